"""robots.txt for the crawler: fetched once per origin, consulted before every request.

A site says in ``/robots.txt`` which paths crawlers may fetch (RFC 9309). The crawler
asks this module before *every* request, including each hop of a redirect, so a page
the site forbids is never requested at all. Parsing is the standard library's
`urllib.robotparser`; what this module adds is the part the RFC leaves to the crawler,
namely what to do when robots.txt itself cannot be read:

- 2xx: obey the file (at most `MAX_ROBOTS_BYTES` of it are read; the RFC asks for at
  least 500 KiB);
- 4xx ("unavailable", including a missing file): everything is allowed;
- 5xx, 429 or no answer ("unreachable"): nothing is allowed, because a server in
  trouble (or asking us to slow down) is exactly the one a crawler must leave alone.

Fetching is not done here: the crawler passes in a coroutine that performs the request
through the same per-host politeness gate as page requests, so robots.txt never
jumps the queue. That keeps this module free of HTTP and easy to test.

Known limits of `urllib.robotparser`, accepted for the sake of using the standard
parser: rules match in file order (the first matching ``Allow``/``Disallow`` wins,
where RFC 9309 says the longest match wins), the ``*`` and ``$`` wildcards are not
understood, and ``Crawl-delay`` must be a whole number of seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

MAX_ROBOTS_BYTES = 512 * 1024

# What the crawler's fetch coroutine returns for robots.txt: the final HTTP status
# (None when the server could not be reached) and the body (possibly truncated).
RobotsFetch = Callable[[str], Awaitable[tuple[int | None, bytes]]]


@dataclass
class RobotsPolicy:
    """The rules of one origin, and how they were obtained (for the crawl report)."""

    origin: str
    parser: RobotFileParser
    source: str  # "file" (obeyed), "unavailable" (4xx: allow all), "unreachable" (5xx/error: deny all)

    def allows(self, url: str, user_agent: str) -> bool:
        return self.parser.can_fetch(user_agent, url)

    def crawl_delay(self, user_agent: str) -> float | None:
        """The site's ``Crawl-delay`` for us, in seconds, if it sets one."""
        delay = self.parser.crawl_delay(user_agent)
        return float(delay) if delay is not None else None


def origin_of(url: str) -> str:
    """scheme://host[:port] -- robots.txt applies per origin, not per domain (RFC 9309 2.3)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def policy_from_response(origin: str, status: int | None, body: bytes) -> RobotsPolicy:
    """Turn the answer to ``GET origin/robots.txt`` into rules, following RFC 9309 2.3.1."""
    parser = RobotFileParser(f"{origin}/robots.txt")
    if status is not None and 200 <= status < 300:
        text = body[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace")
        parser.parse(text.splitlines())
        return RobotsPolicy(origin, parser, "file")
    if status is not None and 400 <= status < 500 and status != 429:
        parser.parse([])  # no rules: everything allowed
        return RobotsPolicy(origin, parser, "unavailable")
    # 5xx, 429 Too Many Requests, or no answer at all.
    parser.parse(["User-agent: *", "Disallow: /"])
    return RobotsPolicy(origin, parser, "unreachable")


class RobotsCache:
    """One `RobotsPolicy` per origin, fetched on first use and kept for the whole run.

    Concurrent callers for a new origin share one fetch (a per-origin lock), so a burst
    of tasks for the same site produces exactly one robots.txt request.
    """

    def __init__(self, fetch: RobotsFetch, user_agent: str) -> None:
        self._fetch = fetch
        self.user_agent = user_agent
        self._policies: dict[str, RobotsPolicy] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def policy_for(self, url: str) -> RobotsPolicy:
        origin = origin_of(url)
        if origin in self._policies:
            return self._policies[origin]
        lock = self._locks.setdefault(origin, asyncio.Lock())
        async with lock:
            if origin not in self._policies:  # another task may have fetched it meanwhile
                status, body = await self._fetch(f"{origin}/robots.txt")
                self._policies[origin] = policy_from_response(origin, status, body)
        return self._policies[origin]

    async def allows(self, url: str) -> bool:
        return (await self.policy_for(url)).allows(url, self.user_agent)

    def known_delay(self, url: str) -> float | None:
        """The Crawl-delay of `url`'s origin if its robots.txt has been read already."""
        policy = self._policies.get(origin_of(url))
        return policy.crawl_delay(self.user_agent) if policy else None

    def sources(self) -> dict[str, str]:
        """origin -> how its rules were obtained; shown in the crawl report."""
        return {origin: policy.source for origin, policy in self._policies.items()}

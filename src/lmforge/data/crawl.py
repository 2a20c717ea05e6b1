"""A polite, resumable web crawler that writes WARC files: `lmforge crawl`.

The crawl is a breadth-first walk over links, starting from seed URLs:

    frontier (URLs to fetch) ──pop──▶ robots.txt allows? ──▶ GET (per-host gate, timeout,
        retries with backoff, manual redirects) ──▶ HTML page? ──▶ WARC records
        ──▶ extract links ──▶ new URLs (in an allowed domain, not too deep, never seen)
        ──push──▶ frontier

Every URL the crawler ever hears of goes into one sqlite table, ``crawl-state.sqlite``
in the output folder; that table *is* both the visited set (a URL is never queued twice)
and the frontier (the rows still ``queued``, in discovery order). Each finished page is
one transaction: its WARC records are flushed first, then the page is marked done and its
links are queued, together. Killing the crawl at any moment therefore loses at most the
pages in flight, and the next run with the same output folder continues the queue
without fetching anything twice.

WARC files are written as ``NAME.warc.gz.open`` and renamed to ``NAME.warc.gz`` when
closed (at rotation or at the end), so a finished name always means a complete file.
After a kill, the next run truncates the leftover ``.open`` file to the last page the
state committed and renames it: records the state never recorded are cut off, and their
pages are fetched again.

Politeness is per host: at most `per_host_concurrency` requests in flight and request
starts at least `per_host_delay` seconds apart (or the site's robots.txt
``Crawl-delay``, when that is longer). robots.txt is read before the first request to
an origin and asked before every request, redirect hops included (`lmforge.data.robots`).

Only successful responses of an allowed content type become pages in the WARC (with
their request and a metadata record naming the referring page, the depth and the
outlinks). Everything else is counted in the report under a reason, and recorded in the
state table, so a skipped URL is not tried again on resume.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import dataclasses
import io
import ipaddress
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from lmforge.cli_parser import add_config_command
from lmforge.data.robots import MAX_ROBOTS_BYTES, RobotsCache

if TYPE_CHECKING:  # httpx is imported where it is used, so that `lmforge --help` stays fast
    import httpx

log = logging.getLogger(__name__)

STATE_FILE = "crawl-state.sqlite"
SOFTWARE = "lmforge-crawler/0.1"

# Why a URL was not stored as a page. One URL counts once, under the first reason.
ROBOTS = "robots"  # robots.txt forbids it (or robots.txt was unreachable)
DOMAIN = "domain"  # outside the allowed domains (as a link, or as a redirect target)
DEPTH = "depth"  # more links away from a seed than max_depth
CONTENT_TYPE = "content-type"  # not one of the allowed content types
TOO_LARGE = "too-large"  # body larger than max_page_bytes (declared or counted)
REDIRECT_LOOP = "redirect-loop"  # a redirect chain came back to a URL it had visited
TOO_MANY_REDIRECTS = "too-many-redirects"  # more than max_redirects hops
DUPLICATE = "duplicate"  # redirects to a page that is already crawled (or being crawled)
HTTP_ERROR = "http-error"  # a 4xx, or a 5xx that outlived the retries
TIMEOUT = "timeout"  # no complete answer within `timeout`, every attempt
NETWORK_ERROR = "network-error"  # connection refused/reset, protocol error, corrupt body

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 60.0  # seconds; a longer Retry-After is capped, not obeyed
DEFAULT_PORTS = {"http": 80, "https": 443}

# Characters left alone when re-quoting a path or a query (RFC 3986 reserved + unreserved + %).
_SAFE_PATH = "/%:@!$&'()*+,;=-._~"
_SAFE_QUERY = _SAFE_PATH + "?"


# ---------------------------------------------------------------------------- config
@dataclass
class CrawlConfig:
    """Everything a crawl needs; loadable with `lmforge.config.load_config(CrawlConfig, ...)`.

    Limits on pages and bytes count the whole crawl in an output folder, across resumed
    runs: ``max_pages: 25`` after a run that stored 10 pages fetches 15 more.
    """

    seeds: list[str] = field(default_factory=list)  # may be empty when resuming
    allowed_domains: list[str] = field(default_factory=list)  # empty: the seeds' hosts; subdomains included
    max_depth: int | None = None  # links away from a seed (seeds are depth 0); None: unlimited
    max_pages: int | None = 1000  # pages stored in the WARC; None: unlimited
    max_bytes: int | None = None  # body bytes downloaded; checked before each new request
    max_page_bytes: int = 5_000_000  # larger bodies are abandoned mid-stream
    per_host_delay: float = 1.0  # seconds between request starts to one host
    per_host_concurrency: int = 2  # requests in flight to one host
    concurrency: int = 16  # requests in flight in total
    timeout: float = 30.0  # seconds for one request, from sending it to its last byte
    retries: int = 3  # extra attempts after a timeout, a network error, 429 or 5xx
    backoff: float = 1.0  # seconds before the first retry; doubles with each further one
    max_redirects: int = 5  # hops followed for one URL
    user_agent: str = f"{SOFTWARE} (+https://github.com/lmforge/lmforge)"
    respect_robots: bool = True  # robots.txt, <meta name=robots content=nofollow>, rel=nofollow
    allowed_content_types: list[str] = field(default_factory=lambda: ["text/html", "application/xhtml+xml"])
    warc_file_bytes: int = 1_000_000_000  # rotate to a new WARC file past this size
    warc_prefix: str = "crawl"

    def __post_init__(self) -> None:
        checks = [
            (self.per_host_concurrency >= 1, "per_host_concurrency must be at least 1"),
            (self.concurrency >= 1, "concurrency must be at least 1"),
            (self.per_host_delay >= 0, "per_host_delay must be >= 0"),
            (self.timeout > 0, "timeout must be > 0"),
            (self.retries >= 0, "retries must be >= 0"),
            (self.backoff >= 0, "backoff must be >= 0"),
            (self.max_redirects >= 0, "max_redirects must be >= 0"),
            (self.max_page_bytes > 0, "max_page_bytes must be > 0"),
            (self.warc_file_bytes > 0, "warc_file_bytes must be > 0"),
            (self.max_depth is None or self.max_depth >= 0, "max_depth must be >= 0"),
            (self.max_pages is None or self.max_pages >= 0, "max_pages must be >= 0"),
            (self.max_bytes is None or self.max_bytes >= 0, "max_bytes must be >= 0"),
            (bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.warc_prefix)), "warc_prefix must be a file name"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"crawl config: {message}")


# ---------------------------------------------------------------------------- URLs
def normalize_url(href: str, base: str | None = None) -> str | None:
    """One spelling per page, so the visited set recognises it; None for what we never fetch.

    Resolves `href` against `base`, drops the fragment (same document) and default ports,
    lower-cases scheme and host (IDNA for non-ASCII hosts), removes dot segments and
    user:password@, and percent-encodes what needs it (existing escapes are kept).
    Only http and https survive: mailto:, javascript:, file:, data: ... give None.
    """
    href = re.sub(r"[\t\r\n]", "", href).strip()  # browsers ignore these inside URLs
    if not href:
        return None
    try:
        parts = urlsplit(urljoin(base, href) if base else href)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            return None
        host = parts.hostname.rstrip(".")  # urllib lower-cases it
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        port = parts.port
    except (ValueError, UnicodeError):  # a bad port, a bad IPv6 literal, an invalid IDN
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    path = quote(_remove_dot_segments(parts.path or "/"), safe=_SAFE_PATH)
    query = quote(parts.query, safe=_SAFE_QUERY)
    return urlunsplit((scheme, netloc, path, query, ""))


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4: /a/./b/../c -> /a/c (urljoin does this only for relative references)."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if len(out) > 1:  # never pop the empty segment before the leading slash
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # /a/b/.. names the folder /a/
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def host_allowed(host: str, domains: Sequence[str]) -> bool:
    """True when `host` is one of `domains` or a subdomain of one (IP addresses: exact match)."""
    try:
        ipaddress.ip_address(host)
        return host in domains
    except ValueError:
        return any(host == d or host.endswith("." + d) for d in domains)


def _clean_domain(domain: str) -> str:
    """'HTTPS://Docs.Example.com:8080/x' or '.example.com' -> the bare lower-case host."""
    domain = domain.strip().lower()
    if "://" in domain:
        domain = urlsplit(domain).hostname or ""
    domain = domain.strip(".")
    if domain.count(":") == 1:  # host:port (an IPv6 address has several colons)
        domain = domain.split(":")[0]
    return domain.strip("[]")


# ---------------------------------------------------------------------------- links
class _LinkParser(HTMLParser):
    """Collects the hrefs a crawler may follow, plus <base href> and robots meta hints."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.links: list[tuple[str, bool]] = []  # (href, rel=nofollow)
        self.meta_nofollow = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag in ("a", "area") and "href" in attributes:
            rel = attributes.get("rel", "").lower().split()
            self.links.append((attributes["href"], "nofollow" in rel))
        elif tag in ("frame", "iframe") and attributes.get("src"):
            self.links.append((attributes["src"], False))
        elif tag == "base" and self.base is None and attributes.get("href"):
            self.base = attributes["href"]
        elif tag == "meta" and attributes.get("name", "").lower() == "robots":
            directives = {d.strip() for d in attributes.get("content", "").lower().split(",")}
            self.meta_nofollow = self.meta_nofollow or bool(directives & {"nofollow", "none"})


def _html_text(content: bytes, content_type: str | None) -> str:
    """Decode a page just well enough to read its links: never fails, never guesses hard."""
    from lmforge.data.decode import charset_of

    name = charset_of(content, content_type) or "utf-8"
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        codec = "utf-8"
    return content.decode(codec, errors="replace")


def extract_links(content: bytes, page_url: str, content_type: str | None = None, *,
                  obey_nofollow: bool = True) -> list[str]:
    """The normalised, de-duplicated http(s) links of an HTML page, in document order.

    Relative links resolve against ``<base href>`` if the page has one, else against
    `page_url` (the final URL after redirects). With `obey_nofollow`, a page marked
    ``<meta name="robots" content="nofollow">`` yields no links and ``rel="nofollow"``
    links are left out.
    """
    parser = _LinkParser()
    parser.feed(_html_text(content, content_type))
    parser.close()
    if obey_nofollow and parser.meta_nofollow:
        return []
    base = normalize_url(parser.base, page_url) if parser.base else None
    found: dict[str, None] = {}
    for href, nofollow in parser.links:
        if nofollow and obey_nofollow:
            continue
        url = normalize_url(href, base or page_url)
        if url is not None:
            found[url] = None
    return list(found)


class ContentEncodingError(ValueError):
    """A body in a Content-Encoding we did not ask for, or (`corrupt`) one that does not inflate."""

    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


def decode_content(raw: bytes, encoding: str, limit: int) -> bytes:
    """Undo gzip/deflate (we ask for nothing else) with a ceiling, so a zip bomb stops at `limit`.

    The WARC keeps the body as it came over the wire; only link extraction needs it decoded.
    Raises `ContentEncodingError`, or returns more than `limit` bytes to say "too large".
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ContentEncodingError(f"unsupported Content-Encoding {encoding!r}")
    # wbits 47 reads gzip and zlib headers; some servers send raw deflate for "deflate".
    for wbits in (47, -15) if encoding == "deflate" else (47,):
        try:
            inflater = zlib.decompressobj(wbits)
            return inflater.decompress(raw, limit + 1)
        except zlib.error as err:
            error = err
    raise ContentEncodingError(f"corrupt {encoding} body: {error}", corrupt=True)


# ---------------------------------------------------------------------------- politeness
class HostGate:
    """Politeness towards one host: at most `concurrency` requests in flight, and request
    starts at least `delay` seconds apart (whatever the concurrency).

    Every request to the host -- robots.txt, retries, redirect hops -- passes through
    `request()`. The lock hands out start times one by one, so two requests can never
    share a slot in the schedule.
    """

    def __init__(self, concurrency: int, delay: float) -> None:
        self.delay = delay
        self._slots = asyncio.Semaphore(concurrency)
        self._turn = asyncio.Lock()
        self._next_start = 0.0

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        async with self._slots:
            async with self._turn:
                loop = asyncio.get_running_loop()
                wait = self._next_start - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._next_start = loop.time() + self.delay
            yield


class Frontier:
    """The URLs waiting in memory: one FIFO per host, served round-robin.

    A host whose `per_host` slots are all taken by running visits is passed over, so a
    single busy site cannot hold up the total concurrency while other sites wait.
    The persistent copy of the frontier is the state table; this is its working set.
    """

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._queues: dict[str, deque[str]] = {}
        self._hosts: deque[str] = deque()  # hosts with queued URLs, in round-robin order
        self.busy: Counter[str] = Counter()

    def push(self, url: str) -> None:
        host = host_of(url)
        if host not in self._queues:
            self._queues[host] = deque()
            self._hosts.append(host)
        self._queues[host].append(url)

    def pop(self) -> str | None:
        """The next URL of the next host with a free slot (marked busy), or None."""
        for _ in range(len(self._hosts)):
            host = self._hosts[0]
            self._hosts.rotate(-1)
            if self.busy[host] < self.per_host:
                url = self._queues[host].popleft()
                if not self._queues[host]:
                    del self._queues[host]
                    self._hosts.remove(host)
                self.busy[host] += 1
                return url
        return None

    def release(self, url: str) -> None:
        self.busy[host_of(url)] -= 1

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())


# ---------------------------------------------------------------------------- state
_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url TEXT PRIMARY KEY,      -- normalised; the visited set
    depth INTEGER NOT NULL,    -- links away from a seed
    via TEXT,                  -- the page that linked here (NULL for seeds)
    status TEXT NOT NULL,      -- queued | fetched | redirected | skipped
    reason TEXT,               -- why skipped (see the reason constants)
    detail TEXT,
    http_status INTEGER,
    bytes INTEGER,             -- body bytes downloaded for this URL
    final_url TEXT,            -- where a redirected URL ended
    warc_file TEXT,            -- fetched pages: finished WARC file name ...
    warc_end INTEGER,          -- ... and the offset just past the page's records
    updated REAL
);
CREATE INDEX IF NOT EXISTS urls_status ON urls(status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class UrlRow:
    url: str
    depth: int
    via: str | None
    status: str
    reason: str | None


class CrawlState:
    """The visited set and the frontier, persisted in sqlite and updated as the crawl goes.

    sqlite gives atomic multi-row updates for free: a page, its redirect hops and the
    links it adds to the frontier commit together or not at all.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)  # explicit transactions only
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (tests, a curious user) never block us
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; fsync at checkpoints
        self._db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, url: str) -> UrlRow | None:
        query = "SELECT url, depth, via, status, reason FROM urls WHERE url = ?"
        row = self._db.execute(query, (url,)).fetchone()
        return UrlRow(*row) if row else None

    def add(self, url: str, depth: int, via: str | None, status: str = "queued",
            reason: str | None = None, detail: str | None = None) -> None:
        row = (url, depth, via, status, reason, detail, time.time())
        self._db.execute("INSERT INTO urls (url, depth, via, status, reason, detail, updated)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def requeue(self, url: str, depth: int, via: str | None) -> None:
        self._db.execute("UPDATE urls SET status = 'queued', reason = NULL, detail = NULL, depth = ?,"
                         " via = ?, updated = ? WHERE url = ?", (depth, via, time.time(), url))

    def set_depth(self, url: str, depth: int, via: str | None) -> None:
        self._db.execute("UPDATE urls SET depth = ?, via = ? WHERE url = ?", (depth, via, url))

    def finish(self, url: str, depth: int, via: str | None, status: str, **fields: Any) -> None:
        """Insert or update `url` with its outcome; `fields` are column values (reason, bytes, ...)."""
        columns = ["status", *fields, "updated"]
        values = [status, *fields.values(), time.time()]
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns)
        self._db.execute(f"INSERT INTO urls (url, depth, via, {names}) VALUES (?, ?, ?, {marks})"
                         f" ON CONFLICT(url) DO UPDATE SET {updates}", (url, depth, via, *values))

    def queued(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT url FROM urls WHERE status = 'queued' ORDER BY rowid")]

    def count(self, status: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM urls WHERE status = ?", (status,)).fetchone()[0]

    def warc_ends(self) -> dict[str, int]:
        """WARC file name -> offset just past its last committed page."""
        rows = self._db.execute("SELECT warc_file, MAX(warc_end) FROM urls WHERE warc_file IS NOT NULL"
                                " GROUP BY warc_file")
        return {name: end for name, end in rows}

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value ="
                         " excluded.value", (key, json.dumps(value)))

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------------------- WARC
@dataclass
class Page:
    """A successful fetch: everything the WARC records and the link extractor need."""

    url: str
    depth: int
    via: str | None
    redirected_from: list[str]
    date: datetime
    status: int
    reason_phrase: str
    http_version: str
    request_target: str
    request_headers: list[tuple[str, str]]
    response_headers: list[tuple[str, str]]
    body: bytes  # as on the wire (Content-Encoding kept; Transfer-Encoding undone by httpx)
    content: bytes  # Content-Encoding undone, for link extraction
    mime: str  # media type from Content-Type, lower case, without parameters
    ip: str | None
    fetch_seconds: float
    links: list[str] = field(default_factory=list)


class WarcSink:
    """Appends pages to gzip WARC files named PREFIX-RUNSTART-SERIAL.warc.gz, rotated by size.

    A file is written as ``NAME.open`` and renamed when closed. On start, leftover
    ``.open`` files of a killed run are cut back to `committed` (name -> end offset of the
    last page the state knows about) and renamed, or removed if they hold no such page.
    """

    def __init__(self, directory: Path, prefix: str, max_file_bytes: int, info: dict[str, str],
                 committed: dict[str, int]) -> None:
        self.directory = directory
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes
        self.info = info
        self.finished: list[Path] = []  # files closed during this run (recovered ones included)
        self._stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self._handle: io.BufferedWriter | None = None
        self._writer: Any = None
        self._name = ""
        self._recover(committed)
        serials = [int(m.group(1)) for p in directory.iterdir()
                   if (m := re.fullmatch(rf"{re.escape(prefix)}-\d+-(\d+)\.warc\.gz(?:\.open)?", p.name))]
        self._serial = max(serials, default=0)

    def _recover(self, committed: dict[str, int]) -> None:
        for leftover in sorted(self.directory.glob(f"{self.prefix}-*.warc.gz.open")):
            name = leftover.name.removesuffix(".open")
            end = min(committed.get(name, 0), leftover.stat().st_size)
            if end == 0:
                leftover.unlink()
                log.info("removed %s: it holds no committed page", leftover.name)
                continue
            os.truncate(leftover, end)
            os.replace(leftover, self.directory / name)
            self.finished.append(self.directory / name)
            log.info("recovered %s up to byte %d", name, end)

    def _open(self) -> None:
        from warcio.warcwriter import WARCWriter

        self._serial += 1
        self._name = f"{self.prefix}-{self._stamp}-{self._serial:05d}.warc.gz"
        self._handle = open(self.directory / f"{self._name}.open", "wb")  # noqa: SIM115 - closed in close()
        self._writer = WARCWriter(self._handle, gzip=True, warc_version="1.1")
        self._writer.write_record(self._writer.create_warcinfo_record(self._name, self.info))

    def close(self) -> None:
        """Finish the current file: flush to disk, then give it its final name."""
        if self._handle is None:
            return
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None
        os.replace(self.directory / f"{self._name}.open", self.directory / self._name)
        self.finished.append(self.directory / self._name)

    def write(self, page: Page) -> tuple[str, int]:
        """Write response, request and metadata records; return (file name, end offset)."""
        from warcio.statusandheaders import StatusAndHeaders
        from warcio.timeutils import datetime_to_iso_date

        if self._handle is not None and self._handle.tell() >= self.max_file_bytes:
            self.close()
        if self._handle is None:
            self._open()
        assert self._handle is not None
        writer = self._writer
        date = datetime_to_iso_date(page.date.replace(tzinfo=None), use_micros=True)
        common = {"WARC-Date": date, **({"WARC-IP-Address": page.ip} if page.ip else {})}
        http = StatusAndHeaders(f"{page.status} {page.reason_phrase}".strip(), page.response_headers,
                                protocol=page.http_version)
        response = writer.create_warc_record(page.url, "response", payload=io.BytesIO(page.body),
                                             length=len(page.body), http_headers=http,
                                             warc_headers_dict=common)
        response_id = response.rec_headers.get_header("WARC-Record-ID")
        linked = {**common, "WARC-Concurrent-To": response_id}
        request_head = StatusAndHeaders(f"GET {page.request_target} HTTP/1.1", page.request_headers,
                                        is_http_request=True)
        request = writer.create_warc_record(page.url, "request", payload=io.BytesIO(b""), length=0,
                                            http_headers=request_head, warc_headers_dict=linked)
        fields = [("via", page.via), ("hopsFromSeed", str(page.depth)),
                  ("fetchTimeMs", str(round(page.fetch_seconds * 1000)))]
        fields += [("redirectedFrom", url) for url in page.redirected_from]
        fields += [("outlink", url) for url in page.links]
        block = "".join(f"{name}: {value}\r\n" for name, value in fields if value).encode("utf-8")
        metadata = writer.create_warc_record(page.url, "metadata", payload=io.BytesIO(block),
                                             length=len(block), warc_content_type="application/warc-fields",
                                             warc_headers_dict=linked)
        for record in (response, request, metadata):
            writer.write_record(record)
        self._handle.flush()  # the state commits right after; a killed process keeps these bytes
        return self._name, self._handle.tell()


# ---------------------------------------------------------------------------- report
@dataclass
class CrawlReport:
    """What a run did. `pages`, `requests`, `bytes` and `skipped` count this run only;
    `total_pages` and `total_bytes` the whole crawl in `output_dir`."""

    output_dir: str
    stopped: str = "running"  # frontier empty | max_pages | max_bytes | interrupted
    pages: int = 0
    total_pages: int = 0
    requests: int = 0
    retries: int = 0
    redirects: int = 0
    bytes: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    queued: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    robots: dict[str, str] = field(default_factory=dict)  # origin -> file | unavailable | unreachable
    warc_files: list[str] = field(default_factory=list)

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["pages_per_second"] = round(self.pages_per_second, 3)
        data["seconds"] = round(self.seconds, 3)
        return data

    def to_table(self) -> str:
        rows = [
            ("stopped", self.stopped),
            ("pages", f"{self.pages} this run, {self.total_pages} in total"),
            ("pages/s", f"{self.pages_per_second:.2f}"),
            ("requests", f"{self.requests} ({self.retries} retries, {self.redirects} redirects followed)"),
            ("downloaded", f"{_megabytes(self.bytes)} this run, {_megabytes(self.total_bytes)} in total"),
            ("time", f"{self.seconds:.1f} s"),
            ("still queued", str(self.queued)),
        ]
        by_count = sorted(self.skipped.items(), key=lambda item: -item[1])
        rows += [(f"skipped: {reason}", str(n)) for reason, n in by_count]
        rows += [(f"robots.txt {origin}", source) for origin, source in self.robots.items()]
        rows += [("warc", name) for name in self.warc_files]
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------- the crawler
@dataclass
class _Skip:
    reason: str
    detail: str


@dataclass
class _Visit:
    """One URL taken from the frontier, followed through its redirects."""

    url: str
    depth: int
    via: str | None
    chain: list[str]  # the URL, then each redirect target
    downloaded: int = 0  # body bytes of every attempt and hop


@dataclass
class _Attempt:
    """One try at one URL: a page, a redirect (location), or a skip that may be retried."""

    page: Page | None = None
    location: str | None = None
    skip: _Skip | None = None
    retryable: bool = False
    retry_after: float | None = None


class Crawler:
    """One run of a crawl into `output_dir`; `await run()` once. See the module docstring."""

    def __init__(self, config: CrawlConfig, output_dir: str | os.PathLike[str], *,
                 on_progress: Callable[[CrawlReport], None] | None = None,
                 stop: asyncio.Event | None = None) -> None:
        self.config = config
        self.output_dir = Path(output_dir)
        self.on_progress = on_progress
        self.stop = stop or asyncio.Event()
        self.report = CrawlReport(output_dir=str(self.output_dir))
        self._skipped: Counter[str] = Counter()
        self._frontier = Frontier(config.per_host_concurrency)
        self._gates: dict[str, HostGate] = {}
        self._claimed: set[str] = set()  # URLs a running visit is fetching (its redirect hops included)
        self._too_deep: set[str] = set()  # URLs skipped for depth in this run (they may be re-queued)
        self._started = 0.0
        self._domains: list[str] = []
        self._state: CrawlState
        self._warc: WarcSink
        self._client: httpx.AsyncClient
        self._robots = RobotsCache(self._fetch_robots, config.user_agent)
        self._content_types = {t.strip().lower() for t in config.allowed_content_types}

    # ----------------------------------------------------------------- setup and main loop
    def _open(self) -> None:
        """Open (or resume) the state, queue the seeds, recover WARC files of a killed run."""
        seeds = [normalize_url(s) for s in self.config.seeds]
        if bad := [s for s, n in zip(self.config.seeds, seeds) if n is None]:
            raise ValueError(f"seed URLs must be http(s) URLs with a host: {', '.join(bad)}")
        state_path = self.output_dir / STATE_FILE
        if not seeds and not state_path.exists():
            raise ValueError(f"no seed URLs, and {self.output_dir} holds no crawl to resume")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._state = CrawlState(state_path)
        all_seeds = list(dict.fromkeys([*self._state.get_meta("seeds", []), *(s for s in seeds if s)]))
        domains = self.config.allowed_domains or [host_of(s) for s in all_seeds]
        self._domains = sorted({_clean_domain(d) for d in domains} - {""})
        self.report.total_pages = self._state.count("fetched")
        self.report.total_bytes = self._state.get_meta("bytes", 0)
        for url in self._state.queued():  # the frontier of an earlier run, in its order
            self._frontier.push(url)
        with self._state.transaction():
            self._state.set_meta("seeds", all_seeds)
            for seed in seeds:
                if seed is not None:
                    self._discover(seed, 0, None)
        info = {"software": SOFTWARE, "format": "WARC File Format 1.1", "http-header-user-agent":
                self.config.user_agent, "robots": "obey" if self.config.respect_robots else "ignore",
                "isPartOf": self.output_dir.name}
        self._warc = WarcSink(self.output_dir, self.config.warc_prefix, self.config.warc_file_bytes, info,
                              self._state.warc_ends())

    async def run(self) -> CrawlReport:
        import httpx

        self._started = time.monotonic()
        try:
            self._open()
            headers = {"User-Agent": self.config.user_agent, "Accept-Encoding": "gzip, deflate",
                       "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1"}
            limits = httpx.Limits(max_connections=self.config.concurrency + 2,
                                  max_keepalive_connections=self.config.concurrency)
            async with httpx.AsyncClient(headers=headers, limits=limits, follow_redirects=False,
                                         timeout=httpx.Timeout(self.config.timeout)) as client:
                self._client = client
                await self._dispatch()
        finally:
            if hasattr(self, "_warc"):
                self._warc.close()
            self._snapshot()
            if hasattr(self, "_state"):
                self._state.close()
        return self.report

    async def _dispatch(self) -> None:
        """Start visits while the limits allow, up to `concurrency` at once, until none are left."""
        cfg = self.config
        running: set[asyncio.Task[None]] = set()
        stop_wait = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                limit = self._limit_reached()
                while limit is None and len(running) < cfg.concurrency and (
                        cfg.max_pages is None or self.report.total_pages + len(running) < cfg.max_pages):
                    url = self._frontier.pop()
                    if url is None:
                        break
                    running.add(asyncio.create_task(self._visit(url), name=url))
                if not running:
                    self.report.stopped = limit or "frontier empty"
                    return
                done, _ = await asyncio.wait(running | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {stop_wait}:
                    running.discard(task)
                    task.result()  # a bug in a visit ends the crawl with its traceback
            self.report.stopped = "interrupted"
        finally:
            stop_wait.cancel()
            for task in running:
                task.cancel()  # their URLs stay queued in the state: fetched again on resume
            await asyncio.gather(*running, stop_wait, return_exceptions=True)

    def _limit_reached(self) -> str | None:
        cfg = self.config
        if cfg.max_pages is not None and self.report.total_pages >= cfg.max_pages:
            return "max_pages"
        if cfg.max_bytes is not None and self.report.total_bytes >= cfg.max_bytes:
            return "max_bytes"
        return None

    def _snapshot(self) -> CrawlReport:
        report = self.report
        report.seconds = time.monotonic() - self._started
        report.queued = self._state.count("queued") if hasattr(self, "_state") else 0
        report.skipped = dict(self._skipped)
        report.robots = self._robots.sources()
        report.warc_files = [p.name for p in self._warc.finished] if hasattr(self, "_warc") else []
        return report

    # ----------------------------------------------------------------- discovery
    def _discover(self, url: str, depth: int, via: str | None) -> None:
        """Queue a URL we just heard of, unless seen before, off-domain or too deep.

        Called inside a state transaction. A URL first seen too deep (or queued deeper
        than now) gets the shorter path: concurrency makes the walk only roughly
        breadth-first, and depth limits should not depend on which page happened to
        finish first.
        """
        max_depth = self.config.max_depth
        too_deep = max_depth is not None and depth > max_depth
        row = self._state.get(url)
        if row is None:
            if not host_allowed(host_of(url), self._domains):
                self._state.add(url, depth, via, "skipped", DOMAIN, f"host {host_of(url)} not allowed")
                self._skipped[DOMAIN] += 1
            elif too_deep:
                self._state.add(url, depth, via, "skipped", DEPTH, f"depth {depth} > {max_depth}")
                self._skipped[DEPTH] += 1
                self._too_deep.add(url)
            else:
                self._state.add(url, depth, via)
                self._frontier.push(url)
        elif row.status == "queued" and depth < row.depth:
            self._state.set_depth(url, depth, via)
        elif row.status == "skipped" and row.reason == DEPTH and not too_deep:
            self._state.requeue(url, depth, via)
            if url in self._too_deep:  # counted as skipped earlier in this run: not any more
                self._too_deep.discard(url)
                self._skipped[DEPTH] -= 1
            self._frontier.push(url)

    # ----------------------------------------------------------------- one URL
    async def _visit(self, url: str) -> None:
        row = self._state.get(url)
        if row is None or row.status != "queued" or url in self._claimed:
            self._frontier.release(url)
            return  # fetched meanwhile (or being fetched) as the target of a redirect
        visit = _Visit(url, row.depth, row.via, chain=[url])
        self._claimed.add(url)
        try:
            started = time.monotonic()
            outcome = await self._follow(visit)
            if isinstance(outcome, Page):
                outcome.depth, outcome.via, outcome.redirected_from = visit.depth, visit.via, visit.chain[:-1]
                outcome.fetch_seconds = time.monotonic() - started
                if outcome.mime in ("text/html", "application/xhtml+xml"):
                    outcome.links = await asyncio.to_thread(
                        extract_links, outcome.content, outcome.url, self._header(outcome, "content-type"),
                        obey_nofollow=self.config.respect_robots)
                self._store_page(outcome, visit)
            else:
                self._store_skip(visit, outcome)
        finally:
            self._claimed.difference_update(visit.chain)
            self._frontier.release(url)
            if self.on_progress is not None:
                self.on_progress(self._snapshot())

    async def _follow(self, visit: _Visit) -> Page | _Skip:
        """Fetch the last URL of the chain, following redirects by hand so that every hop is checked."""
        chain = visit.chain
        while True:
            url = chain[-1]
            if len(chain) > 1 and not host_allowed(host_of(url), self._domains):
                return _Skip(DOMAIN, f"redirected off the allowed domains to {url}")
            if self.config.respect_robots:
                policy = await self._robots.policy_for(url)
                if not policy.allows(url, self.config.user_agent):
                    why = "is unreachable" if policy.source == "unreachable" else "disallows this path"
                    return _Skip(ROBOTS, f"robots.txt of {policy.origin} {why}")
            result = await self._fetch(url, visit)
            if not isinstance(result, str):
                return result
            target = normalize_url(result, url)
            if target is None:
                return _Skip(HTTP_ERROR, f"redirect to an unusable location {result!r}")
            if target in chain:
                return _Skip(REDIRECT_LOOP, " -> ".join([*chain, target]))
            if len(chain) > self.config.max_redirects:
                return _Skip(TOO_MANY_REDIRECTS, f"more than {self.config.max_redirects} redirects")
            row = self._state.get(target)
            if target in self._claimed or (row is not None and row.status in ("fetched", "redirected")):
                return _Skip(DUPLICATE, f"redirects to {target}, crawled already")
            chain.append(target)
            self._claimed.add(target)
            self.report.redirects += 1

    def _gate(self, url: str) -> HostGate:
        host = host_of(url)
        if host not in self._gates:
            self._gates[host] = HostGate(self.config.per_host_concurrency, self.config.per_host_delay)
        gate = self._gates[host]
        robots_delay = self._robots.known_delay(url) if self.config.respect_robots else None
        gate.delay = max(self.config.per_host_delay, robots_delay or 0.0)
        return gate

    def _backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1, 2, ...): doubling, or Retry-After."""
        wait = self.config.backoff * 2 ** (attempt - 1)
        return max(wait, min(retry_after or 0.0, MAX_RETRY_AFTER))

    async def _fetch(self, url: str, visit: _Visit) -> Page | _Skip | str:
        """GET `url` with retries: a Page, a redirect location (str), or a _Skip."""
        attempt = _Attempt()
        for number in range(self.config.retries + 1):
            if number:
                self.report.retries += 1
                await asyncio.sleep(self._backoff(number, attempt.retry_after))
            async with self._gate(url).request():
                attempt = await self._attempt(url, visit)
            if not attempt.retryable:
                break
            log.debug("retryable failure for %s: %s", url, attempt.skip)
        if attempt.page is not None:
            return attempt.page
        if attempt.location is not None:
            return attempt.location
        assert attempt.skip is not None
        return attempt.skip

    async def _attempt(self, url: str, visit: _Visit) -> _Attempt:
        import httpx

        self.report.requests += 1
        date = datetime.now(UTC)
        try:
            async with asyncio.timeout(self.config.timeout), self._client.stream("GET", url) as response:
                return await self._read(url, response, date, visit)
        except (TimeoutError, httpx.TimeoutException):
            return _Attempt(skip=_Skip(TIMEOUT, f"no complete answer within {self.config.timeout:g} s"),
                            retryable=True)
        except httpx.TransportError as err:
            return _Attempt(skip=_Skip(NETWORK_ERROR, f"{type(err).__name__}: {err}"), retryable=True)
        except httpx.InvalidURL as err:  # normalize_url let through something httpx refuses
            return _Attempt(skip=_Skip(NETWORK_ERROR, f"invalid URL: {err}"))
        except ContentEncodingError as err:  # corrupt: probably cut short, worth another try
            reason = NETWORK_ERROR if err.corrupt else CONTENT_TYPE
            return _Attempt(skip=_Skip(reason, str(err)), retryable=err.corrupt)

    async def _read(self, url: str, response: httpx.Response, date: datetime, visit: _Visit) -> _Attempt:
        """Decide from the headers whether the body is wanted, then stream it within the size limit."""
        cfg = self.config
        status = response.status_code
        if 300 <= status < 400 and status != 304 and "location" in response.headers:
            return _Attempt(location=response.headers["location"])
        if status in RETRY_STATUSES or status >= 500:
            retry_after = response.headers.get("retry-after", "")
            return _Attempt(skip=_Skip(HTTP_ERROR, f"HTTP {status}"), retryable=True,
                            retry_after=float(retry_after) if retry_after.isdigit() else None)
        if not 200 <= status < 300:
            return _Attempt(skip=_Skip(HTTP_ERROR, f"HTTP {status}"))
        content_type = response.headers.get("content-type")
        mime = (content_type or "").split(";")[0].strip().lower()
        if mime not in self._content_types:
            return _Attempt(skip=_Skip(CONTENT_TYPE, mime or "no Content-Type"))
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cfg.max_page_bytes:
            return _Attempt(skip=_Skip(TOO_LARGE, f"Content-Length {declared} > {cfg.max_page_bytes}"))
        stream = response.extensions.get("network_stream")  # asked now: gone once the body is read
        server = stream.get_extra_info("server_addr") if stream is not None else None
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            visit.downloaded += len(chunk)
            self._count_bytes(len(chunk))
            if size > cfg.max_page_bytes:
                return _Attempt(skip=_Skip(TOO_LARGE, f"body over {cfg.max_page_bytes} bytes, abandoned"))
            chunks.append(chunk)
        body = b"".join(chunks)
        content = decode_content(body, response.headers.get("content-encoding", ""), cfg.max_page_bytes)
        if len(content) > cfg.max_page_bytes:
            return _Attempt(skip=_Skip(TOO_LARGE, f"body inflates past {cfg.max_page_bytes} bytes"))
        request = response.request
        page = Page(
            url=url, depth=0, via=None, redirected_from=[], date=date, status=status,
            reason_phrase=response.reason_phrase, http_version=response.http_version,
            request_target=request.url.raw_path.decode("ascii"),
            request_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            # httpx has undone chunked transfer coding, so the header would now lie about the body.
            response_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw
                              if k.lower() != b"transfer-encoding"],
            body=body, content=content, mime=mime,
            ip=str(server[0]) if isinstance(server, tuple) else None, fetch_seconds=0.0)
        return _Attempt(page=page)

    @staticmethod
    def _header(page: Page, name: str) -> str | None:
        return next((v for k, v in page.response_headers if k.lower() == name), None)

    async def _fetch_robots(self, robots_url: str) -> tuple[int | None, bytes]:
        """robots.txt for `RobotsCache`: through the host gate, up to 5 redirects, retried on 5xx."""
        status: int | None = None
        body = b""
        for number in range(self.config.retries + 1):
            if number:
                await asyncio.sleep(self._backoff(number))
            status, body = await self._robots_once(robots_url)
            if status is not None and status < 500 and status != 429:
                break
        log.debug("robots.txt %s: status %s, %d bytes", robots_url, status, len(body))
        return status, body

    async def _robots_once(self, url: str) -> tuple[int | None, bytes]:
        import httpx

        for _ in range(6):  # RFC 9309: follow at least five redirects
            self.report.requests += 1
            try:
                async with self._gate(url).request(), asyncio.timeout(self.config.timeout), \
                        self._client.stream("GET", url) as response:
                    location = response.headers.get("location")
                    if response.is_redirect and location:
                        url = urljoin(url, location)
                        continue
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= MAX_ROBOTS_BYTES:
                            break
                    self._count_bytes(len(body))
                    return response.status_code, body
            except (TimeoutError, httpx.HTTPError, httpx.InvalidURL):
                return None, b""
        return 404, b""  # too many redirects: RFC 9309 lets us treat robots.txt as unavailable

    def _count_bytes(self, n: int) -> None:
        """Body bytes as they arrive: max_bytes is checked against the live total."""
        self.report.bytes += n
        self.report.total_bytes += n

    # ----------------------------------------------------------------- recording outcomes
    def _store_page(self, page: Page, visit: _Visit) -> None:
        """WARC first, then one state transaction: the page, its redirect hops, its links."""
        warc_file, warc_end = self._warc.write(page)
        with self._state.transaction():
            for hop in visit.chain[:-1]:
                self._state.finish(hop, page.depth, page.via, "redirected", final_url=page.url)
            self._state.finish(page.url, page.depth, page.via, "fetched", reason=None, detail=None,
                               http_status=page.status, bytes=visit.downloaded, warc_file=warc_file,
                               warc_end=warc_end)
            for link in page.links:
                self._discover(link, page.depth + 1, page.url)
            self._state.set_meta("bytes", self.report.total_bytes)
        self.report.pages += 1
        self.report.total_pages += 1
        log.debug("page %s (%d bytes, %d links)", page.url, len(page.body), len(page.links))

    def _store_skip(self, visit: _Visit, skip: _Skip) -> None:
        with self._state.transaction():
            for url in visit.chain:  # the URL and any redirect hops share the outcome
                last = url == visit.chain[-1]
                self._state.finish(url, visit.depth, visit.via, "skipped", reason=skip.reason,
                                   detail=skip.detail, bytes=visit.downloaded if last else 0)
            self._state.set_meta("bytes", self.report.total_bytes)
        self._skipped[skip.reason] += 1
        log.debug("skipped %s: %s (%s)", visit.url, skip.reason, skip.detail)


# ---------------------------------------------------------------------------- entry points
async def crawl(config: CrawlConfig, output_dir: str | os.PathLike[str], *,
                on_progress: Callable[[CrawlReport], None] | None = None,
                stop: asyncio.Event | None = None) -> CrawlReport:
    """Crawl into `output_dir` (WARC files + state), resuming whatever crawl is already there.

    `on_progress` is called with a report snapshot after every URL; setting `stop` ends
    the run early (in-flight URLs stay queued for the next run).
    """
    return await Crawler(config, output_dir, on_progress=on_progress, stop=stop).run()


def run_crawl(config: CrawlConfig, output_dir: str | os.PathLike[str], *,
              on_progress: Callable[[CrawlReport], None] | None = None,
              handle_signals: bool = False) -> CrawlReport:
    """Synchronous `crawl`. With `handle_signals`, the first Ctrl-C (or SIGTERM) stops the
    crawl cleanly -- WARC closed, state saved, report returned -- and a second one aborts."""

    async def main() -> CrawlReport:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if handle_signals:
            def request_stop(sig: signal.Signals) -> None:
                print(f"\nlmforge crawl: {sig.name}, stopping (again to abort)", file=sys.stderr)
                stop.set()
                loop.remove_signal_handler(sig)  # the next one gets the default behaviour

            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, request_stop, sig)
                    installed.append(sig)
        try:
            return await crawl(config, output_dir, on_progress=on_progress, stop=stop)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    return asyncio.run(main())


# ---------------------------------------------------------------------------- command line
class _ProgressLine:
    """Pages, MB and pages/s on stderr: rewritten in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 0.5 if self.tty else 10.0
        self._last = 0.0

    def __call__(self, report: CrawlReport, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.every:
            return
        self._last = now
        line = (f"crawl: {report.pages} pages, {_megabytes(report.bytes)}, "
                f"{report.pages_per_second:.1f} pages/s, {report.queued} queued, "
                f"{sum(report.skipped.values())} skipped")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        if final and self.tty:
            self.stream.write("\n")
        self.stream.flush()


def _cmd_crawl(args: argparse.Namespace) -> int:
    from lmforge.config import load_config

    config = load_config(CrawlConfig, args.config, args.overrides)
    flags = {"seeds": args.seeds or None, "max_pages": args.max_pages, "max_depth": args.max_depth,
             "max_bytes": args.max_bytes, "allowed_domains": args.allow_domain, "per_host_delay": args.delay,
             "concurrency": args.concurrency}
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    progress = None if args.quiet else _ProgressLine()
    report = run_crawl(config, args.output, on_progress=progress, handle_signals=True)
    if progress is not None:
        progress(report, final=True)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_table())
    return 130 if report.stopped == "interrupted" else 0


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``lmforge crawl`` to the `add_subparsers()` object of the main parser."""
    help_text = "crawl websites politely into WARC files (resumable: run again to continue)"
    p = add_config_command(sub, "crawl", config_help="YAML file with CrawlConfig fields (default: none)",
                           help=help_text, description=help_text)
    p.add_argument("seeds", nargs="*", metavar="SEED", help="start URLs (optional when resuming --output)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="WARC files and crawl state go here")
    p.add_argument("--max-pages", type=int, metavar="N", help="stop after N pages in total (default: 1000)")
    p.add_argument("--max-depth", type=int, metavar="N",
                   help="follow links at most N steps from a seed (default: no limit)")
    p.add_argument("--max-bytes", type=int, metavar="N",
                   help="start no request after N body bytes in total (default: no limit)")
    p.add_argument("--allow-domain", action="append", metavar="DOMAIN",
                   help="crawl this domain and its subdomains (repeatable; default: the seeds' hosts)")
    p.add_argument("--delay", type=float, metavar="S",
                   help="seconds between request starts to one host (default: 1.0)")
    p.add_argument("--concurrency", type=int, metavar="N", help="requests in flight in total (default: 16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_crawl)
    return p

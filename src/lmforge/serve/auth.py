"""API keys: `Authorization: Bearer KEY`, as OpenAI's clients send it.

With a key configured every API route requires it (`/health`, the playground page and
its static files stay open: the page asks for the key itself). The comparison is
constant-time (`hmac.compare_digest` over the UTF-8 bytes), so the time an answer takes
says nothing about how much of a guessed key was right. The dependency is declared as an
HTTP bearer security scheme, so the OpenAPI schema tells clients about it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lmforge.serve.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="the server's --api-key")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def check_api_key(key: str) -> None:
    """Keys travel in an HTTP header: printable ASCII without spaces, and not empty."""
    if not key or not all("!" <= c <= "~" for c in key):
        raise ValueError("the API key must be non-empty printable ASCII without spaces")


def key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def require_api_key(api_key: str | None) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that lets a request through only with the right key (or when none is set)."""

    async def check(credentials: Bearer = None) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not key_matches(credentials.credentials, api_key):
            raise APIError(401, "incorrect API key", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return check

"""Every error the server answers, in OpenAI's shape.

OpenAI's clients read `{"error": {"message", "type", "param", "code"}}` and turn the HTTP
status into an exception class (400 `BadRequestError`, 401 `AuthenticationError`, 404
`NotFoundError`, 422 `UnprocessableEntityError`, 429 `RateLimitError`, ...). FastAPI's own
answers (a 422 listing validation problems under `detail`, a 404 for an unknown path)
would reach such a client as an unreadable message, so the handlers installed here
rewrite them into the same shape, and any unexpected exception becomes a 500 in the
same shape rather than a bare "Internal Server Error".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("lmforge.serve")

#: The error `type` for each status, as OpenAI names them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An answer other than 200, raised anywhere in a request's handling."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _location(loc: Sequence[Any]) -> str | None:
    """`("body", "messages", 0, "content")` -> `messages[0].content` (OpenAI's `param`).

    pydantic also puts the member of a union it tried into the path ("str", "list[int]",
    "constrained-str", "TextPart"); those are not field names (which are snake_case) and
    are left out."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif (isinstance(part, str) and _FIELD.match(part) and part not in _TYPE_NAMES
              and (text or part not in _SOURCES)):
            text += f".{part}" if text else part
    return text or None


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "dict", "list", "tuple", "set", "none"})
_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """FastAPI's list of validation problems as one readable message; `param` names the first.

    A value that fits none of a union's types gets one problem per type: they are joined
    with "or" under the field's name."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    by_param: dict[str | None, list[str]] = {}
    for e in errors:
        messages = by_param.setdefault(_location(e.get("loc", ())), [])
        msg = str(e.get("msg", "invalid value"))
        if msg not in messages:
            messages.append(msg)
    parts = [f"{param}: {' or '.join(msgs)}" if param else " or ".join(msgs)
             for param, msgs in by_param.items()]
    more = f" (and {len(parts) - 5} more problems)" if len(parts) > 5 else ""
    return APIError(422, "; ".join(parts[:5]) + more, param=next(iter(by_param)), code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Make every non-200 answer of `app` an OpenAI-shaped error."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
            if isinstance(exc.detail, str) and exc.detail not in ("Not Found", HTTPStatus(404).phrase):
                message = exc.detail
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        error = APIError(exc.status_code, message, headers=getattr(exc, "headers", None))
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(exc).__name__})"))

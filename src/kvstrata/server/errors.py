"""Errors in OpenAI's body format, `{"error": {"message", "type", "param", "code"}}`, with OpenAI's codes.

Every error a client can cause becomes a 4xx with that body: request validation (FastAPI's 422 is
turned into 400, as OpenAI answers), KvstrataError (400), a too-long prompt (400,
`context_length_exceeded`), missing / wrong API key (401), unknown model, session or response (404),
a stale session write (409), a full queue or a key's quota (429 with Retry-After), a body over the
limit (413). A session store that cannot be reached or written is the server's fault: 503 with
Retry-After, the database's name and error only in the log. Anything else is a 500 whose body says
only that the server failed (the traceback goes to the log).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvstrata.core import ContextLengthError, KvstrataError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


# the `code` of an error raised without one: every error body names a code
_DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limited",
    499: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
}


class APIError(Exception):
    """Raised by route handlers: becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code or _DEFAULT_CODES.get(status, "error")}}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
ANTHROPIC_PREFIX = "/v1/messages"  # routes that answer in Anthropic's error shape (server/anthropic.py)


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def body_for(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The error body a route speaks: Anthropic's `{"type": "error", "error": {"type", "message"}}` under
    /v1/messages, OpenAI's everywhere else."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    return error_body(status, message, code, param)


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    return JSONResponse(body_for(path, status, message, code, param), status_code=status, headers=headers)


def to_api_error(e: BaseException) -> APIError:
    """Map an exception raised below the HTTP layer to the status a client should see."""
    from kvstrata.engine.admission import QuotaExceededError
    from kvstrata.engine.async_engine import EngineDeadError, QueueFullError
    from kvstrata.engine.structured import ConstraintFailedError
    from kvstrata.sessions import (
        InvalidTransition,
        JobNotFound,
        ResponseNotFound,
        SessionNotFound,
        StoreUnavailable,
        VersionConflict,
    )

    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, f"the server is busy: {e}", code="quota_exceeded" if isinstance(e, QuotaExceededError)
                        else "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, StoreUnavailable):
        return store_unavailable(e)
    if isinstance(e, ConstraintFailedError):
        return APIError(400, str(e), code="constraint_failed")
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, SessionNotFound):
        return APIError(404, str(e), code="session_not_found")
    if isinstance(e, ResponseNotFound):
        return APIError(404, str(e), code="response_not_found", param="previous_response_id")
    if isinstance(e, JobNotFound):
        return APIError(404, str(e), code="job_not_found")
    if isinstance(e, VersionConflict):
        return APIError(409, str(e), code="version_conflict")
    if isinstance(e, InvalidTransition):
        return APIError(409, str(e), code="invalid_state")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    if isinstance(e, KvstrataError):
        return APIError(400, str(e), code="invalid_request")
    log.exception("internal error", exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__}); see the server log", code="internal_error")


def store_unavailable(e: BaseException) -> APIError:
    """503 for a session store that failed; what failed goes to the log, not to the client."""
    log.error("session store unavailable: %s", e)
    return APIError(503, "the session store is unavailable; nothing was changed; retry later",
                    code="store_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "tuple", "set"})


def _where(loc: tuple) -> tuple[str, str | None]:
    """pydantic's error location as (a path a client reads, `messages[0].content`; the request field it
    is in, `messages`). pydantic's own steps (union branches such as `str` or `literal['a','b']`,
    validator names) are left out."""
    path, field_name = "", None
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            path += f"[{p}]"
        elif isinstance(p, str) and (p in _TYPE_TAGS or not re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$-]*", p)):
            continue
        else:
            path += f".{p}" if path else str(p)
            field_name = field_name or str(p)
    return path, field_name


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    where, param = _where(tuple(e.get("loc", ())))
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('msg', '')} ({e.get('ctx', {}).get('error', '')})", None
    msg = e.get("msg", "invalid value")
    if not where:
        return f"the request body must be a JSON object (Content-Type: application/json): {msg}", None
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{where}: {msg}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return error_response(400, msg, code="invalid_request", param=param, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = None
        if exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 413:
            code = "request_too_large"
        elif exc.status_code == 400:
            code = "invalid_request"
        return error_response(exc.status_code, msg, code, headers=getattr(exc, "headers", None), path=request.url.path)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers, path=request.url.path)

    @app.exception_handler(KvstrataError)
    async def _kvstrata(request: Request, exc: KvstrataError) -> JSONResponse:
        e = to_api_error(exc)
        return error_response(e.status, e.message, e.code, e.param, e.headers, path=request.url.path)

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        e = to_api_error(exc)
        return error_response(e.status, e.message, e.code, e.param, e.headers, path=request.url.path)

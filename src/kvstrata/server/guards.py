"""Request bodies that would break the server further in: too large, or text that is not Unicode.

Size: a body larger than `--max-body-bytes` gets 413 before it is read when its Content-Length says
so, else as soon as the bytes read pass the limit (a chunked body), so memory never holds more.
(Starlette's own limiter answers in plain text, not in the OpenAI error body clients parse.)

Text: JSON allows `"\\ud800"`, a lone UTF-16 surrogate: Python decodes it into a `str` that no UTF-8
writer accepts, so the tokenizer, the session store or the response encoder fails far from the
request (a 500, or a reset connection when the error message itself cannot be encoded). At the end
of the body, one that is not UTF-8, or whose JSON holds a lone surrogate, gets 400 naming where.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.exceptions import HTTPException

from kvstrata.server.errors import error_response

# a \uD800-\uDFFF escape; a cheap pre-filter (a pair is fine, and "\\ud800" is just text)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


def lone_surrogate_at(obj: Any, where: str = "body") -> str | None:
    """The JSON path of the first string (or key) in `obj` holding a lone surrogate, or None."""
    stack = [(obj, where)]
    while stack:
        o, at = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                return at
        elif isinstance(o, dict):
            for k, v in o.items():
                if lone_surrogate_at(k, at) is not None:
                    return f"{at} (a key)"
                stack.append((v, f"{at}.{k}"))
        elif isinstance(o, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(o))
    return None


def check_body_text(body: bytes) -> str | None:
    """Why `body` (a JSON request body) cannot be served, or None."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the request body is not UTF-8 (at byte {e.start}); send JSON encoded as UTF-8"
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None  # not JSON: the route's own parser says so
    at = lone_surrogate_at(obj)
    if at is None:
        return None
    return (f"{at} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), which is not text; "
            "send valid Unicode")


class BodyGuard:
    """Pure ASGI middleware: 413 for a body over `max_bytes`, 400 for one check_body_text refuses. Errors
    found while the route reads are raised from that read (HTTPException), so the app's handlers render
    them in the OpenAI format."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than this server accepts ({self.max_bytes} bytes, "
                             "--max-body-bytes)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            e = self.too_large()
            return await error_response(413, e.detail, "request_too_large", path=scope.get("path", ""))(scope, receive, send)
        chunks: list[bytes] = []
        size = 0

        async def receive_checked():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                size += len(body)
                if size > self.max_bytes:
                    chunks.clear()
                    raise self.too_large()
                chunks.append(body)
                if not message.get("more_body", False):
                    why = check_body_text(b"".join(chunks))
                    chunks.clear()
                    if why is not None:
                        raise HTTPException(400, why)
            return message

        await self.app(scope, receive_checked, send)

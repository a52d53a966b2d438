"""Request bodies that would break the server further in: text that is not Unicode a program can write.

JSON allows `"\\ud800"`, a lone UTF-16 surrogate: Python decodes it into a `str` that no UTF-8 writer
accepts, so the tokenizer, the session store or the response encoder fails far from the request
(a 500, or a reset connection when the error message itself cannot be encoded). `TextGuard` reads
the body as it passes (the body-size limit, outside it, has already bounded it) and answers 400 at
the end of a body that is not UTF-8, or whose JSON holds a lone surrogate, naming where.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.exceptions import HTTPException

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


class TextGuard:
    """Pure ASGI middleware: a 400 for a JSON body that check_body_text refuses, raised from the body's
    last read so the route's own error handling renders it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def receive_checked():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    why = check_body_text(b"".join(chunks))
                    chunks.clear()
                    if why is not None:
                        raise HTTPException(400, why)
            return message

        await self.app(scope, receive_checked, send)

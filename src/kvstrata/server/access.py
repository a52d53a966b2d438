"""Request ids and the access log: one pure-ASGI middleware, the outermost, so every response has them.

Every response carries `x-request-id`: the client's own when it sent one that is a plain token (1-128
letters, digits and `._:-`; anything else could forge log lines), else a new `req_` id. When the
response is over (a stream: when its last byte went out or the client left) one line goes to the
`kvstrata.access` logger: `METHOD PATH STATUS DURATIONms request_id=ID`, and the request (by route
template, not the path sent) joins the recent ones the status page lists (`RecentRequests`, the last
RECENT of them; the polled QUIET routes are not listed).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import deque
from typing import Any

access_log = logging.getLogger("kvstrata.access")
REQUEST_ID_HEADER = b"x-request-id"
RECENT = 100
QUIET = ("/status", "/metrics", "/health")  # polled: logged, but not listed among the recent requests
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RecentRequests:
    """The last `n` requests served (newest last), as the status page shows them."""

    def __init__(self, n: int = RECENT) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=n)

    def add(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def list(self) -> list[dict[str, Any]]:
        return list(self._items)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id when it is a plain token, else a new one."""
    for k, v in headers:
        if k.lower() == REQUEST_ID_HEADER:
            sent = v.decode("latin-1")
            if _CLIENT_ID.match(sent):
                return sent
            break
    return "req_" + secrets.token_hex(12)


class AccessLog:
    """Sets `x-request-id` on every response, logs one access line per request, records it in `recent`."""

    def __init__(self, app: Any, recent: RecentRequests) -> None:
        self.app, self.recent = app, recent

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope.get("headers") or [])
        scope.setdefault("state", {})["request_id"] = rid
        t0, status = time.monotonic(), {"code": 500}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            ms = (time.monotonic() - t0) * 1000
            method, path = scope.get("method", ""), scope.get("path", "")
            access_log.info("%s %s %d %.1fms request_id=%s", method, path, status["code"], ms, rid)
            route = getattr(scope.get("route"), "path", None)
            if not path.startswith(QUIET):
                self.recent.add({"time": time.time(), "method": method, "route": route or "unmatched",
                                 "status": status["code"], "duration_ms": round(ms, 1), "request_id": rid})

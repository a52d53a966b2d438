"""What every route shares: the async engine, the session store, the served model names, API keys, metrics.

One `ServerState` per app, stored at `app.state.kv`. Routes get it with `get_state(request)` and the
caller's owner (for the session store) with the `owner` dependency.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Request

from kvstrata.engine.admission import Admission
from kvstrata.engine.async_engine import AsyncEngine
from kvstrata.server.access import RecentRequests
from kvstrata.server.errors import APIError
from kvstrata.server.health import StoreHealth
from kvstrata.server.limits import ServerLimits
from kvstrata.server.metrics import Metrics
from kvstrata.sessions import SessionStore, hash_api_key
from kvstrata.sessions.kv import SessionKV

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerState:
    aengine: AsyncEngine
    store: SessionStore
    model_names: list[str]  # the first is the id /v1/models lists; every one is accepted in `model`
    admission: Admission  # every generation passes it (engine/admission.py)
    limits: ServerLimits = field(default_factory=ServerLimits)
    api_keys: tuple[str, ...] = ()  # the owner hash of each accepted key (never the key); empty: no auth
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # set on shutdown: new generations get 503
    weight_bytes: int | None = None  # of the model's parameters, computed on first use
    touched_sessions: dict[str, Any] = field(default_factory=dict)  # id -> owner, for parking at shutdown
    store_health: StoreHealth = field(default_factory=StoreHealth)
    _session_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    sampling_defaults: dict[str, float] = field(default_factory=dict)  # for requests that set no sampling
    memory: Any = None  # server/memory_api.py MemoryServices: recall, compaction defaults, retention
    recent: RecentRequests = field(default_factory=RecentRequests)  # for the status page (server/access.py)
    skv: SessionKV = field(init=False)  # the one owner of every session's KV between turns

    def __post_init__(self) -> None:
        self.skv = SessionKV(self.aengine, self.store)

    @property
    def engine(self):
        return self.aengine.engine

    @property
    def tokenizer(self):
        return self.aengine.engine.tokenizer

    @property
    def model_id(self) -> str:
        return self.model_names[0]

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(404, f"the model {name!r} does not exist on this server; it serves "
                           f"{', '.join(repr(n) for n in self.model_names)} (GET /v1/models)",
                           code="model_not_found", param="model")

    def check_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another instance", code="shutting_down")

    def owner_for_key(self, key: str | None) -> str | None:
        """The store owner for a presented key; raises 401 when keys are required and this one is not."""
        if not self.api_keys:
            return None
        if not key:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
        presented = hash_api_key(key)
        owner = None
        for h in self.api_keys:  # every one compared in constant time: how long it takes says nothing
            if hmac.compare_digest(h, presented):
                owner = h
        if owner is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return owner

    def session_lock(self, session_id: str) -> asyncio.Lock:
        """Serialises the turns of one session inside this process (the store's versions guard the rest)."""
        lock = self._session_locks.get(session_id)
        if lock is None:
            if len(self._session_locks) > 10_000:  # drop idle locks now and then
                for k in [k for k, v in self._session_locks.items() if not v.locked()]:
                    del self._session_locks[k]
            lock = self._session_locks[session_id] = asyncio.Lock()
        return lock

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a (blocking) session-store call off the event loop."""
        return await asyncio.to_thread(fn, *args, **kw)


def make_api_keys(keys: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(hash_api_key(k) for k in keys if k))


def get_state(request: Request) -> ServerState:
    return request.app.state.kv


def owner(request: Request) -> str | None:
    """FastAPI dependency: the caller's owner hash (None without API keys). The auth middleware
    already rejected a missing or wrong key."""
    return getattr(request.state, "owner", None)


async def until_disconnect(request: Request, aw: Awaitable[T], poll_s: float = 0.25) -> T:
    """Await `aw`, cancelling it (and so aborting its engine request) if the client goes away."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                log.info("client disconnected from %s; request aborted", request.url.path)
                raise APIError(499, "client closed the request", code="client_closed_request")
    except asyncio.CancelledError:
        task.cancel()
        raise

"""The FastAPI app: routes, auth, per-route metrics, health; `create_app(aengine, store, ...)`.

Request ids and the access log are the outermost middleware (server/access.py). Auth and request
counting are one pure-ASGI middleware (Starlette's BaseHTTPMiddleware would wrap
streaming responses and hide client disconnects from them). Every route but /health needs a key
when keys are configured; the key's hash is the owner of the sessions it creates. Inside it,
`guards.BodyGuard` answers 413 for a body over `--max-body-bytes` (before or while it is read) and
400 for one that is not Unicode text. Every generation passes one `Admission` gate
(engine/admission.py), shared with the jobs' agents.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvstrata.engine.admission import Admission
from kvstrata.engine.async_engine import AsyncEngine
from kvstrata.jobs.routes import router as jobs_router
from kvstrata.jobs.routes import server_manager
from kvstrata.loader.sampling import recommended_sampling
from kvstrata.server import anthropic, completions, memory_api, openai_chat, responses, sessions, status
from kvstrata.server.access import AccessLog
from kvstrata.server.errors import APIError, body_for, install_error_handlers
from kvstrata.server.guards import BodyGuard
from kvstrata.server.health import health_body
from kvstrata.server.limits import ServerLimits
from kvstrata.server.state import ServerState, get_state, make_api_keys
from kvstrata.sessions import SessionStore

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health"})
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class AuthAndMetrics:
    """Checks `Authorization: Bearer <key>` (or `x-api-key`), sets request.state.owner, counts requests."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.st = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = {"code": 500}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if path not in OPEN_PATHS:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
                key = None
                auth = headers.get("authorization", "")
                if auth.lower().startswith("bearer "):
                    key = auth[7:].strip()
                key = key or headers.get("x-api-key")
                try:
                    owner = self.st.owner_for_key(key)
                except APIError as e:
                    status["code"] = e.status
                    resp = JSONResponse(body_for(path, e.status, e.message, e.code), status_code=e.status,
                                        headers={"WWW-Authenticate": "Bearer"})
                    return await resp(scope, receive, send)
                scope.setdefault("state", {})["owner"] = owner
            await self.app(scope, receive, send_counted)
        finally:
            # labels from a bounded set only: a route template, never the path a client sent
            label = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.st.metrics.requests.labels(label, method if method in METHODS else "other", str(status["code"])).inc()


def create_app(
    aengine: AsyncEngine,
    store: SessionStore,
    *,
    model_names: list[str],
    api_keys: list[str] | None = None,
    close_on_shutdown: bool = False,
    park_tier_on_shutdown: str | None = None,
    lease_sweep_s: float = 30.0,
    resume_jobs: bool = True,
    limits: ServerLimits | None = None,
    default_sampling: dict[str, float] | None = None,
) -> FastAPI:
    """The server app over a running AsyncEngine and an open SessionStore.

    close_on_shutdown: on the app's shutdown, stop the engine thread and close the store (the CLI sets
    it; tests that share one engine between apps do not). park_tier_on_shutdown: park the sessions
    served by this process at that tier when shutting down (after in-flight requests finished).
    lease_sweep_s: how often expired session leases are swept (their KV unpinned); 0 disables.
    resume_jobs: at start, resume the unfinished jobs submitted to /v1/jobs (a restart or crash left them
    queued or running); jobs of `kvstrata jobs run` are left to that command. limits: request, job and
    per-key limits (server/limits.py; default: its defaults). default_sampling: overrides (some of)
    the model's recommended sampling (loader/sampling.py) for requests that set none.
    """
    limits = limits or ServerLimits()
    keys = make_api_keys(api_keys or [])
    policy = limits.admission(aengine.engine.scheduler.max_num_seqs, aengine.max_waiting, keyed=bool(keys))
    st = ServerState(aengine=aengine, store=store, model_names=list(model_names), api_keys=keys,
                     admission=Admission(aengine, policy), limits=limits,
                     sampling_defaults={**recommended_sampling(aengine.engine.model_path), **(default_sampling or {})})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("serving %s", ", ".join(st.model_names))
        sweeper = asyncio.create_task(_sweep_forever(st, lease_sweep_s)) if lease_sweep_s > 0 else None
        if resume_jobs:
            ids = await server_manager(app).resume_unfinished(via="http")
            if ids:
                log.info("resuming %d unfinished jobs: %s", len(ids), ", ".join(ids))
        yield
        st.draining = True
        if sweeper is not None:
            sweeper.cancel()
        jobs = getattr(app.state, "jobs", None)
        if jobs is not None:  # running jobs stay RUNNING and resume later
            await jobs.shutdown()
        if park_tier_on_shutdown:
            await st.skv.park_all(st.touched_sessions, park_tier_on_shutdown)
        if close_on_shutdown:
            log.info("shutting down: stopping the engine and closing the session store")
            aengine.shutdown()
            store.close()

    app = FastAPI(title="kvstrata", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API with durable agent sessions (see docs/server.md)")
    app.state.kv = st
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes)
    app.add_middleware(AuthAndMetrics, state=st)
    app.add_middleware(AccessLog, recent=st.recent)  # the outermost: every response gets its x-request-id
    app.include_router(openai_chat.router)
    app.include_router(completions.router)
    app.include_router(responses.router)
    app.include_router(anthropic.router)
    app.include_router(sessions.router)
    app.include_router(jobs_router)
    app.include_router(status.router)  # GET /status: the status page and its JSON (server/status.py)
    app.include_router(memory_api.router)  # conversations, compaction, recall, retention (server/memory_api.py)

    @app.get("/health", tags=["ops"])
    async def health(request: Request):
        return await health_body(get_state(request))

    @app.get("/v1/models", tags=["openai"])
    async def list_models(request: Request):
        s = get_state(request)
        return {"object": "list", "data": [_model_card(s, n) for n in s.model_names[:1]]}

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str, request: Request):
        s = get_state(request)
        s.check_model(model_id)
        return _model_card(s, model_id)

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request):
        s = get_state(request)
        return Response(await s.metrics.render(s.aengine, s.admission, s.skv), media_type="text/plain; version=0.0.4")

    return app


async def _sweep_forever(st: ServerState, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            n = await st.skv.sweep_leases()
            if n:
                log.info("lease sweep: %d sessions' leases ended; their KV is unpinned", n)
        except Exception as e:  # a store hiccup must not end the sweeper
            log.warning("lease sweep failed: %s", e)


def _model_card(st: ServerState, name: str) -> dict[str, Any]:
    e = st.engine
    if st.weight_bytes is None:
        st.weight_bytes = sum(p.numel() * p.element_size() for p in e.model.parameters())
    return {"id": name, "object": "model", "created": st.created, "owned_by": "kvstrata",
            "max_model_len": e.max_model_len, "root": st.model_id, "weight_bytes": st.weight_bytes}

"""The cluster's HTTP ingress: a FastAPI Ray Serve deployment in front of the engine replicas.

Why a separate ingress deployment (and not the replicas themselves behind Ray's HTTP proxy): a custom
RequestRouter only sees the arguments of a DeploymentHandle call. Behind the proxy those are Ray's
HTTP wrapper, whose body is still being streamed from the proxy after the replica was chosen, so
`previous_response_id`, `prompt_cache_key` or the prompt could not steer the choice. Here the ingress
reads the request once, computes its hints (cluster/hints.py) and calls
`engine.options(stream=True).forward.remote(ForwardRequest)`: the router reads the hints from the
pending request, the replica runs the unchanged server app and streams the ASGI messages back, and
this app re-emits them (`StreamingResponse` for event streams, whole bodies otherwise).

Failover: a replica that dies before its reply started (for generating routes the server starts a
reply only with the first generated token) is retried on another live one, up to MAX_ATTEMPTS, the
request unchanged (Ray drops the dead replica from the router's set; the session's KV is then loaded
from the shared tier wherever it lands). One that dies mid-stream ends the stream with an error event
whose code, `replica_lost`, tells the client to retry.
"""

# (no `from __future__ import annotations`: FastAPI must see the route parameters' real types through
# Ray Serve's class-based view)
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from kvstrata.cluster import hints as H
from kvstrata.cluster import metrics
from kvstrata.core import KvstrataError
from kvstrata.sessions import ANY_OWNER

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
RETRY_PAUSE_S = 0.3
GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_LOST = (RayActorError, ActorUnavailableError)

# the replicas' own /docs and /openapi.json describe the API: the ingress forwards them
api = FastAPI(title="kvstrata cluster", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass(frozen=True)
class IngressSpec:
    model: str  # what the replicas load: the ingress loads its tokenizer and config only
    store: str
    redis_url: str
    events_prefix: str
    pd_transport: str = "shared-tier"  # prefill/decode handover: shared-tier | object-store
    pd_latency_s: float = 0.1  # fixed cost of a handover round trip (cost model; benchmarks/cluster_pd.py measures it)
    api_keys: tuple[str, ...] = ()  # the ingress's own /metrics needs one of them, as a replica's does
    env: dict | None = None


def _sse_error(message: str) -> bytes:
    import json

    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_lost"}}
    return f"data: {json.dumps(body)}\n\n".encode()


@serve.ingress(api)
class Ingress:
    async def __init__(self, engine, spec: IngressSpec, prefill=None) -> None:
        import os

        from kvstrata.cluster.index import KVIndexFollower
        from kvstrata.loader import load_config_and_tokenizer
        from kvstrata.sched.placement import PlacementModel, model_spec
        from kvstrata.sessions import open_store

        os.environ.update(spec.env or {})
        self.engine, self.prefill_handle, self.spec = engine, prefill, spec
        self.info = await engine.describe.remote()
        self.mc, self.tokenizer = await asyncio.to_thread(load_config_and_tokenizer, spec.model)
        self.store = open_store(spec.store)
        self.follower = KVIndexFollower(spec.redis_url, spec.events_prefix)
        self.table = H.AffinityTable()
        self.placement = PlacementModel(None, model_spec(self.mc), [])

    # -- hints ----------------------------------------------------------------------------------------
    def _session_ids(self, session_id: str) -> list[int] | None:
        try:
            return list(self.store.get_session(session_id, owner=ANY_OWNER).token_ids)
        except KvstrataError:
            return None

    def _response_session(self, response_id: str) -> str | None:
        try:
            return self.store.get_response(response_id, owner=ANY_OWNER).session_id
        except KvstrataError:
            return None

    async def _hints(self, path: str, body: dict | None, keys: list[str], method: str
                     ) -> tuple[H.RouteHints, list[int]]:
        replica, key = self.table.get(keys)
        if replica is None and any(k.startswith("response:") for k in keys):  # e.g. after an ingress restart
            rid = next(k for k in keys if k.startswith("response:")).split(":", 1)[1]
            sid = await asyncio.to_thread(self._response_session, rid)
            if sid:
                keys.insert(0, "session:" + sid)
        ids = [] if method != "POST" else await asyncio.to_thread(H.prompt_ids, path, body, self.tokenizer,
                                                                    self._session_ids, keys)
        prefix = H.prefix_hint(self.follower.index, ids, self.info["block_size"], self.info["fingerprint"])
        if replica is None and prefix and any(k.startswith("session:") for k in keys):
            replica = max(prefix, key=prefix.__getitem__)  # the replica holding the session's KV
            key = next(k for k in keys if k.startswith("session:"))
        return H.RouteHints(replica, key, prefix, len(ids)), ids

    # -- routes ---------------------------------------------------------------------------------------
    @api.get("/metrics")
    async def cluster_metrics(self, request: Request) -> Response:
        """The cluster's own metrics (route decisions, retries, prefill placement, replica load)."""
        if self.spec.api_keys:
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
            if key not in self.spec.api_keys:
                return _error(401, "missing or incorrect API key: send `Authorization: Bearer <key>`",
                              "invalid_api_key")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(self, path: str, request: Request) -> Response:
        body = await request.body()
        headers = list(request.headers.items())
        hd = {k.lower(): v for k, v in headers}
        bjson = H.json_body(hd, body) if request.method in ("POST", "PUT", "PATCH") else None
        url_path = request.url.path
        keys = H.affinity_keys(url_path, hd, bjson)
        route, ids = await self._hints(url_path, bjson, keys, request.method)
        req = H.ForwardRequest(request.method, url_path, request.url.query, headers, body, route)
        kv = None
        if self.prefill_handle is not None and request.method == "POST" and ids and (
                url_path in GENERATING or url_path.endswith("/generate")):
            kv = await self._maybe_prefill(ids, route, hd.get("x-kvstrata-prefill"))
            if kv is True:  # in the shared tier: the decode replica reads it before running the request
                req.prefill_ids, kv = ids, None
        return await self._respond(req, keys, kv)

    async def _maybe_prefill(self, ids: list[int], route: H.RouteHints, force: str | None) -> Any:
        """P/D: prefill on a prefill replica when the cost model says the handover beats computing the
        uncached part on the decode replica; returns the object-store handover, True when the blocks
        are in the shared tier, or None (prefill locally). `force` (the
        X-Kvstrata-Prefill header: local, shared-tier or object-store) overrides the choice, for tests
        and benchmarks that measure each path."""
        cached = max(route.prefix.values(), default=0)
        new = len(ids) - cached
        transport = force if force in ("shared-tier", "object-store") else self.spec.pd_transport
        if force in ("local", "shared-tier", "object-store"):
            action = force
        else:
            per_token = self.info["block_bytes"] / self.info["block_size"]
            gbps = self.placement.cal.read_GBps.get("remote" if transport == "shared-tier" else "host", 1.0)
            action = self.placement.prefill_choice(new, cached, int(new * per_token),
                                                   {transport: (gbps, self.spec.pd_latency_s)}).action
        metrics.PD_DECISIONS.labels(action).inc()
        if action == "local":
            return None
        t0 = time.perf_counter()
        try:
            resp = self.prefill_handle.prefill.remote(ids, transport, H.RouteHints())
            if transport == "object-store":
                ref = await resp._to_object_ref()  # the blocks go replica to replica, not through here
                await asyncio.to_thread(ray.wait, [ref], fetch_local=False)
            else:
                await resp
                ref = True
        except Exception as e:  # noqa: BLE001 - a prefill replica lost or failing: the decode replica computes it
            log.warning("remote prefill failed (%s: %s); prefilling on the decode replica", type(e).__name__, e)
            metrics.PD_DECISIONS.labels("local_after_failed_prefill").inc()
            return None
        metrics.HANDOVER.labels(transport).observe(time.perf_counter() - t0)
        return ref

    async def _respond(self, req: H.ForwardRequest, keys: list[str], kv: Any) -> Response:
        for attempt in range(MAX_ATTEMPTS):
            gen = self.engine.options(stream=True).forward.remote(req, kv)
            try:
                start = await gen.__anext__()
            except _LOST as e:
                metrics.RETRIES.labels("replica_lost_before_reply").inc()
                log.warning("replica lost before replying (%s); retry %d", type(e).__name__, attempt + 1)
                await asyncio.sleep(RETRY_PAUSE_S * (attempt + 1))
                continue
            except StopAsyncIteration:
                return _error(502, "the replica closed the request without a reply; retry", "replica_lost")
            hdrs = [(k, v) for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")]
            replica = next((v for k, v in hdrs if k == "x-kvstrata-replica"), None)
            if replica and keys:
                self.table.put(keys, replica)
            media = next((v for k, v in hdrs if k.lower() == "content-type"), "")
            if "text/event-stream" in media:
                return StreamingResponse(self._relay(gen, keys, replica), status_code=start["status"],
                                         headers=dict(hdrs))
            chunks = []
            try:
                async for chunk in gen:
                    chunks.append(chunk)
            except _LOST:
                metrics.FAILED_MIDSTREAM.inc()
                return _error(503, "the replica serving this request stopped while replying; retry", "replica_lost")
            data = b"".join(chunks)
            self._learn(data, replica)
            return Response(data, status_code=start["status"], headers=dict(hdrs))
        return _error(503, f"no replica could take the request after {MAX_ATTEMPTS} attempts; retry later",
                      "replica_lost")

    async def _relay(self, gen, keys: list[str], replica: str | None):
        first = True
        try:
            async for chunk in gen:
                if first:
                    self._learn(chunk, replica)
                    first = False
                yield chunk
        except _LOST:
            metrics.FAILED_MIDSTREAM.inc()
            yield _sse_error("the replica serving this stream stopped; retry the request")
        finally:
            gen.cancel()

    def _learn(self, data: bytes, replica: str | None) -> None:
        """Session, response and job ids a reply names are served by its replica next time."""
        if replica:
            found = H.reply_keys(data)
            if found:
                self.table.put(found, replica)


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                        status_code=status)

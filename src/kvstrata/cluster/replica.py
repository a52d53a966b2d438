"""One engine replica of a cluster: the single-process server app, run inside a Ray Serve replica.

Each replica builds what `kvstrata serve` builds (an AsyncEngine, the session store, `create_app`) and
serves the ingress's `ForwardRequest`s by calling that FastAPI app in-process as ASGI, so every route
(chat, completions, responses, sessions, jobs, models, metrics) behaves exactly as on one server.
`forward` is an async generator: first `{"status", "headers"}`, then the body's chunks as the app
sends them (a stream stays a stream); if the ingress goes away (its client left), Ray cancels the
generator and the app sees `http.disconnect`, which aborts the engine request.

Per replica: its own device pool, host tier and disk tier (`<kv-disk-dir>/<deployment>-<rank>`: a
restarted replica takes over its predecessor's directory, one process per directory as the disk tier
requires); shared by all: the session store and the Redis tier. The replica publishes its pool's KV
events (cluster/events.py) and reports its load to Ray's router (`record_routing_stats`); Ray calls
`check_health` and restarts a replica that fails it or dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from kvstrata.cluster.hints import ForwardRequest

log = logging.getLogger(__name__)

HANDOVER_CHUNK = 8  # handed-over blocks copied into the pool per engine call (one call runs between two steps)


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica of a deployment is built from (pickled by Ray to each replica)."""

    engine: dict[str, Any]  # EngineConfig fields (kv_disk_dir is the base; each replica takes a subdirectory)
    store: str  # session store path or URL
    redis_url: str  # the shared KV tier, also carrying the KV events
    events_prefix: str  # Redis key prefix of this cluster's event stream
    model_names: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    max_waiting: int = 256
    park_on_shutdown: bool = True
    resume_jobs: bool = True  # rank 0 resumes jobs clients submitted (one replica, or each would)
    role: str = "both"  # both | prefill | decode
    env: dict[str, str] = field(default_factory=dict)


def replica_identity() -> tuple[str, str, int]:
    """(unique replica id, deployment name, rank) from Ray Serve's replica context."""
    from ray import serve

    ctx = serve.get_replica_context()
    rank = getattr(ctx.rank, "rank", ctx.rank)
    return ctx.replica_id.unique_id, ctx.deployment, int(rank or 0)


class EngineReplica:
    async def __init__(self, spec: ReplicaSpec) -> None:
        from kvstrata.cluster.events import KVEventPublisher
        from kvstrata.config import EngineConfig
        from kvstrata.engine.async_engine import AsyncEngine
        from kvstrata.engine.llm_engine import LLMEngine
        from kvstrata.server import create_app
        from kvstrata.sessions import open_store

        os.environ.update(spec.env)
        self.spec = spec
        self.replica_id, self.deployment, self.rank = replica_identity()
        engine = dict(spec.engine, kv_redis_url=spec.redis_url)
        if engine.get("kv_disk_dir"):
            engine["kv_disk_dir"] = os.path.join(engine["kv_disk_dir"], f"{self.deployment}-{self.rank}")
        cfg = EngineConfig.from_dict(engine, "cluster replica")
        self.store = open_store(spec.store)
        try:  # built on the thread that steps it (engine/async_engine.py)
            self.aengine = await asyncio.to_thread(AsyncEngine, lambda: LLMEngine(cfg), spec.max_waiting)
        except BaseException:
            self.store.close()
            raise
        e = self.aengine.engine
        self.fingerprint, self.block_size, self.block_bytes = e.fingerprint, e.pool.block_size, e.pool.block_bytes
        self.events = KVEventPublisher(spec.redis_url, spec.events_prefix, self.replica_id, self.block_size)
        await self.aengine.call_async(self._attach_events)
        park = "disk" if (cfg.kv_disk_dir and spec.park_on_shutdown) else None
        self.app = create_app(self.aengine, self.store, model_names=list(spec.model_names),
                              api_keys=list(spec.api_keys), close_on_shutdown=True, park_tier_on_shutdown=park,
                              resume_jobs=spec.resume_jobs and self.rank == 0)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.started = time.time()
        log.info("replica %s (%s rank %d, pid %d) serving %s", self.replica_id, self.deployment, self.rank,
                 os.getpid(), spec.model_names[0])

    def _attach_events(self, e) -> None:
        e.kv.listeners.append(self.events)
        e.pool.evict_hooks.append(self.events.on_evict)
        if e.offload is not None:
            e.offload.listeners.append(self.events)

    # -- requests -------------------------------------------------------------------------------------
    async def forward(self, req: ForwardRequest, kv: Any = None) -> AsyncIterator[Any]:
        """Run one HTTP request through the app; yields the response start, then body chunks. `kv`: a
        prefill replica's blocks (object-store handover); `req.prefill_ids`: a prompt a prefill replica
        put in the shared tier."""
        if kv or req.prefill_ids:
            await self._receive_handover(req.prefill_ids, kv)
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await out.put(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
            "query_string": req.query.encode(), "root_path": "", "client": ("127.0.0.1", 0),
            "server": ("kvstrata-replica", 0), "state": {},
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in req.headers],
        }
        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: out.put_nowait(None))
        started = False
        try:
            while True:
                msg = await out.get()
                if msg is None:
                    break
                if msg["type"] == "http.response.start":
                    started = True
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
                    headers.append(("x-kvstrata-replica", self.replica_id))
                    yield {"status": msg["status"], "headers": headers}
                elif msg["type"] == "http.response.body" and msg.get("body"):
                    yield bytes(msg["body"])
            if task.exception() is not None and not started:  # the app's error handlers answer everything else
                raise task.exception()
        finally:
            gone.set()
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                    task.cancel()

    async def _receive_handover(self, ids: list[int] | None, kv: Any) -> int:
        """Prefilled blocks into this replica's pool: read or decoded and verified off the engine thread,
        copied in HANDOVER_CHUNK blocks per engine call, between steps."""
        from kvstrata.cluster.pd import decode_blocks, fetch_blocks, place_blocks

        e = self.aengine.engine
        if kv:
            blocks = await asyncio.to_thread(decode_blocks, self.fingerprint, kv.get("blocks", []))
        elif e.offload is not None:
            blocks = await asyncio.to_thread(fetch_blocks, e.offload.stack, self.fingerprint, ids, self.block_size,
                                             e.pool.key_to_block)
        else:
            return 0
        n = 0
        for i in range(0, len(blocks), HANDOVER_CHUNK):
            part = blocks[i : i + HANDOVER_CHUNK]
            n += await self.aengine.call_async(lambda eng, part=part: place_blocks(eng, part, [self.events]))
        return n

    async def prefill(self, ids: list[int], transport: str, route: Any = None) -> dict[str, Any]:
        """Compute the KV of `ids` here (one greedy token, discarded) for a decode replica: wait until
        write-behind has written its blocks to the shared tier, or return them encoded. (`route`: the
        RouteHints the router reads.)"""
        from kvstrata.cluster.pd import export_blocks
        from kvstrata.core import SamplingParams

        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=1, temperature=0.0)
        async for _ in self.aengine.generate(list(ids), params):
            pass
        res: dict[str, Any] = {"replica": self.replica_id, "compute_s": time.perf_counter() - t0}
        if transport == "object-store":
            res["blocks"] = await self.aengine.call_async(lambda e: export_blocks(e, ids))
        else:
            stack = self.aengine.engine.offload.stack if self.aengine.engine.offload else None
            if stack is not None:
                await asyncio.to_thread(stack.flush, 30.0)
        res["seconds"] = time.perf_counter() - t0
        return res

    # -- for the ingress, the router and Ray ----------------------------------------------------------
    async def describe(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "deployment": self.deployment, "rank": self.rank, "pid": os.getpid(),
                "fingerprint": self.fingerprint, "block_size": self.block_size, "block_bytes": self.block_bytes,
                "model": self.spec.model_names[0], "role": self.spec.role,
                "spec": dataclasses.asdict(self.spec) | {"api_keys": len(self.spec.api_keys)}}

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray polls this for the router: queue depth, running streams, device KV usage."""
        def read(e) -> dict[str, Any]:
            p = e.pool
            return {"waiting": len(e.scheduler.waiting), "running": len(e.scheduler.running),
                    "kv_usage": p.num_in_use / max(1, p.num_blocks)}

        stats = await self.aengine.call_async(read)
        stats["ongoing"] = stats["waiting"] + stats["running"]
        return stats

    async def check_health(self) -> None:
        if self.aengine._dead is not None:
            raise RuntimeError(f"the engine stopped: {self.aengine._dead!r}")

    async def __del__(self) -> None:
        """Ray Serve's graceful stop: the app's shutdown (sessions parked, engine and store closed)."""
        try:
            await self._lifespan.__aexit__(None, None, None)
        finally:
            self.events.close(clear=True)

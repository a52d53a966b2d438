"""The replay client: sessions against any OpenAI-compatible ``/v1/completions`` (httpx, streaming).

Sessions start in arrival order at ``arrival_s * time_scale`` (real seconds from the run's start), at most
`concurrency` at once: a session that finds every place taken starts when one frees (closed loop; the
Claude Code sessions all arrive at 0 plus a gap, so this keeps `concurrency` sessions going). Inside a
session requests go one after another: each waits its traced think time (capped at `max_think_s`, times
`time_scale`) after the previous response, then streams its prompt (token ids) with ``max_tokens`` forced by
``ignore_eos``. After a request with sub-agents, those start (after their traced delay, scaled) as
concurrent sessions of their own, outside the `concurrency` limit (their parent waits on them), and the next
request of the parent waits until all of them finished.

Per request it records TTFT (send to the first chunk with text), the time to the last token, tokens, and
what the server says it reused: ``usage.prompt_tokens_details.cached_tokens`` (kvstrata adds
``cached_tokens_by_tier``), llama-server's ``timings.cache_n`` / ``prompt_n``. At `max_wall_s` every session
still running is cancelled (its open request is closed, which both servers treat as an abort).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import httpx

from benchmarks.agent_replay.prompts import PromptBuilder, common_prefix
from benchmarks.agent_replay.traces import Session
from benchmarks.peers.http_load import sse_events

logger = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    session: str  # the (sub-)session id
    root: str  # the top-level session it belongs to
    index: int  # position in its session
    first: bool  # the session's first request (nothing of it can be cached yet, other than shared blocks)
    sent_s: float  # when it was sent, seconds from the run's start
    prompt_tokens: int  # tokens sent
    max_tokens: int
    reusable_tokens: int  # tokens it shares with the previous prompt of its session (what a cache could serve)
    ok: bool = False
    ttft_s: float | None = None
    latency_s: float | None = None  # send to the last token
    completion_tokens: int = 0
    cached_tokens: int | None = None  # prompt tokens the server reused (None: it does not say)
    cached_by_tier: dict = field(default_factory=dict)
    computed_tokens: int | None = None  # prompt tokens the server computed (llama-server's prompt_n)
    error: str = ""


@dataclass
class Settings:
    concurrency: int = 16
    time_scale: float = 0.01
    max_think_s: float = 300.0  # traced; longer waits (a user away for hours) are cut to this
    max_wall_s: float | None = None
    model: str = "default"
    extra_body: dict = field(default_factory=dict)  # added to every request body
    # per-request additions, e.g. hints a scheduler may use (session, stop reason, expected wait): f(session, i) -> dict
    hints: Callable[[Session, int], dict] | None = None


async def complete(client: httpx.AsyncClient, url: str, rec: RequestRecord, ids: list[int], s: Settings,
                   extra: dict | None = None) -> None:
    """Stream one completion of `ids` into `rec`. Errors are recorded, not raised."""
    body = {"model": s.model, "prompt": ids, "max_tokens": rec.max_tokens, "stream": True, "temperature": 0.0,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **s.extra_body, **(extra or {})}
    t0 = time.perf_counter()
    pieces = 0
    try:
        # the session as the agent program: kvstrata orders waiting work by it (others ignore the header)
        async with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body,
                                 headers={"X-Session-Id": rec.root}) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return
            async for msg in sse_events(r):
                if "error" in msg:
                    rec.error = f"stream error: {str(msg['error'])[:300]}"
                    return
                choices = msg.get("choices") or []
                if choices and choices[0].get("text"):
                    pieces += 1
                    if rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - t0
                if usage := msg.get("usage"):
                    rec.completion_tokens = usage.get("completion_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    if "cached_tokens" in details:
                        rec.cached_tokens = details["cached_tokens"]
                    rec.cached_by_tier = details.get("cached_tokens_by_tier") or {}
                if (timings := msg.get("timings")) and "cache_n" in timings:  # llama-server
                    rec.cached_tokens, rec.computed_tokens = timings["cache_n"], timings.get("prompt_n")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return
    rec.latency_s = time.perf_counter() - t0
    rec.completion_tokens = rec.completion_tokens or pieces
    rec.ok = rec.completion_tokens > 0 and rec.ttft_s is not None
    if not rec.ok:
        rec.error = "no tokens streamed"


class Replay:
    """One replay of `sessions` against `url`; `run()` returns the records and per-session outcomes."""

    def __init__(self, url: str, sessions: list[Session], builder: PromptBuilder, settings: Settings):
        self.url, self.sessions, self.builder, self.s = url, sessions, builder, settings
        self.records: list[RequestRecord] = []
        self.done: dict[str, float] = {}  # top-level session -> seconds from start to its last token
        self.started: dict[str, float] = {}
        self.t0 = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def _wait(self, traced_s: float) -> None:
        real = min(traced_s, self.s.max_think_s) * self.s.time_scale
        if real > 0:
            await asyncio.sleep(real)

    async def _session(self, client: httpx.AsyncClient, sess: Session, root: str) -> None:
        prev: list[int] = []
        for i, req in enumerate(sess.requests):
            await self._wait(req.think_s)
            p = self.builder.build(sess, i, req)
            rec = RequestRecord(session=sess.id, root=root, index=i, first=i == 0, sent_s=round(self.now(), 4),
                                prompt_tokens=len(p.ids), max_tokens=p.max_tokens,
                                reusable_tokens=common_prefix(prev, p.ids))
            prev = p.ids
            self.records.append(rec)
            await complete(client, self.url, rec, p.ids, self.s, self.s.hints(sess, i) if self.s.hints else None)
            if not rec.ok:
                logger.warning("%s request %d failed: %s", sess.id, i, rec.error)
            if req.subagents:
                await asyncio.gather(*(self._subagent(client, delay, sub, root) for delay, sub in req.subagents))

    async def _subagent(self, client: httpx.AsyncClient, delay_s: float, sub: Session, root: str) -> None:
        await self._wait(delay_s)
        await self._session(client, sub, root)

    async def _top(self, client: httpx.AsyncClient, sess: Session, gate: asyncio.Semaphore) -> None:
        delay = sess.arrival_s * self.s.time_scale - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            self.started[sess.id] = self.now()
            await self._session(client, sess, sess.id)
            self.done[sess.id] = self.now()

    async def run(self) -> float:
        """Replays every session (or until max_wall_s); returns the wall time in seconds."""
        gate = asyncio.Semaphore(self.s.concurrency)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
            self.t0 = time.perf_counter()
            tasks = [asyncio.create_task(self._top(client, s, gate)) for s in self.sessions]
            _, pending = await asyncio.wait(tasks, timeout=self.s.max_wall_s)
            for t in pending:
                t.cancel()
            wall = self.now()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                logger.info("stopped at %.0f s with %d sessions unfinished", wall, len(pending))
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        return wall


def replay(url: str, sessions: list[Session], builder: PromptBuilder, settings: Settings) -> dict:
    """Synchronous entry: {"wall_s", "records": [...], "done": {...}, "started": {...}}."""
    r = Replay(url, sessions, builder, settings)
    wall = asyncio.run(r.run())
    return {"wall_s": round(wall, 3), "records": [asdict(x) for x in r.records], "done": r.done,
            "started": r.started}


def warmup(url: str, model: str = "default") -> None:
    """Two short requests every peer gets before its replay (first-use costs out of the measurement)."""
    body = {"model": model, "prompt": list(range(1000, 1064)), "max_tokens": 4, "ignore_eos": True, "temperature": 0.0}
    for _ in range(2):
        httpx.post(url.rstrip("/") + "/v1/completions", json=body, timeout=300.0).raise_for_status()

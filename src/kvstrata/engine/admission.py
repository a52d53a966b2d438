"""Admission in front of the AsyncEngine: who may add a request now, who waits, who gets 429.

Every request the server or a job sends to the engine passes `Admission.generate`. It counts the
requests it let in and not yet finished (*outstanding*: running or waiting in the engine) and holds
these invariants:

* at most `max_outstanding` requests are outstanding (the engine's running batch plus its queue);
* `batch` requests never take the last `interactive_reserve` of those slots, so a person's request
  finds room however much agent work is queued;
* with API keys, one key has at most `per_key_concurrency` requests outstanding; up to
  `per_key_queue` more of its requests wait for one of those slots, and beyond that it gets 429.

The outputs it passes on are checked on the way: a constrained output (`SamplingParams.structured`)
that stopped without completing its grammar is raised as `ConstraintFailedError` (structured.py),
never passed on as a clean stop.

A request that may not wait (an HTTP client's) gets `QueueFullError` (HTTP 429 with Retry-After) when
there is no room. A request that waits (a job's agent: `wait=True`) is queued here instead, in
order, interactive ones first, and also rides out a full engine queue with a short backoff: a job
that asks for more than the server has room for runs slower, never fails for it. Cancelling a waiter
(a client that left, a job cancelled) takes it out of the queue and leaves nothing behind.

All of it runs on the server's asyncio loop; no locks are needed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence as Seq

from kvstrata.core import FinishReason, KvstrataError, RequestClass, RequestOutput, SamplingParams
from kvstrata.engine.async_engine import AsyncEngine, QueueFullError
from kvstrata.engine.structured import ConstraintFailedError, check_output

log = logging.getLogger(__name__)

ENGINE_FULL_BACKOFF_S = (0.05, 2.0)  # a waiting request's retry delay when the engine's own queue is full


class QuotaExceededError(QueueFullError):
    """One API key has as many requests outstanding and queued as its quota allows (HTTP 429)."""


@dataclass(frozen=True)
class AdmissionPolicy:
    max_outstanding: int = 320  # requests admitted and not finished, all classes (running + waiting)
    interactive_reserve: int = 64  # of those, slots batch requests may not take
    per_key_concurrency: int = 0  # outstanding requests of one API key; 0: no limit
    per_key_queue: int = 0  # requests of one key that may wait for one of its slots; more get 429

    def __post_init__(self) -> None:
        if self.max_outstanding < 1:
            raise KvstrataError(f"max_outstanding must be >= 1, got {self.max_outstanding}")
        if not 0 <= self.interactive_reserve < self.max_outstanding:
            raise KvstrataError(f"the interactive reserve must be >= 0 and below the {self.max_outstanding} "
                                f"admitted requests, got {self.interactive_reserve}")
        if self.per_key_concurrency < 0 or self.per_key_queue < 0:
            raise KvstrataError("per-key concurrency and queue quotas must be >= 0 (0: no limit / no queue)")

    @classmethod
    def for_engine(cls, max_num_seqs: int, max_waiting: int, *, interactive_reserve: int | None = None,
                   per_key_concurrency: int = 0, per_key_queue: int = 0) -> "AdmissionPolicy":
        """The engine's running batch plus its queue bound; a quarter of the queue kept for interactive."""
        reserve = max(1, max_waiting // 4) if interactive_reserve is None else interactive_reserve
        return cls(max_num_seqs + max_waiting, reserve, per_key_concurrency, per_key_queue)


@dataclass
class _Waiter:
    order: tuple[int, int]  # (0 interactive / 1 batch, arrival): who is woken first
    key: Any
    batch: bool
    fut: asyncio.Future


class Admission:
    def __init__(self, aengine: AsyncEngine, policy: AdmissionPolicy) -> None:
        self.aengine, self.policy = aengine, policy
        self.outstanding = {"interactive": 0, "batch": 0}
        self.peak = {"interactive": 0, "batch": 0}  # the most outstanding at once, per class
        self.by_key: dict[Any, int] = {}
        self.queued_by_key: dict[Any, int] = {}
        self._waiters: list[_Waiter] = []
        self._arrivals = itertools.count()
        self.stats = {"admitted": 0, "rejected_full": 0, "rejected_quota": 0, "waited": 0, "engine_full_retries": 0}

    # -- accounting ------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return self.outstanding["interactive"] + self.outstanding["batch"]

    def _room(self, batch: bool) -> bool:
        p = self.policy
        return self.total < (p.max_outstanding - p.interactive_reserve if batch else p.max_outstanding)

    def _key_room(self, key: Any) -> bool:
        c = self.policy.per_key_concurrency
        return key is None or c == 0 or self.by_key.get(key, 0) < c

    def _take(self, key: Any, batch: bool) -> None:
        cls = "batch" if batch else "interactive"
        self.outstanding[cls] += 1
        self.peak[cls] = max(self.peak[cls], self.outstanding[cls])
        if key is not None:
            self.by_key[key] = self.by_key.get(key, 0) + 1
        self.stats["admitted"] += 1

    def _release(self, key: Any, batch: bool) -> None:
        self.outstanding["batch" if batch else "interactive"] -= 1
        if key is not None:
            n = self.by_key[key] - 1
            if n:
                self.by_key[key] = n
            else:
                del self.by_key[key]
        self._wake()

    def _wake(self) -> None:
        """Wake, interactive first and then by arrival, every waiter that fits in the room there is now
        (counting the ones woken before it). Each takes its slot itself when it runs, and passes the
        wake-up on if it was cancelled meanwhile."""
        if not self._waiters:
            return
        p = self.policy
        total, keys = self.total, dict(self.by_key)
        for w in sorted(self._waiters, key=lambda w: w.order):
            cap = p.max_outstanding - (p.interactive_reserve if w.batch else 0)
            key_ok = w.key is None or p.per_key_concurrency == 0 or keys.get(w.key, 0) < p.per_key_concurrency
            if total < cap and key_ok and not w.fut.done():
                total += 1
                if w.key is not None:
                    keys[w.key] = keys.get(w.key, 0) + 1
                self._waiters.remove(w)
                w.fut.set_result(None)
            if total >= p.max_outstanding:
                break

    async def _acquire(self, key: Any, batch: bool, wait: bool) -> None:
        order = (1 if batch else 0, next(self._arrivals))
        queued_for_key = False
        try:
            while not (self._room(batch) and self._key_room(key)):
                if not self._key_room(key) and not queued_for_key:
                    if not wait and self.queued_by_key.get(key, 0) >= self.policy.per_key_queue:
                        self.stats["rejected_quota"] += 1
                        raise QuotaExceededError(
                            f"this API key has {self.by_key.get(key, 0)} requests in progress and "
                            f"{self.queued_by_key.get(key, 0)} queued, its quota; retry later")
                    queued_for_key = True
                    self.queued_by_key[key] = self.queued_by_key.get(key, 0) + 1
                elif not self._room(batch) and not wait:
                    self.stats["rejected_full"] += 1
                    what = "batch requests may use (the rest is kept for interactive ones)" if batch else "it admits"
                    raise QueueFullError(f"{self.total} requests are in progress, as many as the server {what}; "
                                         "retry later")
                w = _Waiter(order, key, batch, asyncio.get_running_loop().create_future())
                self._waiters.append(w)
                self.stats["waited"] += 1
                try:
                    await w.fut
                except asyncio.CancelledError:
                    if w in self._waiters:
                        self._waiters.remove(w)
                    elif w.fut.done() and not w.fut.cancelled():
                        self._wake()  # woken but leaving: the slot goes to the next one
                    raise
        finally:
            if queued_for_key:
                n = self.queued_by_key[key] - 1
                if n:
                    self.queued_by_key[key] = n
                else:
                    del self.queued_by_key[key]
        self._take(key, batch)

    # -- API -------------------------------------------------------------------------------------
    async def generate(self, prompt: str | Seq[int], params: SamplingParams, *, request_id: str | None = None,
                       request_class: RequestClass | str = RequestClass.INTERACTIVE, owner: Any = None,
                       wait: bool = False, program: str | None = None) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.generate once admitted. `owner`: the API key's owner hash (None: no per-key quota);
        `wait`: queue here (and ride out a full engine queue) instead of raising QueueFullError; `program`:
        the session or job task it belongs to (the engine orders waiting work by program)."""
        batch = RequestClass(request_class) == RequestClass.BATCH
        await self._acquire(owner, batch, wait)
        try:
            delay = ENGINE_FULL_BACKOFF_S[0]
            while True:
                agen = self.aengine.generate(prompt, params, request_id, request_class, program=program)
                try:
                    first = await agen.__anext__()
                except QueueFullError:
                    if not wait:
                        raise
                    self.stats["engine_full_retries"] += 1
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, ENGINE_FULL_BACKOFF_S[1])
                    continue
                except BaseException:  # cancelled while the engine adds it: the engine stream aborts it
                    await agen.aclose()
                    raise
                break
            try:
                if first.finished:
                    await self._check(params, first)
                yield first
                if not first.finished:
                    async for out in agen:
                        if out.finished:
                            await self._check(params, out)
                        yield out
            finally:
                await agen.aclose()
        finally:
            self._release(owner, batch)

    async def _check(self, params: SamplingParams, out: RequestOutput) -> None:
        if params.structured is None:
            return
        eng = self.aengine.engine
        for o in out.outputs:  # a stop string or stop token the client chose is its own stop
            if o.finish_reason == FinishReason.STOP and o.stop_reason is None:
                why = await asyncio.to_thread(check_output, params.structured, eng.tokenizer, o.token_ids,
                                              eng.eos_ids)
                if why is not None:
                    raise ConstraintFailedError(f"the structured output could not be enforced ({why}); nothing "
                                                "valid was generated; simplify the schema, pattern or grammar")

    def snapshot(self) -> dict[str, Any]:
        return {**self.outstanding, "waiting": len(self._waiters), "keys": len(self.by_key), **self.stats}


class AdmittedEngine:
    """What a job's agents use in place of the AsyncEngine: the same `engine`, `call`, `call_async`, with
    `generate` admitted through the gate as `owner`, waiting for room instead of failing."""

    def __init__(self, gate: Admission, owner: Any = None) -> None:
        self.gate, self.owner = gate, owner
        self.aengine = gate.aengine

    @property
    def engine(self):
        return self.aengine.engine

    @property
    def tokenizer(self):
        return self.aengine.tokenizer

    def call(self, fn):
        return self.aengine.call(fn)

    async def call_async(self, fn):
        return await self.aengine.call_async(fn)

    def generate(self, prompt: str | Seq[int], params: SamplingParams, request_id: str | None = None,
                 request_class: RequestClass | str = RequestClass.BATCH,
                 program: str | None = None) -> AsyncIterator[RequestOutput]:
        return self.gate.generate(prompt, params, request_id=request_id, request_class=request_class,
                                  owner=self.owner, wait=True, program=program)

"""The admission gate alone (engine/admission.py), over a stand-in engine whose requests finish when the
test says: the interactive reserve, per-key quotas, waiting in order, cancellation leaving nothing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kvstrata.engine.admission import Admission, AdmissionPolicy, QuotaExceededError
from kvstrata.engine.async_engine import QueueFullError

PARAMS = SimpleNamespace(structured=None)


class StandInEngine:
    """generate() yields one finished output once the test releases that request; `full` makes the
    next adds fail as a full engine queue does."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.full = 0

    async def generate(self, prompt, params, request_id=None, request_class="interactive", program=None):
        if self.full:
            self.full -= 1
            raise QueueFullError("engine queue full")
        ev = self.release.setdefault(prompt, asyncio.Event())
        self.started.append(prompt)
        await ev.wait()
        yield SimpleNamespace(finished=True, outputs=[])

    def finish(self, name: str) -> None:
        self.release.setdefault(name, asyncio.Event()).set()


async def run(gate: Admission, name: str, **kw) -> str:
    async for _ in gate.generate(name, PARAMS, **kw):
        pass
    return name


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_batch_never_takes_the_interactive_reserve():
    async def go():
        eng = StandInEngine()
        gate = Admission(eng, AdmissionPolicy(max_outstanding=4, interactive_reserve=1))
        batch = [asyncio.create_task(run(gate, f"b{i}", request_class="batch")) for i in range(3)]
        await settle()
        with pytest.raises(QueueFullError, match="kept for interactive"):
            await run(gate, "b-late", request_class="batch")
        person = asyncio.create_task(run(gate, "person"))  # the reserved slot
        await settle()
        assert "person" in eng.started
        with pytest.raises(QueueFullError):
            await run(gate, "person2")  # now truly full
        for n in ["b0", "b1", "b2", "person"]:
            eng.finish(n)
        assert await asyncio.gather(*batch, person) == ["b0", "b1", "b2", "person"]
        assert gate.total == 0 and gate.stats["rejected_full"] == 2

    asyncio.run(go())


def test_waiting_requests_are_admitted_in_order_interactive_first():
    async def go():
        eng = StandInEngine()
        gate = Admission(eng, AdmissionPolicy(max_outstanding=2, interactive_reserve=0))
        first = [asyncio.create_task(run(gate, n, wait=True, request_class="batch")) for n in ("a", "b")]
        await settle()
        queued = [asyncio.create_task(run(gate, n, wait=True, request_class="batch")) for n in ("c", "d")]
        await settle()
        person = asyncio.create_task(run(gate, "p", wait=True))
        await settle()
        assert eng.started == ["a", "b"] and len(gate._waiters) == 3
        eng.finish("a")
        await settle()
        assert eng.started[-1] == "p"  # the interactive waiter goes first
        eng.finish("b")
        await settle()
        assert eng.started[-1] == "c"  # then by arrival
        for n in "pcd":
            eng.finish(n)
        await asyncio.gather(*first, *queued, person)
        assert eng.started == ["a", "b", "p", "c", "d"] and gate.total == 0

    asyncio.run(go())


def test_per_key_concurrency_and_queue_quotas():
    async def go():
        eng = StandInEngine()
        gate = Admission(eng, AdmissionPolicy(max_outstanding=10, interactive_reserve=1, per_key_concurrency=1,
                                              per_key_queue=1))
        a1 = asyncio.create_task(run(gate, "a1", owner="A"))
        await settle()
        a2 = asyncio.create_task(run(gate, "a2", owner="A"))  # waits for A's slot
        await settle()
        with pytest.raises(QuotaExceededError, match="quota"):
            await run(gate, "a3", owner="A")
        b1 = asyncio.create_task(run(gate, "b1", owner="B"))  # another key is not held up
        await settle()
        assert eng.started == ["a1", "b1"]
        eng.finish("a1")
        eng.finish("b1")
        await settle()
        assert eng.started == ["a1", "b1", "a2"]
        eng.finish("a2")
        await asyncio.gather(a1, a2, b1)
        assert gate.by_key == {} and gate.queued_by_key == {} and gate.stats["rejected_quota"] == 1

    asyncio.run(go())


def test_a_cancelled_waiter_leaves_nothing_behind():
    async def go():
        eng = StandInEngine()
        gate = Admission(eng, AdmissionPolicy(max_outstanding=1, interactive_reserve=0, per_key_concurrency=1,
                                              per_key_queue=5))
        a = asyncio.create_task(run(gate, "a", owner="K"))
        await settle()
        waiters = [asyncio.create_task(run(gate, f"w{i}", owner="K", wait=True)) for i in range(3)]
        await settle()
        waiters[0].cancel()  # cancelled while queued
        await settle()
        assert len(gate._waiters) == 2
        eng.finish("a")
        while len(gate._waiters) == 2:  # until "a" is released and w1 woken
            await asyncio.sleep(0)
        waiters[1].cancel()  # woken (it fits now) but cancelled before it ran: the slot passes on
        await settle()
        eng.finish("w2")
        await asyncio.gather(a, *waiters, return_exceptions=True)
        assert eng.started == ["a", "w2"]
        assert gate.total == 0 and gate._waiters == [] and gate.by_key == {} and gate.queued_by_key == {}

    asyncio.run(go())


def test_a_waiting_request_rides_out_a_full_engine_queue(monkeypatch):
    monkeypatch.setattr("kvstrata.engine.admission.ENGINE_FULL_BACKOFF_S", (0.001, 0.01))

    async def go():
        eng = StandInEngine()
        gate = Admission(eng, AdmissionPolicy(max_outstanding=4, interactive_reserve=1))
        eng.full = 3
        eng.finish("job")
        assert await run(gate, "job", wait=True, request_class="batch") == "job"
        assert gate.stats["engine_full_retries"] == 3
        eng.full = 1
        with pytest.raises(QueueFullError):  # an HTTP client's request does not wait
            await run(gate, "http")
        assert gate.total == 0

    asyncio.run(go())

"""AsyncEngine built from a factory: the engine is constructed on the thread that steps it (one OpenMP
team for all of the model's tensor work, see engine/async_engine.py), and a failing build surfaces in
the caller as the original error with no thread left behind."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kvstrata.core import KvstrataError, SamplingParams
from kvstrata.engine.async_engine import AsyncEngine, EngineDeadError
from kvstrata.engine.llm_engine import LLMEngine


def test_factory_builds_on_the_engine_thread_and_serves(tiny_llama):
    built_on: list[str] = []

    def factory() -> LLMEngine:
        built_on.append(threading.current_thread().name)
        return LLMEngine(model=str(tiny_llama), kv_device_bytes="16M")

    aeng = AsyncEngine(factory)
    try:
        assert built_on == ["kvstrata-engine"] and isinstance(aeng.engine, LLMEngine)

        async def run():
            last = None
            async for out in aeng.generate([1, 2, 3, 4], SamplingParams(max_tokens=5, ignore_eos=True)):
                last = out
            return last

        out = asyncio.run(run())
        assert out.finished and len(out.outputs[0].token_ids) == 5
    finally:
        aeng.shutdown()


def test_factory_error_is_raised_by_the_constructor(tmp_path):
    def factory() -> LLMEngine:
        raise KvstrataError("no such model")

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(KvstrataError, match="no such model"):
        AsyncEngine(factory)
    assert "kvstrata-engine" not in {t.name for t in threading.enumerate()} - before


# -- cancellation at every await point never harms the engine ----------------------------------------
# Callers are cancelled after k passes of the event loop (k = 0 .. 11: before their command is queued,
# while it waits in the queue, while it runs, while the stream is open) and after short real delays,
# while another request keeps the engine busy. The engine must stay alive and keep nothing of theirs.


async def _cancel_after(task: asyncio.Task, k: int, delay: float) -> None:
    for _ in range(k):
        await asyncio.sleep(0)
    if delay:
        await asyncio.sleep(delay)
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, KvstrataError):
        pass


def _busy_engine(tiny_llama) -> AsyncEngine:
    return AsyncEngine(LLMEngine(model=str(tiny_llama), kv_device_bytes="16M"))


async def _consume(aeng: AsyncEngine, prompt: list[int], max_tokens: int) -> list[int]:
    last = None
    async for out in aeng.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)):
        last = out
    return last.outputs[0].token_ids


def test_a_storm_of_cancelled_calls_never_kills_the_engine(tiny_llama):
    aeng = _busy_engine(tiny_llama)

    def slow(e):  # long enough that some cancellations land while it runs on the engine thread
        time.sleep(0.0005)
        return e.pool.summary()

    async def run():
        busy = asyncio.ensure_future(_consume(aeng, [5, 6, 7], 600))
        await asyncio.sleep(0.05)
        storm = []
        for k in range(12):
            for delay in (0.0, 0.0002, 0.001, 0.003):
                for _ in range(4):
                    storm.append(_cancel_after(asyncio.ensure_future(aeng.call_async(slow)), k, delay))
        await asyncio.gather(*storm)
        assert aeng._dead is None
        assert (await aeng.call_async(lambda e: 41 + 1)) == 42  # commands still run
        assert len(await busy) == 600  # the busy request was never disturbed
        assert len(await _consume(aeng, [9, 10], 4)) == 4  # and new requests are served

    try:
        asyncio.run(run())
        assert aeng._dead is None and not aeng.engine.requests and not aeng._streams
    finally:
        aeng.shutdown()


def test_generates_cancelled_at_every_await_point_leave_no_request_behind(tiny_llama):
    aeng = _busy_engine(tiny_llama)

    async def run():
        busy = asyncio.ensure_future(_consume(aeng, [5, 6, 7], 400))
        await asyncio.sleep(0.05)
        storm = []
        for k in range(12):
            for delay in (0.0, 0.0005, 0.002, 0.01):
                for _ in range(3):
                    t = asyncio.ensure_future(_consume(aeng, [11, 12, 13, 14], 500))
                    storm.append(_cancel_after(t, k, delay))
        await asyncio.gather(*storm)
        # commands run in order, so this runs after every abort the cancellations queued
        left = await aeng.call_async(lambda e: sorted(e.requests))
        assert len(left) == 1, left  # only the busy request
        assert len(await busy) == 400
        assert aeng._dead is None

    try:
        asyncio.run(run())
        assert not aeng.engine.requests and not aeng._streams and not aeng.engine.has_unfinished()
    finally:
        aeng.shutdown()


def test_commands_and_streams_queued_when_the_engine_dies_fail_instead_of_hanging(tiny_llama):
    """The engine dies (three failed steps in a row) while a call and a generate wait in its queue:
    both get EngineDeadError at once, and later calls are refused the same way."""
    aeng = _busy_engine(tiny_llama)
    eng = aeng.engine
    gate, in_third = threading.Event(), threading.Event()
    calls = [0]

    def failing_step():
        calls[0] += 1
        if calls[0] == 3:
            in_third.set()
            gate.wait(10)
        raise RuntimeError("kernel exploded")

    async def run():
        stream = aeng.generate([1, 2, 3], SamplingParams(max_tokens=4))
        eng.step, eng.has_unfinished = failing_step, lambda: True
        aeng._wake.set()
        assert await asyncio.to_thread(in_third.wait, 10)
        queued_call = asyncio.ensure_future(aeng.call_async(lambda e: 1))
        queued_gen = asyncio.ensure_future(_consume(aeng, [4, 5, 6], 4))
        await asyncio.sleep(0.05)
        gate.set()
        for fut in (queued_call, queued_gen):
            with pytest.raises(EngineDeadError, match="kernel exploded"):
                await asyncio.wait_for(fut, 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(aeng.call_async(lambda e: 1), 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(stream.__anext__(), 5)

    try:
        asyncio.run(run())
        assert aeng._dead is not None
    finally:
        gate.set()
        aeng.shutdown()


def test_shutdown_fails_what_is_queued_and_refuses_more(tiny_llama):
    aeng = _busy_engine(tiny_llama)
    gate = threading.Event()

    async def run():
        blocker = asyncio.ensure_future(aeng.call_async(lambda e: gate.wait(10)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(aeng.call_async(lambda e: 1))
        await asyncio.sleep(0.05)
        aeng._stop = True  # what shutdown() sets; the thread finishes the blocking command first
        gate.set()
        assert await asyncio.wait_for(blocker, 5) is True
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(queued, 5)
        await asyncio.to_thread(aeng._thread.join, 5)
        with pytest.raises(EngineDeadError, match="shut down"):
            await aeng.call_async(lambda e: 1)

    try:
        asyncio.run(run())
    finally:
        gate.set()
        aeng.shutdown()

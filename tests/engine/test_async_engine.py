"""AsyncEngine built from a factory: the engine is constructed on the thread that steps it (one OpenMP
team for all of the model's tensor work, see engine/async_engine.py), and a failing build surfaces in
the caller as the original error with no thread left behind."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvstrata.core import KvstrataError, SamplingParams
from kvstrata.engine.async_engine import AsyncEngine
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

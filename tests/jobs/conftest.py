"""Fixtures of the jobs tests: a tiny random-weight engine, a fresh session store, a job runner helper."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _sample_tools_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # jobs_sample_tools, the MCP server script


@pytest.fixture(scope="module")
def tiny_aeng(tiny_llama):
    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine

    aeng = AsyncEngine(LLMEngine(model=str(tiny_llama), kv_device_bytes="32M"))
    yield aeng
    aeng.shutdown()


@pytest.fixture
def store(tmp_path):
    from kvstrata.sessions import open_store

    s = open_store(tmp_path / "jobs.db")
    yield s
    s.close()


def run_job(aeng, store, job: dict, **mgr_kw):
    """Create and run `job` to its end in a fresh event loop; returns (job id, results by task id)."""
    from kvstrata.jobs import JobManager

    async def go():
        mgr = JobManager(aeng, store, **mgr_kw)
        job_id = await mgr.create(job)
        await mgr.run(job_id)
        return job_id, await mgr.results(job_id)

    job_id, recs = asyncio.run(go())
    return job_id, {r["task_id"]: r for r in recs}


def forced(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}

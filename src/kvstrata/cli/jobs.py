"""`kvstrata jobs`: run files of agent tasks without a person in the loop (docs/jobs.md).

    kvstrata jobs run tasks.jsonl [--store DB] [--output results.jsonl] [engine flags]
    kvstrata jobs status [JOB_ID] [--store DB]
    kvstrata jobs results JOB_ID [--store DB] [--no-transcript]

`run` is resumable: the job is found again by the sha256 of the file, so after a crash or a kill the
same command continues every unfinished task where it stopped (--new starts over, --job-id picks one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from kvstrata.config import add_engine_args, engine_config_from_args
from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="run (or resume) a job file")
    r.add_argument("file", help="job file: JSONL (one task a line, optional header line) or .json")
    _store_arg(r)
    r.add_argument("--output", "-o", help="results JSONL (default ./<file stem>.results.jsonl)")
    r.add_argument("--new", action="store_true", help="start a new job even if this file has an unfinished one")
    r.add_argument("--job-id", help="resume this job (its stored spec is used, not the file's)")
    r.add_argument("--retry-failed", action="store_true", help="run failed tasks of a resumed job again")
    r.add_argument("--no-recall", action="store_true",
                   help="no built-in memory_search tool (no background embedding of the tasks' messages)")
    r.add_argument("--no-progress", action="store_true", help="no live display: one plain line per finished task")
    r.add_argument("--progress-every", type=float, default=5.0,
                   help="seconds between plain progress lines when stderr is not a terminal (default 5)")
    add_engine_args(r)
    s = sub.add_parser("status", help="a job's state and task counts (all jobs without an id)")
    s.add_argument("job_id", nargs="?")
    _store_arg(s)
    q = sub.add_parser("results", help="print a job's results as JSONL")
    q.add_argument("job_id")
    q.add_argument("--no-transcript", action="store_true")
    _store_arg(q)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="session store: SQLite path or postgresql:// URL (default $KVSTRATA_HOME/sessions.db)")


def _open_store(arg: str | None):
    from kvstrata.sessions import open_store

    if arg:
        return open_store(arg)
    from kvstrata.core import kvstrata_home

    home = kvstrata_home()
    home.mkdir(parents=True, exist_ok=True)
    return open_store(str(home / "sessions.db"))


def run(a: argparse.Namespace) -> int:
    cmd = getattr(a, "jobs_command", None)
    if cmd == "run":
        return _run(a)
    if cmd == "status":
        return _status(a)
    if cmd == "results":
        return _results(a)
    raise KvstrataError("give a sub-command: kvstrata jobs run | status | results (see --help)")


def find_job(store, digest: str) -> str | None:
    """The newest unfinished-or-done (not cancelled / failed) job created from a file with this sha256."""
    from kvstrata.sessions import ANY_OWNER, JobState

    best, after = None, None
    while True:
        page = store.list_jobs(owner=ANY_OWNER, limit=200, after=after)
        for j in page.items:
            src = (j.spec or {}).get("source") or {}
            if src.get("sha256") == digest and j.state not in (JobState.CANCELLED, JobState.FAILED):
                best = j.id
        if not page.has_more:
            return best
        after = page.next_after


def _run(a: argparse.Namespace) -> int:
    from kvstrata.jobs.spec import JobSpec, read_job_file

    job, digest = read_job_file(a.file)
    JobSpec.parse(job)  # a bad file fails before the model loads
    out = Path(a.output or f"{Path(a.file).stem}.results.jsonl")
    store = _open_store(a.store)
    try:
        return asyncio.run(_run_async(a, store, job, digest, out))
    finally:
        store.close()


def _names_memory_search(job: dict) -> bool:
    """Whether a task (or the defaults) lists the built-in memory_search tool: only then is recall started."""
    from kvstrata.memory import is_memory_search

    lists = [t.get("tools") for t in job.get("tasks") or [] if isinstance(t, dict)]
    lists.append((job.get("defaults") or {}).get("tools"))
    return any(isinstance(ts, list) and any(x == "memory_search" or is_memory_search(x) for x in ts) for ts in lists)


async def _run_async(a, store, job: dict, digest: str, out: Path) -> int:
    from rich.console import Console

    from kvstrata.engine.async_engine import AsyncEngine
    from kvstrata.engine.llm_engine import LLMEngine
    from kvstrata.jobs.manager import JobManager
    from kvstrata.jobs.progress import JobProgress, ProgressDisplay, summary_table
    from kvstrata.jobs.results import ResultsFile

    job_id = a.job_id or (None if a.new else await asyncio.to_thread(find_job, store, digest))
    cfg = engine_config_from_args(a)
    aeng = AsyncEngine(lambda: LLMEngine(cfg))  # built on the thread that steps it (see engine/async_engine.py)
    engine = aeng.engine
    recall = None
    if not a.no_recall and _names_memory_search(job):
        from kvstrata.memory import Recall

        recall = Recall(store).start()
    mgr = JobManager(aeng, store, recall=recall)
    err = Console(file=sys.stderr)
    try:
        if job_id is None:
            job_id = await mgr.create(job, source={"path": str(Path(a.file).resolve()), "sha256": digest})
            err.print(f"job {job_id}: {len(job['tasks'])} tasks; results -> {out}", markup=False, highlight=False)
        else:
            err.print(f"job {job_id}: resuming; results -> {out}", markup=False, highlight=False)
        rf = ResultsFile(out)
        rf.rewrite(await mgr.results(job_id))  # lines of tasks finished before: exactly once
        progress = JobProgress(job_id, len(job["tasks"]))
        display = ProgressDisplay(progress, err, every_s=a.progress_every,
                                  live=False if a.no_progress else None)
        if a.no_progress:
            display.every_s = float("inf")

        async def done(index: int) -> None:
            rf.append(await mgr.task_record(job_id, index))
            display.refresh()

        async def refresher() -> None:
            while True:
                await asyncio.sleep(0.5)
                display.refresh()

        t0 = time.time()
        display.start()
        ticker = asyncio.create_task(refresher())
        try:
            await mgr.run(job_id, on_task_done=done, retry_failed=a.retry_failed, progress=progress)
        finally:
            ticker.cancel()
            display.stop()
        records = await mgr.results(job_id)
        rf.rewrite(records)
        Console(file=sys.stdout, width=140).print(summary_table(records, time.time() - t0))
        st = await mgr.status(job_id)
        print(json.dumps({"job_id": job_id, "state": st["state"], "tasks": st["tasks"], "results": str(out)}))
        return 0
    finally:
        if recall is not None:
            recall.stop()
        aeng.shutdown()
        engine.close()  # write cached device KV down the tiers, so a later run finds it


def _status(a: argparse.Namespace) -> int:
    from kvstrata.sessions import ANY_OWNER

    store = _open_store(a.store)
    try:
        if a.job_id:
            from kvstrata.jobs.manager import JobManager

            print(json.dumps(asyncio.run(JobManager(None, store).status(a.job_id)), indent=2))
            return 0
        after = None
        while True:
            page = store.list_jobs(owner=ANY_OWNER, limit=200, after=after)
            for j in page.items:
                src = (j.spec or {}).get("source") or {}
                print(f"{j.id}  {j.state.value:<9}  {j.num_tasks:>5} tasks  {src.get('path', '-')}")
            if not page.has_more:
                return 0
            after = page.next_after
    finally:
        store.close()


def _results(a: argparse.Namespace) -> int:
    from kvstrata.jobs.manager import JobManager

    store = _open_store(a.store)
    try:
        recs = asyncio.run(JobManager(None, store).results(a.job_id, include_transcript=not a.no_transcript))
    finally:
        store.close()
    for r in recs:
        print(json.dumps(r, ensure_ascii=False))
    return 0

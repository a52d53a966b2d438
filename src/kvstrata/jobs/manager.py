"""JobManager: create, run, resume and report agent jobs over one AsyncEngine and one SessionStore.

The CLI and the HTTP routes are thin wrappers over it:

    mgr = JobManager(aengine, store)
    job_id = await mgr.submit(job_dict)          # validate, create (job + one task per input), run in background
    await mgr.status(job_id)                      # state, task counts, live progress
    await mgr.results(job_id)                     # one record per finished task (docs/jobs.md)
    await mgr.run(job_id)                         # or run it in the current task until it ends

All progress lives in the store, so `run(job_id)` on a job that an earlier process left unfinished
resumes every unfinished task where it stopped (see agent.py). Everything runs on the caller's
asyncio loop; the store's blocking calls go to threads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from kvstrata.core import KvstrataError
from kvstrata.engine.admission import Admission, AdmissionPolicy, AdmittedEngine
from kvstrata.engine.async_engine import EngineDeadError
from kvstrata.jobs.agent import Agent, RunContext
from kvstrata.jobs.progress import JobProgress
from kvstrata.jobs.results import result_record
from kvstrata.jobs.spec import JobLimits, JobSpec
from kvstrata.jobs.tools import Tool, ToolContext, load_source
from kvstrata.jobs.workers import TaskTools, ToolWorkers
from kvstrata.sessions import ANY_OWNER, JobState, StoreUnavailable, TaskState
from kvstrata.sessions.kv import SessionKV

log = logging.getLogger(__name__)
TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
STORE_RETRY_S = (1.0, 30.0)  # a job whose store is down resumes after this backoff (first, most)


def memory_tool(recall: Any) -> Tool:
    """The built-in `memory_search` (kvstrata.memory.tools): a search of the calling task's own session,
    run on a tool worker thread (the query's embedding never runs on the engine thread)."""
    from kvstrata.memory.tools import memory_search_tool, render_hits

    def memory_search(query: str, k: int = 5, tool_context: ToolContext | None = None) -> str:
        sid = tool_context.session_id if tool_context is not None else None
        return render_hits(recall.search_sync(ANY_OWNER, query, max(1, min(int(k), 20)), session_id=sid))

    f = memory_search_tool()["function"]
    return Tool(name=f["name"], description=f["description"], parameters=f["parameters"], source="builtin:memory",
                fn=memory_search, ctx_param="tool_context")


class JobManager:
    def __init__(self, aengine, store, *, skv: SessionKV | None = None, allow_python_modules: bool = True,
                 allow_mcp: bool = True, kv_sample_s: float = 2.0, limits: JobLimits | None = None,
                 admission: Admission | None = None, recall: Any = None) -> None:
        """skv: the SessionKV that owns the sessions' KV (the server passes its own; default: a new one).
        allow_python_modules / allow_mcp: whether job specs may name tool modules by path / start MCP
        server commands. The CLI allows both; a server should allow neither for untrusted clients (entry
        points, installed by the operator, are always allowed). limits: what one job may ask for (a
        server's flags; None: no limit). admission: the gate every agent's generation passes (the
        server's, shared with its HTTP requests; default: one over this engine alone). Agents wait there
        for room as batch requests, so a job never takes the interactive reserve and never fails on a
        full queue. recall: a kvstrata.memory.Recall; with it, a task that names `memory_search` in its
        tools can search its own earlier conversation."""
        self.aeng, self.store = aengine, store
        self.skv = skv if skv is not None else SessionKV(aengine, store)
        self.allow_python_modules, self.allow_mcp = allow_python_modules, allow_mcp
        self.limits = limits or JobLimits()
        self.gate = admission or Admission(aengine, AdmissionPolicy.for_engine(
            aengine.engine.scheduler.max_num_seqs, aengine.max_waiting))
        self.kv_sample_s = kv_sample_s
        self.recall = recall
        self.progress: dict[str, JobProgress] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    async def _db(self, fn, *a, **kw):
        return await asyncio.to_thread(fn, *a, **kw)

    # -- create -------------------------------------------------------------------------------------
    async def create(self, job: dict, *, owner: str | None = None, source: dict | None = None) -> str:
        """Validate `job` (the job-file object) and store it as a QUEUED job; returns its id."""
        spec = JobSpec.parse(job, self.limits)
        if spec.mcp_servers and not self.allow_mcp:
            raise KvstrataError("this server does not start MCP servers named in a job; ask the operator to "
                                "configure them, or run the job with `kvstrata jobs run`")
        for src in spec.tool_sources:
            if "python" in src and not self.allow_python_modules:
                raise KvstrataError(f"tool source {src['python']!r}: module paths are not allowed here; use tools "
                                    "registered through the 'kvstrata.tools' entry-point group")
        header = {k: v for k, v in job.items() if k != "tasks"}
        j = await self._db(self.store.create_job, {"job": header, "source": source}, owner=owner,
                           tasks=list(job["tasks"]))
        return j.id

    async def submit(self, job: dict, *, owner: str | None = None, source: dict | None = None) -> str:
        """create() and start running it in the background on this loop; returns the job id."""
        job_id = await self.create(job, owner=owner, source=source)
        self.start(job_id)
        return job_id

    def start(self, job_id: str) -> asyncio.Task:
        t = self._tasks.get(job_id)
        if t is None or t.done():
            t = self._tasks[job_id] = asyncio.create_task(self._run_logged(job_id), name=f"job-{job_id}")
        return t

    async def _run_logged(self, job_id: str) -> None:
        delay = STORE_RETRY_S[0]
        while True:
            try:
                return await self._run_once(job_id)
            except StoreUnavailable as e:  # nothing is lost: every step is in the store; resume when it is back
                log.warning("job %s: the session store is unavailable (%s); resuming in %.0f s", job_id, e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, STORE_RETRY_S[1])

    async def _run_once(self, job_id: str) -> None:
        try:
            await self.run(job_id)
        except (asyncio.CancelledError, StoreUnavailable):
            raise
        except KvstrataError as e:  # e.g. a tool source that does not load: the job fails with the reason
            log.warning("job %s failed: %s", job_id, e)
            try:
                await self._db(self.store.set_job_state, job_id, JobState.FAILED, owner=ANY_OWNER, error=str(e))
            except Exception:  # noqa: BLE001 - already terminal
                pass
        except Exception:
            log.exception("job %s stopped with an internal error; it stays resumable", job_id)

    async def resume_unfinished(self, *, via: str | None = None) -> list[str]:
        """Start every QUEUED or RUNNING job of the store in the background (at server start); with `via`,
        only those whose source says they came that way (the server resumes what clients submitted over
        HTTP, not the job files of `kvstrata jobs run`, whose tools it may not be allowed to load)."""
        ids: list[str] = []
        for state in (JobState.RUNNING, JobState.QUEUED):
            after = None
            while True:
                page = await self._db(self.store.list_jobs, owner=ANY_OWNER, state=state, limit=100, after=after)
                ids += [j.id for j in page.items if via is None or ((j.spec or {}).get("source") or {}).get("via") == via]
                if not page.has_more:
                    break
                after = page.next_after
        for i in ids:
            self.start(i)
        return ids

    # -- run ----------------------------------------------------------------------------------------
    async def _load(self, job_id: str) -> tuple[Any, list, JobSpec]:
        job = await self._db(self.store.get_job, job_id, owner=ANY_OWNER)
        tasks = await self._db(self.store.get_job_tasks, job_id, owner=ANY_OWNER)
        raw = dict((job.spec or {}).get("job") or {})
        raw["tasks"] = [t.input for t in tasks]
        return job, tasks, JobSpec.parse(raw)

    async def _tools(self, spec: JobSpec) -> tuple[dict[str, Tool], list]:
        registry: dict[str, Tool] = {}
        conns: list = []

        def add(tools: list[Tool]) -> None:
            for t in tools:
                if t.name in registry:
                    raise KvstrataError(f"two tools are named {t.name!r} ({registry[t.name].source} and {t.source}); "
                                        "rename one (or give the MCP server a tool_prefix)")
                registry[t.name] = t

        if self.recall is not None:
            add([memory_tool(self.recall)])
        try:
            for src in spec.tool_sources:
                add(load_source(src, allow_python=self.allow_python_modules))
            if spec.mcp_servers and not self.allow_mcp:
                raise KvstrataError("this process does not start MCP servers named in a job")
            from kvstrata.jobs.mcp_tools import MCPConnection

            for m in spec.mcp_servers:
                c = MCPConnection(m)
                conns.append(c)
                add(await c.start())
        except BaseException:
            for c in conns:
                await c.close()
            raise
        return registry, conns

    async def run(self, job_id: str, *, on_task_done: Callable[[int], Awaitable[None]] | None = None,
                  retry_failed: bool = False, progress: JobProgress | None = None) -> JobProgress:
        """Run (or resume) the job in the current task until every task is done or failed."""
        job, tasks, spec = await self._load(job_id)
        if job.state in TERMINAL:
            p = progress or JobProgress(job_id, len(tasks))
            p.done = sum(t.state == TaskState.DONE for t in tasks)
            p.failed = sum(t.state == TaskState.FAILED for t in tasks)
            return p
        if retry_failed:
            for t in tasks:
                if t.state == TaskState.FAILED:
                    await self._db(self.store.update_job_task, job_id, t.index, state=TaskState.PENDING)
            tasks = await self._db(self.store.get_job_tasks, job_id, owner=ANY_OWNER)
        if job.state == JobState.QUEUED:
            await self._db(self.store.set_job_state, job_id, JobState.RUNNING, owner=ANY_OWNER)
        p = progress or JobProgress(job_id, len(tasks))
        p.total = len(tasks)
        p.done = sum(t.state == TaskState.DONE for t in tasks)
        p.failed = sum(t.state == TaskState.FAILED for t in tasks)
        self.progress[job_id] = p
        registry, conns = await self._tools(spec)
        lim = self.limits  # a job stored under other limits (a resume) runs within today's
        workers = ToolWorkers(min(spec.tool_workers, lim.max_tool_workers or spec.tool_workers))
        rc = RunContext(AdmittedEngine(self.gate, job.owner), self.store, self.skv, workers, job_id, p, owner=job.owner)
        sem = asyncio.Semaphore(min(spec.max_concurrent_agents, lim.max_agents or spec.max_concurrent_agents))

        async def one(jt) -> None:
            async with sem:
                ts = spec.tasks[jt.index]
                try:
                    tools = TaskTools(registry, ts, spec.max_tool_output_chars)
                except KvstrataError as e:  # the task names a tool nobody provides: it fails alone
                    await self._db(self.store.update_job_task, job_id, jt.index, state=TaskState.FAILED,
                                   result={"status": "failed", "finish_reason": "error", "error": str(e)}, error=str(e))
                    p.task_phase(jt.index, "failed")
                else:
                    await Agent(rc, ts, tools).run(jt)
                if on_task_done is not None:
                    await on_task_done(jt.index)

        todo = [t for t in tasks if t.state in (TaskState.PENDING, TaskState.RUNNING)]
        sampler = asyncio.create_task(self._sample_kv(p))
        try:
            results = await asyncio.gather(*(one(t) for t in todo), return_exceptions=True)
            for r in results:  # an engine that died: stop, leaving the job resumable
                if isinstance(r, BaseException):
                    raise r
        finally:
            sampler.cancel()
            for c in conns:
                await c.close()
        await self._db(self.store.set_job_state, job_id, JobState.DONE, owner=ANY_OWNER)
        return p

    async def _sample_kv(self, p: JobProgress) -> None:
        """Every kv_sample_s: where the KV of the active sessions lives, per tier (for the display)."""
        while True:
            await asyncio.sleep(self.kv_sample_s)
            ids = list(p.live_tokens.values())[:128]
            if not ids:
                p.kv_by_tier = {}
                continue
            try:
                locs = await self.aeng.call_async(lambda e: [e.kv.locate(x) for x in ids])
            except EngineDeadError:
                return
            except Exception as e:  # a display detail; never stops the job
                log.debug("locate failed: %s", e)
                continue
            tot: dict[str, int] = {}
            for loc, x in zip(locs, ids):
                for tier, n in loc.items():
                    tot[tier] = tot.get(tier, 0) + n
                rest = len(x) - sum(loc.values())
                if rest > 0:
                    tot["none"] = tot.get("none", 0) + rest
            p.kv_by_tier = tot

    # -- report -------------------------------------------------------------------------------------
    async def status(self, job_id: str, *, owner: Any = ANY_OWNER) -> dict:
        job = await self._db(self.store.get_job, job_id, owner=owner)
        tasks = await self._db(self.store.get_job_tasks, job_id, owner=owner)
        counts = {s.value: 0 for s in TaskState}
        for t in tasks:
            counts[t.state.value] += 1
        out = {"id": job.id, "object": "job", "state": job.state.value, "error": job.error,
               "created_at": job.created_at, "updated_at": job.updated_at, "num_tasks": job.num_tasks,
               "tasks": counts, "steps": sum(t.steps for t in tasks),
               "prompt_tokens": sum(t.prompt_tokens for t in tasks),
               "completion_tokens": sum(t.completion_tokens for t in tasks), "progress": None}
        p = self.progress.get(job_id)
        if p is not None and job.state not in TERMINAL:
            out["progress"] = p.snapshot()
        return out

    async def task_record(self, job_id: str, index: int, *, owner: Any = ANY_OWNER) -> dict:
        t = await self._db(self.store.get_job_task, job_id, index, owner=owner)
        sess = None
        if t.session_id:
            try:
                sess = await self._db(self.store.get_session, t.session_id, owner=ANY_OWNER)
            except KvstrataError:  # deleted meanwhile
                sess = None
        return result_record(job_id, t, sess)

    async def results(self, job_id: str, *, owner: Any = ANY_OWNER, include_transcript: bool = True) -> list[dict]:
        """One record per finished (done or failed) task, in task order."""
        tasks = await self._db(self.store.get_job_tasks, job_id, owner=owner)
        out = []
        for t in tasks:
            if t.state in (TaskState.DONE, TaskState.FAILED):
                r = await self.task_record(job_id, t.index)
                if not include_transcript:
                    r.pop("transcript", None)
                out.append(r)
        return out

    async def cancel(self, job_id: str, *, owner: Any = ANY_OWNER) -> dict:
        """Stops the job's agents (their engine requests aborted, waiters leave the admission queue) and
        marks it cancelled; the store puts its running tasks back to pending in the same write."""
        await self._db(self.store.get_job, job_id, owner=owner)  # JobNotFound for another owner
        t = self._tasks.pop(job_id, None)
        if t is not None:
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
        await self._db(self.store.set_job_state, job_id, JobState.CANCELLED, owner=ANY_OWNER)
        return await self.status(job_id, owner=owner)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop background runs; their jobs stay RUNNING in the store and resume on the next start."""
        ts = [t for t in self._tasks.values() if not t.done()]
        for t in ts:
            t.cancel()
        if ts:
            await asyncio.wait(ts, timeout=timeout_s)
        self._tasks.clear()

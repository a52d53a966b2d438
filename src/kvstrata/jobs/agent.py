"""One agent's loop, checkpointed step by step in the session store.

    generate -> append the assistant message (one transaction) -> run its tool calls (each recorded
    before and after it runs) -> append the tool results (one transaction) -> generate ...

until the agent answers without a tool call (then the next follow-up user message, if any) or hits a
limit (steps, generated tokens, deadline, context). Where to continue is read from the session's
messages alone, so a process killed at any point resumes at the right place: a step whose assistant
message was appended is never generated again, a tool call whose outcome was recorded is never run
again (its recorded result is reused), and stateful toolsets get back the state that their last
recorded call left (stored with that call's result).

Each step is a session turn (sessions/turns.py, the function the server's routes use too): the stored
token ids are the prompt's source of truth, so the engine's prefix cache (device pool or any tier)
serves the prefix after a tool wait or a restart. While the tools run the session is paused through
SessionKV (sessions/kv.py): the cost model keeps, moves down or drops its KV, and the placement is
recorded in the store, so a restart during a tool wait resumes from the tier the KV went to.

Near the window a step compacts the session first (memory/compaction.py; the task's `compaction` key):
the model summarises the older turns, the log keeps them, and the agent goes on from the summary and its
recent turns, whose KV is computed once and cached, instead of ending at `context_length`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from kvstrata.core import ContextLengthError, RequestClass, SamplingParams
from kvstrata.engine.async_engine import EngineDeadError
from kvstrata.jobs.results import summarize
from kvstrata.jobs.tools import ToolContext
from kvstrata.jobs.workers import TaskTools, ToolWorkers
from kvstrata.memory import CompactionPolicy, maybe_compact
from kvstrata.memory.compaction import default_threshold
from kvstrata.sessions import ANY_OWNER, JobTask, Session, SessionState, StoreUnavailable, TaskState
from kvstrata.sessions import turns
from kvstrata.sessions.kv import SessionKV
from kvstrata.tokenizer.tools import forced_tool_call_spec, parse_tool_calls

log = logging.getLogger(__name__)
_rids = itertools.count()


@dataclass
class RunContext:
    aeng: Any  # AsyncEngine
    store: Any  # SessionStore
    skv: SessionKV
    workers: ToolWorkers
    job_id: str
    progress: Any  # jobs.progress.JobProgress
    owner: str | None = None  # the job's owner: its task sessions are the job's key's too


class Agent:
    def __init__(self, rc: RunContext, task, tools: TaskTools) -> None:
        self.rc, self.task, self.tools = rc, task, tools
        self.eng = rc.aeng.engine
        self.sess: Session | None = None
        self.compaction_refused: list[str] = []  # why compacting could not shorten the context, each time

    async def _db(self, fn, *a, **kw):
        return await asyncio.to_thread(fn, *a, **kw)

    # -- start or pick up ---------------------------------------------------------------------------
    async def _open(self, jt: JobTask) -> None:
        st, t = self.rc.store, self.task
        if jt.session_id:
            sess = await self._db(st.get_session, jt.session_id, owner=ANY_OWNER)
            if sess.state == SessionState.CLOSED:  # a failed task retried: start its conversation over
                jt = dataclasses.replace(jt, session_id=None)
        if jt.session_id:
            self.sess = sess
            calls = await self._db(st.list_tool_calls, jt.session_id)
            snaps: dict[str, Any] = {}
            for rec in calls:  # in start order: the last recorded state of each toolset wins
                if rec.finished and isinstance(rec.result, dict) and isinstance(rec.result.get("state"), dict):
                    snaps.update(rec.result["state"])
            self.tools.restore(snaps)
            if jt.state == TaskState.PENDING:
                await self._db(st.update_job_task, self.rc.job_id, t.index, state=TaskState.RUNNING)
            return
        meta = {"job_id": self.rc.job_id, "task_index": t.index, "task_id": t.id, "started_at": time.time()}
        self.sess = await self._db(st.create_session, owner=self.rc.owner, messages=list(t.messages), system_prompt=t.system,
                                   tools=self.tools.defs or None, request_class=RequestClass.BATCH, metadata=meta)
        await self._db(st.update_job_task, self.rc.job_id, t.index, state=TaskState.RUNNING, session_id=self.sess.id)

    def _deadline(self) -> float | None:
        t = self.task
        ds = []
        if t.deadline is not None:
            ds.append(float(t.deadline))
        if t.deadline_s is not None:
            ds.append(float(self.sess.metadata.get("started_at", time.time())) + t.deadline_s)
        return min(ds) if ds else None

    async def _append(self, messages: list[dict], state: SessionState) -> None:
        await turns.append(self.rc.store, self.sess, ANY_OWNER, messages, state)

    # -- the loop -------------------------------------------------------------------------------------
    async def run(self, jt: JobTask) -> dict:
        """Runs (or resumes) the task to its end; records and returns its result summary."""
        p, t = self.rc.progress, self.task
        await self._open(jt)
        p.task_phase(t.index, "running", self.sess.id)
        reason, error = None, None
        try:
            while reason is None:
                msgs = self.sess.messages
                last = msgs[-1]
                if last["role"] == "assistant" and last.get("tool_calls"):
                    await self._run_tools(last["tool_calls"])
                elif last["role"] == "assistant":
                    n_user = sum(1 for m in msgs if m["role"] == "user")
                    k = n_user - sum(1 for m in t.messages if m["role"] == "user")
                    if k < len(t.followups):
                        await self._append([{"role": "user", "content": t.followups[k]}], SessionState.ACTIVE)
                    else:
                        reason = "answered"
                else:
                    reason = await self._step()
        except (EngineDeadError, StoreUnavailable, asyncio.CancelledError):  # the job stops and resumes later
            raise
        except Exception as e:  # an engine or store error for this task: it fails, the job goes on
            log.exception("task %s failed", t.id)
            reason, error = "error", f"{type(e).__name__}: {e}"
        summary = summarize(self.sess.messages, self.sess.metadata, reason, error,
                            self.compaction_refused[-1] if self.compaction_refused else None)
        state = TaskState.FAILED if error else TaskState.DONE
        await self._db(self.rc.store.update_job_task, self.rc.job_id, t.index, state=state, result=summary,
                       error=error)
        try:
            await self._db(self.rc.store.set_state, self.sess.id, SessionState.CLOSED, owner=ANY_OWNER)
        except Exception as e:  # closing is housekeeping; the result is already recorded
            log.info("could not close session %s: %s", self.sess.id, e)
        p.task_phase(t.index, "failed" if error else "done", self.sess.id)
        return summary

    async def _step(self) -> str | None:
        """One generation; returns a finish reason when a limit stops the task instead."""
        t, s, p = self.task, self.sess, self.rc.progress
        steps = [m for m in s.messages if m["role"] == "assistant"]
        used = sum((m.get("kvstrata") or {}).get("completion_tokens", 0) for m in steps)
        deadline = self._deadline()
        if deadline is not None and time.time() >= deadline:
            return "deadline"
        if len(steps) >= t.max_steps:
            return "max_steps"
        if used >= t.max_total_tokens:
            return "max_total_tokens"
        defs = self.tools.defs or None
        last = next((m for m in reversed(s.messages) if not turns.hidden(m)), s.messages[-1])
        choice = t.tool_choice if last["role"] == "user" else "auto"
        forced = forced_tool_call_spec(defs, choice) if defs and choice not in ("auto", "none") else None
        room = [0]

        def make_params(n: int) -> SamplingParams:
            room[0] = self.eng.max_model_len - n
            return SamplingParams(max_tokens=max(1, min(t.max_tokens, t.max_total_tokens - used, room[0])),
                                  **t.sampling, structured=forced)

        plan = turns.plan_turn(self.eng, s, [], make_params)
        policy = self._compaction_policy()
        if policy is not None and len(plan.prompt) + t.max_tokens > policy.threshold_tokens:
            await self.rc.skv.resume(s)  # the summary reads the old prefix: bring it back first
            if await maybe_compact(self.rc.aeng, self.rc.store, self.rc.skv, s, ANY_OWNER, policy,
                                   len(plan.prompt) + t.max_tokens, self.compaction_refused) is not None:
                plan = turns.plan_turn(self.eng, s, [], make_params)
        if room[0] < 1:
            return "context_length"
        await self.rc.skv.resume(s)  # paused on tools (in this run or before a restart): the KV comes back
        p.task_phase(t.index, "generating", s.id, plan.prompt)
        t0 = time.time()
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            out = await asyncio.wait_for(self._generate(plan.prompt, plan.params, s.id), timeout)
        except asyncio.TimeoutError:
            return "deadline"
        except ContextLengthError as e:
            log.info("task %s: %s", t.id, e)
            return "context_length"
        o = out.outputs[0]
        gen = list(o.token_ids)
        p.add_generated(len(gen))
        content, calls = parse_tool_calls(o.text) if defs and choice != "none" else ((o.text.strip() or None), [])
        m = out.metrics
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        msg["kvstrata"] = {"step": len(steps) + 1, "prompt_tokens": len(plan.prompt), "completion_tokens": len(gen),
                           "history_tokens_kept": plan.keep,
                           "cached_prompt_tokens": m.cached_prompt_tokens,
                           "computed_prompt_tokens": m.computed_prompt_tokens,
                           "cached_by_tier": dict(m.cached_prompt_tokens_by_tier),
                           "finish_reason": o.finish_reason.value if o.finish_reason else None,
                           "started_at": t0, "generate_s": round(time.time() - t0, 6)}
        await turns.record_turn(self.rc.store, self.eng, s, ANY_OWNER, [], plan, msg, gen,
                                SessionState.WAITING_ON_TOOL if calls else SessionState.ACTIVE)
        await self._db(self.rc.store.record_job_step, self.rc.job_id, t.index, prompt_tokens=len(plan.prompt),
                       completion_tokens=len(gen))
        return None

    def _compaction_policy(self) -> CompactionPolicy | None:
        """The task's compaction (None: off). Default threshold: memory.compaction.default_threshold."""
        c = self.task.compaction
        if c is None:
            return None
        p = CompactionPolicy(keep_recent_tokens=c.get("keep_recent_tokens"),
                             summary_max_tokens=c.get("summary_max_tokens"), request_class="batch")
        n = self.eng.max_model_len
        return dataclasses.replace(p, threshold_tokens=c.get("threshold") or default_threshold(p, n, self.task.max_tokens))

    async def _generate(self, prompt: list[int], params: SamplingParams, sid: str):
        final = None
        rid = f"{sid}-{next(_rids)}"
        async for out in self.rc.aeng.generate(prompt, params, request_id=rid, request_class="batch", program=sid):
            final = out
        return final

    async def _pause(self, tool_name: str | None) -> dict | None:
        """The tools run: SessionKV places the session's KV for the wait (an optimisation: a failure
        costs a recompute, not the task)."""
        try:
            d = await self.rc.skv.pause(self.sess, ANY_OWNER, tool=tool_name)
        except EngineDeadError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("pausing the KV of task %s failed: %s", self.task.id, e)
            return None
        self.rc.progress.placement(d.get("action"))
        return d

    async def _run_tools(self, calls: list[dict]) -> None:
        t, s, st, p = self.task, self.sess, self.rc.store, self.rc.progress
        p.task_phase(t.index, "tools", s.id, s.token_ids)
        decision = await self._pause((calls[0].get("function") or {}).get("name"))
        deadline = self._deadline()

        async def one(c: dict) -> dict:
            f = c.get("function") or {}
            name, args, cid = f.get("name", ""), f.get("arguments", "{}"), c.get("id") or ""
            rec = await self._db(st.record_tool_call_start, s.id, cid, name, args)
            reused = rec.finished
            if reused:  # recorded before a restart: never run again
                res = rec.result if isinstance(rec.result, dict) else {}
                content, err, dur = res.get("content", ""), rec.error, res.get("duration_s", 0.0)
            else:
                timeout = t.tool_timeout_s
                if deadline is not None:
                    timeout = max(0.01, min(timeout, deadline - time.time()))
                ctx = ToolContext(call_id=cid, tool_name=name, job_id=self.rc.job_id, task_id=t.id,
                                  task_index=t.index, session_id=s.id, attempt=rec.attempts)
                oc = await self.tools.call(name, args, ctx, self.rc.workers, timeout)
                await self._db(st.record_tool_call_result, s.id, cid, result=oc.record(), error=oc.error)
                content, err, dur = oc.content, oc.error, oc.duration_s
            return {"role": "tool", "tool_call_id": cid, "name": name, "content": content,
                    "kvstrata": {"error": err, "duration_s": round(float(dur or 0.0), 6), "reused": reused}}

        results = await asyncio.gather(*(one(c) for c in calls))
        if decision is not None:
            results[0]["kvstrata"]["placement"] = {k: decision.get(k) for k in ("action", "expected_wait_s") if k in decision}
        await self._append(list(results), SessionState.ACTIVE)

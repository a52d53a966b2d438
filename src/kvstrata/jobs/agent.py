"""One agent's loop, checkpointed step by step in the session store.

    generate -> append the assistant message (one transaction) -> run its tool calls (each recorded
    before and after it runs) -> append the tool results (one transaction) -> generate ...

until the agent answers without a tool call (then the next follow-up user message, if any) or hits a
limit (steps, generated tokens, deadline, context). Where to continue is read from the session's
messages alone, so a process killed at any point resumes at the right place: a step whose assistant
message was appended is never generated again, a tool call whose outcome was recorded is never run
again (its recorded result is reused), and stateful toolsets get back the state that their last
recorded call left (stored with that call's result).

The session's stored token ids are the prompt's source of truth: each step's prompt is the previous
step's prompt plus its generated tokens plus the new messages' tokens, so the engine's prefix cache
(device pool or any tier) serves the prefix after a tool wait or a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from kvstrata.core import ContextLengthError, RequestClass, SamplingParams, chain_keys
from kvstrata.engine.async_engine import EngineDeadError
from kvstrata.jobs.results import summarize
from kvstrata.jobs.tools import ToolContext
from kvstrata.jobs.workers import TaskTools, ToolWorkers
from kvstrata.sessions import ANY_OWNER, JobTask, Session, SessionState, StoreUnavailable, TaskState
from kvstrata.tokenizer.tokenizer import splice_tokens

log = logging.getLogger(__name__)
_rids = itertools.count()


@dataclass
class RunContext:
    aeng: Any  # AsyncEngine
    store: Any  # SessionStore
    workers: ToolWorkers
    job_id: str
    progress: Any  # jobs.progress.JobProgress
    owner: str | None = None  # the job's owner: its task sessions are the job's key's too




class Agent:
    def __init__(self, rc: RunContext, task, tools: TaskTools) -> None:
        self.rc, self.task, self.tools = rc, task, tools
        self.eng = rc.aeng.engine
        self.sess: Session | None = None
        self.paused = False

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

    async def _append(self, messages: list[dict], state: SessionState, token_ids=(), keep: int | None = None,
                      block_keys=(), keep_blocks: int | None = None) -> None:
        s = self.sess
        info = await self._db(self.rc.store.append, s.id, owner=ANY_OWNER, expected_version=s.version,
                              messages=messages, token_ids=list(token_ids), keep_tokens=keep,
                              block_keys=list(block_keys), keep_blocks=keep_blocks, new_state=state)
        s.messages.extend(messages)
        if keep is not None:
            s.token_ids = s.token_ids[:keep]
        s.token_ids.extend(token_ids)
        if keep_blocks is not None:
            s.block_keys = s.block_keys[:keep_blocks]
        s.block_keys.extend(block_keys)
        s.version, s.state = info.version, info.state

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
        summary = summarize(self.sess.messages, self.sess.metadata, reason, error)
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
        from kvstrata.tokenizer.tools import forced_tool_call_spec, parse_tool_calls, render_chat

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
        tok = self.eng.tokenizer
        defs = self.tools.defs or None
        choice = t.tool_choice if s.messages[-1]["role"] == "user" else "auto"
        history = ([{"role": "system", "content": s.system_prompt}] if s.system_prompt else []) + s.messages
        text = render_chat(tok, history, defs, "auto" if defs else None)
        keep, new_ids = splice_tokens(tok, s.token_ids, text)
        prompt = s.token_ids[:keep] + new_ids
        room = self.eng.max_model_len - len(prompt)
        if room < 1:
            return "context_length"
        params = SamplingParams(max_tokens=min(t.max_tokens, t.max_total_tokens - used, room), **t.sampling,
                                structured=forced_tool_call_spec(defs, choice) if defs and choice != "auto" and choice != "none" else None)
        if self.paused:
            await self._placement("resume", prompt)
            self.paused = False
        p.task_phase(t.index, "generating", s.id, prompt)
        t0 = time.time()
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        try:
            out = await asyncio.wait_for(self._generate(prompt, params, s.id), timeout)
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
        msg["kvstrata"] = {"step": len(steps) + 1, "prompt_tokens": len(prompt), "completion_tokens": len(gen),
                           "history_tokens_kept": keep,
                           "cached_prompt_tokens": m.cached_prompt_tokens,
                           "computed_prompt_tokens": m.computed_prompt_tokens,
                           "cached_by_tier": dict(m.cached_prompt_tokens_by_tier),
                           "finish_reason": o.finish_reason.value if o.finish_reason else None,
                           "started_at": t0, "generate_s": round(time.time() - t0, 6)}
        bs = self.eng.pool.block_size
        keys = chain_keys(prompt + gen, bs, self.eng.fingerprint)
        kb = min(len(s.block_keys), keep // bs)
        await self._append([msg], SessionState.WAITING_ON_TOOL if calls else SessionState.ACTIVE,
                           new_ids + gen, keep, keys[kb:], kb)
        await self._db(self.rc.store.record_job_step, self.rc.job_id, t.index, prompt_tokens=len(prompt),
                       completion_tokens=len(gen))
        return None

    async def _generate(self, prompt: list[int], params: SamplingParams, sid: str):
        final = None
        rid = f"{sid}-{next(_rids)}"
        async for out in self.rc.aeng.generate(prompt, params, request_id=rid, request_class="batch"):
            final = out
        return final

    async def _placement(self, what: str, token_ids: list[int], tool_name: str | None = None) -> dict | None:
        """The engine's placement hooks (pause / resume / record_tool_duration); no-ops until it has them."""
        if not hasattr(self.eng, what):
            return None
        try:
            if what == "pause":
                d = await self.rc.aeng.call_async(lambda e: e.pause(list(token_ids), tool_name))
                self.rc.progress.placement(d.get("action") if isinstance(d, dict) else str(d))
                return d if isinstance(d, dict) else {"action": d}
            if what == "resume":
                return {"loaded": await self.rc.aeng.call_async(lambda e: e.resume(list(token_ids)))}
        except EngineDeadError:
            raise
        except Exception as e:  # placement is an optimisation: a failure costs a recompute, not the task
            log.warning("engine.%s failed for task %s: %s", what, self.task.id, e)
        return None

    async def _run_tools(self, calls: list[dict]) -> None:
        t, s, st, p = self.task, self.sess, self.rc.store, self.rc.progress
        p.task_phase(t.index, "tools", s.id, s.token_ids)
        first = (calls[0].get("function") or {}).get("name")
        decision = await self._placement("pause", s.token_ids, first)
        self.paused = True
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
                if hasattr(self.eng, "record_tool_duration"):
                    try:
                        await self.rc.aeng.call_async(lambda e: e.record_tool_duration(name, dur))
                    except Exception as e:  # an optimisation only
                        log.debug("record_tool_duration failed: %s", e)
            return {"role": "tool", "tool_call_id": cid, "name": name, "content": content,
                    "kvstrata": {"error": err, "duration_s": round(float(dur or 0.0), 6), "reused": reused}}

        results = await asyncio.gather(*(one(c) for c in calls))
        if decision is not None:
            results[0]["kvstrata"]["placement"] = {k: decision.get(k) for k in ("action", "expected_wait_s") if k in decision}
        await self._append(list(results), SessionState.ACTIVE)

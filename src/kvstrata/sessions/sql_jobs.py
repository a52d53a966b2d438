"""The SQL core, second half: agent jobs, their tasks, and tool-call records (the checkpoints that
let a job resume after a crash without running a finished tool call twice)."""

from __future__ import annotations

from typing import Any, Sequence

from kvstrata.core import KvstrataError
from kvstrata.sessions import codec
from kvstrata.sessions.sql_base import SqlBase
from kvstrata.sessions.types import (
    JOB_TRANSITIONS,
    TASK_TRANSITIONS,
    UNSET,
    InvalidTransition,
    Job,
    JobNotFound,
    JobState,
    JobTask,
    Page,
    SessionNotFound,
    TaskState,
    ToolCallNotFound,
    ToolCallRecord,
    ToolCallStatus,
    check_transition,
    new_job_id,
)

JOB_COLS = "id, owner, spec, state, num_tasks, error, created_at, updated_at"
TASK_COLS = (
    "job_id, idx, state, input, session_id, result, error, steps, prompt_tokens, completion_tokens, "
    "created_at, updated_at"
)
CALL_COLS = "session_id, call_id, name, arguments, status, attempts, started_at, finished_at, result, error"


def _job(r: Sequence[Any]) -> Job:
    return Job(id=r[0], owner=r[1], spec=codec.loads(r[2]), state=JobState(r[3]), num_tasks=r[4],
               error=r[5], created_at=r[6], updated_at=r[7])  # fmt: skip


def _task(r: Sequence[Any]) -> JobTask:
    return JobTask(job_id=r[0], index=r[1], state=TaskState(r[2]), input=codec.loads(r[3]),
                   session_id=r[4], result=codec.loads(r[5]), error=r[6], steps=r[7],
                   prompt_tokens=int(r[8]), completion_tokens=int(r[9]), created_at=r[10],
                   updated_at=r[11])  # fmt: skip


def _call(r: Sequence[Any]) -> ToolCallRecord:
    return ToolCallRecord(session_id=r[0], call_id=r[1], name=r[2], arguments=codec.loads(r[3]),
                          status=ToolCallStatus(r[4]), attempts=r[5], started_at=r[6],
                          finished_at=r[7], result=codec.loads(r[8]), error=r[9])  # fmt: skip


class JobsSql(SqlBase):
    # ------------------------------------------------------------------------------------ jobs

    def create_job(self, spec: Any, *, owner: str | None, tasks: Sequence[Any]) -> Job:
        self._check_owner_arg(owner, allow_any=False)
        if isinstance(tasks, (str, bytes, dict)):
            raise KvstrataError("tasks must be a list (one input per task)")
        spec_text = codec.dumps(spec, "job spec")
        inputs = [codec.dumps(t, f"task {i}") for i, t in enumerate(tasks)]
        now = self._now()
        job = Job(id=new_job_id(), owner=owner, spec=codec.loads(spec_text), state=JobState.QUEUED,
                  created_at=now, updated_at=now, num_tasks=len(inputs))  # fmt: skip
        with self._write() as cur:
            self._x(
                cur,
                f"INSERT INTO jobs ({JOB_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, owner, spec_text, job.state.value, job.num_tasks, None, now, now),
            )
            for i, text in enumerate(inputs):
                self._x(
                    cur,
                    f"INSERT INTO job_tasks ({TASK_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, i, TaskState.PENDING.value, text, None, None, None, 0, 0, 0, now, now),
                )
        return job

    def _job_row(self, cur: Any, job_id: str, owner: Any, lock: bool) -> tuple:
        self._check_owner_arg(owner)
        row = self._one(cur, f"SELECT {JOB_COLS} FROM jobs WHERE id = ?" + (self.for_update if lock else ""), (job_id,))
        if row is None or not self._visible(row[1], owner):
            raise JobNotFound(job_id)
        return row

    def get_job(self, job_id: str, *, owner: Any) -> Job:
        with self._read() as cur:
            return _job(self._job_row(cur, job_id, owner, False))

    def list_jobs(
        self, *, owner: Any, state: JobState | None = None, limit: int = 20, after: str | None = None
    ) -> Page:
        self._check_owner_arg(owner)
        limit = codec.check_limit(limit)
        where, params = self._owner_filter(owner)
        if state is not None:
            where += " AND state = ?"
            params += (self._enum(JobState, state, "state").value,)
        with self._read() as cur:
            frag, fparams, order_by = self._page_filter(cur, "jobs", after, owner, "asc", JobNotFound)
            rows = self._all(
                cur,
                f"SELECT {JOB_COLS} FROM jobs WHERE 1 = 1{where}{frag}{order_by} LIMIT ?",
                params + fparams + (limit + 1,),
            )
        return Page(items=[_job(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def set_job_state(self, job_id: str, state: JobState, *, owner: Any, error: str | None = None) -> Job:
        state = self._enum(JobState, state, "state")
        with self._write() as cur:
            job = _job(self._job_row(cur, job_id, owner, True))
            check_transition("job", job_id, JOB_TRANSITIONS, job.state, state)
            now = max(self._now(), job.updated_at)
            self._x(
                cur,
                "UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                (state.value, error, now, job_id),
            )
            if state == JobState.CANCELLED:  # a cancelled job runs nothing: its running tasks stop, unfinished
                self._x(cur, "UPDATE job_tasks SET state = ?, updated_at = ? WHERE job_id = ? AND state = ?",
                        (TaskState.PENDING.value, now, job_id, TaskState.RUNNING.value))  # fmt: skip
        job.state, job.error, job.updated_at = state, error, now
        return job

    def delete_job(self, job_id: str, *, owner: Any) -> None:
        with self._write() as cur:
            self._job_row(cur, job_id, owner, True)
            self._x(cur, "DELETE FROM jobs WHERE id = ?", (job_id,))

    # ------------------------------------------------------------------------------------ job tasks

    def get_job_tasks(self, job_id: str, *, owner: Any, state: TaskState | None = None) -> list[JobTask]:
        sql = f"SELECT {TASK_COLS} FROM job_tasks WHERE job_id = ?"
        params: tuple[Any, ...] = (job_id,)
        if state is not None:
            sql, params = sql + " AND state = ?", params + (self._enum(TaskState, state, "state").value,)
        with self._read() as cur:
            self._job_row(cur, job_id, owner, False)
            return [_task(r) for r in self._all(cur, sql + " ORDER BY idx", params)]

    def _task_row(self, cur: Any, job_id: str, index: int, lock: bool) -> JobTask:
        row = self._one(
            cur,
            f"SELECT {TASK_COLS} FROM job_tasks WHERE job_id = ? AND idx = ?" + (self.for_update if lock else ""),
            (job_id, index),
        )
        if row is None:
            raise JobNotFound(job_id, index)
        return _task(row)

    def get_job_task(self, job_id: str, index: int, *, owner: Any) -> JobTask:
        with self._read() as cur:
            self._job_row(cur, job_id, owner, False)
            return self._task_row(cur, job_id, index, False)

    def update_job_task(
        self,
        job_id: str,
        index: int,
        *,
        state: TaskState | None = None,
        session_id: str | None = UNSET,
        result: Any = UNSET,
        error: str | None = UNSET,
    ) -> JobTask:
        sets: dict[str, Any] = {}
        if state is not None:
            state = self._enum(TaskState, state, "state")
            sets["state"] = state.value
        if session_id is not UNSET:
            sets["session_id"] = session_id
        if result is not UNSET:
            sets["result"] = None if result is None else codec.dumps(result, "task result")
        if error is not UNSET:
            sets["error"] = error
        with self._write() as cur:
            task = self._task_row(cur, job_id, index, True)
            if state is not None:
                check_transition(f"task {index} of job", job_id, TASK_TRANSITIONS, task.state, state)
            if state == TaskState.RUNNING:
                job_row = self._one(cur, "SELECT state FROM jobs WHERE id = ?", (job_id,))
                assert job_row is not None  # (the job's row was read above in this transaction)
                job_state = job_row[0]
                if job_state in (JobState.CANCELLED.value, JobState.DONE.value, JobState.FAILED.value):
                    raise InvalidTransition(f"job {job_id!r} is {job_state}: its task {index} cannot start")
            sets["updated_at"] = max(self._now(), task.updated_at)
            cols = ", ".join(f"{k} = ?" for k in sets)
            self._x(cur, f"UPDATE job_tasks SET {cols} WHERE job_id = ? AND idx = ?",
                    tuple(sets.values()) + (job_id, index))  # fmt: skip
            return self._task_row(cur, job_id, index, False)

    def record_job_step(
        self, job_id: str, index: int, *, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> JobTask:
        codec.check_count(prompt_tokens, "prompt_tokens")
        codec.check_count(completion_tokens, "completion_tokens")
        with self._write() as cur:
            task = self._task_row(cur, job_id, index, True)
            if task.state != TaskState.RUNNING:
                raise InvalidTransition(
                    f"task {index} of job {job_id!r} is {task.state.value!r}: only a running task takes "
                    "steps; set it to 'running' first"
                )
            self._x(
                cur,
                "UPDATE job_tasks SET steps = steps + 1, prompt_tokens = prompt_tokens + ?, "
                "completion_tokens = completion_tokens + ?, updated_at = ? WHERE job_id = ? AND idx = ?",
                (prompt_tokens, completion_tokens, max(self._now(), task.updated_at), job_id, index),
            )
            return self._task_row(cur, job_id, index, False)

    # ------------------------------------------------------------------------------------ tool calls

    def record_tool_call_start(self, session_id: str, call_id: str, name: str, arguments: Any) -> ToolCallRecord:
        if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
            raise KvstrataError(f"a tool call needs a non-empty call id and name, got {call_id!r}, {name!r}")
        args = codec.dumps(arguments, "tool call arguments")
        with self._write() as cur:
            if self._one(cur, "SELECT id FROM sessions WHERE id = ?" + self.for_update, (session_id,)) is None:
                raise SessionNotFound(session_id)
            inserted = self._x(
                cur,
                f"INSERT INTO tool_calls ({CALL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (session_id, call_id) DO NOTHING",
                (session_id, call_id, name, args, ToolCallStatus.RUNNING.value, 1, self._now(), None, None, None),
            ).rowcount
            if inserted != 1:  # started before: a resume after a crash (or a retry)
                rec = self._call_row(cur, session_id, call_id)
                if not rec.finished:
                    self._x(
                        cur,
                        "UPDATE tool_calls SET attempts = attempts + 1 WHERE session_id = ? AND call_id = ?",
                        (session_id, call_id),
                    )
            return self._call_row(cur, session_id, call_id)

    def _call_row(self, cur: Any, session_id: str, call_id: str) -> ToolCallRecord:
        row = self._one(cur, f"SELECT {CALL_COLS} FROM tool_calls WHERE session_id = ? AND call_id = ?",
                        (session_id, call_id))  # fmt: skip
        if row is None:
            raise ToolCallNotFound(session_id, call_id)
        return _call(row)

    def record_tool_call_result(
        self, session_id: str, call_id: str, *, result: Any = None, error: str | None = None
    ) -> ToolCallRecord:
        text = codec.dumps(result, "tool call result")
        status = ToolCallStatus.DONE if error is None else ToolCallStatus.FAILED
        with self._write() as cur:
            self._one(cur, "SELECT id FROM sessions WHERE id = ?" + self.for_update, (session_id,))
            rec = self._call_row(cur, session_id, call_id)
            if rec.finished:
                raise InvalidTransition(
                    f"tool call {call_id!r} of session {session_id!r} already has a recorded outcome "
                    f"({rec.status.value}); it is never recorded or run twice"
                )
            self._x(
                cur,
                "UPDATE tool_calls SET status = ?, result = ?, error = ?, finished_at = ? "
                "WHERE session_id = ? AND call_id = ?",
                (status.value, text, error, max(self._now(), rec.started_at), session_id, call_id),
            )
            return self._call_row(cur, session_id, call_id)

    def get_tool_call(self, session_id: str, call_id: str) -> ToolCallRecord | None:
        with self._read() as cur:
            try:
                return self._call_row(cur, session_id, call_id)
            except ToolCallNotFound:
                return None

    def list_tool_calls(self, session_id: str) -> list[ToolCallRecord]:
        with self._read() as cur:
            rows = self._all(
                cur,
                f"SELECT {CALL_COLS} FROM tool_calls WHERE session_id = ? ORDER BY started_at, call_id",
                (session_id,),
            )
        return [_call(r) for r in rows]

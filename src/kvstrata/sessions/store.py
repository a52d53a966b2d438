"""The session store contract: durable agent sessions, Responses-API records, job checkpoints.

Two implementations behave identically (one shared SQL core, see `sql_sessions.py`): SQLite for one
machine (`sqlite.py`) and PostgreSQL for many (`postgres.py`). `open_store` in `__init__.py` picks one
from a URL or path.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

from kvstrata.core import RequestClass
from kvstrata.sessions.types import (
    UNSET,
    Job,
    JobState,
    JobTask,
    Owner,
    Page,
    ResponseRecord,
    Session,
    SessionInfo,
    SessionState,
    TaskState,
    ToolCallRecord,
)


class SessionStore(abc.ABC):
    """Durable storage of agent sessions and of the checkpoints of agent jobs.

    Contract shared by every method:

    * **Durability.** A method that returns has committed its write (one transaction). A write that
      raises, or whose process is killed before it returns, left nothing behind: no partial append,
      no half-created job. How far a committed write survives a power loss is backend-specific; see
      docs/sessions.md.
    * **Owners.** Methods the HTTP layer exposes take a keyword-only `owner`: the caller's
      `hash_api_key(key)`, or None when the server runs without keys, or `ANY_OWNER` for internal
      callers (lease sweeper, job runner). An object owned by someone else behaves exactly as a
      missing one (`SessionNotFound`, `ResponseNotFound`, `JobNotFound`): existence never leaks.
    * **Versions.** Every session carries a `version`, 1 at creation, +1 on each successful write.
      Writers pass `expected_version` (mandatory for `append`, optional elsewhere); a stale one
      raises `VersionConflict` and changes nothing. Re-read, then retry.
    * **States.** Changes follow `SESSION_TRANSITIONS`, `JOB_TRANSITIONS` and `TASK_TRANSITIONS` in
      `types.py`; anything else raises `InvalidTransition` and changes nothing. A CLOSED session takes
      no appends and no state changes (fork it to continue).
    * **Threads and processes.** One store object may be used from many threads at once; several
      processes may open the same database. Every error a caller can cause is a `KvstrataError`.
    * Returned objects are copies: mutating them changes nothing in the store.
    * **Outages.** A database that cannot be reached or written raises `StoreUnavailable` (the
      server's state, worth a retry) and sets `failed_at` (time.monotonic()), which /health reads.
    """

    failed_at: float | None = None

    # ------------------------------------------------------------------------------------ sessions

    @abc.abstractmethod
    def create_session(
        self,
        *,
        owner: str | None,
        messages: Sequence[dict[str, Any]] = (),
        token_ids: Sequence[int] = (),
        block_keys: Sequence[bytes] = (),
        system_prompt: str | None = None,
        tools: Any = None,
        request_class: RequestClass = RequestClass.INTERACTIVE,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        """Create an ACTIVE session at version 1 with a fresh unguessable `sess_...` id."""

    @abc.abstractmethod
    def get_session(self, session_id: str, *, owner: Owner) -> Session:
        """The whole session, consistent with one version. Raises SessionNotFound."""

    @abc.abstractmethod
    def get_session_info(self, session_id: str, *, owner: Owner) -> SessionInfo:
        """The session without messages, token ids, block keys, system prompt and tools (cheap)."""

    @abc.abstractmethod
    def list_sessions(
        self,
        *,
        owner: Owner,
        state: SessionState | None = None,
        limit: int = 20,
        after: str | None = None,
        order: str = "asc",
    ) -> Page:
        """`SessionInfo`s of `owner` (all owners for ANY_OWNER), by (created_at, id) in `order`
        ("asc" or "desc"), optionally only those in `state`. `after` is the last id of the previous
        page (`Page.next_after`); an `after` the caller cannot see raises SessionNotFound.
        `limit` is 1..1000."""

    @abc.abstractmethod
    def delete_session(self, session_id: str, *, owner: Owner) -> None:
        """Delete the session with its messages, responses and tool-call records. Forks survive
        (their `parent_id` then names a session that no longer exists). Raises SessionNotFound."""

    @abc.abstractmethod
    def append(
        self,
        session_id: str,
        *,
        owner: Owner,
        expected_version: int,
        messages: Sequence[dict[str, Any]] = (),
        token_ids: Sequence[int] = (),
        block_keys: Sequence[bytes] = (),
        keep_tokens: int | None = None,
        keep_blocks: int | None = None,
        new_state: SessionState | None = None,
    ) -> SessionInfo:
        """Atomically: append `messages`; cut the token ids to their first `keep_tokens` (None: keep
        all) and append `token_ids`; cut the block keys to their first `keep_blocks` and append
        `block_keys`; optionally change the state; add 1 to the version. Either all of it is
        committed or nothing.

        The cut exists because a chat template may render earlier turns differently once a new turn
        follows; the engine passes the length of the common prefix. Raises VersionConflict when the
        session is not at `expected_version`, InvalidTransition when it is CLOSED (or `new_state` is
        not allowed), KvstrataError on malformed input (a message without a `role`, a token id outside
        0..2**31-1, a key that is not 32 bytes, a cut longer than what is stored).
        """

    @abc.abstractmethod
    def set_state(
        self,
        session_id: str,
        state: SessionState,
        *,
        owner: Owner,
        expected_version: int | None = None,
        lease_expires_at: float | None = UNSET,
        parked_tier: str | None = UNSET,
        kv_placement: dict[str, Any] | None = UNSET,
    ) -> SessionInfo:
        """Change the state (and, in the same write, the lease and placement fields given; UNSET leaves
        them). Closing clears the lease, the parked tier and the placement. Setting the current state again is allowed and
        still counts as a write (version + 1). Raises InvalidTransition, VersionConflict."""

    def park(
        self,
        session_id: str,
        *,
        owner: Owner,
        tier: str,
        lease_expires_at: float | None,
        expected_version: int | None = None,
    ) -> SessionInfo:
        """PARKED at `tier` until `lease_expires_at`: its KV chain is pinned in that tier."""
        return self.set_state(
            session_id,
            SessionState.PARKED,
            owner=owner,
            expected_version=expected_version,
            lease_expires_at=lease_expires_at,
            parked_tier=tier,
        )

    @abc.abstractmethod
    def set_lease(
        self,
        session_id: str,
        *,
        owner: Owner,
        lease_expires_at: float | None,
        parked_tier: str | None = UNSET,
        kv_placement: dict[str, Any] | None = UNSET,
        expected_version: int | None = None,
    ) -> SessionInfo:
        """Change the lease (None: no lease) and optionally the parked tier and the KV placement record
        without a state change.
        Raises InvalidTransition on a CLOSED session."""

    @abc.abstractmethod
    def update_metadata(
        self,
        session_id: str,
        metadata: dict[str, Any],
        *,
        owner: Owner,
        expected_version: int | None = None,
    ) -> SessionInfo:
        """Merge `metadata` into the session's (a key set to None is removed)."""

    @abc.abstractmethod
    def fork_session(
        self, session_id: str, *, owner: Owner, metadata: dict[str, Any] | None = None
    ) -> Session:
        """A new ACTIVE session (new id, version 1, no lease, same owner and class) with a copy of
        the messages, token ids, block keys, system prompt, tools and metadata (merged with
        `metadata`) of the source's current version, and `parent_id` = the source. The source is
        not changed; a CLOSED source may be forked."""

    @abc.abstractmethod
    def sessions_expired_leases(self, now: float, *, limit: int = 100) -> list[SessionInfo]:
        """Sessions of every owner, not CLOSED, whose lease ended at or before `now`, earliest
        first. For the sweeper that drops or moves down their KV."""

    # ------------------------------------------------------------------------------------ responses

    @abc.abstractmethod
    def put_response(
        self,
        session_id: str,
        *,
        owner: Owner,
        turn: int,
        output: Any,
        usage: Any = None,
        response_id: str | None = None,
    ) -> ResponseRecord:
        """Record a Responses-API response as turn `turn` of the session, under `response_id` (a fresh
        `resp_...` id when None; a stream announces its id before the turn is stored).
        Raises SessionNotFound."""

    @abc.abstractmethod
    def get_response(self, response_id: str, *, owner: Owner) -> ResponseRecord:
        """The response, if its session is visible to `owner`; else ResponseNotFound."""

    @abc.abstractmethod
    def delete_response(self, response_id: str, *, owner: Owner) -> None:
        """Delete the stored response (its session and messages stay). Raises ResponseNotFound."""

    @abc.abstractmethod
    def replace_message(
        self, session_id: str, idx: int, message: dict[str, Any], *, owner: Owner, expected_version: int | None = None
    ) -> SessionInfo:
        """Replace message `idx` of the session (a deleted conversation item becomes a tombstone, so the
        indexes of the messages after it do not move); its embedded chunks are forgotten; version + 1.
        The stored token ids are left: the next turn's splice cuts them where the rendering changed.
        Raises SessionNotFound, InvalidTransition (closed), KvstrataError (no such index)."""

    @abc.abstractmethod
    def apply_retention(
        self,
        now: float,
        *,
        session_ttl_s: float | None = None,
        max_sessions_per_owner: int | None = None,
        response_ttl_s: float | None = None,
        max_responses_per_owner: int | None = None,
    ) -> dict[str, int]:
        """The retention sweep, every owner: delete sessions not updated for `session_ttl_s` and, per
        owner, all but the `max_sessions_per_owner` most recently updated (with their messages,
        responses and embeddings); stored responses older than `response_ttl_s` and all but the newest
        `max_responses_per_owner` per owner. Sessions of unfinished job tasks are kept. None: no limit.
        Returns {"sessions": n, "responses": n} removed."""

    # ------------------------------------------------------------------------------------ jobs

    @abc.abstractmethod
    def create_job(self, spec: Any, *, owner: str | None, tasks: Sequence[Any]) -> Job:
        """A QUEUED job (fresh `job_...` id) with one PENDING task per item of `tasks` (its input),
        indexed 0.., all in one transaction."""

    @abc.abstractmethod
    def get_job(self, job_id: str, *, owner: Owner) -> Job:
        """Raises JobNotFound."""

    @abc.abstractmethod
    def list_jobs(
        self,
        *,
        owner: Owner,
        state: JobState | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page:
        """Jobs by (created_at, id), paginated as `list_sessions`."""

    @abc.abstractmethod
    def set_job_state(
        self, job_id: str, state: JobState, *, owner: Owner, error: str | None = None
    ) -> Job:
        """Change the job's state (and its error text). Raises JobNotFound, InvalidTransition."""

    @abc.abstractmethod
    def delete_job(self, job_id: str, *, owner: Owner) -> None:
        """Delete the job and its tasks (not their sessions). Raises JobNotFound."""

    @abc.abstractmethod
    def get_job_tasks(
        self, job_id: str, *, owner: Owner, state: TaskState | None = None
    ) -> list[JobTask]:
        """The job's tasks by index, optionally only those in `state`. Raises JobNotFound."""

    @abc.abstractmethod
    def get_job_task(self, job_id: str, index: int, *, owner: Owner) -> JobTask:
        """Raises JobNotFound (for the job or the index)."""

    @abc.abstractmethod
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
        """Runner-side: change a task's state and fields in one write. Raises JobNotFound,
        InvalidTransition."""

    @abc.abstractmethod
    def record_job_step(
        self, job_id: str, index: int, *, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> JobTask:
        """Runner-side: one more agent step done, with its token counts. The runner calls this (and
        appends the step's messages to the session) before the next step starts. Only a RUNNING task
        takes steps (else InvalidTransition)."""

    # ------------------------------------------------------------------------------------ tool calls

    @abc.abstractmethod
    def record_tool_call_start(
        self, session_id: str, call_id: str, name: str, arguments: Any
    ) -> ToolCallRecord:
        """Runner-side: record that tool call `call_id` of the session is about to run, and return
        its record. **Check `.finished` on what comes back**: if a result or an error was already
        recorded (a resume after a crash), the existing record is returned unchanged and the tool
        must NOT run again; use `.result`. If a start but no result was recorded, `attempts` goes
        up by one (the tool may or may not have run before the crash). Raises SessionNotFound."""

    @abc.abstractmethod
    def record_tool_call_result(
        self, session_id: str, call_id: str, *, result: Any = None, error: str | None = None
    ) -> ToolCallRecord:
        """Runner-side: record the outcome (DONE with `result`, or FAILED when `error` is given).
        Raises ToolCallNotFound without a start, InvalidTransition if already finished."""

    @abc.abstractmethod
    def get_tool_call(self, session_id: str, call_id: str) -> ToolCallRecord | None:
        """The record, or None if no start was ever recorded."""

    @abc.abstractmethod
    def list_tool_calls(self, session_id: str) -> list[ToolCallRecord]:
        """The session's tool-call records in the order they were started."""

    # ------------------------------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version of the open database (after migrations)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection. The store must not be used afterwards."""

    def __enter__(self) -> "SessionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

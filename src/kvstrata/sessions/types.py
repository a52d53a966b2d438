"""Plain data of the session store: sessions, responses, jobs, job tasks, tool calls, and its errors.

No database import here: the engine and the server use these types without choosing a backend.
Times are unix seconds (float). JSON fields hold whatever `json.dumps` accepts and come back as
`json.loads` gives them (dict key order kept).
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any, Union

from kvstrata.core import KvstrataError, RequestClass

# ---------------------------------------------------------------------------------------------- errors


class SessionStoreError(KvstrataError):
    """Base of every error the session store raises on purpose."""


class StoreUnavailable(SessionStoreError):
    """The database cannot be reached or written now (server down, disk full, locked for too long): the
    server's fault, not the request's, and worth a retry (HTTP 503). The message names the database;
    the server logs it and tells clients less."""


class SessionNotFound(SessionStoreError):
    """No such session, or it belongs to another API key (the two are indistinguishable on purpose)."""

    def __init__(self, session_id: str):
        super().__init__(
            f"session {session_id!r} not found: check the id, and that it was created with the same "
            "API key (sessions of other keys are invisible)"
        )
        self.session_id = session_id


class ResponseNotFound(SessionStoreError):
    def __init__(self, response_id: str):
        super().__init__(
            f"response {response_id!r} not found: previous_response_id must name a response created "
            "with the same API key whose session still exists"
        )
        self.response_id = response_id


class JobNotFound(SessionStoreError):
    def __init__(self, job_id: str, index: int | None = None):
        what = f"job {job_id!r}" if index is None else f"task {index} of job {job_id!r}"
        super().__init__(f"{what} not found: check the id and the API key it was created with")
        self.job_id = job_id


class ToolCallNotFound(SessionStoreError):
    def __init__(self, session_id: str, call_id: str):
        super().__init__(
            f"no tool call {call_id!r} recorded for session {session_id!r}: record_tool_call_start "
            "must come before record_tool_call_result"
        )


class VersionConflict(SessionStoreError):
    """The caller's view of a session is stale: another writer changed it first. Re-read and retry."""

    def __init__(self, session_id: str, expected: int, actual: int):
        super().__init__(
            f"session {session_id!r} is at version {actual}, not the expected {expected}: another "
            "writer changed it; re-read the session and retry"
        )
        self.session_id, self.expected, self.actual = session_id, expected, actual


class InvalidTransition(SessionStoreError):
    """A state change (or an append) that the object's current state does not allow."""


class SchemaTooNew(SessionStoreError):
    """The database was written by a newer kvstrata (a higher schema version than this code knows)."""


# ---------------------------------------------------------------------------------------------- states


class SessionState(str, enum.Enum):
    ACTIVE = "active"  # in use: generating, or ready to generate
    PARKED = "parked"  # KV moved down to `parked_tier` until the lease ends
    WAITING_ON_TOOL = "waiting_on_tool"  # the last turn asked for tool calls; waiting for results
    CLOSED = "closed"  # terminal: no more appends or state changes


# Allowed changes; setting the state a session already has is always allowed (a no-op but for lease
# fields). CLOSED is terminal.
SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.ACTIVE: frozenset({SessionState.PARKED, SessionState.WAITING_ON_TOOL, SessionState.CLOSED}),
    SessionState.PARKED: frozenset({SessionState.ACTIVE, SessionState.WAITING_ON_TOOL, SessionState.CLOSED}),
    SessionState.WAITING_ON_TOOL: frozenset({SessionState.ACTIVE, SessionState.PARKED, SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    # RUNNING -> QUEUED: handed back (e.g. the engine shuts down cleanly and another picks it up)
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class TaskState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset({TaskState.RUNNING, TaskState.FAILED}),
    # RUNNING -> PENDING: a retry after a crash or a transient error
    TaskState.RUNNING: frozenset({TaskState.PENDING, TaskState.DONE, TaskState.FAILED}),
    TaskState.DONE: frozenset(),
    TaskState.FAILED: frozenset({TaskState.PENDING}),  # an explicit retry
}


class ToolCallStatus(str, enum.Enum):
    RUNNING = "running"  # started, no result recorded (after a crash: may or may not have run)
    DONE = "done"  # result recorded: never execute again
    FAILED = "failed"  # error recorded: never execute again


def check_transition(kind: str, obj_id: str, table: dict, old: enum.Enum, new: enum.Enum) -> None:
    if new != old and new not in table[old]:
        allowed = ", ".join(sorted(s.value for s in table[old])) or "none (terminal state)"
        raise InvalidTransition(
            f"{kind} {obj_id!r} cannot go from {old.value!r} to {new.value!r}; allowed from "
            f"{old.value!r}: {allowed}"
        )


# ---------------------------------------------------------------------------------------------- owner


class _AnyOwner:
    """Sentinel owner for internal callers (lease sweeper, job runner): no ownership check."""

    _instance: "_AnyOwner | None" = None

    def __new__(cls) -> "_AnyOwner":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ANY_OWNER"


ANY_OWNER = _AnyOwner()
# An owner hash (see hash_api_key), None (a server without API keys), or ANY_OWNER (internal callers).
Owner = Union[str, None, _AnyOwner]


class _Unset:
    """Sentinel for "leave this field as it is" (None is a value: it clears the field)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def hash_api_key(api_key: str) -> str:
    """The owner string stored for an API key: sha256 hex. The key itself is never stored."""
    return hashlib.sha256(b"kvstrata-owner-v1\0" + api_key.encode()).hexdigest()


def new_id(prefix: str) -> str:
    """An unguessable id: `prefix` + 32 url-safe characters (192 random bits)."""
    return prefix + secrets.token_urlsafe(24)


def new_session_id() -> str:
    return new_id("sess_")


def new_response_id() -> str:
    return new_id("resp_")


def new_job_id() -> str:
    return new_id("job_")


# ---------------------------------------------------------------------------------------------- records


@dataclass
class SessionInfo:
    """A session without its bulky parts (messages, token ids, block keys, system prompt, tools)."""

    id: str
    owner: str | None
    state: SessionState
    request_class: RequestClass
    version: int  # starts at 1; every successful write adds 1
    created_at: float
    updated_at: float
    parent_id: str | None = None  # the session this one was forked from
    lease_expires_at: float | None = None
    parked_tier: str | None = None
    num_messages: int = 0
    num_tokens: int = 0
    num_blocks: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    # where SessionKV put the KV while the session waits (sessions/kv.py): {"action", "tier", "tokens",
    # "at", "expected_wait_s", "tool"}; None when the session holds no placement
    kv_placement: dict[str, Any] | None = None


@dataclass
class Session(SessionInfo):
    """A whole session as `get_session` returns it."""

    system_prompt: str | None = None
    tools: Any = None  # JSON: the OpenAI `tools` list, or None
    messages: list[dict[str, Any]] = field(default_factory=list)  # OpenAI chat format
    token_ids: list[int] = field(default_factory=list)  # the rendered prompt so far
    block_keys: list[bytes] = field(default_factory=list)  # 32-byte chain keys of its full blocks


@dataclass
class Page:
    """One page of a listing; pass `next_after` as `after` to get the next one."""

    items: list[Any]
    has_more: bool

    @property
    def next_after(self) -> str | None:
        return self.items[-1].id if self.items and self.has_more else None


@dataclass
class ResponseRecord:
    """A Responses-API response: `previous_response_id` -> the session (and turn) to continue."""

    id: str
    session_id: str
    turn: int  # index of the turn within the session (0-based)
    output: Any  # JSON: the response's output items
    usage: Any = None  # JSON: {"input_tokens": .., "output_tokens": .., ...}
    created_at: float = 0.0


@dataclass
class Job:
    id: str
    owner: str | None
    spec: Any  # JSON: the job file as submitted
    state: JobState
    created_at: float
    updated_at: float
    num_tasks: int = 0
    error: str | None = None


@dataclass
class JobTask:
    job_id: str
    index: int
    state: TaskState
    input: Any = None  # JSON: this task's own spec
    session_id: str | None = None
    result: Any = None
    error: str | None = None
    steps: int = 0  # agent steps recorded so far
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class ToolCallRecord:
    session_id: str
    call_id: str
    name: str
    arguments: Any  # JSON (as parsed from the model's output, or the raw string)
    status: ToolCallStatus
    attempts: int  # how many times record_tool_call_start was called while it was RUNNING
    started_at: float
    finished_at: float | None = None
    result: Any = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        """True once a result or an error is recorded: the call must not be executed again."""
        return self.status != ToolCallStatus.RUNNING

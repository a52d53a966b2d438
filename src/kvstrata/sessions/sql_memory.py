"""The SQL core, what the Conversations API and retention need: deleting a stored response, replacing
one message of a session's log (a deleted conversation item becomes a tombstone, so message indexes
and the embeddings keyed by them stay valid), and the retention sweep (TTL and a count per owner) for
sessions and stored responses.

The embedding tables of migration 4 (memory_items, memory_cursor) are written by `kvstrata.memory`;
here they only go away with their session (ON DELETE CASCADE).
"""

from __future__ import annotations

import logging
from typing import Any

from kvstrata.core import KvstrataError
from kvstrata.sessions import codec
from kvstrata.sessions.sql_base import SqlBase
from kvstrata.sessions.types import InvalidTransition, ResponseNotFound, SessionInfo, SessionState, TaskState

log = logging.getLogger(__name__)

# Sessions that an unfinished job task still runs in are never removed by retention.
_IN_USE_BY_JOBS = (
    "SELECT session_id FROM job_tasks WHERE session_id IS NOT NULL AND state IN "
    f"('{TaskState.PENDING.value}', '{TaskState.RUNNING.value}')"
)
_BATCH = 500  # rows one retention statement removes at most


def _positive(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise KvstrataError(f"{what} must be a positive number or None, got {value!r}")
    return value


class MemorySql(SqlBase):
    def delete_response(self, response_id: str, *, owner: Any) -> None:
        self._check_owner_arg(owner)
        with self._write() as cur:
            row = self._one(
                cur,
                "SELECT s.owner FROM responses r JOIN sessions s ON s.id = r.session_id WHERE r.id = ?",
                (response_id,),
            )
            if row is None or not self._visible(row[0], owner):
                raise ResponseNotFound(response_id)
            self._x(cur, "DELETE FROM responses WHERE id = ?", (response_id,))

    def replace_message(
        self, session_id: str, idx: int, message: dict[str, Any], *, owner: Any, expected_version: int | None = None
    ) -> SessionInfo:
        body = codec.check_messages([message])[0]
        idx = codec.check_count(idx, "idx")
        with self._write() as cur:
            info = self._locked(cur, session_id, owner, expected_version)  # type: ignore[attr-defined]
            if info["state"] == SessionState.CLOSED:
                raise InvalidTransition(f"session {session_id!r} is closed: its messages cannot change")
            if idx >= info["num_messages"]:
                raise KvstrataError(f"session {session_id!r} has {info['num_messages']} messages; no message {idx}")
            self._x(cur, "UPDATE messages SET body = ? WHERE session_id = ? AND idx = ?", (body, session_id, idx))
            # its embedded chunks described the old text: forget them (the cursor does not move back)
            self._x(cur, "DELETE FROM memory_items WHERE session_id = ? AND idx = ?", (session_id, idx))
            return self._bump(cur, info, {})  # type: ignore[attr-defined]

    def apply_retention(
        self,
        now: float,
        *,
        session_ttl_s: float | None = None,
        max_sessions_per_owner: int | None = None,
        response_ttl_s: float | None = None,
        max_responses_per_owner: int | None = None,
    ) -> dict[str, int]:
        now = codec.check_time(now, "now")
        session_ttl_s = _positive(session_ttl_s, "session_ttl_s")
        response_ttl_s = _positive(response_ttl_s, "response_ttl_s")
        for v, what in ((max_sessions_per_owner, "max_sessions_per_owner"),
                        (max_responses_per_owner, "max_responses_per_owner")):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise KvstrataError(f"{what} must be a positive integer or None, got {v!r}")
        out = {"sessions": 0, "responses": 0}
        if session_ttl_s is not None:
            out["sessions"] += self._delete_ids(
                "sessions",
                f"SELECT id FROM sessions WHERE updated_at < ? AND id NOT IN ({_IN_USE_BY_JOBS}) LIMIT {_BATCH}",
                (now - session_ttl_s,))
        if max_sessions_per_owner is not None:
            out["sessions"] += self._delete_ids(
                "sessions",
                "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY owner ORDER BY updated_at DESC, id DESC) "
                f"AS rn FROM sessions WHERE id NOT IN ({_IN_USE_BY_JOBS})) q WHERE rn > ? LIMIT {_BATCH}",
                (max_sessions_per_owner,))
        if response_ttl_s is not None:
            out["responses"] += self._delete_ids(
                "responses", f"SELECT id FROM responses WHERE created_at < ? LIMIT {_BATCH}", (now - response_ttl_s,))
        if max_responses_per_owner is not None:
            out["responses"] += self._delete_ids(
                "responses",
                "SELECT id FROM (SELECT r.id, ROW_NUMBER() OVER (PARTITION BY s.owner ORDER BY r.created_at DESC, "
                "r.id DESC) AS rn FROM responses r JOIN sessions s ON s.id = r.session_id) q "
                f"WHERE rn > ? LIMIT {_BATCH}",
                (max_responses_per_owner,))
        if out["sessions"] or out["responses"]:
            log.info("retention: removed %d sessions and %d stored responses", out["sessions"], out["responses"])
        return out

    def _delete_ids(self, table: str, select: str, params: tuple) -> int:
        """Delete the rows `select` names, a batch per transaction, until none is left."""
        total = 0
        while True:
            with self._write() as cur:
                ids = [r[0] for r in self._all(cur, select, params)]
                for i in ids:
                    self._x(cur, f"DELETE FROM {table} WHERE id = ?", (i,))
            total += len(ids)
            if len(ids) < _BATCH:
                return total

"""The SQL core shared by the SQLite and PostgreSQL stores: sessions.

Responses-API records are in sql_responses.py; jobs, job tasks and tool calls in sql_jobs.py. Everything here is plain SQL that both databases
run unchanged, so the two backends cannot drift apart.

Consistency of reads without a snapshot: messages are only ever appended, and a session row names how
many it has (`num_messages`), so `get_session` reads the row and then the messages with
`idx < num_messages`; that is one version's view even under READ COMMITTED.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from kvstrata.core import BLOCK_KEY_BYTES, KvstrataError, RequestClass
from kvstrata.sessions import codec
from kvstrata.sessions.sql_jobs import JobsSql
from kvstrata.sessions.sql_memory import MemorySql
from kvstrata.sessions.sql_responses import ResponsesSql
from kvstrata.sessions.store import SessionStore
from kvstrata.sessions.types import (
    SESSION_TRANSITIONS,
    UNSET,
    InvalidTransition,
    Page,
    Session,
    SessionInfo,
    SessionNotFound,
    SessionState,
    VersionConflict,
    check_transition,
    new_session_id,
)

log = logging.getLogger(__name__)

INFO_COLS = (
    "id, owner, parent_id, state, request_class, metadata, num_tokens, num_blocks, num_messages, "
    "version, lease_expires_at, parked_tier, created_at, updated_at, kv_placement"
)
FULL_COLS = INFO_COLS + ", system_prompt, tools, token_ids, block_keys"
_SYS, _TOOLS, _TOKENS, _KEYS = range(len(INFO_COLS.split(",")), len(FULL_COLS.split(",")))  # FULL_COLS row indices


def _info(row: Sequence[Any]) -> dict[str, Any]:
    return dict(
        id=row[0],
        owner=row[1],
        parent_id=row[2],
        state=SessionState(row[3]),
        request_class=RequestClass(row[4]),
        metadata=codec.loads(row[5]),
        num_tokens=row[6],
        num_blocks=row[7],
        num_messages=row[8],
        version=int(row[9]),
        lease_expires_at=row[10],
        parked_tier=row[11],
        created_at=row[12],
        updated_at=row[13],
        kv_placement=codec.loads(row[14]) if row[14] is not None else None,
    )


class SqlStore(ResponsesSql, MemorySql, JobsSql, SessionStore):
    """SessionStore on any backend that provides the SqlBase hooks."""

    # ------------------------------------------------------------------------------------ reads

    def get_session_info(self, session_id: str, *, owner: Any) -> SessionInfo:
        with self._read() as cur:
            return SessionInfo(**_info(self._load_row(cur, session_id, owner, INFO_COLS, False)))

    def get_session(self, session_id: str, *, owner: Any) -> Session:
        with self._read() as cur:
            row = self._load_row(cur, session_id, owner, FULL_COLS, False)
            info = _info(row)
            bodies = self._all(
                cur,
                "SELECT body FROM messages WHERE session_id = ? AND idx < ? ORDER BY idx",
                (session_id, info["num_messages"]),
            )
        return Session(
            **info,
            system_prompt=row[_SYS],
            tools=codec.loads(row[_TOOLS]),
            messages=[codec.loads(b[0]) for b in bodies],
            token_ids=codec.decode_tokens(row[_TOKENS]),
            block_keys=codec.decode_keys(row[_KEYS]),
        )

    def list_sessions(
        self,
        *,
        owner: Any,
        state: SessionState | None = None,
        limit: int = 20,
        after: str | None = None,
        order: str = "asc",
    ) -> Page:
        self._check_owner_arg(owner)
        limit = codec.check_limit(limit)
        where, params = self._owner_filter(owner)
        if state is not None:
            where += " AND state = ?"
            params += (self._enum(SessionState, state, "state").value,)
        with self._read() as cur:
            frag, fparams, order_by = self._page_filter(cur, "sessions", after, owner, order, SessionNotFound)
            rows = self._all(
                cur,
                f"SELECT {INFO_COLS} FROM sessions WHERE 1 = 1{where}{frag}{order_by} LIMIT ?",
                params + fparams + (limit + 1,),
            )
        items = [SessionInfo(**_info(r)) for r in rows[:limit]]
        return Page(items=items, has_more=len(rows) > limit)

    def sessions_expired_leases(self, now: float, *, limit: int = 100) -> list[SessionInfo]:
        now = codec.check_time(now, "now")
        limit = codec.check_limit(limit)
        with self._read() as cur:
            rows = self._all(
                cur,
                f"SELECT {INFO_COLS} FROM sessions WHERE lease_expires_at IS NOT NULL "
                "AND lease_expires_at <= ? AND state <> ? ORDER BY lease_expires_at, id LIMIT ?",
                (now, SessionState.CLOSED.value, limit),
            )
        return [SessionInfo(**_info(r)) for r in rows]

    # ------------------------------------------------------------------------------------ writes

    def _insert_session(self, cur: Any, s: Session, token_blob: bytes, key_blob: bytes) -> None:
        self._x(
            cur,
            "INSERT INTO sessions (id, owner, parent_id, state, request_class, system_prompt, tools, "
            "metadata, token_ids, num_tokens, block_keys, num_blocks, num_messages, version, "
            "lease_expires_at, parked_tier, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                s.id, s.owner, s.parent_id, s.state.value, s.request_class.value, s.system_prompt,
                codec.dumps(s.tools, "tools") if s.tools is not None else None,
                codec.dumps(s.metadata, "metadata"), token_blob, s.num_tokens, key_blob,
                s.num_blocks, s.num_messages, s.version, None, None, s.created_at, s.updated_at,
            ),
        )  # fmt: skip

    def _insert_messages(self, cur: Any, session_id: str, start: int, bodies: list[str]) -> None:
        for i, body in enumerate(bodies):
            self._x(
                cur,
                "INSERT INTO messages (session_id, idx, body) VALUES (?, ?, ?)",
                (session_id, start + i, body),
            )

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
        self._check_owner_arg(owner, allow_any=False)
        bodies = codec.check_messages(messages)
        token_blob, key_blob = codec.encode_tokens(token_ids), codec.encode_keys(block_keys)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise KvstrataError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        if metadata is not None and not isinstance(metadata, dict):
            raise KvstrataError(f"metadata must be a dict, got {type(metadata).__name__}")
        now = self._now()
        s = Session(
            id=new_session_id(),
            owner=owner,
            state=SessionState.ACTIVE,
            request_class=self._enum(RequestClass, request_class, "request_class"),
            version=1,
            created_at=now,
            updated_at=now,
            num_messages=len(bodies),
            num_tokens=len(token_ids),
            num_blocks=len(block_keys),
            metadata=dict(metadata or {}),
            system_prompt=system_prompt,
            tools=codec.loads(codec.dumps(tools, "tools")),
            messages=[codec.loads(b) for b in bodies],
            token_ids=codec.decode_tokens(token_blob),
            block_keys=codec.decode_keys(key_blob),
        )
        with self._write() as cur:
            self._insert_session(cur, s, token_blob, key_blob)
            self._insert_messages(cur, s.id, 0, bodies)
        log.debug("created session %s (%d messages, %d tokens)", s.id, len(bodies), len(token_ids))
        return s

    def delete_session(self, session_id: str, *, owner: Any) -> None:
        with self._write() as cur:
            self._load_row(cur, session_id, owner, "id, owner", True)
            self._x(cur, "DELETE FROM sessions WHERE id = ?", (session_id,))

    def _locked(self, cur: Any, session_id: str, owner: Any, expected_version: int | None) -> dict:
        row = self._load_row(cur, session_id, owner, INFO_COLS, True)
        info = _info(row)
        if expected_version is not None and info["version"] != expected_version:
            raise VersionConflict(session_id, expected_version, info["version"])
        return info

    def _bump(self, cur: Any, info: dict, sets: dict[str, Any]) -> SessionInfo:
        """UPDATE the locked session row with `sets`, version + 1; returns the new info."""
        sets = dict(sets, version=info["version"] + 1, updated_at=max(self._now(), info["updated_at"]))
        cols = ", ".join(f"{k} = ?" for k in sets)
        self._x(cur, f"UPDATE sessions SET {cols} WHERE id = ?", tuple(sets.values()) + (info["id"],))
        new = dict(info)
        for k, v in sets.items():
            if k in new:
                new[k] = v
        if "metadata" in sets:
            new["metadata"] = codec.loads(sets["metadata"])
        if sets.get("kv_placement") is not None:
            new["kv_placement"] = codec.loads(sets["kv_placement"])
        new["state"] = SessionState(new["state"])
        return SessionInfo(**new)

    def append(
        self,
        session_id: str,
        *,
        owner: Any,
        expected_version: int,
        messages: Sequence[dict[str, Any]] = (),
        token_ids: Sequence[int] = (),
        block_keys: Sequence[bytes] = (),
        keep_tokens: int | None = None,
        keep_blocks: int | None = None,
        new_state: SessionState | None = None,
    ) -> SessionInfo:
        if isinstance(expected_version, bool) or not isinstance(expected_version, int):
            raise KvstrataError(f"expected_version must be the int version you read, got {expected_version!r}")
        bodies = codec.check_messages(messages)
        new_tokens, new_keys = codec.encode_tokens(token_ids), codec.encode_keys(block_keys)
        if new_state is not None:
            new_state = self._enum(SessionState, new_state, "new_state")
        with self._write() as cur:
            info = self._locked(cur, session_id, owner, expected_version)
            if info["state"] == SessionState.CLOSED:
                raise InvalidTransition(
                    f"session {session_id!r} is closed: it takes no more messages; fork it to continue"
                )
            if new_state is not None:
                check_transition("session", session_id, SESSION_TRANSITIONS, info["state"], new_state)
            row = self._one(cur, "SELECT token_ids, block_keys FROM sessions WHERE id = ?", (session_id,))
            assert row is not None  # (read above in this transaction)
            tokens, keys = bytes(row[0]), bytes(row[1])
            nt = info["num_tokens"] if keep_tokens is None else codec.check_count(keep_tokens, "keep_tokens")
            nb = info["num_blocks"] if keep_blocks is None else codec.check_count(keep_blocks, "keep_blocks")
            if nt > info["num_tokens"] or nb > info["num_blocks"]:
                raise KvstrataError(
                    f"keep_tokens={keep_tokens} / keep_blocks={keep_blocks} exceed what session "
                    f"{session_id!r} holds ({info['num_tokens']} tokens, {info['num_blocks']} blocks)"
                )
            tokens = tokens[: nt * codec.TOKEN_BYTES] + new_tokens
            keys = keys[: nb * BLOCK_KEY_BYTES] + new_keys
            self._insert_messages(cur, session_id, info["num_messages"], bodies)
            sets: dict[str, Any] = dict(
                token_ids=tokens,
                num_tokens=len(tokens) // codec.TOKEN_BYTES,
                block_keys=keys,
                num_blocks=nb + len(block_keys),
                num_messages=info["num_messages"] + len(bodies),
            )
            if new_state is not None:
                sets["state"] = new_state.value
            return self._bump(cur, info, sets)

    def set_state(
        self,
        session_id: str,
        state: SessionState,
        *,
        owner: Any,
        expected_version: int | None = None,
        lease_expires_at: float | None = UNSET,
        parked_tier: str | None = UNSET,
        kv_placement: dict[str, Any] | None = UNSET,
    ) -> SessionInfo:
        state = self._enum(SessionState, state, "state")
        sets: dict[str, Any] = {"state": state.value}
        if lease_expires_at is not UNSET:
            sets["lease_expires_at"] = codec.check_time(lease_expires_at, "lease_expires_at")
        if parked_tier is not UNSET:
            sets["parked_tier"] = self._check_tier(parked_tier)
        if kv_placement is not UNSET:
            sets["kv_placement"] = self._placement(kv_placement)
        if state == SessionState.CLOSED:
            sets["lease_expires_at"] = sets["parked_tier"] = sets["kv_placement"] = None
        with self._write() as cur:
            info = self._locked(cur, session_id, owner, expected_version)
            if info["state"] == SessionState.CLOSED:
                raise InvalidTransition(f"session {session_id!r} is closed: its state cannot change")
            check_transition("session", session_id, SESSION_TRANSITIONS, info["state"], state)
            return self._bump(cur, info, sets)

    @staticmethod
    def _placement(p: Any) -> str | None:
        if p is not None and not isinstance(p, dict):
            raise KvstrataError(f"kv_placement must be a dict or None, got {type(p).__name__}")
        return None if p is None else codec.dumps(p, "kv_placement")

    @staticmethod
    def _check_tier(tier: Any) -> str | None:
        if tier is not None and (not isinstance(tier, str) or not tier):
            raise KvstrataError(f"parked_tier must be a tier name (non-empty str) or None, got {tier!r}")
        return tier

    def set_lease(
        self,
        session_id: str,
        *,
        owner: Any,
        lease_expires_at: float | None,
        parked_tier: str | None = UNSET,
        kv_placement: dict[str, Any] | None = UNSET,
        expected_version: int | None = None,
    ) -> SessionInfo:
        sets: dict[str, Any] = {"lease_expires_at": codec.check_time(lease_expires_at, "lease_expires_at")}
        if parked_tier is not UNSET:
            sets["parked_tier"] = self._check_tier(parked_tier)
        if kv_placement is not UNSET:
            sets["kv_placement"] = self._placement(kv_placement)
        with self._write() as cur:
            info = self._locked(cur, session_id, owner, expected_version)
            if info["state"] == SessionState.CLOSED:
                raise InvalidTransition(f"session {session_id!r} is closed: it holds no lease")
            return self._bump(cur, info, sets)

    def update_metadata(
        self, session_id: str, metadata: dict[str, Any], *, owner: Any, expected_version: int | None = None
    ) -> SessionInfo:
        if not isinstance(metadata, dict):
            raise KvstrataError(f"metadata must be a dict, got {type(metadata).__name__}")
        codec.dumps(metadata, "metadata")
        with self._write() as cur:
            info = self._locked(cur, session_id, owner, expected_version)
            merged = dict(info["metadata"])
            for k, v in metadata.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            return self._bump(cur, info, {"metadata": codec.dumps(merged, "metadata")})

    def fork_session(self, session_id: str, *, owner: Any, metadata: dict[str, Any] | None = None) -> Session:
        if metadata is not None and not isinstance(metadata, dict):
            raise KvstrataError(f"metadata must be a dict, got {type(metadata).__name__}")
        with self._write() as cur:
            src_row = self._load_row(cur, session_id, owner, FULL_COLS, True)
            src = _info(src_row)
            now = self._now()
            merged = {**src["metadata"], **(metadata or {})}
            s = Session(
                **{**src, "id": new_session_id(), "parent_id": session_id, "state": SessionState.ACTIVE,
                   "version": 1, "created_at": now, "updated_at": now, "lease_expires_at": None,
                   "parked_tier": None, "kv_placement": None, "metadata": merged},
                system_prompt=src_row[_SYS],
                tools=codec.loads(src_row[_TOOLS]),
                token_ids=codec.decode_tokens(src_row[_TOKENS]),
                block_keys=codec.decode_keys(src_row[_KEYS]),
            )  # fmt: skip
            self._insert_session(cur, s, bytes(src_row[_TOKENS]), bytes(src_row[_KEYS]))
            self._x(
                cur,
                "INSERT INTO messages (session_id, idx, body) SELECT ?, idx, body FROM messages "
                "WHERE session_id = ? AND idx < ?",
                (s.id, session_id, s.num_messages),
            )
            bodies = self._all(
                cur, "SELECT body FROM messages WHERE session_id = ? ORDER BY idx", (s.id,)
            )
        s.messages = [codec.loads(b[0]) for b in bodies]
        return s

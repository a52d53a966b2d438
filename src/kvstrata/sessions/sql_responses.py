"""The SQL core, Responses-API records: `previous_response_id` -> the session (and turn) to continue.
A response is visible to whoever can see its session, and is deleted with it."""

from __future__ import annotations

from typing import Any

from kvstrata.sessions import codec
from kvstrata.sessions.sql_base import SqlBase
from kvstrata.sessions.types import ResponseNotFound, ResponseRecord, new_response_id


class ResponsesSql(SqlBase):
    def put_response(
        self, session_id: str, *, owner: Any, turn: int, output: Any, usage: Any = None, response_id: str | None = None
    ) -> ResponseRecord:
        turn = codec.check_count(turn, "turn")
        rec = ResponseRecord(
            id=response_id or new_response_id(),
            session_id=session_id,
            turn=turn,
            output=codec.loads(codec.dumps(output, "output")),
            usage=codec.loads(codec.dumps(usage, "usage")),
            created_at=self._now(),
        )
        with self._write() as cur:
            self._load_row(cur, session_id, owner, "id, owner", True)
            self._x(
                cur,
                "INSERT INTO responses (id, session_id, turn, output, usage, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (rec.id, session_id, turn, codec.dumps(output, "output"),
                 None if usage is None else codec.dumps(usage, "usage"), rec.created_at),
            )  # fmt: skip
        return rec

    def get_response(self, response_id: str, *, owner: Any) -> ResponseRecord:
        self._check_owner_arg(owner)
        with self._read() as cur:
            row = self._one(
                cur,
                "SELECT r.id, r.session_id, r.turn, r.output, r.usage, r.created_at, s.owner "
                "FROM responses r JOIN sessions s ON s.id = r.session_id WHERE r.id = ?",
                (response_id,),
            )
        if row is None or not self._visible(row[6], owner):
            raise ResponseNotFound(response_id)
        return ResponseRecord(
            id=row[0], session_id=row[1], turn=row[2], output=codec.loads(row[3]),
            usage=codec.loads(row[4]), created_at=row[5],
        )  # fmt: skip

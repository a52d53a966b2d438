"""What the shared SQL core needs from a backend, and the helpers both halves of the core use.

A backend (sqlite.py, postgres.py) provides a connection per thread and two context managers:
`_read()` (a cursor, autocommit reads) and `_write()` (a cursor inside one transaction that excludes
other writers of the rows it locks, committed on normal exit and rolled back on an exception). SQL
is written once with `?` placeholders; `_q` rewrites them for the backend's driver.
"""

from __future__ import annotations

import contextlib
import enum
import time
from typing import Any, Callable

from kvstrata.core import KvstrataError
from kvstrata.sessions.types import ANY_OWNER, SessionNotFound, _AnyOwner


class SqlBase:
    dialect: str = ""  # "sqlite" or "postgresql"
    for_update: str = ""  # row-lock suffix for SELECTs inside _write(); "" where the tx locks all
    clock: Callable[[], float] = time.time

    # ---- backend hooks

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _write(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _q(self, sql: str) -> str:
        return sql

    # ---- helpers

    def _x(self, cur: Any, sql: str, params: tuple | list = ()) -> Any:
        cur.execute(self._q(sql), tuple(params))
        return cur

    def _one(self, cur: Any, sql: str, params: tuple | list = ()) -> tuple | None:
        return self._x(cur, sql, params).fetchone()

    def _all(self, cur: Any, sql: str, params: tuple | list = ()) -> list[tuple]:
        return list(self._x(cur, sql, params).fetchall())

    def _now(self) -> float:
        return float(self.clock())

    def _load_row(self, cur: Any, session_id: str, owner: Any, cols: str, lock: bool) -> tuple:
        """The session row (columns `cols`, the second being `owner`); SessionNotFound if not visible."""
        self._check_owner_arg(owner)
        sql = f"SELECT {cols} FROM sessions WHERE id = ?" + (self.for_update if lock else "")
        row = self._one(cur, sql, (session_id,))
        if row is None or not self._visible(row[1], owner):
            raise SessionNotFound(session_id)
        return row

    @staticmethod
    def _check_owner_arg(owner: Any, allow_any: bool = True) -> None:
        if owner is None or isinstance(owner, str):
            return
        if isinstance(owner, _AnyOwner):
            if allow_any:
                return
            raise KvstrataError("a new object needs a concrete owner (an owner hash or None), not ANY_OWNER")
        raise KvstrataError(f"owner must be a str, None or ANY_OWNER, got {type(owner).__name__}")

    @staticmethod
    def _visible(row_owner: str | None, owner: Any) -> bool:
        return owner is ANY_OWNER or row_owner == owner

    @staticmethod
    def _owner_filter(owner: Any) -> tuple[str, tuple]:
        """A WHERE fragment (starting with ' AND') restricting rows to `owner`."""
        if owner is ANY_OWNER:
            return "", ()
        if owner is None:
            return " AND owner IS NULL", ()
        return " AND owner = ?", (owner,)

    @staticmethod
    def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
            raise KvstrataError(f"{what} must be one of {allowed}, got {value!r}") from None

    def _page_filter(
        self, cur: Any, table: str, after: str | None, owner: Any, order: str, not_found: Callable
    ) -> tuple[str, tuple, str]:
        """Keyset pagination on (created_at, id): WHERE fragment, its params, ORDER BY clause."""
        if order not in ("asc", "desc"):
            raise KvstrataError(f"order must be 'asc' or 'desc', got {order!r}")
        direction = ">" if order == "asc" else "<"
        order_by = f" ORDER BY created_at {order.upper()}, id {order.upper()}"
        if after is None:
            return "", (), order_by
        row = self._one(cur, f"SELECT created_at, owner FROM {table} WHERE id = ?", (after,))
        if row is None or not self._visible(row[1], owner):
            raise not_found(after)
        frag = f" AND (created_at {direction} ? OR (created_at = ? AND id {direction} ?))"
        return frag, (row[0], row[0], after), order_by

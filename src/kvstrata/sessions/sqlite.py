"""The SQLite session store: one file, WAL journal, one connection per thread.

Durability. WAL mode with `synchronous=FULL` (the default here) fsyncs the WAL at every commit, so a
committed write survives a process kill (SIGKILL, OOM) *and* an OS crash or power loss. With
`synchronous=NORMAL` a commit is not fsynced: it still survives any process kill (the WAL is in the
OS page cache) and the file is never corrupted, but the last commits before a power loss or kernel
crash can be rolled back. We default to FULL because each commit here is an agent turn or a
tool-call checkpoint (seconds of work apart, and a recorded tool result must never be lost and re-run);
an fsync per commit is cheap next to that. Pass `synchronous="NORMAL"` for throughput instead.

Concurrency. Each thread gets its own connection (sqlite3 connections must not be shared while in
use); writes take `BEGIN IMMEDIATE`, so writers queue on the file lock (up to `busy_timeout_s`) rather
than failing on a lock upgrade; readers never block writers (WAL). Several processes may open the same
file on a local filesystem (not NFS: WAL needs shared memory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from kvstrata.core import KvstrataError
from kvstrata.sessions.schema import MIGRATIONS, Migration, current_version, migrate
from kvstrata.sessions.sql_sessions import SqlStore
from kvstrata.sessions.types import SessionStoreError, StoreUnavailable

log = logging.getLogger(__name__)

_SYNC_MODES = ("FULL", "NORMAL", "EXTRA")


class SQLiteSessionStore(SqlStore):
    dialect = "sqlite"
    for_update = ""  # BEGIN IMMEDIATE already holds the database's write lock

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        synchronous: str = "FULL",
        busy_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ):
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise KvstrataError(
                f"the SQLite session store needs a file path, got {str(path)!r}: an in-memory database "
                "is not durable and not shared between threads; use a temporary file instead"
            )
        if synchronous.upper() not in _SYNC_MODES:
            raise KvstrataError(f"synchronous must be one of {', '.join(_SYNC_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise KvstrataError(
                f"cannot open the session store {str(self.path)!r}: directory {str(self.path.parent)!r} "
                "does not exist; create it first"
            )
        self.synchronous = synchronous.upper()
        self.busy_timeout_s = float(busy_timeout_s)
        self.clock = clock
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        with self._write() as cur:
            self._version = migrate(cur, self.dialect, migrations, str(self.path))
        log.info("session store: SQLite %s (schema v%d, synchronous=%s)", self.path, self._version, self.synchronous)

    # ---- connections

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise SessionStoreError("this session store is closed; open a new one")
        if os.getpid() != self._pid:  # forked: the parent's connections must not be used here
            with self._lock:
                self._pid, self._conns, self._local = os.getpid(), [], threading.local()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                mode = self._enable_wal(conn)
                if mode.lower() != "wal":
                    raise SessionStoreError(f"SQLite refused WAL mode on {self.path} (got {mode!r})")
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.DatabaseError as e:
                conn.close()
                raise self._wrap(e) from None
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> str:
        """`PRAGMA journal_mode = WAL`, retried for up to busy_timeout_s: switching a new file to WAL takes
        an exclusive lock, and SQLite answers "database is locked" at once there instead of calling its
        busy handler, so concurrent first opens of one file would fail without this loop."""
        deadline, delay = time.monotonic() + self.busy_timeout_s, 0.002
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if not ("locked" in str(e) or "busy" in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 0.1)

    def _wrap(self, e: sqlite3.DatabaseError) -> SessionStoreError:
        """Every database error here is the store's state, not the request's: StoreUnavailable (HTTP 503)."""
        hint = ""
        if "locked" in str(e) or "busy" in str(e):
            hint = f" (another writer held it for over {self.busy_timeout_s:g}s; retry later)"
        elif "not a database" in str(e):
            hint = " (the file exists but is not a SQLite database: point the store at another path)"
        elif "full" in str(e):
            hint = " (free disk space where the store lives)"
        self.failed_at = time.monotonic()
        return StoreUnavailable(f"session store {str(self.path)!r}: SQLite error: {e}{hint}")

    @contextlib.contextmanager
    def _tx(self, begin: str) -> Iterator[Any]:
        conn = self._conn()
        try:
            conn.execute(begin)
        except sqlite3.DatabaseError as e:
            raise self._wrap(e) from None
        try:
            yield conn.cursor()
        except BaseException as exc:
            with contextlib.suppress(sqlite3.DatabaseError):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
                raise self._wrap(exc) from None
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            with contextlib.suppress(sqlite3.DatabaseError):
                conn.execute("ROLLBACK")
            raise self._wrap(e) from None

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        return self._tx("BEGIN")  # a deferred transaction: one consistent snapshot for all its reads

    def _write(self) -> contextlib.AbstractContextManager[Any]:
        return self._tx("BEGIN IMMEDIATE")

    # ---- lifecycle

    def schema_version(self) -> int:
        with self._read() as cur:
            return current_version(cur)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(sqlite3.Error):
                c.close()

    def __repr__(self) -> str:
        return f"SQLiteSessionStore({str(self.path)!r}, synchronous={self.synchronous})"

"""The PostgreSQL session store (psycopg 3), for several engine instances sharing one store.

Same tables and SQL as SQLite (see sql_sessions.py); the differences are here: `%s` placeholders, row
locks (`SELECT ... FOR UPDATE`) inside each write transaction under READ COMMITTED, and an advisory
lock that serialises schema migrations between processes. One connection per thread.

Durability is the server's: with PostgreSQL's defaults (`fsync=on`, `synchronous_commit=on`) a
committed write survives the client's death, the server's crash and a power loss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import psycopg

from kvstrata.sessions.schema import MIGRATIONS, Migration, current_version, migrate
from kvstrata.sessions.sql_sessions import SqlStore
from kvstrata.sessions.types import SessionStoreError, StoreUnavailable

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x6B7673_7365_7373  # pg_advisory_xact_lock key: "kvs" "sess"


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable PostgreSQL URL>"
    return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"


class PostgresSessionStore(SqlStore):
    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ):
        self.url = url
        self.where = _redact(url)
        self.connect_timeout_s = connect_timeout_s
        self.clock = clock
        self._local = threading.local()
        self._conns: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        with self._write() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self._version = migrate(cur, self.dialect, migrations, self.where)
        log.info("session store: PostgreSQL %s (schema v%d)", self.where, self._version)

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    # ---- connections

    def _conn(self) -> psycopg.Connection:
        if self._closed:
            raise SessionStoreError("this session store is closed; open a new one")
        if os.getpid() != self._pid:  # forked: the parent's connections must not be used here
            with self._lock:
                self._pid, self._conns, self._local = os.getpid(), [], threading.local()
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.closed:
            conn = None  # the server closed it (restart, idle timeout): reconnect
        if conn is None:
            try:
                conn = psycopg.connect(
                    self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s))
                )
            except psycopg.Error as e:
                self.failed_at = time.monotonic()
                raise StoreUnavailable(
                    f"cannot connect to the session store {self.where}: {str(e).strip()}; check that the "
                    "server runs and the URL (user, password, database) is right"
                ) from None
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        conn = self._conn()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.QueryCanceled) as e:
            self.failed_at = time.monotonic()
            raise StoreUnavailable(f"session store {self.where}: {str(e).strip()}") from None

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        return self._tx()

    def _write(self) -> contextlib.AbstractContextManager[Any]:
        return self._tx()

    # ---- lifecycle

    def schema_version(self) -> int:
        with self._read() as cur:
            return current_version(cur)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(psycopg.Error):
                c.close()

    def __repr__(self) -> str:
        return f"PostgresSessionStore({self.where!r})"

"""The vector index beside the session store: the embedded chunks of every session's messages.

Its rows live in the session store's own database (migration 4): `memory_items` (text, owner, the
float32 embedding) and `memory_cursor` (how many of a session's messages are embedded). The cursor
moves in the same transaction that writes a batch's rows, so a process killed mid-embedding loses
nothing: the next start finds the session behind its cursor and embeds the rest (`backlog`).

Search, per backend:
- SQLite: a sqlite-vec `vec0` virtual table (`memory_vec`, cosine distance, the owner as its partition
  key, the session as a metadata column) in a sidecar file beside the store, `<store>.vec`, derived from
  memory_items and brought up to them before each search (see SqliteVecIndex).
- PostgreSQL: exact search: the owner's (or the session's) embeddings read and scored with one matrix
  product. pgvector is not used (no package of it on these machines); the rows keep the embedding as
  bytes, so an ANN index can be added beside them later.

Results never cross owners: the query names the owner (a partition of the vec0 table; a WHERE clause on
PostgreSQL), and every hit is joined back to `memory_items` and its owner checked again.
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from kvstrata.sessions.types import ANY_OWNER

BACKLOG_SQL = (
    "SELECT s.id, s.owner, s.num_messages, COALESCE(c.done, 0) FROM sessions s "
    "LEFT JOIN memory_cursor c ON c.session_id = s.id WHERE s.num_messages > COALESCE(c.done, 0) "
    "ORDER BY s.updated_at, s.id LIMIT ?"
)
CURSOR_SQL = (
    "INSERT INTO memory_cursor (session_id, done, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (session_id) DO UPDATE SET done = excluded.done, updated_at = excluded.updated_at"
)


@dataclass
class Chunk:
    idx: int  # the message's index in the session's log
    part: int  # the chunk's number within the message
    role: str
    text: str


@dataclass
class Hit:
    session_id: str
    idx: int
    part: int
    role: str
    text: str
    score: float  # cosine similarity, 1 = same direction

    def as_dict(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "message_index": self.idx, "chunk": self.part, "role": self.role,
                "text": self.text, "score": round(self.score, 4)}


class MemoryIndex(abc.ABC):
    """backlog / messages / write for the embedder; search for everyone; gc after deletions. The rows
    (memory_items, memory_cursor) are read and written through the session store's own connections."""

    kind = ""

    def __init__(self, store: Any) -> None:
        self.store = store

    def _read(self):
        return self.store._read()

    def _write(self):
        return self.store._write()

    def _x(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self.store._q(sql), tuple(params))
        return cur

    def backlog(self, limit: int = 64) -> list[tuple[str, str | None, int, int]]:
        """(session id, owner, messages, embedded) of sessions with messages not embedded yet, oldest first."""
        with self._read() as cur:
            return [tuple(r) for r in self._x(cur, BACKLOG_SQL, (limit,)).fetchall()]

    def messages(self, session_id: str, start: int, end: int) -> list[tuple[int, str]]:
        """(index, JSON body) of the session's messages start..end-1."""
        with self._read() as cur:
            return [tuple(r) for r in self._x(
                cur, "SELECT idx, body FROM messages WHERE session_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
                (session_id, start, end)).fetchall()]

    def write(self, session_id: str, owner: str | None, chunks: Sequence[Chunk], vecs: np.ndarray, done: int) -> bool:
        """Store the chunks with their vectors and move the session's cursor to `done`, in one
        transaction. False (nothing written) when the session was deleted meanwhile. Rows written before
        a crash that kept the cursor behind are replaced (new ids: ids are never reused)."""
        now = time.time()
        with self._write() as cur:
            if self._x(cur, "SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                return False
            if chunks:
                self._x(cur, "DELETE FROM memory_items WHERE session_id = ? AND idx >= ? AND idx <= ?",
                        (session_id, min(c.idx for c in chunks), max(c.idx for c in chunks)))
            for c, v in zip(chunks, vecs):
                self._x(cur, "INSERT INTO memory_items (session_id, idx, part, owner, role, text, embedding, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (session_id, c.idx, c.part, owner, c.role, c.text, np.asarray(v, dtype=np.float32).tobytes(), now))
            self._x(cur, CURSOR_SQL, (session_id, done, now))
        self.sync()
        return True

    def sync(self) -> int:
        """Bring a derived search structure up to the rows (a no-op where search reads the rows)."""
        return 0

    @abc.abstractmethod
    def search(self, owner: Any, query: np.ndarray, k: int = 5, session_id: str | None = None) -> list[Hit]:
        """The k chunks of `owner` (of one session when given) nearest to the unit vector `query`."""

    def _items(self, ids: Sequence[int], owner: Any) -> dict[int, tuple]:
        """memory_items rows by id, only those `owner` may see."""
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        with self._read() as cur:
            rows = self._x(cur, f"SELECT id, owner, session_id, idx, part, role, text FROM memory_items "
                                f"WHERE id IN ({marks})", list(ids)).fetchall()
        return {r[0]: r for r in rows if owner is ANY_OWNER or r[1] == owner}

    def stats(self) -> dict[str, int]:
        with self._read() as cur:
            items = self._x(cur, "SELECT COUNT(*) FROM memory_items").fetchone()[0]
            behind = self._x(cur, "SELECT COUNT(*) FROM sessions s LEFT JOIN memory_cursor c ON c.session_id = s.id "
                                  "WHERE s.num_messages > COALESCE(c.done, 0)").fetchone()[0]
        return {"items": int(items), "sessions_behind": int(behind)}

    def gc(self) -> int:
        """Forget derived entries whose rows went with a deleted session; returns how many."""
        return 0

    def close(self) -> None:
        pass


class SqliteVecIndex(MemoryIndex):
    """sqlite-vec in a sidecar file beside the store (`<store file>.vec`), derived from memory_items.

    The sidecar holds a vec0 table keyed by memory_items ids (owner as partition key, session as metadata)
    and how far it has copied (`vec_state.synced_id`). It is opened through `sqlean` (Python's own sqlite3
    here cannot load extensions) and never the store's file: two SQLite libraries must not open one
    database in one process (their POSIX locks would cancel each other; SQLite's "how to corrupt" 2.2.1).
    Ids are never reused, so a stale entry can only point at a deleted row, which search drops."""

    kind = "sqlite-vec"

    def __init__(self, store: Any, *, busy_timeout_s: float = 10.0) -> None:
        import sqlean  # noqa: F401  (imported here: only the SQLite index needs them)
        import sqlite_vec  # noqa: F401

        super().__init__(store)
        self.path = Path(str(store.path) + ".vec")
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        from kvstrata.memory.embed import DIM

        with self._vec("BEGIN IMMEDIATE") as cur:
            cur.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS memory_vec USING vec0(item_id INTEGER PRIMARY KEY, "
                        f"owner TEXT PARTITION KEY, session_id TEXT, embedding FLOAT[{DIM}] distance_metric=cosine)")
            cur.execute("CREATE TABLE IF NOT EXISTS vec_state (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
            cur.execute("INSERT OR IGNORE INTO vec_state (k, v) VALUES ('synced_id', 0)")

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            import sqlean
            import sqlite_vec

            conn = sqlean.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None,
                                  check_same_thread=False)
            conn.enable_load_extension(True)
            sqlite_vec.load(conn)
            conn.enable_load_extension(False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _vec(self, begin: str) -> Iterator[Any]:
        conn = self._conn()
        conn.execute(begin)
        try:
            yield conn.cursor()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _part(owner: str | None) -> str:
        return owner if owner is not None else ""  # owner hashes are hex: "" is no key's partition

    def sync(self, batch: int = 2000) -> int:
        """Copy memory_items rows newer than the sidecar's mark into the vec0 table; returns how many."""
        total = 0
        while True:
            with self._vec("BEGIN IMMEDIATE") as vc:
                mark = vc.execute("SELECT v FROM vec_state WHERE k = 'synced_id'").fetchone()[0]
                with self._read() as cur:
                    rows = self._x(cur, "SELECT id, owner, session_id, embedding FROM memory_items WHERE id > ? "
                                        "ORDER BY id LIMIT ?", (mark, batch)).fetchall()
                for item_id, owner, sid, blob in rows:
                    vc.execute("INSERT INTO memory_vec (item_id, owner, session_id, embedding) VALUES (?, ?, ?, ?)",
                               (item_id, self._part(owner), sid, bytes(blob)))
                if rows:
                    vc.execute("UPDATE vec_state SET v = ? WHERE k = 'synced_id'", (rows[-1][0],))
            total += len(rows)
            if len(rows) < batch:
                return total

    def search(self, owner: Any, query: np.ndarray, k: int = 5, session_id: str | None = None) -> list[Hit]:
        self.sync()
        q = np.asarray(query, dtype=np.float32).tobytes()
        sql = "SELECT item_id, distance FROM memory_vec WHERE embedding MATCH ? AND k = ?"
        params: list[Any] = [q, 2 * k + 8]  # spare rows for entries of deleted messages not collected yet
        if owner is not ANY_OWNER:
            sql += " AND owner = ?"
            params.append(self._part(owner))
        if session_id is not None:
            sql += " AND session_id = ?"
            params.append(session_id)
        with self._vec("BEGIN") as vc:
            near = vc.execute(sql, params).fetchall()
        rows = self._items([r[0] for r in near], owner)
        hits = [Hit(rows[i][2], rows[i][3], rows[i][4], rows[i][5], rows[i][6], 1.0 - float(d))
                for i, d in near if i in rows and (session_id is None or rows[i][2] == session_id)]
        return hits[:k]

    def gc(self) -> int:
        with self._vec("BEGIN") as vc:
            ids = [r[0] for r in vc.execute("SELECT item_id FROM memory_vec").fetchall()]
        live = set()
        for i in range(0, len(ids), 500):
            live |= set(self._items(ids[i:i + 500], ANY_OWNER))
        dead = [i for i in ids if i not in live]
        with self._vec("BEGIN IMMEDIATE") as vc:
            for i in dead:
                vc.execute("DELETE FROM memory_vec WHERE item_id = ?", (i,))
        return len(dead)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()


class ExactIndex(MemoryIndex):
    """PostgreSQL: exact cosine search over the owner's (or the session's) rows."""

    kind = "exact"

    def search(self, owner: Any, query: np.ndarray, k: int = 5, session_id: str | None = None) -> list[Hit]:
        sql = "SELECT id, owner, session_id, idx, part, role, text, embedding FROM memory_items WHERE 1 = 1"
        params: list[Any] = []
        if owner is not ANY_OWNER:
            sql += " AND owner IS NULL" if owner is None else " AND owner = ?"
            params += [] if owner is None else [owner]
        if session_id is not None:
            sql += " AND session_id = ?"
            params.append(session_id)
        with self._read() as cur:
            rows = self._x(cur, sql, params).fetchall()
        if not rows:
            return []
        m = np.frombuffer(b"".join(bytes(r[7]) for r in rows), dtype=np.float32).reshape(len(rows), -1)
        scores = m @ np.asarray(query, dtype=np.float32)
        top = np.argsort(-scores)[:k]
        return [Hit(rows[i][2], rows[i][3], rows[i][4], rows[i][5], rows[i][6], float(scores[i])) for i in top
                if owner is ANY_OWNER or rows[i][1] == owner]


def open_index(store: Any) -> MemoryIndex:
    """The index of the session store `store` (SQLite: sqlite-vec in a sidecar file; PostgreSQL: exact)."""
    if getattr(store, "dialect", "") == "sqlite":
        return SqliteVecIndex(store, busy_timeout_s=getattr(store, "busy_timeout_s", 10.0))
    return ExactIndex(store)

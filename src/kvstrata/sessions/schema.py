"""The schema of the session store and its ordered migrations.

`schema_version` holds one row per applied migration; the database's version is the highest.
`migrate` runs at every open, in one transaction that also holds the backend's migration lock, so two
processes opening a fresh database at once apply each step exactly once. A database whose version is
higher than the newest step this code knows raises SchemaTooNew and is not touched.

Rules for new steps: append only (never edit a released step), one `Migration` per change, DDL written
once with the type placeholders below so SQLite and PostgreSQL get the same tables.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kvstrata.sessions.types import SchemaTooNew

log = logging.getLogger(__name__)

# Column types per dialect. {blob}: bytes; {real}: float64 unix seconds; {bigint}: 64-bit counters.
TYPES = {
    "sqlite": {"blob": "BLOB", "real": "REAL", "bigint": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "real": "DOUBLE PRECISION", "bigint": "BIGINT"},
}


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]  # DDL with {blob} / {real} / {bigint} placeholders
    # optional data step after the DDL, given (cursor, dialect); same transaction
    run: Callable[[Any, str], None] | None = None


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions, their messages, Responses-API records",
        (
            """CREATE TABLE sessions (
                id TEXT PRIMARY KEY,
                owner TEXT,
                parent_id TEXT,
                state TEXT NOT NULL,
                request_class TEXT NOT NULL,
                system_prompt TEXT,
                tools TEXT,
                metadata TEXT NOT NULL,
                token_ids {blob} NOT NULL,
                num_tokens INTEGER NOT NULL,
                block_keys {blob} NOT NULL,
                num_blocks INTEGER NOT NULL,
                num_messages INTEGER NOT NULL,
                version {bigint} NOT NULL,
                lease_expires_at {real},
                parked_tier TEXT,
                created_at {real} NOT NULL,
                updated_at {real} NOT NULL)""",
            "CREATE INDEX sessions_owner_created ON sessions (owner, created_at, id)",
            "CREATE INDEX sessions_lease ON sessions (lease_expires_at)",
            """CREATE TABLE messages (
                session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
                idx INTEGER NOT NULL,
                body TEXT NOT NULL,
                PRIMARY KEY (session_id, idx))""",
            """CREATE TABLE responses (
                id TEXT PRIMARY KEY,
                session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
                turn INTEGER NOT NULL,
                output TEXT NOT NULL,
                usage TEXT,
                created_at {real} NOT NULL)""",
            "CREATE INDEX responses_session ON responses (session_id)",
        ),
    ),
    Migration(
        2,
        "agent jobs: jobs, job_tasks, tool_calls",
        (
            """CREATE TABLE jobs (
                id TEXT PRIMARY KEY,
                owner TEXT,
                spec TEXT NOT NULL,
                state TEXT NOT NULL,
                num_tasks INTEGER NOT NULL,
                error TEXT,
                created_at {real} NOT NULL,
                updated_at {real} NOT NULL)""",
            "CREATE INDEX jobs_owner_created ON jobs (owner, created_at, id)",
            """CREATE TABLE job_tasks (
                job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
                idx INTEGER NOT NULL,
                input TEXT,
                session_id TEXT,
                state TEXT NOT NULL,
                result TEXT,
                error TEXT,
                steps INTEGER NOT NULL,
                prompt_tokens {bigint} NOT NULL,
                completion_tokens {bigint} NOT NULL,
                created_at {real} NOT NULL,
                updated_at {real} NOT NULL,
                PRIMARY KEY (job_id, idx))""",
            """CREATE TABLE tool_calls (
                session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
                call_id TEXT NOT NULL,
                name TEXT NOT NULL,
                arguments TEXT,
                status TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                result TEXT,
                error TEXT,
                started_at {real} NOT NULL,
                finished_at {real},
                PRIMARY KEY (session_id, call_id))""",
        ),
    ),
    Migration(
        3,
        "sessions.kv_placement: where a paused session's KV was put (survives restarts)",
        ("ALTER TABLE sessions ADD COLUMN kv_placement TEXT",),
    ),
    Migration(
        4,
        "memory: embedded message chunks (recall) and each session's embedding cursor",
        (
            "CREATE INDEX responses_created ON responses (created_at)",
            "CREATE INDEX sessions_updated ON sessions (updated_at)",
        ),
        run=lambda cur, dialect: _memory_tables(cur, dialect),
    ),
)


def _memory_tables(cur: Any, dialect: str) -> None:
    """memory_items: one row per embedded chunk of a session message (ids never reused, so a vector
    index keyed by them can never point at another owner's text); memory_cursor: how many of a
    session's messages are embedded. Both go with their session (ON DELETE CASCADE)."""
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT" if dialect == "sqlite" else "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    t = TYPES[dialect]
    cur.execute(f"""CREATE TABLE memory_items (
        id {serial},
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        part INTEGER NOT NULL,
        owner TEXT,
        role TEXT NOT NULL,
        text TEXT NOT NULL,
        embedding {t['blob']} NOT NULL,
        created_at {t['real']} NOT NULL,
        UNIQUE (session_id, idx, part))""")
    cur.execute("CREATE INDEX memory_items_owner ON memory_items (owner, session_id)")
    cur.execute(f"""CREATE TABLE memory_cursor (
        session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
        done INTEGER NOT NULL,
        updated_at {t['real']} NOT NULL)""")

SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at {real} NOT NULL)"
)


def check_migrations(migrations: Sequence[Migration]) -> None:
    for i, m in enumerate(migrations):
        assert m.version == i + 1, f"migration versions must be 1, 2, ... in order; got {m.version} at {i}"


def current_version(cur: Any) -> int:
    cur.execute("SELECT MAX(version) FROM schema_version")
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def too_new(found: int, known: int, where: str) -> SchemaTooNew:
    return SchemaTooNew(
        f"the session store at {where} has schema version {found}, but this kvstrata knows only up "
        f"to {known}: it was written by a newer kvstrata. Upgrade kvstrata, or point it at another "
        "database; it was left untouched"
    )


def migrate(cur: Any, dialect: str, migrations: Sequence[Migration], where: str) -> int:
    """Bring the database to the last of `migrations`; the caller holds a write transaction and the
    migration lock. Returns the version reached."""
    check_migrations(migrations)
    types = TYPES[dialect]
    ph = "?" if dialect == "sqlite" else "%s"
    cur.execute(SCHEMA_VERSION_DDL.format(**types))
    found = current_version(cur)
    if found > len(migrations):
        raise too_new(found, len(migrations), where)
    for m in migrations[found:]:
        log.info("session store %s: applying migration %d (%s)", where, m.version, m.description)
        for stmt in m.statements:
            cur.execute(stmt.format(**types))
        if m.run is not None:
            m.run(cur, dialect)
        cur.execute(
            f"INSERT INTO schema_version (version, description, applied_at) VALUES ({ph}, {ph}, {ph})",
            (m.version, m.description, time.time()),
        )
    return max(found, len(migrations))

"""Durable agent sessions and job checkpoints: the session store (SQLite by default, PostgreSQL at
scale). See docs/sessions.md.

    store = open_store("sessions.db")                       # or "sqlite:///abs/path.db"
    store = open_store("postgresql://user:pw@host/dbname")  # needs psycopg (psycopg[binary])
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl

from kvstrata.core import KvstrataError
from kvstrata.sessions.store import SessionStore
from kvstrata.sessions.types import (
    ANY_OWNER,
    SESSION_TRANSITIONS,
    UNSET,
    InvalidTransition,
    Job,
    JobNotFound,
    JobState,
    JobTask,
    Page,
    ResponseNotFound,
    ResponseRecord,
    SchemaTooNew,
    Session,
    SessionInfo,
    SessionNotFound,
    SessionState,
    SessionStoreError,
    StoreUnavailable,
    TaskState,
    ToolCallNotFound,
    ToolCallRecord,
    ToolCallStatus,
    VersionConflict,
    hash_api_key,
)


def open_store(url_or_path: str | os.PathLike, **kwargs: Any) -> SessionStore:
    """Open (creating and migrating as needed) the store named by `url_or_path`:

    * a plain path, or `sqlite://` followed by a path (`sqlite:///var/lib/kv.db` is the absolute
      /var/lib/kv.db, `sqlite://kv.db` a relative one); a query string sets SQLiteSessionStore
      options, e.g. `sqlite:///kv.db?synchronous=NORMAL&busy_timeout_s=30`;
    * `postgresql://...` or `postgres://...`: a libpq URL for PostgresSessionStore.

    Keyword arguments go to the store's constructor.
    """
    target = os.fspath(url_or_path)
    scheme = target.split("://", 1)[0].lower() if "://" in target else ""
    if scheme in ("postgresql", "postgres"):
        try:
            from kvstrata.sessions.postgres import PostgresSessionStore
        except ImportError as e:
            raise KvstrataError(
                f"a PostgreSQL session store needs psycopg 3: pip install 'psycopg[binary]' ({e})"
            ) from None
        return PostgresSessionStore(target, **kwargs)
    from kvstrata.sessions.sqlite import SQLiteSessionStore

    if scheme == "sqlite":
        rest = target[len("sqlite://") :]
        path, _, query = rest.partition("?")
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "synchronous":
                kwargs.setdefault("synchronous", value)
            elif key == "busy_timeout_s":
                kwargs.setdefault("busy_timeout_s", float(value))
            else:
                raise KvstrataError(f"unknown SQLite store option {key!r} in {target!r}; known: synchronous, busy_timeout_s")
        return SQLiteSessionStore(path, **kwargs)
    if scheme:
        raise KvstrataError(
            f"unknown session store scheme {scheme!r} in {target!r}: use a file path, sqlite://PATH or "
            "postgresql://..."
        )
    return SQLiteSessionStore(target, **kwargs)


__all__ = [
    "ANY_OWNER", "SESSION_TRANSITIONS", "UNSET", "InvalidTransition", "Job", "JobNotFound", "JobState",
    "JobTask", "Page", "ResponseNotFound", "ResponseRecord", "SchemaTooNew", "Session", "SessionInfo",
    "SessionNotFound", "SessionState", "SessionStore", "SessionStoreError", "StoreUnavailable", "TaskState", "ToolCallNotFound",
    "ToolCallRecord", "ToolCallStatus", "VersionConflict", "hash_api_key", "open_store",
]  # fmt: skip

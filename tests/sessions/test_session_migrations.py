"""Schema versions and migrations, on both backends."""

from __future__ import annotations

import threading

import pytest

from kvstrata.sessions import ANY_OWNER, JobState, SchemaTooNew, open_store
from kvstrata.sessions.schema import MIGRATIONS, Migration

TURN = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]


def _add_priority(cur, dialect):
    """A data step: fill the new column from the metadata of existing sessions."""
    import json

    ph = "?" if dialect == "sqlite" else "%s"
    cur.execute("SELECT id, metadata FROM sessions")
    for sid, meta in cur.fetchall():
        cur.execute(f"UPDATE sessions SET priority = {ph} WHERE id = {ph}", (json.loads(meta).get("prio", 0), sid))


N = len(MIGRATIONS)
NEXT = MIGRATIONS + (
    Migration(N + 1, "test only: a session priority column",
              ("ALTER TABLE sessions ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",), run=_add_priority),
)  # fmt: skip


def _versions(store):
    with store._read() as cur:
        cur.execute("SELECT version FROM schema_version ORDER BY version")
        return [r[0] for r in cur.fetchall()]


def test_fresh_store_is_at_the_latest_version(store):
    assert store.schema_version() == N >= 3
    assert _versions(store) == list(range(1, N + 1))


def test_v1_database_is_upgraded_in_place(store_url):
    old = open_store(store_url, migrations=MIGRATIONS[:1])  # what an earlier kvstrata wrote
    assert old.schema_version() == 1
    # (an insert and a response only: this code's reads name columns that later steps add)
    s = old.create_session(owner=None, messages=TURN, token_ids=[5, 6, 7], metadata={"prio": 3})
    r = old.put_response(s.id, owner=None, turn=0, output=[{"type": "message"}])
    with pytest.raises(Exception):  # v1 has no job tables
        old.create_job({}, owner=None, tasks=[])
    old.close()

    new = open_store(store_url)
    assert new.schema_version() == N and _versions(new) == list(range(1, N + 1))
    new.append(s.id, owner=None, expected_version=1, messages=[{"role": "user", "content": "more"}])
    got = new.get_session(s.id, owner=None)
    assert got.messages == TURN + [{"role": "user", "content": "more"}] and got.token_ids == [5, 6, 7]
    assert got.version == 2 and new.get_response(r.id, owner=None).session_id == s.id
    assert got.kv_placement is None  # the v3 column, NULL for rows written before it
    info = new.set_state(s.id, got.state, owner=None, kv_placement={"action": "disk", "tokens": 3})
    assert info.kv_placement == {"action": "disk", "tokens": 3}
    assert new.get_session_info(s.id, owner=None).kv_placement == {"action": "disk", "tokens": 3}
    job = new.create_job({"x": 1}, owner=None, tasks=["t"])  # the v2 tables work
    new.record_tool_call_start(s.id, "c1", "f", {})
    new.close()

    newer = open_store(store_url, migrations=NEXT)  # a data migration runs over existing rows
    with newer._read() as cur:
        cur.execute(newer._q("SELECT priority FROM sessions WHERE id = ?"), (s.id,))
        assert cur.fetchone()[0] == 3
    assert newer.get_job(job.id, owner=None).state == JobState.QUEUED
    assert newer.get_tool_call(s.id, "c1") is not None
    newer.close()


def test_newer_schema_is_refused_and_left_untouched(store_url):
    open_store(store_url, migrations=NEXT).close()
    with pytest.raises(SchemaTooNew, match=f"schema version {N + 1}.*knows only up to {N}"):
        open_store(store_url)
    again = open_store(store_url, migrations=NEXT)  # nothing was changed by the refused open
    assert _versions(again) == list(range(1, N + 2))
    again.close()


def test_concurrent_first_opens_migrate_once(store_url):
    stores, errors = [], []

    def opener():
        try:
            stores.append(open_store(store_url))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _versions(stores[0]) == list(range(1, N + 1))
    sid = stores[1].create_session(owner=None).id
    assert stores[2].get_session(sid, owner=ANY_OWNER).id == sid
    for s in stores:
        s.close()


def test_many_concurrent_first_opens_of_new_sqlite_files(tmp_path):
    """Switching a new file to WAL takes an exclusive lock and SQLite reports "database is locked" at once
    there, without waiting on busy_timeout: 12 threads opening 30 fresh files failed 3 times (a run of this
    test failed 4 times in 5) before the store retried that pragma."""
    errors = []
    for i in range(80):
        path, stores = tmp_path / f"s{i}.db", []

        def opener():
            try:
                stores.append(open_store(str(path)))
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=opener) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in stores:
            s.close()
    assert errors == []

"""The store side of memory, on SQLite and a real PostgreSQL: retention (TTL and a count per owner, sessions
of running job tasks kept), deleting a stored response, tombstoning a message, and the vector index
(backlog and cursor, idempotent rewrite after a crash, owner-scoped search, cleanup after deletion)."""

from __future__ import annotations

import numpy as np
import pytest

from kvstrata.core import KvstrataError
from kvstrata.memory.index import Chunk, open_index
from kvstrata.sessions import ANY_OWNER, ResponseNotFound, SessionNotFound, TaskState, open_store

A, B = "a" * 64, "b" * 64


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_retention_ttl_and_count_per_owner(store_url):
    clock = Clock()
    store = open_store(store_url, clock=clock)
    try:
        olds = [store.create_session(owner=A, messages=[{"role": "user", "content": f"old {i}"}]) for i in range(3)]
        job = store.create_job({"job": {}}, owner=None, tasks=[{"user": "x"}])
        busy = store.create_session(owner=None)  # a running job task's session: never removed
        store.update_job_task(job.id, 0, state=TaskState.RUNNING, session_id=busy.id)
        clock.t += 1000
        fresh = []
        for owner in (A, A, A, A, B, B):
            clock.t += 1
            fresh.append(store.create_session(owner=owner))
            store.put_response(fresh[-1].id, owner=owner, turn=0, output={"n": 1})
        got = store.apply_retention(clock.t, session_ttl_s=500)
        assert got == {"sessions": 3, "responses": 0}
        for s in olds:
            with pytest.raises(SessionNotFound):
                store.get_session(s.id, owner=A)
        store.get_session(busy.id, owner=None)
        # a count per owner: A keeps its 2 most recently updated, B (2) keeps both
        got = store.apply_retention(clock.t, max_sessions_per_owner=2)
        assert got["sessions"] == 2
        left = {s.id for s in store.list_sessions(owner=ANY_OWNER, limit=100).items}
        assert left == {fresh[2].id, fresh[3].id, fresh[4].id, fresh[5].id, busy.id}
        # responses: newest per owner, and a TTL
        assert store.apply_retention(clock.t, max_responses_per_owner=1) == {"sessions": 0, "responses": 2}
        clock.t += 10_000
        assert store.apply_retention(clock.t, response_ttl_s=60)["responses"] == 2
        with pytest.raises(KvstrataError):
            store.apply_retention(clock.t, session_ttl_s=-1)
        with pytest.raises(KvstrataError):
            store.apply_retention(clock.t, max_sessions_per_owner=0)
    finally:
        store.close()


def test_delete_response_and_replace_message(store):
    s = store.create_session(owner=A, messages=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
    r = store.put_response(s.id, owner=A, turn=0, output={})
    with pytest.raises(ResponseNotFound):
        store.delete_response(r.id, owner=B)
    store.delete_response(r.id, owner=A)
    with pytest.raises(ResponseNotFound):
        store.get_response(r.id, owner=A)
    info = store.replace_message(s.id, 0, {"role": "user", "content": "", "kvstrata": {"deleted": True}}, owner=A,
                                 expected_version=s.version)
    assert info.version == s.version + 1 and info.num_messages == 2
    assert store.get_session(s.id, owner=A).messages[0]["kvstrata"] == {"deleted": True}
    with pytest.raises(SessionNotFound):
        store.replace_message(s.id, 1, {"role": "user", "content": "x"}, owner=B)
    with pytest.raises(KvstrataError):
        store.replace_message(s.id, 5, {"role": "user", "content": "x"}, owner=A)
    with pytest.raises(KvstrataError):
        store.replace_message(s.id, 1, {"content": "no role"}, owner=A)
    assert store.get_session(s.id, owner=A).messages[1]["content"] == "two"


def _unit(seed: int, dim: int = 384) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_index_backlog_cursor_search_and_owners(store):
    idx = open_index(store)
    try:
        assert idx.kind == ("sqlite-vec" if store.dialect == "sqlite" else "exact")
        sa = store.create_session(owner=A, messages=[{"role": "user", "content": f"a{i}"} for i in range(3)])
        sb = store.create_session(owner=B, messages=[{"role": "user", "content": "b0"}])
        back = {r[0]: r for r in idx.backlog()}
        assert back[sa.id][2:] == (3, 0) and back[sb.id][2:] == (1, 0)
        assert [i for i, _ in idx.messages(sa.id, 1, 3)] == [1, 2]
        va = np.stack([_unit(i) for i in range(3)])
        assert idx.write(sa.id, A, [Chunk(i, 0, "user", f"a{i}") for i in range(2)], va[:2], 2)
        # a crash after the rows but before the cursor is simulated by writing the same rows again
        assert idx.write(sa.id, A, [Chunk(i, 0, "user", f"a{i}") for i in range(3)], va, 3)
        assert idx.write(sb.id, B, [Chunk(0, 0, "user", "b0")], _unit(1)[None], 1)
        assert sa.id not in {r[0] for r in idx.backlog()}
        assert idx.stats() == {"items": 4, "sessions_behind": 0}
        hits = idx.search(A, _unit(1), k=5)
        assert [h.text for h in hits][0] == "a1" and {h.session_id for h in hits} == {sa.id}
        assert len(hits) == 3  # no duplicates after the rewrite
        assert [h.text for h in idx.search(B, _unit(1), k=5)] == ["b0"]  # same vector, other owner: only B's
        assert idx.search(A, _unit(1), k=5, session_id=sb.id) == []
        store.delete_session(sa.id, owner=A)
        idx.gc()
        assert idx.search(A, _unit(1), k=5) == []
        assert not idx.write(sa.id, A, [Chunk(0, 0, "user", "late")], _unit(0)[None], 1)  # deleted meanwhile
    finally:
        idx.close()

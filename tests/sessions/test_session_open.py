"""open_store: choosing the backend from a URL or path, and the errors of a bad target; plus a
model-based check of append against a plain Python list."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstrata.core import KvstrataError, chain_keys
from kvstrata.sessions import SessionStoreError, open_store
from kvstrata.sessions.postgres import PostgresSessionStore
from kvstrata.sessions.schema import MIGRATIONS
from kvstrata.sessions.sqlite import SQLiteSessionStore


def test_plain_path_and_sqlite_urls(tmp_path, monkeypatch):
    a = open_store(tmp_path / "a.db")
    b = open_store(f"sqlite://{tmp_path}/b.db")  # sqlite:///abs/path
    monkeypatch.chdir(tmp_path)
    c = open_store("sqlite://c.db?busy_timeout_s=3")  # relative to the working directory
    for s, name in ((a, "a.db"), (b, "b.db"), (c, "c.db")):
        assert isinstance(s, SQLiteSessionStore) and s.synchronous == "FULL"
        sid = s.create_session(owner=None).id
        s.close()
        assert (tmp_path / name).is_file()
        again = open_store(tmp_path / name)  # the data is in that file
        assert again.get_session(sid, owner=None).id == sid
        again.close()
    d = open_store(f"sqlite://{tmp_path}/d.db?synchronous=normal")
    assert d.synchronous == "NORMAL"
    d.close()


def test_postgres_urls(pg_server):
    url = pg_server.create_database()
    for u in (url, url.replace("postgresql://", "postgres://")):
        s = open_store(u)
        assert isinstance(s, PostgresSessionStore) and s.schema_version() == len(MIGRATIONS)
        s.close()


@pytest.mark.parametrize(
    "target, match",
    [
        ("mysql://db/x", "unknown session store scheme"),
        (":memory:", "needs a file path"),
        ("", "needs a file path"),
        ("/no/such/dir/s.db", "does not exist"),
        ("sqlite:///tmp/x.db?journal=off", "unknown SQLite store option"),
        ("sqlite:///tmp/x.db?synchronous=OFF", "synchronous must be one of"),
    ],
)
def test_bad_targets(target, match):
    with pytest.raises(KvstrataError, match=match):
        open_store(target)


def test_a_file_that_is_not_a_database(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"this is not sqlite\n" * 100)
    with pytest.raises(SessionStoreError, match="not a SQLite database"):
        open_store(p)
    assert p.read_bytes() == b"this is not sqlite\n" * 100


def test_unreachable_postgres_names_the_server_not_the_password():
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SessionStoreError) as e:
        open_store(f"postgresql://agent:s3cret-pw@127.0.0.1:{port}/kv", connect_timeout_s=2)
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "s3cret-pw" not in msg and "check that the server runs" in msg


def test_closed_store_refuses_use(store):
    store.close()
    with pytest.raises(SessionStoreError, match="closed"):
        store.create_session(owner=None)


def test_two_sqlite_stores_in_one_process_see_each_other(tmp_path):
    a, b = open_store(tmp_path / "s.db"), open_store(tmp_path / "s.db")
    sid = a.create_session(owner=None).id
    b.append(sid, owner=None, expected_version=1, messages=[{"role": "user", "content": "from b"}])
    assert a.get_session(sid, owner=None).messages == [{"role": "user", "content": "from b"}]
    a.close()
    b.close()


# One step of a conversation: keep a prefix of the stored tokens, then add new ones and messages.
step = st.tuples(
    st.floats(0.0, 1.0),  # fraction of the current tokens kept
    st.lists(st.integers(0, 2**31 - 1), max_size=9),
    st.lists(st.text(max_size=5), max_size=2),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=6))
def test_append_matches_a_list_model(store, steps):
    s = store.create_session(owner=None)
    msgs, toks, version = [], [], 1
    for frac, new, texts in steps:
        keep = int(len(toks) * frac)
        toks = toks[:keep] + new
        full = len(chain_keys(toks[:keep], 4, "m"))  # keys of whole blocks inside the kept prefix
        new_msgs = [{"role": "user", "content": t} for t in texts]
        msgs += new_msgs
        store.append(s.id, owner=None, expected_version=version, messages=new_msgs, token_ids=new,
                     keep_tokens=keep, keep_blocks=full, block_keys=chain_keys(toks, 4, "m")[full:])  # fmt: skip
        version += 1
    got = store.get_session(s.id, owner=None)
    assert (got.messages, got.token_ids, got.version) == (msgs, toks, version)
    assert got.block_keys == chain_keys(toks, 4, "m")

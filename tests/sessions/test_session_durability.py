"""Crash safety and concurrency: writers killed with SIGKILL, several processes and threads on one store.

The writers are child interpreters (`_crash_writer.py`, `_concurrent_writer.py`); the parent reopens
the store afterwards and checks it against what the children acknowledged.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time

import pytest

from kvstrata.sessions import ANY_OWNER, VersionConflict, open_store


def expected_after(n):
    """The (messages, token ids, block keys) of a crash-writer session after n whole appends."""
    msgs = [{"role": "system", "content": "start"}]
    toks, keys = [], []
    for i in range(1, n + 1):
        msgs += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
        toks += [3 * i, 3 * i + 1, 3 * i + 2]
        keys.append(hashlib.sha256(str(i).encode()).digest())
    return msgs, toks, keys


def read_lines_until(proc, stop, timeout_s=90.0):
    lines, deadline = [], time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line.split())
        if stop(lines) or time.monotonic() > deadline:
            return lines
    raise AssertionError(f"writer exited early ({proc.wait()}): {proc.stderr.read()}")


def check_whole(store, sid):
    """The session holds exactly n whole appends for some n; returns n."""
    s = store.get_session(sid, owner=ANY_OWNER)
    n = (len(s.messages) - 1) // 2
    msgs, toks, keys = expected_after(n)
    assert [{k: m[k] for k in ("role", "content")} for m in s.messages] == msgs
    assert (s.token_ids, s.block_keys, s.version) == (toks, keys, n + 1)
    assert (s.num_messages, s.num_tokens, s.num_blocks) == (len(msgs), len(toks), len(keys))
    return n


def test_sigkill_keeps_every_committed_append_and_no_partial_one(store_url, run_child):
    proc = run_child("_crash_writer.py", store_url, "loop")
    lines = read_lines_until(proc, lambda ls: sum(x[0] == "appended" for x in ls) >= 30)
    proc.send_signal(signal.SIGKILL)
    lines += [line.split() for line in proc.stdout.read().splitlines()]  # acks printed before death
    assert proc.wait() == -signal.SIGKILL

    created = [x[1] for x in lines if x[0] == "created"]
    acked: dict[str, int] = {}
    for x in lines:
        if x[0] == "appended":
            acked[x[1]] = max(acked.get(x[1], 0), int(x[2]))
    store = open_store(store_url)
    try:
        stored = store.list_sessions(owner=ANY_OWNER, limit=1000).items
        assert {s.id for s in stored} >= set(created)
        assert len(stored) <= len(created) + 1  # at most one create committed but not yet acknowledged
        for s in stored:
            n = check_whole(store, s.id)
            assert acked.get(s.id, 0) <= n <= acked.get(s.id, 0) + 1  # nothing acked is lost
    finally:
        store.close()


def test_sigkill_inside_a_transaction_leaves_nothing_and_releases_locks(store_url, run_child):
    proc = run_child("_crash_writer.py", store_url, "hang")
    lines = read_lines_until(proc, lambda ls: ls[-1][0] == "inside")
    sid = lines[0][1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(store_url, **({} if "://" in store_url else {"busy_timeout_s": 5.0}))
    try:
        assert check_whole(store, sid) == 0  # the append that was inside its transaction is gone
        _, toks, keys = expected_after(1)
        store.append(sid, owner=None, expected_version=1, messages=expected_after(1)[0][1:],
                     token_ids=toks, block_keys=keys)  # fmt: skip
        assert check_whole(store, sid) == 1  # and the dead writer's lock did not outlive it
    finally:
        store.close()


def test_two_processes_append_to_one_session(store_url, run_child):
    store = open_store(store_url)
    sid = store.create_session(owner=None).id
    count = 12
    procs = [run_child("_concurrent_writer.py", store_url, sid, name, str(count)) for name in ("p", "q")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.startswith("done")
    s = store.get_session(sid, owner=None)
    contents = [m["content"] for m in s.messages]
    for name in ("p", "q"):  # every append of each writer, once, in its own order
        assert [c for c in contents if c.startswith(name + ":")] == [f"{name}:{i}" for i in range(count)]
    assert len(contents) == 2 * count and s.version == 2 * count + 1
    # token ids were appended together with their message, atomically
    assert s.token_ids == [int(c.split(":")[1]) for c in contents]
    store.close()


def test_threads_share_one_store(store):
    sid = store.create_session(owner=None).id
    conflicts, errors = [0], []

    def writer(name):
        try:
            for i in range(8):
                while True:
                    v = store.get_session_info(sid, owner=None).version
                    try:
                        store.append(sid, owner=None, expected_version=v,
                                     messages=[{"role": "user", "content": f"{name}:{i}"}])  # fmt: skip
                        break
                    except VersionConflict:
                        conflicts[0] += 1
                store.create_session(owner=name)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(f"t{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = store.get_session(sid, owner=None)
    assert s.version == 33 and len(s.messages) == 32
    for k in range(4):
        assert [m["content"] for m in s.messages if m["content"].startswith(f"t{k}:")] == [f"t{k}:{i}" for i in range(8)]
        assert len(store.list_sessions(owner=f"t{k}").items) == 8


@pytest.mark.parametrize("sync", ["FULL", "NORMAL"])
def test_sqlite_durability_setting_is_applied(tmp_path, sync):
    store = open_store(f"sqlite://{tmp_path}/s.db?synchronous={sync}")
    with store._read() as cur:
        cur.execute("PRAGMA synchronous")
        level = cur.fetchone()[0]
        cur.execute("PRAGMA journal_mode")
        mode = cur.fetchone()[0]
    assert (level, mode) == ({"FULL": 2, "NORMAL": 1}[sync], "wal")
    store.close()

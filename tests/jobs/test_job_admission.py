"""One job cannot starve everyone (issue 19, defect 3): jobs past the server's limits are refused, job
agents wait on backpressure instead of failing, interactive requests keep their room, a cancel leaves
no task running, and a job's task sessions belong to the job's key."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvstrata.server.limits import ServerLimits  # noqa: E402
from tests.server.harness import make_engine, serve, slow_engine_steps  # noqa: E402

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _tasks(n: int, max_tokens: int = 8) -> list[dict]:
    return [{"id": f"t{i}", "user": f"count to {i}", "tools": [], "max_tokens": max_tokens,
             "sampling": {"temperature": 0, "ignore_eos": True}} for i in range(n)]


def _wait(c: httpx.Client, job_id: str, until, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = c.get(f"/v1/jobs/{job_id}").json()
        if until(st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached the state wanted: {st}")


@pytest.fixture
def small_server(tiny_llama, tmp_path):
    """An engine with room for 2 running and 4 waiting requests: the gate admits 6, batch at most 5."""
    from kvstrata.sessions import open_store

    ae = make_engine(str(tiny_llama), max_num_seqs=2, max_waiting=4, kv_device_bytes="32M")
    slow_engine_steps(ae)  # >= 10 ms a step: a job lasts long enough for the chat requests sent beside it
    store = open_store(tmp_path / "s.db")
    with serve(ae, store, limits=ServerLimits(max_job_agents=32)) as srv:
        yield srv
    ae.shutdown()
    store.close()


def test_a_job_past_the_server_limits_is_refused_and_nothing_is_stored(tiny_aeng, store):
    """The issue's job: 20,000 tasks with max_concurrent_agents 10,000 was accepted; the defaults refuse it."""
    with serve(tiny_aeng, store) as srv:
        _refused(srv.url, store)


def _refused(url: str, store) -> None:
    r = httpx.post(url + "/v1/jobs", json={"tasks": _tasks(20_000), "max_concurrent_agents": 10_000}, timeout=60)
    assert r.status_code == 400 and "--max-job-tasks" in r.json()["error"]["message"]
    for body, flag in (({"max_concurrent_agents": 10_000}, "--max-job-agents"),
                       ({"tool_workers": 1000}, "--max-tool-workers")):
        r = httpx.post(url + "/v1/jobs", json={"tasks": _tasks(2), **body})
        assert r.status_code == 400 and flag in r.json()["error"]["message"], r.text
    from kvstrata.sessions import ANY_OWNER

    assert store.list_jobs(owner=ANY_OWNER).items == []


def test_job_agents_wait_and_interactive_requests_keep_their_room(small_server):
    """32 agents on an engine that admits 6: every task finishes (none fails with a full queue), batch
    work never holds more than the 5 slots outside the interactive reserve, and a person's chat
    requests in the middle of it are answered, not 429."""
    gate = small_server.state.admission
    with httpx.Client(base_url=small_server.url, timeout=120) as c:
        job = c.post("/v1/jobs", json={"tasks": _tasks(32, 64), "max_concurrent_agents": 32}).json()
        _wait(c, job["id"], lambda st: st["tasks"]["running"] > 0)
        answered = 0
        for _ in range(3):
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            answered += c.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
        st = _wait(c, job["id"], lambda st: st["state"] in ("done", "failed"))
        assert st["state"] == "done" and st["tasks"]["done"] == 32 and st["tasks"]["failed"] == 0
        res = c.get(f"/v1/jobs/{job['id']}/results", params={"include_transcript": "false"}).json()["data"]
        assert all(r["status"] == "done" and r["error"] is None for r in res)
    assert answered == 3, "the chat requests were not answered while the job ran"
    assert gate.peak["batch"] == 5 and gate.stats["waited"] > 0 and gate.total == 0


def test_cancel_leaves_no_task_running(small_server):
    with httpx.Client(base_url=small_server.url, timeout=120) as c:
        job = c.post("/v1/jobs", json={"tasks": _tasks(40, 48), "max_concurrent_agents": 16}).json()
        _wait(c, job["id"], lambda st: st["tasks"]["done"] >= 1)
        st = c.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert st["state"] == "cancelled" and st["tasks"]["running"] == 0
        assert st["tasks"]["done"] + st["tasks"]["pending"] == 40
        time.sleep(1.0)
        later = c.get(f"/v1/jobs/{job['id']}").json()
        assert later["tasks"] == st["tasks"]  # nothing started or finished after the cancel
    gate = small_server.state.admission
    assert gate.total == 0 and gate._waiters == []
    deadline = time.time() + 30
    while small_server.engine_call(lambda e: e.has_unfinished()) and time.time() < deadline:
        time.sleep(0.05)
    assert not small_server.engine_call(lambda e: e.has_unfinished())


def test_a_jobs_task_sessions_belong_to_the_jobs_key(tiny_aeng, store):
    alice, bob = {"Authorization": "Bearer k-alice"}, {"Authorization": "Bearer k-bob"}
    with serve(tiny_aeng, store, api_keys=["k-alice", "k-bob"]) as srv, httpx.Client(base_url=srv.url) as c:
        job = c.post("/v1/jobs", json={"tasks": _tasks(1, 4)}, headers=alice).json()
        deadline = time.time() + 60
        while c.get(f"/v1/jobs/{job['id']}", headers=alice).json()["state"] != "done" and time.time() < deadline:
            time.sleep(0.1)
        rec = c.get(f"/v1/jobs/{job['id']}/results", headers=alice).json()["data"][0]
        sid = rec["session_id"]
        r = c.get(f"/v1/sessions/{sid}", headers=alice)
        assert r.status_code == 200 and r.json()["metadata"]["job_id"] == job["id"]
        assert c.get(f"/v1/sessions/{sid}", headers=bob).status_code == 404
        assert c.get(f"/v1/jobs/{job['id']}", headers=bob).status_code == 404


def test_a_cancelled_job_has_no_running_task_and_none_starts(store):
    """The store's own rule, whoever cancels: running tasks go back to pending in the cancelling write,
    and no task of a finished job can start afterwards (an agent's late write cannot revive one)."""
    from kvstrata.sessions import ANY_OWNER, InvalidTransition, JobState, TaskState

    job = store.create_job({"job": {}}, owner=None, tasks=[{"user": "a"}, {"user": "b"}, {"user": "c"}])
    store.set_job_state(job.id, JobState.RUNNING, owner=ANY_OWNER)
    store.update_job_task(job.id, 0, state=TaskState.RUNNING)
    store.update_job_task(job.id, 1, state=TaskState.RUNNING)
    store.update_job_task(job.id, 1, state=TaskState.DONE, result={"status": "done"})
    store.set_job_state(job.id, JobState.CANCELLED, owner=ANY_OWNER)
    states = [t.state for t in store.get_job_tasks(job.id, owner=ANY_OWNER)]
    assert states == [TaskState.PENDING, TaskState.DONE, TaskState.PENDING]
    with pytest.raises(InvalidTransition, match="cancelled"):
        store.update_job_task(job.id, 2, state=TaskState.RUNNING)

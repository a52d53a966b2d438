"""Job checkpoints: jobs, job tasks and tool-call records, on both backends."""

from __future__ import annotations

import pytest

from kvstrata.core import KvstrataError
from kvstrata.sessions import (
    ANY_OWNER,
    InvalidTransition,
    JobNotFound,
    JobState,
    SessionNotFound,
    TaskState,
    ToolCallNotFound,
    ToolCallStatus,
    hash_api_key,
)

ALICE, BOB = hash_api_key("sk-alice"), hash_api_key("sk-bob")
SPEC = {"model": "default", "max_steps": 8, "tools": ["search"], "tasks": [{"prompt": "a"}, {"prompt": "b"}]}


def test_create_job_with_tasks(store):
    job = store.create_job(SPEC, owner=ALICE, tasks=SPEC["tasks"])
    assert job.id.startswith("job_") and job.state == JobState.QUEUED and job.num_tasks == 2
    got = store.get_job(job.id, owner=ALICE)
    assert (got.spec, got.state, got.owner, got.num_tasks) == (SPEC, JobState.QUEUED, ALICE, 2)
    tasks = store.get_job_tasks(job.id, owner=ALICE)
    assert [(t.index, t.state, t.input, t.steps, t.session_id) for t in tasks] == [
        (0, TaskState.PENDING, {"prompt": "a"}, 0, None),
        (1, TaskState.PENDING, {"prompt": "b"}, 0, None),
    ]


def test_job_owner_and_not_found(store):
    job = store.create_job(SPEC, owner=ALICE, tasks=[1])
    for call in (
        lambda o: store.get_job(job.id, owner=o),
        lambda o: store.get_job_tasks(job.id, owner=o),
        lambda o: store.get_job_task(job.id, 0, owner=o),
        lambda o: store.set_job_state(job.id, JobState.CANCELLED, owner=o),
        lambda o: store.delete_job(job.id, owner=o),
    ):
        with pytest.raises(JobNotFound) as e:
            call(BOB)
        assert str(e.value) == str(JobNotFound(job.id))
        with pytest.raises(JobNotFound):
            call(None)
    with pytest.raises(JobNotFound):
        store.get_job("job_missing", owner=ANY_OWNER)
    with pytest.raises(JobNotFound):
        store.get_job_task(job.id, 5, owner=ALICE)
    with pytest.raises(JobNotFound):
        store.update_job_task(job.id, 5, state=TaskState.RUNNING)
    assert store.get_job(job.id, owner=ALICE).state == JobState.QUEUED


def test_job_state_transitions(store):
    job = store.create_job(SPEC, owner=None, tasks=[])
    assert store.set_job_state(job.id, JobState.RUNNING, owner=None).state == JobState.RUNNING
    done = store.set_job_state(job.id, JobState.FAILED, owner=ANY_OWNER, error="tool server gone")
    assert (done.state, done.error) == (JobState.FAILED, "tool server gone")
    assert store.get_job(job.id, owner=None).error == "tool server gone"
    for st in (JobState.RUNNING, JobState.QUEUED, JobState.DONE):
        with pytest.raises(InvalidTransition, match="terminal"):
            store.set_job_state(job.id, st, owner=None)
    with pytest.raises(KvstrataError, match="state must be one of"):
        store.set_job_state(job.id, "paused", owner=None)


def test_list_jobs(store):
    mine = [store.create_job({"i": i}, owner=ALICE, tasks=[]).id for i in range(5)]
    store.create_job({}, owner=BOB, tasks=[])
    store.set_job_state(mine[1], JobState.RUNNING, owner=ALICE)
    page = store.list_jobs(owner=ALICE, limit=2)
    assert [j.id for j in page.items] == mine[:2] and page.has_more
    rest = store.list_jobs(owner=ALICE, limit=10, after=page.next_after)
    assert [j.id for j in rest.items] == mine[2:] and not rest.has_more
    assert [j.id for j in store.list_jobs(owner=ALICE, state=JobState.RUNNING).items] == [mine[1]]
    store.delete_job(mine[0], owner=ALICE)
    assert len(store.list_jobs(owner=ALICE).items) == 4
    with pytest.raises(JobNotFound):
        store.get_job_tasks(mine[0], owner=ALICE)


def test_task_lifecycle_and_steps(store):
    job = store.create_job(SPEC, owner=None, tasks=[{"p": 0}, {"p": 1}])
    sess = store.create_session(owner=None)
    with pytest.raises(InvalidTransition, match="only a running task"):
        store.record_job_step(job.id, 0, prompt_tokens=5)
    t = store.update_job_task(job.id, 0, state=TaskState.RUNNING, session_id=sess.id)
    assert (t.state, t.session_id) == (TaskState.RUNNING, sess.id)
    store.record_job_step(job.id, 0, prompt_tokens=100, completion_tokens=20)
    t = store.record_job_step(job.id, 0, prompt_tokens=30, completion_tokens=7)
    assert (t.steps, t.prompt_tokens, t.completion_tokens) == (2, 130, 27)
    t = store.update_job_task(job.id, 0, state=TaskState.DONE, result={"answer": 42})
    assert (t.state, t.result, t.steps) == (TaskState.DONE, {"answer": 42}, 2)
    with pytest.raises(InvalidTransition):
        store.update_job_task(job.id, 0, state=TaskState.RUNNING)
    with pytest.raises(InvalidTransition):  # pending -> done skips running
        store.update_job_task(job.id, 1, state=TaskState.DONE)
    store.update_job_task(job.id, 1, state=TaskState.RUNNING)
    store.update_job_task(job.id, 1, state=TaskState.FAILED, error="max steps")
    t = store.update_job_task(job.id, 1, state=TaskState.PENDING, error=None)  # an explicit retry
    assert (t.state, t.error) == (TaskState.PENDING, None)
    assert [x.index for x in store.get_job_tasks(job.id, owner=None, state=TaskState.DONE)] == [0]
    with pytest.raises(KvstrataError):
        store.record_job_step(job.id, 0, prompt_tokens=-1)


def test_tool_call_is_never_run_twice_after_a_result(store):
    s = store.create_session(owner=None)
    rec = store.record_tool_call_start(s.id, "call_a", "search", {"q": "kv cache"})
    assert (rec.status, rec.attempts, rec.finished, rec.arguments) == (ToolCallStatus.RUNNING, 1, False, {"q": "kv cache"})
    assert store.get_tool_call(s.id, "call_a").status == ToolCallStatus.RUNNING
    done = store.record_tool_call_result(s.id, "call_a", result={"hits": ["a", "b"]})
    assert (done.status, done.result, done.finished) == (ToolCallStatus.DONE, {"hits": ["a", "b"]}, True)
    assert done.finished_at >= done.started_at
    # a resumed runner asks to start it again: it gets the recorded result, unchanged
    again = store.record_tool_call_start(s.id, "call_a", "search", {"q": "kv cache"})
    assert again.finished and again.result == {"hits": ["a", "b"]} and again.attempts == 1
    with pytest.raises(InvalidTransition, match="never recorded or run twice"):
        store.record_tool_call_result(s.id, "call_a", result="other")
    assert store.get_tool_call(s.id, "call_a").result == {"hits": ["a", "b"]}


def test_tool_call_started_but_unfinished_counts_attempts(store):
    s = store.create_session(owner=None)
    store.record_tool_call_start(s.id, "c1", "fetch", "raw-args")
    rec = store.record_tool_call_start(s.id, "c1", "fetch", "raw-args")  # a crash, then a resume
    assert (rec.status, rec.attempts) == (ToolCallStatus.RUNNING, 2)
    failed = store.record_tool_call_result(s.id, "c1", error="HTTP 503")
    assert (failed.status, failed.error, failed.finished) == (ToolCallStatus.FAILED, "HTTP 503", True)
    assert store.record_tool_call_start(s.id, "c1", "fetch", "raw-args").status == ToolCallStatus.FAILED


def test_tool_call_errors_and_listing(store):
    s = store.create_session(owner=None)
    other = store.create_session(owner=None)
    assert store.get_tool_call(s.id, "nope") is None
    with pytest.raises(ToolCallNotFound):
        store.record_tool_call_result(s.id, "nope", result=1)
    with pytest.raises(SessionNotFound):
        store.record_tool_call_start("sess_missing", "c", "f", {})
    with pytest.raises(KvstrataError):
        store.record_tool_call_start(s.id, "", "f", {})
    with pytest.raises(KvstrataError, match="JSON"):
        store.record_tool_call_start(s.id, "c", "f", {"x": object()})
    for cid in ("c1", "c2", "c3"):
        store.record_tool_call_start(s.id, cid, "f", {"id": cid})
    store.record_tool_call_start(other.id, "c1", "g", {})  # same call id, another session: separate
    assert [r.call_id for r in store.list_tool_calls(s.id)] == ["c1", "c2", "c3"]
    assert store.get_tool_call(other.id, "c1").name == "g"
    assert store.get_tool_call(s.id, "c1").name == "f"

"""The agent loop on a tiny random-weight model: tool round trips (module path and entry point), failing
tools, limits, follow-ups, results records. The first step is forced to call a tool (tool_choice), so
the round trip is deterministic even though the model knows nothing."""

from __future__ import annotations

import json

import pytest

from kvstrata.core import KvstrataError
from kvstrata.jobs.results import RESULT_KEYS
from kvstrata.sessions import ANY_OWNER, SessionState, ToolCallStatus

from .conftest import forced, run_job


def _tool_msgs(rec):
    return [m for m in rec["transcript"] if m["role"] == "tool"]


def _calls(rec):
    return [c for m in rec["transcript"] if m["role"] == "assistant" for c in m.get("tool_calls") or []]


def test_forced_round_trip_with_a_module_path_tool(tiny_aeng, store, tmp_path, monkeypatch):
    fx = tmp_path / "effects.jsonl"
    monkeypatch.setenv("KVSTRATA_TEST_SIDE_EFFECTS", str(fx))
    job = {"tools": [{"python": "jobs_sample_tools:pick"}],
           "tasks": [{"id": "a", "system": "Be brief.", "user": "pick one", "tools": ["pick"],
                      "tool_choice": "required", "max_tokens": 64, "max_steps": 3}]}
    job_id, recs = run_job(tiny_aeng, store, job)
    r = recs["a"]
    assert set(r) == set(RESULT_KEYS)
    assert r["status"] == "done" and r["error"] is None and r["job_id"] == job_id
    calls = _calls(r)
    assert calls and calls[0]["function"]["name"] == "pick"
    n = json.loads(calls[0]["function"]["arguments"])["n"]
    tool = _tool_msgs(r)[0]
    assert tool["tool_call_id"] == calls[0]["id"]
    assert json.loads(tool["content"]) == {"picked": n, "double": 2 * n}
    # executed exactly once, with the call's own id in its context
    lines = [json.loads(x) for x in fx.read_text().splitlines()]
    assert [(x["call_id"], x["attempt"], x["task_id"]) for x in lines] == [(calls[0]["id"], 1, "a")]
    # the agent went on after the result: another step, and the counts match the transcript
    steps = [m for m in r["transcript"] if m["role"] == "assistant"]
    assert r["steps"] == len(steps) >= 2 and r["tool_calls"] == 1 and r["tool_errors"] == 0
    assert r["completion_tokens"] == sum(m["kvstrata"]["completion_tokens"] for m in steps) > 0
    assert r["prompt_tokens"] == sum(m["kvstrata"]["prompt_tokens"] for m in steps)
    assert r["transcript"][0] == {"role": "system", "content": "Be brief."}
    assert r["finish_reason"] in ("answered", "max_steps")
    if r["finish_reason"] == "answered":
        assert r["final_answer"] == steps[-1]["content"]
    t = r["timings"]
    assert t["finished_at"] >= t["started_at"] and t["generate_s"] > 0 and t["wall_s"] >= t["generate_s"]
    # the second step's prompt starts with the first step's prompt and output (tokens as generated),
    # so their KV can be reused wherever the placement put it
    k0, k1 = steps[0]["kvstrata"], steps[1]["kvstrata"]
    assert k1["history_tokens_kept"] == k0["prompt_tokens"] + k0["completion_tokens"] < k1["prompt_tokens"]
    assert k1["cached_prompt_tokens"] + k1["computed_prompt_tokens"] == k1["prompt_tokens"]
    # the store agrees: one DONE record with the same content, the session closed, the task done
    rec = store.get_tool_call(r["session_id"], calls[0]["id"])
    assert rec.status == ToolCallStatus.DONE and rec.result["content"] == tool["content"] and rec.attempts == 1
    assert store.get_session_info(r["session_id"], owner=ANY_OWNER).state == SessionState.CLOSED
    jt = store.get_job_task(job_id, 0, owner=ANY_OWNER)
    assert jt.steps == r["steps"] and jt.completion_tokens == r["completion_tokens"]


def test_entry_point_registration(tiny_aeng, store, tmp_path, monkeypatch):
    dist = tmp_path / "site" / "kvstrata_test_tools-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvstrata-test-tools\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvstrata.tools]\nsample-pick = jobs_sample_tools:pick\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    job = {"tools": [{"entry_point": "sample-pick"}],
           "tasks": [{"id": "ep", "user": "pick", "tool_choice": forced("pick"), "max_tokens": 64, "max_steps": 2}]}
    _, recs = run_job(tiny_aeng, store, job)
    r = recs["ep"]
    n = json.loads(_calls(r)[0]["function"]["arguments"])["n"]
    assert json.loads(_tool_msgs(r)[0]["content"]) == {"picked": n, "double": 2 * n}
    with pytest.raises(KvstrataError, match="no tool entry point 'nope'.*sample-pick"):
        run_job(tiny_aeng, store, {"tools": [{"entry_point": "nope"}], "tasks": [{"user": "x"}]})


def test_failing_tools_inform_the_agent_and_the_job_goes_on(tiny_aeng, store):
    mod = "jobs_sample_tools"
    task = {"tool_choice": "required", "max_tokens": 64, "max_steps": 2, "tool_timeout_s": 0.5}
    job = {"tools": [{"python": mod}],
           "tasks": [{"id": name, "user": f"use {name}", "tools": [name], **task}
                     for name in ("explode", "hang", "garbage", "pick")]}
    _, recs = run_job(tiny_aeng, store, job)
    expect = {"explode": "ValueError: boom", "hang": "timeout", "garbage": "not JSON (set)"}
    for name, r in recs.items():
        assert r["status"] == "done", (name, r["error"])
        (tm,) = _tool_msgs(r)
        after = r["transcript"][r["transcript"].index(tm) + 1:]
        assert after and after[0]["role"] == "assistant"  # the model was called again with the result
        if name == "pick":
            assert tm["kvstrata"]["error"] is None and r["tool_errors"] == 0
            continue
        assert expect[name] in tm["kvstrata"]["error"], tm
        assert tm["content"].startswith("Error:") and expect[name] in tm["content"]
        assert r["tool_errors"] == 1
    assert _tool_msgs(recs["hang"])[0]["kvstrata"]["duration_s"] < 5  # abandoned at its timeout, not awaited


def test_limits_and_followups(tiny_aeng, store):
    eos_off = {"ignore_eos": True}
    job = {"tools": [{"python": "jobs_sample_tools"}],
           "tasks": [
               {"id": "steps", "user": "pick", "tools": ["pick"], "tool_choice": "required", "max_tokens": 64,
                "max_steps": 1},
               {"id": "tokens", "user": "talk", "tools": [], "max_tokens": 3, "max_total_tokens": 5,
                "followups": ["more", "even more"], "sampling": eos_off},
               {"id": "deadline", "user": "wait", "tools": ["hang"], "tool_choice": "required", "max_tokens": 64,
                "tool_timeout_s": 10, "deadline_s": 1.0},
               {"id": "turns", "user": "hello", "tools": [], "max_tokens": 4, "followups": ["again"],
                "sampling": eos_off},
           ]}
    _, recs = run_job(tiny_aeng, store, job)
    r = recs["steps"]
    assert (r["finish_reason"], r["steps"], r["tool_calls"]) == ("max_steps", 1, 1)
    r = recs["tokens"]
    assert (r["finish_reason"], r["steps"], r["completion_tokens"]) == ("max_total_tokens", 2, 5)
    r = recs["deadline"]
    assert r["finish_reason"] == "deadline" and r["steps"] == 1
    assert "timeout" in _tool_msgs(r)[0]["kvstrata"]["error"]
    r = recs["turns"]
    assert r["finish_reason"] == "answered" and r["steps"] == 2
    assert [m["role"] for m in r["transcript"]] == ["user", "assistant", "user", "assistant"]
    assert r["transcript"][2]["content"] == "again" and r["final_answer"] == r["transcript"][3]["content"]
    assert all(x["status"] == "done" for x in recs.values())


def test_a_task_naming_an_unknown_tool_fails_alone(tiny_aeng, store):
    job = {"tools": [{"python": "jobs_sample_tools:pick"}],
           "tasks": [{"id": "bad", "user": "x", "tools": ["nonexistent"]},
                     {"id": "good", "user": "x", "tools": [], "max_tokens": 2}]}
    _, recs = run_job(tiny_aeng, store, job)
    assert recs["bad"]["status"] == "failed" and "nonexistent" in recs["bad"]["error"]
    assert recs["good"]["status"] == "done"



def test_a_task_whose_compaction_cannot_shorten_its_context_says_why(tiny_aeng, store):
    """A system prompt that fills most of the window leaves compaction nothing to shorten: the task goes on
    with its oldest turns left out of the prompt, and its result says why compaction was refused (not
    only a log line); a task that never needs to compact has no reason there."""
    turn = "the quick brown fox jumps over the lazy dog " * 6
    job = {"tasks": [{"id": "refused", "system": "Follow these rules with care. " * 120, "user": turn, "tools": [],
                      "max_tokens": 8, "sampling": {"ignore_eos": True}, "followups": [turn] * 6, "max_steps": 50,
                      "compaction": {}},
                     {"id": "short", "user": "hello", "tools": [], "max_tokens": 4}]}
    _, recs = run_job(tiny_aeng, store, job)
    r = recs["refused"]
    assert r["status"] == "done" and r["compactions"] == 0, (r["finish_reason"], r["error"])
    assert r["compaction_refused"] and "system prompt" in r["compaction_refused"], r["compaction_refused"]
    assert recs["short"]["compaction_refused"] is None

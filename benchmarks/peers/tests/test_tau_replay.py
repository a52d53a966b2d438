import json
import time

from benchmarks.peers.tau_replay import DEFAULT_TRACE, build_session, flatten, load_sessions, replay
from benchmarks.peers.tests.fake_server import FakeServer
import pytest

pytestmark = pytest.mark.skipif(not DEFAULT_TRACE.is_file(), reason="tau-bench trace not present")


def _runs():
    return json.loads(DEFAULT_TRACE.read_text())


def test_flatten_keeps_roles_alternating_and_marks_tool_results():
    for run in _runs()[:40]:
        flat = flatten(run["traj"])
        roles = [m["role"] for m, _ in flat]
        assert roles[0] == "system" and set(roles) <= {"system", "user", "assistant"}
        assert all(a != b for a, b in zip(roles, roles[1:]))
        n_tool = sum(m["role"] == "tool" for m in run["traj"])
        tool_text = sum(m["content"].count("[tool result:") for m, _ in flat)
        assert tool_text == n_tool
        calls = sum(m["content"].count("<tool_call>") for m, _ in flat)
        assert calls >= sum(1 for m in run["traj"] if m.get("tool_calls"))
        assert all(from_tool == ("[tool result:" in m["content"]) for m, from_tool in flat)


def test_tool_call_is_rendered_as_json():
    traj = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "None",
             "tool_calls": "[{'function': {'arguments': '{\"user_id\":\"x\"}', 'name': 'get_user'}, 'id': 'c1'}]"},
            {"role": "tool", "name": "get_user", "content": "{}"}, {"role": "assistant", "content": "done"}]
    flat = flatten(traj)
    call = flat[2][0]["content"]
    assert call.startswith("<tool_call>") and json.loads(call[len("<tool_call>"):-len("</tool_call>")]) == \
        {"name": "get_user", "arguments": {"user_id": "x"}}
    s = build_session({"task_id": 7, "traj": traj}, max_tokens_cap=8)
    assert [t.after_tool for t in s.turns] == [False, True]
    assert s.turns[1].messages[-1]["content"] == "[tool result: get_user] {}"
    assert s.turns[1].max_tokens == 4  # "done" is short: floor of 4


def test_sessions_have_growing_history():
    sessions = load_sessions(n_sessions=3, max_chars=20000)
    assert len(sessions) == 3 and all(s.chars <= 20000 for s in sessions)
    for s in sessions:
        assert any(t.after_tool for t in s.turns)
        for a, b in zip(s.turns, s.turns[1:]):
            assert b.messages[: len(a.messages)] == a.messages and len(b.messages) > len(a.messages)


def test_load_sessions_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"not": "runs"}))
    with pytest.raises(ValueError, match="tau-bench"):
        load_sessions(bad)


def test_replay_sends_every_turn_and_waits_for_tools():
    sessions = load_sessions(n_sessions=2, max_tokens_cap=3)
    n_turns = sum(len(s.turns) for s in sessions)
    waits = max(sum(t.after_tool for t in s.turns) for s in sessions)
    with FakeServer(delay_s=0.0) as srv:
        t0 = time.perf_counter()
        res = replay(srv.url, sessions, concurrency=2, tool_wait_s=0.05)
        elapsed = time.perf_counter() - t0
        sent = list(srv.requests)
    assert len(sent) == n_turns == res["ok_turns"] and res["errors"] == []
    assert elapsed >= waits * 0.05
    assert res["completion_tokens"] == sum(t.max_tokens for s in sessions for t in s.turns)
    assert res["cached_tokens"] == 3 * n_turns  # the fake server reports 3 cached tokens per request
    assert all(r["jct_s"] > 0 for r in res["per_session"])

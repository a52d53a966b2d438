import json

import pytest

from benchmarks.agent_replay import traces


def _req(t, n_in, think, api=2.0, stop="tool_use", ids=None):
    return {"t": t, "type": "n", "in": n_in, "out": 100, "hash_ids": ids or list(range(1, n_in // 64 + 1)),
            "stop": stop, "think_time": think, "api_time": api}


def _cc_file(tmp_path, name="trace_0001"):
    sub = {"t": 50.0, "type": "subagent", "agent_id": "agent_001", "subagent_type": "Explore", "duration_ms": 40000,
           "requests": [_req(0.0, 640, 0.0, ids=list(range(500, 510))), _req(5.0, 704, 3.0, ids=list(range(500, 511)))]}
    d = {"id": name, "block_size": 64, "hash_id_scope": "local",
         "requests": [_req(0.0, 1280, 0.0, api=9.0), sub, _req(60.0, 1344, 51.0),
                      _req(70.0, 1408, 8.0, stop="end_turn")]}
    (tmp_path / f"{name}.json").write_text(json.dumps(d))
    return d


def test_claude_code_sub_agent_is_attached_and_the_parent_waits_for_it(tmp_path):
    _cc_file(tmp_path)
    (s,) = traces.load_claude_code(tmp_path)
    assert s.id == "claude-code/trace_0001" and s.namespace == s.id and s.block_tokens == 64
    assert [r.input_tokens for r in s.requests] == [1280, 1344, 1408]
    ((delay, sub),) = s.requests[0].subagents  # started at 50 - 40 = 10 s, one second after the first response (9 s)
    assert delay == pytest.approx(1.0) and sub.id == "claude-code/trace_0001/agent_001" and sub.namespace == s.namespace
    assert [r.think_s for r in sub.requests] == [0.0, 3.0]
    assert s.requests[1].think_s == pytest.approx(10.0)  # from the sub-agent's end (50 s) to the next send (60 s)
    assert s.requests[2].think_s == 8.0 and s.requests[2].stop == "end_turn"
    assert s.all_requests() == 5
    (cut,) = traces.load_claude_code(tmp_path, max_requests=1)
    assert len(cut.requests) == 1 and len(cut.requests[0].subagents[0][1].requests) == 1


def test_claude_code_sessions_arrive_a_gap_apart_and_can_be_named(tmp_path):
    for n in ("trace_0001", "trace_0002", "trace_0003"):
        _cc_file(tmp_path, n)
    got = traces.load_claude_code(tmp_path, 2, session_gap_s=30.0)
    assert [(s.id, s.arrival_s) for s in got] == [("claude-code/trace_0001", 0.0), ("claude-code/trace_0002", 30.0)]
    assert [s.id for s in traces.load_claude_code(tmp_path, files=["trace_0003"])] == ["claude-code/trace_0003"]
    assert traces.resolve(tmp_path) == ("claude-code", tmp_path)


def test_real_claude_code_sub_agents_run_together_after_the_first_turn():
    try:
        sessions = traces.load("claude-code", files=["trace_0274"])
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    (s,) = sessions
    subs = s.requests[0].subagents
    assert len(subs) == 3 and all(0 <= d < 1 for d, _ in subs)  # three Explore agents, launched together
    assert [len(x.requests) for _, x in subs] == [11, 13, 24]
    assert all(len(r.hash_ids) == r.input_tokens // 64 for r in s.requests)  # whole blocks only
    assert s.all_requests() == 57 + 11 + 13 + 24


def test_mooncake_requests_are_single_request_sessions_at_their_timestamps(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]}\n'
                 '{"timestamp": 2500, "input_length": 600, "output_length": 3, "hash_ids": [0, 7]}\n')
    a, b = traces.load(p)
    assert (a.arrival_s, b.arrival_s, a.block_tokens, a.namespace == b.namespace) == (0.0, 2.5, 512, True)
    assert b.requests[0].hash_ids == (0, 7) and b.requests[0].output_tokens == 3
    try:
        real = traces.load("mooncake", 50)
    except FileNotFoundError:
        return
    assert len(real) == 50 and all(len(s.requests[0].hash_ids) * 512 >= s.requests[0].input_tokens for s in real)


def test_tau_bench_sessions_share_the_policy_and_grow_turn_by_turn():
    try:
        sessions = traces.load("tau-bench", 3, tool_wait_s=5.0, user_wait_s=30.0)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    a, b = sessions[0], sessions[1]
    policy = 6155 // 4 // 16  # the shared system prompt's blocks (at least)
    assert a.requests[0].hash_ids[:policy] == b.requests[0].hash_ids[:policy]
    for s in sessions:
        for prev, cur in zip(s.requests, s.requests[1:]):
            assert cur.hash_ids[: len(prev.hash_ids)] == prev.hash_ids  # each turn's history starts with the last
            assert cur.think_s == (5.0 if prev.stop == "tool_use" else 30.0)
    assert any(r.stop == "tool_use" for r in a.requests)


def test_unknown_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot tell"):
        traces.resolve(tmp_path / "x.csv")

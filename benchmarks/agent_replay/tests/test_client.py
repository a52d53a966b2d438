"""The replay client against a fake streaming server: ordering, concurrency, sub-agents, time limit, figures."""

import pytest

from benchmarks.agent_replay import report
from benchmarks.agent_replay.client import Settings, replay
from benchmarks.agent_replay.prompts import PromptBuilder
from benchmarks.agent_replay.run import working_set_peak
from benchmarks.agent_replay.traces import Request, Session
from benchmarks.peers.tests.fake_server import FakeServer

BUILDER = PromptBuilder(1000, 1 / 16)


def _sess(sid: str, n: int, think: float = 0.0, out: int = 48, subagents=(), arrival: float = 0.0) -> Session:
    reqs = [Request(hash_ids=tuple(range(1, 4 + i)), input_tokens=64 * (3 + i), output_tokens=out,
                    think_s=think if i else 0.0, subagents=tuple(subagents) if i == 0 else ()) for i in range(n)]
    return Session(id=sid, namespace=sid, block_tokens=64, requests=tuple(reqs), arrival_s=arrival)


def _by_session(srv: FakeServer, sessions: list[Session]) -> dict[str, list]:
    """The server's spans grouped by the session whose prompt they carried (each session's first block differs)."""
    first = {s.id: BUILDER.build(s, 0).ids[:4] for s in sessions}
    return {sid: [sp for sp in srv.spans if sp[2]["prompt"][:4] == key] for sid, key in first.items()}


def test_sub_agents_run_concurrently_and_the_parent_waits_for_them():
    subs = [(0.0, _sess(f"p/agent_{k}", 2)) for k in range(3)]
    parent = _sess("p", 2, subagents=subs)
    hints = lambda sess, i: {"session_hint": sess.id, "turn": i}  # noqa: E731
    with FakeServer(delay_s=0.05) as srv:  # each answer takes >= 150 ms: a busy machine still sees them overlap
        run = replay(srv.url, [parent], BUILDER, Settings(concurrency=1, time_scale=0.0, hints=hints))
    spans = _by_session(srv, [parent] + [s for _, s in subs])
    assert sorted((sp[2]["session_hint"], sp[2]["turn"]) for sp in srv.spans)[:2] == [("p", 0), ("p", 1)]
    assert all(sp[2]["ignore_eos"] and sp[2]["stream"] and isinstance(sp[2]["prompt"][0], int) for sp in srv.spans)
    firsts = [spans[f"p/agent_{k}"][0] for k in range(3)]
    assert max(sp[0] for sp in firsts) < min(sp[1] for sp in firsts)  # all three in flight at once
    sub_end = max(sp[1] for k in range(3) for sp in spans[f"p/agent_{k}"])
    p0, p1 = spans["p"]
    assert p0[1] <= min(sp[0] for sp in firsts) and p1[0] >= sub_end
    s = report.summarize(run, [parent])
    assert (s["sessions_completed"], s["requests_ok"], s["requests_failed"]) == (1, 8, 0)
    assert all(r["root"] == "p" for r in run["records"])


def test_concurrency_limit_arrivals_and_think_times():
    sessions = [_sess(f"s{k}", 2, think=50.0, out=16, arrival=10.0 * k) for k in range(4)]
    with FakeServer(delay_s=0.005) as srv:
        run = replay(srv.url, sessions, BUILDER, Settings(concurrency=2, time_scale=0.002))
    started, done = run["started"], run["done"]
    for k in range(4):  # arrivals 20 ms apart; a session starts no earlier than its arrival
        assert started[f"s{k}"] >= 0.02 * k - 1e-3
    for k in (2, 3):  # at most two at once: s2 and s3 wait for a place
        assert started[f"s{k}"] >= sorted(done[f"s{j}"] for j in range(k))[k - 2] - 1e-3
    recs = {(r["session"], r["index"]): r for r in run["records"]}
    for k in range(4):  # the second request waits its think time (50 s traced x 0.002) after the first answer
        a, b = recs[(f"s{k}", 0)], recs[(f"s{k}", 1)]
        assert b["sent_s"] >= a["sent_s"] + a["latency_s"] + 0.1 - 1e-3
        assert b["cached_tokens"] > 0 and a["first"] and not b["first"]


def test_time_limit_cancels_what_is_left():
    sessions = [_sess(f"s{k}", 3, think=1000.0, out=16) for k in range(2)]
    with FakeServer(delay_s=0.005) as srv:
        # the first turns are answered at once, the second ones would wait 10 s: the 3 s limit stops both sessions
        run = replay(srv.url, sessions, BUILDER, Settings(concurrency=2, time_scale=0.01, max_think_s=1e9,
                                                          max_wall_s=3.0))
    s = report.summarize(run, sessions)
    assert run["wall_s"] < 4.5 and s["sessions_completed"] == 0 and s["requests_ok"] == 2
    assert s["session_equivalents_per_hour"] == pytest.approx(2 * (1 / 3) / run["wall_s"] * 3600, abs=0.01)


def test_errors_are_recorded_and_the_session_does_not_count():
    run = replay("http://127.0.0.1:1", [_sess("x", 1)], BUILDER, Settings(time_scale=0.0))  # nothing listens there
    s = report.summarize(run, [_sess("x", 1)])
    assert s["requests_failed"] == 1 and s["sessions_completed"] == 0 and s["errors"]


def test_summary_figures_from_records():
    def rec(root, idx, sent, ttft, prompt, cached, tiers, out=5, lat=1.0):
        return {"session": root, "root": root, "index": idx, "first": idx == 0, "sent_s": sent, "ok": True,
                "prompt_tokens": prompt, "max_tokens": out, "ttft_s": ttft, "latency_s": lat, "completion_tokens": out,
                "cached_tokens": cached, "cached_by_tier": tiers, "computed_tokens": None, "error": ""}
    run = {"wall_s": 10.0, "done": {"a": 9.0}, "started": {"a": 0.0, "b": 0.0},
           "records": [rec("a", 0, 0.0, 2.0, 100, 0, {}), rec("a", 1, 1.0, 0.1, 120, 96, {"device": 64, "host": 32}),
                       rec("b", 0, 0.5, 4.0, 80, 0, {})]}
    sessions = [_sess("a", 2), _sess("b", 2)]
    s = report.summarize(run, sessions)
    assert (s["sessions_completed"], s["sessions_per_hour"], s["session_equivalents_per_hour"]) == (1, 360.0, 540.0)
    assert (s["prompt_tokens"], s["cached_tokens"], s["recomputed_tokens"]) == (300, 96, 204)
    assert s["cached_by_tier"] == {"device": 64, "host": 32} and s["cached_share"] == 0.32
    assert s["ttft_first_ms"] == {"n": 2, "p50": 2000.0, "p99": 4000.0}
    assert s["ttft_resumed_ms"] == {"n": 1, "p50": 100.0, "p99": 100.0}
    assert s["decode_tps_aggregate"] == 1.5 and s["jct_s_median"] == 9.0
    # a's second prompt + output (125) and b's (85) are both live from t=1 until b ends (t=1.5)
    assert working_set_peak(run["records"]) == 125 + 85
    table = report.peer_table([{"peer": "x", "summary": s, "peak_rss_bytes": 2**30}, {"peer": "y", "skipped": "no"}],
                              "x")
    assert "| x | 1 / 2 | 360.0 | 1.00x |" in table and "device 64, host 32" in table and "| y | no |" in table


def test_server_notes_name_tiers_placement_and_preemptions():
    m = {'kvstrata_kv_tier{tier="host",stat="bytes_written"}': 2.0 * 2**20, 'kvstrata_kv_tier{tier="host",stat="hits"}': 12.0,
         'kvstrata_kv_tier{tier="disk",stat="bytes_read"}': 3.0 * 2**20, 'kvstrata_placement_decisions{action="host"}': 3.0,
         'kvstrata_engine_counter{name="preemptions"}': 2.0, 'kvstrata_engine_counter{name="steps"}': 9.0}
    assert report.server_notes(m) == ("disk: 0 MiB written, 3 MiB read, 0 hits; host: 2 MiB written, 0 MiB read, 12 hits; "
                                      "placement decisions host 3; preemptions 2")
    assert report.server_notes({}) == "placement decisions none"

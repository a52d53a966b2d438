"""The replay's short form end to end: the command against a real `kvstrata serve` (and llama-server when built)."""

import json

import pytest

from benchmarks.agent_replay import run, traces
from benchmarks.peers.common import PeerMissingError, default_gguf, peers_available

pytestmark = pytest.mark.slow


def test_short_replay_against_the_real_servers(tmp_path):
    try:
        default_gguf()
        traces.resolve("claude-code")
    except (PeerMissingError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    names = ["kvstrata-tiers"] + (["llama-server"] if peers_available()[0] else [])
    # two sessions, three turns each, tokens scaled by 1/64 (a 64-token block is one token), waits by 1/1000; seconds
    # on an idle machine, minutes on a crowded one (a 2-thread OpenMP team waits at every barrier), so a loose limit
    argv = ["--peers", ",".join(names), "--sessions", "2", "--max-requests", "3", "--concurrency", "2",
            "--token-scale", str(1 / 64), "--time-scale", "0.001", "--device-tokens", "8192", "--host-mib", "64",
            "--quiet-wait-s", "0", "--max-wall-s", "600", "--out", str(tmp_path), "--name", "short"]
    assert run.main(argv) == 0
    data = json.loads((tmp_path / "short.json").read_text())
    assert (tmp_path / "short.md").is_file() and (tmp_path / "short.png").is_file()
    assert [r["peer"] for r in data["results"]] == names
    for r in data["results"]:
        s = r["summary"]
        assert (s["sessions_completed"], s["requests_ok"], s["requests_failed"]) == (2, 6, 0), r["peer"]
        assert s["ttft_first_ms"]["n"] == 2 and s["ttft_resumed_ms"]["n"] == 4
        assert r["peak_rss_bytes"] > 0
        for rec in r["records"]:
            assert rec["completion_tokens"] == rec["max_tokens"]  # outputs forced to their length (ignore_eos)
            # the budget holds every session: a turn finds what it shares with the previous one (whole 16-token blocks)
            assert rec["cached_tokens"] >= rec["reusable_tokens"] // 16 * 16, (r["peer"], rec)
        assert sum(rec["reusable_tokens"] for rec in r["records"]) > 1000
    kv = data["results"][0]
    assert kv["summary"]["cached_by_tier"].get("device", 0) > 0 and kv["config"]["kv_host_bytes"] == 64 << 20

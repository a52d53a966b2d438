"""The command's options, its goals and `make bench`'s dispatch of the replay (no server)."""

import json
import sys

import pytest

from benchmarks.agent_replay import run
from benchmarks.agent_replay.peers import Budget, kvstrata_settings


def test_quick_changes_only_what_was_not_given():
    a = run.parse_args(["--quick", "--sessions", "3"])
    assert (a.sessions, a.concurrency, a.max_requests, a.name) == \
        (3, run.QUICK["concurrency"], run.QUICK["max_requests"], "agent_replay_quick")
    b = run.parse_args([])
    assert (b.sessions, b.concurrency, b.time_scale, b.name, b.peers) == \
        (32, 16, 0.01, "agent_replay", "llama-server,kvstrata-tiers,kvstrata-recompute")


def test_peer_settings_share_one_budget():
    b = Budget(device_tokens=32768, host_mib=512, kvstrata_max_seqs=16)
    assert b.slots == 4  # 32k tokens of unified KV hold four 8k-context slots
    tiers = kvstrata_settings("kvstrata-tiers", b, "/tmp/x")
    recompute = kvstrata_settings("kvstrata-recompute", b, None)
    assert tiers["kv_device_bytes"] == recompute["kv_device_bytes"] == 32768 * 23040  # fp16 KV of the default model
    assert tiers["kv_host_bytes"] == 512 << 20 and tiers["enable_prefix_caching"] and tiers["kv_disk_dir"] == "/tmp/x"
    assert not recompute["enable_prefix_caching"] and "kv_host_bytes" not in recompute
    assert tiers["quantization"] == recompute["quantization"] == "int8" and tiers["num_threads"] == 2


def _summary(sph: float, equiv: float, p99: float, failed: int = 0) -> dict:
    return {"sessions_per_hour": sph, "session_equivalents_per_hour": equiv, "requests_failed": failed,
            "ttft_resumed_ms": {"p99": p99}}


def test_goals_need_the_ratio_and_the_latency():
    res = [{"peer": "kvstrata-tiers", "summary": _summary(30, 30, 900)},
           {"peer": "llama-server", "summary": _summary(9, 9, 1000)},
           {"peer": "kvstrata-recompute", "summary": _summary(12, 12, 500)}]
    got = run.goals(res)
    assert "3.33x" in got[0] and "**reached**" in got[0]
    assert "2.50x" in got[1] and "**not reached**" in got[1]
    res[0]["summary"] = _summary(30, 30, 1100)  # faster, but its p99 is worse than llama-server's
    assert "**not reached**" in run.goals(res)[0]
    res[1]["summary"] = _summary(0, 3, 1000)  # llama-server finished no session: compare session-equivalents
    assert "10.00x in session-equivalents" in run.goals(res)[0]
    assert "not measured" in run.goals(res[:1])[0]


def test_make_bench_quick_runs_the_replay_short(tmp_path, monkeypatch):
    from benchmarks import run_all

    calls = []
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    monkeypatch.setattr(run_all, "run_child", lambda cmd, env: calls.append(cmd) or (0, 123.0))
    monkeypatch.setattr(sys, "argv", ["run_all", "--quick", "agent replay"])
    assert run_all.main() == 0
    assert calls == [[sys.executable, "-m", "benchmarks.agent_replay", "--quick"]]
    index = (tmp_path / "index.md").read_text()
    assert "agent_replay_quick.md" in index and "| 123 | ok |" in index and "peak RSS, MiB" in index
    assert run_all.present("benchmarks.agent_replay") and run_all.present("benchmarks.tier_ttft")
    assert not run_all.present("benchmarks.nothing_here")


def test_a_peer_that_cannot_start_is_recorded_and_the_run_fails(tmp_path):
    from benchmarks.agent_replay import traces
    from benchmarks.peers.common import PeerMissingError, default_gguf

    try:
        default_gguf()
        traces.resolve("claude-code")
    except (PeerMissingError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    argv = ["--peers", "kvstrata-recompute", "--sessions", "1", "--quiet-wait-s", "0", "--kvstrata-opt",
            "quantization=q9", "--out", str(tmp_path), "--name", "bad"]
    assert run.main(argv) == 1
    (r,) = json.loads((tmp_path / "bad.json").read_text())["results"]
    assert r["peer"] == "kvstrata-recompute" and "quantization" in r["error"]
    assert "| kvstrata-recompute | KvstrataError" in (tmp_path / "bad.md").read_text()


def test_result_files_name_no_machine_paths():
    import tempfile
    from pathlib import Path

    root = Path(run.__file__).resolve().parents[2]
    text = f"{root}/.venv/bin/kvstrata --kv-disk-dir {tempfile.gettempdir()}/kv-x -m {Path.home()}/.cache/m.gguf"
    assert run.portable(text) == "./.venv/bin/kvstrata --kv-disk-dir $TMPDIR/kv-x -m ~/.cache/m.gguf"


def test_make_bench_reports_each_benchmarks_exit_code_and_peak_memory():
    """From a small parent, as `make bench` runs them (a child started by vfork + exec is charged its
    parent's high-water mark: from this test process, gigabytes)."""
    import json
    import os
    import subprocess

    from benchmarks import run_all

    code = "b = bytearray(160 << 20); b[::4096] = b'x' * len(b[::4096]); import sys; sys.exit(3)"
    parent = ("import json, os, sys; from benchmarks import run_all; "
              f"print(json.dumps(run_all.run_child([sys.executable, '-c', {code!r}], dict(os.environ))))")
    env = {**os.environ, "PYTHONPATH": str(run_all.ROOT)}
    out = subprocess.run([sys.executable, "-c", parent], env=env, capture_output=True, text=True, check=True).stdout
    rc, peak = json.loads(out)
    assert rc == 3 and 160 < peak < 512

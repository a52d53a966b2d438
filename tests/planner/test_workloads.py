"""Workload profiles: derived offline from the public traces, stored with provenance, read as data."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from benchmarks.common import trace_dir
from kvstrata.core import KvstrataError
from kvstrata.planner import workloads
from kvstrata.planner.workloads import Workload, get_workload, trace_profiles, workload_names

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_workloads():
    a, g = get_workload("answer"), get_workload("agentic")
    assert a.sessions == 1 and a.tool_wait_s == 0
    assert g.sessions > 1 and g.context_tokens >= 16_000 and g.tool_wait_s > 0


def test_every_trace_profile_has_provenance():
    profiles = trace_profiles()
    assert {"mooncake", "azure-conv", "azure-code", "tau-bench", "bfcl", "claude-code"} <= set(profiles)
    assert set(workload_names()) >= {"answer", "agentic", *profiles}
    for name, w in profiles.items():
        p = w.provenance
        assert p["file"] and p["bytes"] > 0 and len(p["sha256"]) == 16 and p["computed"], name
        assert "benchmarks/workload_profiles.py" in w.source


def test_claude_code_profile_is_agentic():
    w = get_workload("claude-code")
    stats = w.provenance["stats"]
    # long shared prefixes that grow turn by turn: most of each request's context is the session's own history
    assert w.prefix_reuse > 0.8 and w.context_tokens > 10 * w.prompt_tokens
    assert w.turns > 10 and w.tool_wait_s > 0 and stats["sessions"] >= stats["recorded_sessions"] > 100
    assert stats["context_max"] <= 128_000  # the selection rule of the trace folder


def test_mooncake_profile_matches_its_readme():
    w = get_workload("mooncake")
    # Mooncake's README: synthetic trace, 3,993 requests, average input 15,325, average output 149
    assert "3993 requests" in w.description
    assert w.context_tokens + w.prompt_tokens == pytest.approx(15_325, abs=2)
    assert w.output_tokens == 149 and 0.3 < w.prefix_reuse < 0.9


def test_library_ships_no_trace_adapter():
    """The planner reads derived numbers only: no trace file names, no paths outside the package."""
    src = (ROOT / "src" / "kvstrata" / "planner" / "workloads.py").read_text()
    tree = ast.parse(src)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert not imported & {"csv", "glob", "os"}
    for needle in ("synthetic_trace", "AzureLLMInferenceTrace", "gpt-4o-airline", "shared", "TRACE_DIR"):
        assert needle not in src, needle


def test_derivation_reproduces_the_stored_profiles():
    """benchmarks/workload_profiles.py, run on the traces, gives back data/workloads.json exactly."""
    root = trace_dir()
    if not (root / "claude-code").is_dir():
        pytest.skip(f"traces not found under {root} (set KVSTRATA_TRACE_DIR to check the derivation)")
    from benchmarks.workload_profiles import OUT, derive

    assert derive(root) == json.loads(OUT.read_text())["profiles"]


def test_errors():
    with pytest.raises(KvstrataError, match="unknown workload"):
        get_workload("nope")
    with pytest.raises(KvstrataError, match="sessions"):
        Workload("x", "", sessions=0, context_tokens=0, prompt_tokens=1, output_tokens=1)
    assert workloads.BUILTIN["answer"].with_overrides(sessions=None) is workloads.BUILTIN["answer"]

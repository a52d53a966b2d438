"""Workload profiles derived from the public traces, checked against the traces' own statistics."""

from __future__ import annotations

import csv
import json

import pytest

from kvstrata.core import KvstrataError
from kvstrata.planner import workloads
from kvstrata.planner.workloads import Workload, get_workload, trace_dir, workload_names


def test_builtin_workloads():
    a, g = get_workload("answer"), get_workload("agentic")
    assert a.sessions == 1 and a.tool_wait_s == 0
    assert g.sessions > 1 and g.context_tokens >= 16_000 and g.tool_wait_s > 0


def test_mooncake_profile_matches_its_readme():
    w = get_workload("mooncake")
    # Mooncake's README: synthetic trace, 3,993 requests, average input 15,325, average output 149
    assert "3993 requests" in w.description
    assert w.context_tokens + w.prompt_tokens == pytest.approx(15_325, abs=2)
    assert w.output_tokens == 149 and 0.3 < w.prefix_reuse < 0.9


def test_azure_profile_matches_the_csv():
    w = get_workload("azure-conv")
    with open(trace_dir() / "azure2023" / "AzureLLMInferenceTrace_conv.csv") as f:
        rows = list(csv.DictReader(f))
    assert str(len(rows)) in w.description
    assert w.prompt_tokens == int(sum(int(r["ContextTokens"]) for r in rows) / len(rows))
    assert w.arrival_rate_per_s > 1


def test_agent_traces_have_turns_and_tool_waits():
    tau = get_workload("tau-bench")
    trajs = json.loads((trace_dir() / "tau-bench" / "gpt-4o-airline.json").read_text())
    turns = sum(sum(m["role"] == "assistant" for m in t["traj"]) for t in trajs) / len(trajs)
    assert tau.turns == round(turns) and tau.tool_wait_s > 0
    bfcl = get_workload("bfcl")
    assert bfcl.context_tokens > 1000  # the shared tool documentation prefix
    assert set(workload_names()) >= {"answer", "agentic", "mooncake", "azure-conv", "azure-code", "tau-bench", "bfcl"}


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(KvstrataError, match="unknown workload"):
        get_workload("nope")
    with pytest.raises(KvstrataError, match="sessions"):
        Workload("x", "", sessions=0, context_tokens=0, prompt_tokens=1, output_tokens=1)
    monkeypatch.setenv("KVSTRATA_TRACE_DIR", str(tmp_path))
    workloads._trace_profile.cache_clear()
    with pytest.raises(KvstrataError, match="KVSTRATA_TRACE_DIR"):
        get_workload("mooncake")
    workloads._trace_profile.cache_clear()

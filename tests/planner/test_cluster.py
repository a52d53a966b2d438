"""Cluster plans: replicas, tiers below device memory and cost for N concurrent sessions."""

from __future__ import annotations

import math

import pytest

from kvstrata.planner.catalog import load_catalog
from kvstrata.planner.cluster import cluster_plan, compare, markdown_table
from kvstrata.planner.modelspec import builtin_model
from kvstrata.planner.workloads import get_workload

CAT, _ = load_catalog()
M = builtin_model("llama-3.1-70b")


def test_cluster_carries_every_session_and_prices_it():
    wl = get_workload("claude-code")
    c = cluster_plan(M, CAT["h200"], wl, 5000)
    assert c.fits and c.replicas == math.ceil(5000 / c.sessions_per_replica)
    assert c.devices == c.replicas * c.devices_per_replica == c.prefill_devices + c.decode_devices
    assert 0 < c.prefill_share < 1 and c.tokens_per_s_per_user >= 5
    # the SSD holds every session's KV at its peak; the shared store the same in the 1-byte cold codec
    assert c.ssd_GB == pytest.approx(5000 * M.kv_bytes(wl.peak_context, c.replica.kv_dtype) / 1e9)
    assert c.shared_store_GB == pytest.approx(5000 * M.kv_bytes(wl.peak_context, 1.0) / 1e9)
    assert c.usd_per_hour == pytest.approx(CAT["h200"].usd_per_hour * c.devices)
    assert c.usd_per_session == pytest.approx(c.usd_per_hour * c.session_s / 5000 / 3600)
    assert c.usd_per_million_tokens < c.usd_per_million_output_tokens


def test_sram_machines_pay_for_long_agent_contexts():
    """The essay's comparison: on short answers a wafer is fastest; on long agent contexts its SRAM
    cannot hold the sessions and the cost per finished session rises far above HBM GPUs."""
    plans = {(c.workload, c.hardware): c for c in compare(M, [CAT["cerebras-wse3"], CAT["h100-sxm"]],
                                                          [get_workload("answer"), get_workload("claude-code")], 2000)}
    wafer, gpu = plans[("answer", "cerebras-wse3")], plans[("answer", "h100-sxm")]
    assert wafer.tokens_per_s_per_user > 5 * gpu.tokens_per_s_per_user
    agent_wafer, agent_gpu = plans[("claude-code", "cerebras-wse3")], plans[("claude-code", "h100-sxm")]
    assert agent_wafer.usd_per_session > 5 * agent_gpu.usd_per_session
    assert "| claude-code | cerebras-wse3 |" in markdown_table(list(plans.values()))


def test_cluster_that_cannot_meet_the_speed_says_why():
    c = cluster_plan(builtin_model("llama-3.1-405b"), CAT["epyc-9554"], get_workload("answer"), 10, min_tokens_per_s=50)
    assert not c.fits and "50 tokens/s" in c.reason and c.usd_per_session is None

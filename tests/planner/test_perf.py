"""The performance model: capacity, the SRAM cliff, not-fitting reported, speculative decoding, cost."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvstrata.planner.catalog import load_catalog
from kvstrata.planner.modelspec import builtin_model
from kvstrata.planner.perf import PlanOptions, plan
from kvstrata.planner.workloads import get_workload

CAT, _ = load_catalog()
ANSWER = get_workload("answer")


def test_capacity_picks_devices_that_hold_weights():
    r = plan(builtin_model("llama-3.1-70b"), CAT["cerebras-wse3"], ANSWER)
    assert r.fits and r.devices == 4  # 141 GB of bf16 weights over 44 GB wafers (10% reserve)
    assert r.placement[0].weights_GB == pytest.approx(builtin_model("llama-3.1-70b").params * 2 / 1e9)
    r = plan(builtin_model("llama-3.1-70b"), CAT["h100-sxm"], ANSWER)
    assert r.fits and r.devices == 2 and r.tensor_parallel == 2


def test_weights_that_do_not_fit_are_reported():
    r = plan(builtin_model("llama-3.1-70b"), CAT["h100-sxm"], ANSWER, PlanOptions(devices=1))
    assert not r.fits and "weights need" in r.reason
    assert r.tokens_per_s_per_user is None and r.usd_per_million_tokens is None


def test_kv_that_fits_nowhere_is_reported_not_clipped():
    wl = replace(get_workload("agentic"), sessions=100_000, context_tokens=120_000)
    r = plan(builtin_model("llama-3.1-8b"), CAT["h100-sxm"], wl, PlanOptions(devices=1))
    assert not r.fits and "does not fit" in r.reason and r.tokens_per_s_aggregate is None
    r = plan(builtin_model("llama-3.1-8b"), CAT["h100-sxm"], replace(ANSWER, context_tokens=200_000))
    assert not r.fits and "supports 131072" in r.reason


def test_sram_cliff_when_kv_outgrows_the_wafer():
    m, wse = builtin_model("llama-3.1-8b"), CAT["cerebras-wse3"]
    fast = plan(m, wse, replace(ANSWER, sessions=8, context_tokens=8_000), PlanOptions(devices=1))
    slow = plan(m, wse, replace(ANSWER, sessions=8, context_tokens=32_000), PlanOptions(devices=1))
    assert fast.fits and slow.fits and slow.placement[1].sessions > 0  # KV spilled below the wafer
    assert fast.tokens_per_s_per_user > 10 * slow.tokens_per_s_per_user
    # an H100 still holds that KV in HBM and loses far less
    h_fast = plan(m, CAT["h100-sxm"], replace(ANSWER, sessions=8, context_tokens=8_000), PlanOptions(devices=1))
    h_slow = plan(m, CAT["h100-sxm"], replace(ANSWER, sessions=8, context_tokens=32_000), PlanOptions(devices=1))
    assert h_fast.tokens_per_s_per_user / h_slow.tokens_per_s_per_user < 10


def test_agentic_sessions_park_below_device_memory():
    r = plan(builtin_model("llama-3.1-70b"), CAT["h100-sxm"], get_workload("agentic"))
    assert r.fits and r.active_sessions < r.sessions
    assert sum(t.sessions for t in r.placement) == r.sessions
    assert r.placement[0].kv_GB + r.weights_GB <= r.placement[0].capacity_GB


def test_speculative_decoding_is_an_explicit_factor():
    m, h = builtin_model("llama-3.1-8b"), CAT["h100-sxm"]
    off = plan(m, h, ANSWER)
    on = plan(m, h, ANSWER, PlanOptions(spec_tokens_per_step=2.5, spec_draft_tokens=4))
    assert 2.0 < on.tokens_per_s_per_user / off.tokens_per_s_per_user <= 2.5


def test_cost_per_million_tokens():
    r = plan(builtin_model("llama-3.1-8b"), CAT["h100-sxm"], replace(ANSWER, sessions=64))
    assert r.usd_per_million_tokens == pytest.approx(2.99 * r.devices / (r.tokens_per_s_aggregate * 3600) * 1e6)
    single = plan(builtin_model("llama-3.1-8b"), CAT["h100-sxm"], ANSWER)
    assert single.usd_per_million_tokens > 10 * r.usd_per_million_tokens  # batching is what makes tokens cheap
    assert plan(builtin_model("llama-3.1-8b"), CAT["sambanova-sn40l"], ANSWER).usd_per_million_tokens is None
    # a finished task costs the devices for its wall time, shared by the sessions they carry
    assert r.usd_per_task == pytest.approx(2.99 * r.devices / 3600 * r.session_s / r.sessions)

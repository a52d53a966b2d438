"""The pure cost functions the engine's placement model calls."""

from __future__ import annotations

import math

import pytest

from kvstrata.planner.cost import (ModelSpec, allreduce_time_s, best_restore, decode_step, decode_step_time_s,
                                   prefill_flops, recompute_time_s, reload_time_s)
from kvstrata.planner.modelspec import builtin_model

M = builtin_model("llama-3.1-8b")


def test_reload_time():
    assert reload_time_s(1e9, 10.0) == pytest.approx(0.1)
    assert reload_time_s(1e9, 10.0, latency_s=0.5) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        reload_time_s(1e9, 0)
    with pytest.raises(ValueError):
        reload_time_s(-1, 1)


def test_recompute_time_and_prefill_flops():
    f = prefill_flops(M, 1000)
    # 2 FLOPs per weight per token; 8.03B less 2 x 0.525B of embeddings (output head on the last token only)
    assert 2 * 6.9e9 * 1000 < f < 2 * 7.1e9 * 1000 * 1.1
    assert recompute_time_s(1000, 0, M, 1000.0) == pytest.approx(f / 1e12)
    assert recompute_time_s(1000, 0, M, 1000.0, efficiency=0.5) == pytest.approx(2 * f / 1e12)
    assert prefill_flops(M, 100, context_tokens=50_000) > prefill_flops(M, 100)
    with pytest.raises(ValueError):
        recompute_time_s(10, 0, M, 0)


def test_best_restore_prefers_cheaper_path():
    kv = M.kv_bytes(8000, 2)  # ~1 GB
    choice, t = best_restore(kv, 8000, M, {"host": 50.0, "disk": 2.0}, compute_GFLOPs=100.0)
    assert choice == "host" and t == pytest.approx(kv / 50e9)
    choice, _ = best_restore(kv, 8000, M, {"remote": 0.001}, compute_GFLOPs=1e6)  # very slow link, huge GPU
    assert choice == "recompute"


def test_allreduce():
    assert allreduce_time_s(1e6, 1, 100, 1e-5) == 0.0
    assert allreduce_time_s(1e6, 8, 100, 1e-5) == pytest.approx(1e-5 + 2 * 7 / 8 * 1e6 / 1e11)


def test_decode_step_roofline_and_latency_floor():
    kw = dict(bandwidth_GBps=1000.0, compute_GFLOPs=1e6, weight_dtype="bf16", kv_dtype="bf16")
    s = decode_step(M, 1, 1000, **kw)
    assert s.bound == "memory"
    assert s.memory_s == pytest.approx((M.matmul_params * 2 + M.kv_bytes(1000, 2)) / 1e12)
    # a latency floor bigger than the memory time takes over
    s2 = decode_step(M, 1, 1000, **kw, per_layer_latency_s=1e-3)
    assert s2.bound == "latency" and s2.total_s == pytest.approx(32e-3)
    # big batches on little compute are compute bound
    s3 = decode_step(M, 512, 1000, bandwidth_GBps=1000.0, compute_GFLOPs=10_000.0)
    assert s3.bound == "compute"
    # KV read from a slow tier adds its own time; a tier with no bandwidth cannot serve it
    s4 = decode_step(M, 1, 100_000, **kw, spill_fraction=0.5, spill_bandwidth_GBps=10.0)
    assert s4.memory_s > s.memory_s * 10
    assert math.isinf(decode_step(M, 1, 1000, **kw, spill_fraction=0.5).memory_s)
    assert decode_step_time_s(M, 1, 1000, **kw) == s.total_s
    with pytest.raises(ValueError):
        decode_step(M, 0, 1000, **kw)


def test_modelspec_exported_from_cost():
    assert ModelSpec is type(M)

"""Property tests: monotonic in bandwidth, context and model size; a workload that does not fit is never clipped
(more devices never slowing the fastest plan: test_deploy.py; prices and sources: test_catalog.py)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstrata.planner.catalog import load_catalog
from kvstrata.planner.modelspec import builtin_model
from kvstrata.planner.perf import PlanOptions, plan
from kvstrata.planner.workloads import get_workload

CAT, _ = load_catalog()
MODELS = ["llama-3.1-8b", "llama-3.1-70b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-120b", "smollm2-135m"]
HW = ["cerebras-wse3", "h100-sxm", "h200", "groq-lpu", "epyc-9554", "tpu-v5e", "sambanova-sn40l"]
SETTINGS = settings(max_examples=40, deadline=None)

case = st.fixed_dictionaries({
    "model": st.sampled_from(MODELS), "hw": st.sampled_from(HW), "sessions": st.integers(1, 256),
    "context": st.integers(0, 100_000), "devices": st.one_of(st.none(), st.integers(1, 64)),
})


def _wl(c):
    return replace(get_workload("answer"), sessions=c["sessions"], context_tokens=c["context"])


@SETTINGS
@given(case, st.floats(1.01, 100.0))
def test_more_bandwidth_never_slower_decode(c, scale):
    m, hw = builtin_model(c["model"]), CAT[c["hw"]]
    base = plan(m, hw, _wl(c), PlanOptions(devices=c["devices"]))
    more = plan(m, hw, _wl(c), PlanOptions(devices=c["devices"], bandwidth_scale=scale))
    assert base.fits == more.fits
    if base.fits:
        assert more.tokens_per_s_per_user >= base.tokens_per_s_per_user * (1 - 1e-12)


@SETTINGS
@given(case, st.integers(1, 100_000))
def test_more_context_never_faster_decode_on_a_fixed_machine(c, extra):
    m, hw = builtin_model(c["model"]), CAT[c["hw"]]
    n = c["devices"] or plan(m, hw, replace(_wl(c), sessions=1, context_tokens=0)).devices
    if n is None:
        return
    short = plan(m, hw, _wl(c), PlanOptions(devices=n))
    long = plan(m, hw, replace(_wl(c), context_tokens=c["context"] + extra), PlanOptions(devices=n))
    if long.fits:
        assert short.fits  # fitting never appears with more context
        assert long.tokens_per_s_per_user <= short.tokens_per_s_per_user * (1 + 1e-12)


@SETTINGS
@given(case)
def test_fits_means_everything_is_placed(c):
    m, hw = builtin_model(c["model"]), CAT[c["hw"]]
    r = plan(m, hw, _wl(c), PlanOptions(devices=c["devices"]))
    if r.fits:
        assert sum(t.sessions for t in r.placement) == r.sessions == c["sessions"]
        for t in r.placement:
            assert t.weights_GB + t.kv_GB <= t.capacity_GB * (1 + 1e-9)
        assert r.tokens_per_s_per_user > 0 and r.tokens_per_s_aggregate > 0
    else:
        assert r.reason and r.tokens_per_s_per_user is None and r.tokens_per_s_aggregate is None


DIMS = st.fixed_dictionaries({
    "layers": st.integers(2, 96), "hidden_per_head": st.sampled_from([64, 128]), "heads": st.integers(4, 64),
    "kv_div": st.sampled_from([1, 2, 4, 8]), "mlp": st.sampled_from([2, 3, 4]), "vocab": st.integers(1000, 200_000),
})
GROW = st.fixed_dictionaries({"layers": st.integers(0, 40), "heads": st.integers(0, 32), "vocab": st.integers(0, 50_000)})


def _model(d, name):
    from kvstrata.planner.modelspec import ModelSpec

    kv = max(1, d["heads"] // d["kv_div"])
    hidden = d["heads"] * d["hidden_per_head"]
    return ModelSpec.from_hf_config({"num_hidden_layers": d["layers"], "hidden_size": hidden, "num_attention_heads": d["heads"],
                                     "num_key_value_heads": kv, "intermediate_size": d["mlp"] * hidden,
                                     "vocab_size": d["vocab"], "max_position_embeddings": 1 << 20}, name=name)


@SETTINGS
@given(DIMS, GROW, st.sampled_from(HW + ["b200", "mi300x"]), st.integers(1, 16), st.sampled_from(["answer", "agentic"]))
def test_a_bigger_model_never_fits_where_a_smaller_does_not(d, grow, hw, devices, wl):
    small = _model(d, "small")
    big = _model({**d, "layers": d["layers"] + grow["layers"], "heads": d["heads"] + grow["heads"],
                  "vocab": d["vocab"] + grow["vocab"]}, "big")
    assert big.params >= small.params and big.kv_bytes_per_token(2) >= small.kv_bytes_per_token(2)
    opts = PlanOptions(devices=devices)
    if plan(big, CAT[hw], get_workload(wl), opts).fits:
        assert plan(small, CAT[hw], get_workload(wl), opts).fits

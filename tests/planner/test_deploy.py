"""Two deployments per plan: the cheapest that fits and the fastest within the vendor's unit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstrata.planner.catalog import load_catalog
from kvstrata.planner.deploy import deployments, device_counts, ordered
from kvstrata.planner.modelspec import builtin_model
from kvstrata.planner.perf import PlanOptions, plan
from kvstrata.planner.workloads import get_workload

CAT, _ = load_catalog()
ANSWER, AGENTIC = get_workload("answer"), get_workload("agentic")


def test_device_counts_follow_the_layout():
    assert list(device_counts(CAT["h100-sxm"], 32)) == [1, 2, 4, 8, 16, 24, 32]
    assert list(device_counts(CAT["gb200-nvl72"], 72))[-2:] == [64, 72]
    assert list(device_counts(CAT["cerebras-wse3"], 5)) == [1, 2, 3, 4, 5]


def test_fastest_and_cheapest_are_what_they_say():
    m = builtin_model("llama-3.1-70b")
    cheap, fast = deployments(m, CAT["h100-sxm"], ANSWER)
    assert cheap.role == "cheapest" and fast.role == "fastest" and cheap.fits and fast.fits
    # fewest-that-fit is not how providers serve it: the fastest uses the whole server, FP8, and a draft model
    fewest = plan(m, CAT["h100-sxm"], ANSWER)
    assert fast.devices == 8 and fast.weight_dtype == "fp8" and "llama-3.2-1b" in fast.spec
    assert fast.tokens_per_s_per_user > 4 * fewest.tokens_per_s_per_user
    assert cheap.usd_per_task <= fewest.usd_per_task and cheap.usd_per_task <= fast.usd_per_task
    assert ordered((cheap, fast), ANSWER) == [fast, cheap] and ordered((cheap, fast), AGENTIC) == [cheap, fast]


def test_no_spec_decoding_where_none_is_public_and_fixed_counts_are_kept():
    m = builtin_model("llama-3.1-70b")
    for hw in ("cerebras-wse3", "mi300x", "groq-lpu"):
        assert not deployments(m, CAT[hw], ANSWER)[1].spec, hw
    cheap, fast = deployments(m, CAT["h200"], ANSWER, PlanOptions(devices=2))
    assert cheap.devices == fast.devices == 2


def test_beyond_the_vendor_unit_is_said():
    cheap, fast = deployments(builtin_model("llama-3.1-405b"), CAT["groq-lpu"], ANSWER)
    assert fast.fits and fast.devices > CAT["groq-lpu"].max_devices and "more than" in fast.limit


CASE = st.fixed_dictionaries({
    "model": st.sampled_from(["llama-3.1-8b", "llama-3.1-70b", "qwen3-32b", "gpt-oss-20b"]),
    "hw": st.sampled_from(["h100-sxm", "h200", "b200", "gb200-nvl72", "mi300x", "tpu-v6e", "cerebras-wse3",
                           "sambanova-sn40l", "epyc-9554"]),
    "wl": st.sampled_from(["answer", "agentic", "tau-bench"]),
    "small": st.integers(1, 64), "extra": st.integers(0, 64),
})


@settings(max_examples=40, deadline=None)
@given(CASE)
def test_more_devices_never_make_the_fastest_plan_slower_per_user(c):
    m, hw, wl = builtin_model(c["model"]), CAT[c["hw"]], get_workload(c["wl"])
    _, few = deployments(m, hw, wl, limit=c["small"])
    _, more = deployments(m, hw, wl, limit=c["small"] + c["extra"])
    if few.fits and few.devices <= c["small"]:
        assert more.fits and more.tokens_per_s_per_user >= few.tokens_per_s_per_user * (1 - 1e-12)

"""Request classes and the placement cost model (issue: agentic inference)."""

from __future__ import annotations

import pytest

from kvstrata import LLM, SamplingParams
from kvstrata.core import RequestClass
from kvstrata.planner.modelspec import ModelSpec
from kvstrata.sched.placement import Calibration, PlacementModel

SPEC = ModelSpec.from_hf_config({"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                                 "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                                 "tie_word_embeddings": True}, name="smollm2-like")
KV = 46_080 * 2048  # bytes of a 2,048-token SmolLM2 prefix in fp32
POOL = 2 << 30


def model(read=2.0, write=1.0, compute=100.0, tiers=("host", "disk")):
    cal = Calibration({t: read for t in tiers}, {t: write for t in tiers}, compute)
    return PlacementModel(cal, SPEC, list(tiers))


def test_long_wait_with_a_fast_tier_moves_down():
    d = model().decide(KV, 2048, "search", pressure=0.8, pool_bytes=POOL, wait_s=300.0)
    assert d.action in ("host", "disk")
    assert d.costs[d.action] < d.costs["keep"] and d.costs[d.action] < d.costs["drop"]


def test_short_wait_keeps():
    d = model().decide(KV, 2048, "calc", pressure=0.8, pool_bytes=POOL, wait_s=0.01)
    assert d.action == "keep"


def test_free_recompute_drops():
    d = model(compute=1e12).decide(KV, 2048, "search", pressure=0.8, pool_bytes=POOL, wait_s=300.0)
    assert d.action == "drop"


def test_slow_tiers_and_long_wait_recompute_rather_than_reload():
    d = model(read=0.001, write=0.001).decide(KV, 2048, None, pressure=0.8, pool_bytes=POOL, wait_s=300.0)
    assert d.action == "drop"


def test_no_tiers_means_keep_or_drop():
    m = model(tiers=())
    assert m.decide(KV, 2048, None, 0.9, POOL, wait_s=1e4).action == "drop"
    assert m.decide(KV, 2048, None, 0.9, POOL, wait_s=0.001).action == "keep"


def test_expected_wait_is_learned_per_tool():
    m = model()
    for _ in range(10):
        m.waits.observe("slow_tool", 600.0)
        m.waits.observe("fast_tool", 0.001)
    assert m.decide(KV, 2048, "slow_tool", 0.8, POOL).action in ("host", "disk")
    assert m.decide(KV, 2048, "fast_tool", 0.8, POOL).action == "keep"
    assert m.counts and len(m.decisions) == 2


TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 4


def test_decisions_never_wait_for_a_measurement(monkeypatch):
    """No saved calibration: the first decision uses the defaults and starts the measurement on another
    thread; it returns without waiting for it, and the measured numbers replace the defaults after."""
    import threading

    from kvstrata.sched import placement as pl

    started, release, threads = threading.Event(), threading.Event(), []

    def slow_measure():
        threads.append(threading.current_thread().name)
        started.set()
        release.wait(10)
        return Calibration({"disk": 9.0}, {"disk": 9.0}, 123.0, "measured")

    monkeypatch.setattr(pl, "measure_calibration", slow_measure)
    m = PlacementModel(None, SPEC, ["disk"])
    assert m.cal is pl.DEFAULT_CALIBRATION
    d = m.decide(KV, 2048, "t", 0.5, POOL, wait_s=1.0)  # returns while the measurement is blocked
    assert started.wait(5) and d.action in ("keep", "disk", "drop") and m.cal is pl.DEFAULT_CALIBRATION
    release.set()
    assert m.wait_calibrated(10) and m.cal.source == "measured"
    assert threads == ["kvstrata-calibrate"] and threading.current_thread().name not in threads
    m.decide(KV, 2048, "t", 0.5, POOL, wait_s=1.0)  # measured once, not again
    assert len(threads) == 1


def test_saved_calibration_is_read_at_start(monkeypatch):
    from kvstrata.planner.calibration import calibrate, save_profile
    from kvstrata.sched import placement as pl

    save_profile(calibrate(quick=True))
    monkeypatch.setattr(pl, "measure_calibration", lambda: pytest.fail("must not measure again"))
    m = PlacementModel(None, SPEC, ["disk"])
    assert m.cal.source.startswith("calibration ")
    m.decide(KV, 2048, "t", 0.5, POOL, wait_s=1.0)
    assert m.wait_calibrated(1)


def _block_bytes(llm):
    return llm.engine.pool.block_bytes


def test_preempted_batch_work_moves_down_and_matches_unpreempted(tiny_llama, tmp_path):
    # outputs compared token for token across batch compositions (batch invariance, the default path)
    ref = LLM(str(tiny_llama), kv_device_bytes="8M")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [TEXT[i * 7:] + f" job {i}" for i in range(6)]
    want = [ref.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    llm = LLM(str(tiny_llama), kv_device_bytes=16 * _block_bytes(ref), kv_host_bytes="8M", max_num_batched_tokens=256)
    llm.engine.placement = model(tiers=("host",))
    outs = llm.generate(prompts, params, request_class="batch")
    eng = llm.engine
    assert eng.counters["preemptions"] > 0
    assert eng.kv_stats()["placement"]["decisions"].get("preempt:host", 0) > 0
    assert eng.cached_tokens_by_tier.get("host", 0) > 0  # re-admitted work reloaded, not recomputed
    assert [o.outputs[0].token_ids for o in outs] == want


def test_interactive_request_during_a_saturating_batch_job(tiny_llama):
    """Bound: an interactive prompt that fits one step's token budget gets its first token within two
    engine steps of arriving (the step in flight, then its own), however much batch work waits."""
    llm = LLM(str(tiny_llama), kv_device_bytes="8M", max_num_batched_tokens=128, max_num_seqs=16)
    eng = llm.engine
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    batch_ids = [eng.add_request(TEXT + f" task {i}", params, request_class="batch") for i in range(24)]
    for _ in range(3):
        eng.step()
    rid = eng.add_request("Paris is the capital of", SamplingParams(max_tokens=5, ignore_eos=True),
                          request_class=RequestClass.INTERACTIVE)
    steps, first = 0, None
    done = {}
    while eng.has_unfinished():
        outs = eng.step()
        steps += 1
        for o in outs:
            if o.request_id == rid and first is None and o.outputs[0].token_ids:
                first = steps
            if o.finished:
                done[o.request_id] = o
    assert first is not None and first <= 2, first
    alone = llm.generate("Paris is the capital of", SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert done[rid].outputs[0].token_ids == alone.outputs[0].token_ids
    assert all(len(done[b].outputs[0].token_ids) == 30 for b in batch_ids)


def test_waiting_work_is_ordered_by_its_programs_service(tiny_llama):
    """Least attained service by program: a request of a program that has had little service is admitted
    before one of a program that has had much, within a class; interactive stays first; outputs unchanged."""
    llm = LLM(str(tiny_llama), kv_device_bytes="8M", max_num_seqs=1)
    eng = llm.engine
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    prompt = llm.tokenizer.encode(TEXT * 4)[:900]
    eng.add_request(prompt, p, "big-1", "batch", program="big")
    eng.run_to_completion()
    assert eng.scheduler.attained["big"] == len(prompt) + 3  # the prompt and 3 decode steps were computed
    eng.scheduler.attained["big"] += 10**5  # as if it had run a long while (the tiny model's window is short)
    eng.add_request(TEXT, p, "big-2", "batch", program="big")
    eng.add_request(TEXT, p, "small-1", "batch", program="small")
    eng.add_request(TEXT, p, "chat", "interactive", program="big")
    order = []
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                order.append(out.request_id)
    assert order == ["chat", "small-1", "big-2"]
    fifo = LLM(str(tiny_llama), kv_device_bytes="8M", max_num_seqs=1, program_priority=False)
    fifo.engine.scheduler.attained["big"] = 10**6
    fifo.engine.add_request(TEXT, p, "big-2", "batch", program="big")
    fifo.engine.add_request(TEXT, p, "small-1", "batch", program="small")
    done = fifo.engine.run_to_completion()
    assert list(done) == ["big-2", "small-1"]  # switched off: arrival order
    assert done["small-1"].outputs[0].token_ids == llm.generate(TEXT, p)[0].outputs[0].token_ids

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


def test_engine_pause_moves_down_and_resume_brings_back(tiny_llama, tmp_path):
    llm = LLM(str(tiny_llama), kv_device_bytes="4M", kv_disk_dir=str(tmp_path / "kv"))
    eng = llm.engine
    eng.paused.set_model(model(tiers=("disk",)))
    ids = llm.tokenizer.encode(TEXT)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = llm.generate([ids], params)[0]
    session = ids + first.outputs[0].token_ids
    d = eng.pause(session, "web_search", wait_s=600.0)
    assert d["action"] == "disk"
    assert eng.locate(session).get("device", 0) == 0 and eng.locate(session)["disk"] > 0
    assert eng.resume(session) == len(session) // 16 * 16
    nxt = session + llm.tokenizer.encode(" And then")
    out = llm.generate([nxt], params)[0]
    assert out.metrics.cached_prompt_tokens_by_tier.get("device", 0) >= len(session) // 16 * 16
    eng.pool.reset_prefix_cache()
    assert llm.generate([nxt], params)[0].outputs[0].token_ids == out.outputs[0].token_ids
    # keep: the blocks are held against eviction until resume
    d = eng.pause(session, "calc", wait_s=0.0)
    assert d["action"] == "keep" and eng.pool.num_in_use == len(session) // 16
    eng.resume(session)
    assert eng.pool.num_in_use == 0
    assert eng.kv_stats()["placement"]["decisions"] == {"disk": 1, "keep": 1}


def _block_bytes(llm):
    from kvstrata.kv.pool import BlockPool

    c = llm.engine.model_config
    return BlockPool.bytes_per_block(16, c.num_layers, c.num_kv_heads, c.head_dim)


def test_preempted_batch_work_moves_down_and_matches_unpreempted(tiny_llama, tmp_path):
    # the exact path: outputs compared token for token across batch compositions
    ref = LLM(str(tiny_llama), kv_device_bytes="8M", quantization="none")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [TEXT[i * 7:] + f" job {i}" for i in range(6)]
    want = [ref.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    llm = LLM(str(tiny_llama), kv_device_bytes=16 * _block_bytes(ref), kv_host_bytes="8M", max_num_batched_tokens=256,
              quantization="none")
    llm.engine.paused.set_model(model(tiers=("host",)))
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

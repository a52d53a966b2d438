"""The cluster's parts without Ray: KV events (vLLM's wire format), the index, the routing policy, the
hints, the KV listeners of a real engine, the prefill handover's verification, the prefill cost model."""

from __future__ import annotations

import random
import time

import msgpack
import pytest
import torch

from kvstrata.cluster.events import (AllBlocksCleared, BlockRemoved, BlockStored, KVEventPublisher, decode_batch,
                                     encode_batch)
from kvstrata.cluster.hints import AffinityTable, RouteHints, affinity_keys, reply_keys
from kvstrata.cluster.index import KVIndex, KVIndexFollower
from kvstrata.core import chain_keys

K = [bytes([i]) * 32 for i in range(8)]


def test_events_use_vllms_msgpack_layout():
    data = encode_batch(12.5, [BlockStored(K[:2], None, list(range(32)), 16), BlockRemoved([K[1]]), AllBlocksCleared()])
    raw = msgpack.unpackb(data)
    # KVEventBatch [ts, events]; each event a tagged array in vLLM's field order
    assert raw == [12.5, [["BlockStored", K[:2], None, list(range(32)), 16, None, "GPU", None],
                          ["BlockRemoved", [K[1]], "GPU"], ["AllBlocksCleared"]]]
    ts, events = decode_batch(data)
    assert ts == 12.5 and events[0].block_hashes == K[:2] and isinstance(events[2], AllBlocksCleared)
    # a batch as vLLM itself sends it (integer hashes, newer trailing fields, data_parallel_rank) reads too
    vllm = msgpack.packb([1.0, [["BlockStored", [7, 8], 6, [1] * 32, 16, None, "GPU", None, None, 0]], 0])
    assert decode_batch(vllm)[1][0].block_hashes == [7, 8]
    with pytest.raises(ValueError):
        decode_batch(b"\x93\x01\x02")


def test_index_longest_prefix_per_replica():
    idx = KVIndex()
    idx.apply("a", [BlockStored(K[:4], None, [], 16)])
    idx.apply("b", [BlockStored(K[:2], None, [], 16), BlockStored([K[5]], K[4], [], 16)])
    assert idx.match(K[:4]) == {"a": 4, "b": 2}
    assert idx.match(K[:4], replicas=["b"]) == {"b": 2}
    idx.apply("a", [BlockRemoved([K[2]])])
    assert idx.match(K[:4]) == {"a": 2, "b": 2}
    idx.apply("a", [BlockStored([K[3]], K[2], [], 16, medium="CPU")])  # other media are not device hits
    idx.apply("b", [AllBlocksCleared()])
    assert idx.match(K[:4]) == {"a": 2} and idx.match([K[5]]) == {}
    assert idx.blocks("a") == 3 and idx.replicas() == ["a"]


def test_published_events_reach_a_follower(redis_server):
    prefix = f"kvstrata:t{time.time_ns()}:"
    pub = KVEventPublisher(redis_server.url, prefix, "r1", 16, flush_s=0.01)
    pub.stored(K[:3], None, list(range(48)))
    pub.on_evict(0, K[2], ())
    assert pub.flush()
    follower = KVIndexFollower(redis_server.url, prefix)  # starts late: reads the retained window
    try:
        deadline = time.time() + 10
        while follower.index.match(K[:3]) != {"r1": 2} and time.time() < deadline:
            time.sleep(0.02)
        assert follower.index.match(K[:3]) == {"r1": 2}
        pub.close(clear=True)  # a graceful stop clears the replica's entries
        deadline = time.time() + 10
        while follower.index.match(K[:3]) and time.time() < deadline:
            time.sleep(0.02)
        assert follower.index.match(K[:3]) == {}
    finally:
        follower.close()


def test_policy_affinity_prefix_load_and_overrides():
    from kvstrata.cluster.router import Load, Policy, decide

    rng = random.Random(0)
    idle = {"a": Load(0), "b": Load(1), "c": Load(1)}
    assert decide(RouteHints(affinity="b"), idle, rng=rng) == (["b", "a", "c"], "affinity")
    assert decide(RouteHints(prefix={"c": 64, "b": 32}), idle, rng=rng)[0][0] == "c"
    assert decide(RouteHints(prefix={"c": 64, "b": 64}), {"b": Load(0), "c": Load(2)}, rng=rng)[0][0] == "b"
    assert decide(None, idle, rng=rng) == (["a", "b", "c"], "load")
    busy = {"a": Load(0), "b": Load(6), "c": Load(1)}  # b runs 6 more than a: imbalanced at 4
    assert decide(RouteHints(affinity="b", prefix={"b": 99}), busy, Policy(imbalance=4), rng)[1] == "affinity_overloaded"
    assert decide(RouteHints(affinity="b"), busy, Policy(imbalance=8), rng)[1] == "affinity"
    assert decide(RouteHints(affinity="gone"), idle, rng=rng)[1] == "affinity_lost"
    assert decide(RouteHints(prefix={"b": 99}), busy, rng=rng) == (["a", "c", "b"], "prefix_overloaded")
    full = {"a": Load(0, 0.99), "b": Load(0, 0.2)}  # a full pool loses its affinity while another has room
    assert decide(RouteHints(affinity="a"), full, rng=rng)[0][0] == "b"
    assert decide(None, {}, rng=rng) == ([], "load")


def test_affinity_keys_and_reply_ids():
    keys = affinity_keys("/v1/sessions/sess_x/generate", {"x-session-id": "h"},
                         {"previous_response_id": "resp_1", "conversation": {"id": "conv_9"}, "prompt_cache_key": "p"})
    assert keys == ["session:sess_x", "response:resp_1", "conversation:conv_9", "prompt_cache_key:p", "header:h"]
    assert affinity_keys("/v1/chat/completions", {}, None) == []
    assert reply_keys(b'{"id":"resp_abc","object":"response","session_id":"sess_Q-1"}') == [
        "response:resp_abc", "session:sess_Q-1"]
    t = AffinityTable(capacity=2)
    t.put(["a", "b"], "r1")
    t.put(["c"], "r2")
    assert t.get(["a"]) == (None, None) and t.get(["x", "c"]) == ("r2", "c")


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from kvstrata.engine.llm_engine import LLMEngine

    return LLMEngine(model=str(tiny_llama), kv_device_bytes="1M", num_threads=1)


class Recorder:
    def __init__(self) -> None:
        self.stored: list[tuple[list[bytes], bytes | None, int]] = []
        self.removed: list[bytes] = []

    def stored_fn(self, keys, parent, token_ids):
        self.stored.append((list(keys), parent, len(token_ids)))

    def on_evict(self, b, key, toks):
        self.removed.append(key)


def test_engine_reports_computed_blocks_with_their_parents_and_evictions(engine):
    from kvstrata.core import SamplingParams

    rec = Recorder()
    listener = type("L", (), {"stored": lambda s, k, p, t: rec.stored_fn(k, p, t), "removed": lambda s, k: None})()
    engine.kv.listeners.append(listener)
    engine.pool.evict_hooks.append(rec.on_evict)
    try:
        bs = engine.pool.block_size
        ids = list(range(5, 5 + 3 * bs + 3))
        engine.add_request(ids, SamplingParams(max_tokens=1))
        engine.run_to_completion()
        keys = chain_keys(ids, bs, engine.fingerprint)
        got = [k for run, _, _ in rec.stored for k in run]
        assert got == keys  # every full block, in chain order
        parents = {run[0]: parent for run, parent, _ in rec.stored}
        for i, k in enumerate(keys):
            if k in parents:
                assert parents[k] == (keys[i - 1] if i else None)
        for i in range(engine.pool.num_blocks):  # fill the pool with other prompts: the old blocks get evicted
            engine.add_request([200 + (i % 100), 300 + (i // 100) % 100] + [301] * bs, SamplingParams(max_tokens=1))
        engine.run_to_completion()
        assert set(keys) & set(rec.removed)
    finally:
        engine.kv.listeners.remove(listener)
        engine.pool.evict_hooks.remove(rec.on_evict)


def test_handover_blocks_are_verified_on_import(engine, tiny_llama):
    from kvstrata.cluster.pd import export_blocks, import_blocks
    from kvstrata.core import SamplingParams
    from kvstrata.engine.llm_engine import LLMEngine

    bs = engine.pool.block_size
    ids = [7 + (i % 90) for i in range(4 * bs + 1)]
    engine.add_request(ids, SamplingParams(max_tokens=1))
    engine.run_to_completion()
    blocks = export_blocks(engine, ids)
    assert len(blocks) == 4
    other = LLMEngine(model=str(tiny_llama), kv_device_bytes="1M", num_threads=1)
    bad = [(k, t, blob[:-1] + bytes([blob[-1] ^ 1])) if i == 2 else (k, t, blob) for i, (k, t, blob) in enumerate(blocks)]
    assert import_blocks(other, bad) == 2 * bs  # the corrupted third block stops the import
    assert import_blocks(other, blocks) == 2 * bs  # the first two are there already
    other.add_request(ids, SamplingParams(max_tokens=4))
    out = list(other.run_to_completion().values())[0]
    assert out.metrics.cached_prompt_tokens == 4 * bs
    engine.add_request(ids, SamplingParams(max_tokens=4))
    assert list(engine.run_to_completion().values())[0].outputs[0].token_ids == out.outputs[0].token_ids
    other_dtype = "float32" if engine.kv_dtype != torch.float32 else "float16"
    f16 = LLMEngine(model=str(tiny_llama), kv_device_bytes="1M", num_threads=1, kv_dtype=other_dtype)
    assert f16.fingerprint != engine.fingerprint
    assert import_blocks(f16, blocks) == 0  # another fingerprint (KV dtype): never used


def test_prefill_choice_keeps_short_and_cached_prompts_local():
    from kvstrata.planner.modelspec import ModelSpec
    from kvstrata.sched.placement import Calibration, PlacementModel

    spec = ModelSpec.from_hf_config({"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152})
    pm = PlacementModel(Calibration({"remote": 1.0}, {"remote": 1.0}, 100.0), spec, [])
    per_token = 46_000
    net = {"shared-tier": (1.0, 0.1)}  # 1 GB/s and a 100 ms round trip
    assert pm.prefill_choice(4000, 0, 4000 * per_token, net).action == "shared-tier"
    assert pm.prefill_choice(8, 0, 8 * per_token, net).action == "local"  # under the round trip
    assert pm.prefill_choice(8, 3992, 8 * per_token, net).action == "local"  # the decode replica holds the rest
    assert pm.prefill_choice(0, 4000, 0, net).action == "local"


def test_replicas_of_different_models_never_use_each_others_blocks(tiny_llama, redis_server):
    """Two 'replicas' sharing one Redis tier and one KV index: a different fingerprint (here the KV dtype)
    finds none of the other's blocks, in the tier or in the index."""
    from kvstrata.core import SamplingParams
    from kvstrata.engine.llm_engine import LLMEngine

    a = LLMEngine(model=str(tiny_llama), kv_device_bytes="1M", num_threads=1, kv_redis_url=redis_server.url,
                  kv_dtype="float32")
    b = LLMEngine(model=str(tiny_llama), kv_device_bytes="1M", num_threads=1, kv_redis_url=redis_server.url,
                  kv_dtype="float16")
    assert a.fingerprint != b.fingerprint
    ids = [11 + (i % 80) for i in range(5 * a.pool.block_size + 1)]
    idx = KVIndex()
    a.kv.listeners.append(type("L", (), {"stored": lambda s, k, p, t: idx.apply("a", [BlockStored(list(k), p, list(t), 16)]),
                                         "removed": lambda s, k: None})())
    a.add_request(ids, SamplingParams(max_tokens=1))
    a.run_to_completion()
    assert a.offload.stack.flush(10)
    assert idx.match(chain_keys(ids, a.pool.block_size, a.fingerprint)) == {"a": 5}
    assert idx.match(chain_keys(ids, b.pool.block_size, b.fingerprint)) == {}
    b.add_request(ids, SamplingParams(max_tokens=1))
    out = list(b.run_to_completion().values())[0]
    assert out.metrics.cached_prompt_tokens == 0
    a.close()
    b.close()


def test_cluster_options_reject_bad_layouts():
    from kvstrata.cluster.launch import ClusterOptions
    from kvstrata.core import KvstrataError

    for bad in (dict(replicas=0), dict(prefill_replicas=1), dict(prefill_replicas=-1, decode_replicas=1),
                dict(router="round-robin"), dict(pd_transport="nfs"), dict(min_replicas=2),
                dict(min_replicas=3, max_replicas=2)):
        with pytest.raises(KvstrataError):
            ClusterOptions(**bad)
    assert ClusterOptions(prefill_replicas=1, decode_replicas=2).disaggregated


def test_autoscaling_and_router_options_reach_ray_serve():
    from kvstrata.cluster.launch import ClusterOptions, _deployment
    from kvstrata.cluster.replica import EngineReplica

    opts = ClusterOptions(min_replicas=1, max_replicas=4, target_ongoing_requests=6, imbalance=7, replica_cpus=0.5)
    d = _deployment(EngineReplica, "engine", opts, 2, True)
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 6)
    router = d._deployment_config.request_router_config
    assert router.request_router_class.endswith("KVAwareRouter") and router.request_router_kwargs == {"imbalance": 7}
    assert d.ray_actor_options["num_cpus"] == 0.5
    fixed = _deployment(EngineReplica, "engine", ClusterOptions(replicas=3, router="ray-default"), 3, True)
    assert fixed.num_replicas == 3 and "PowerOfTwo" in fixed._deployment_config.request_router_config.request_router_class


def test_ingress_tokenizes_as_the_engine_does_without_loading_weights(engine, tiny_llama):
    from kvstrata.loader import load_config_and_tokenizer

    cfg, tok = load_config_and_tokenizer(str(tiny_llama))
    assert cfg == engine.model_config
    text = "The quick brown fox, Grüße aus Köln."
    assert tok.encode(text) == engine.tokenizer.encode(text)
    from kvstrata.loader import load_model

    cfg, tok = load_config_and_tokenizer("default")  # a GGUF: metadata and tokenizer, no weights read
    lm = load_model("default")
    assert cfg == lm.config and tok.encode(text) == lm.tokenizer.encode(text)

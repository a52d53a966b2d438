"""The KV hierarchy in the engine: restores equal recompute, restarts reuse, faults cost only recompute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvstrata import LLM, SamplingParams

PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
SHARED = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 4


def _engine(model, **kw):
    # the exact path unless a test asks otherwise: restored turns are compared token for token with
    # recomputed ones, which int8 does not promise (its prefill rows share one activation range, so a
    # tail computed alone rounds differently from the whole prompt)
    kw.setdefault("quantization", "none")
    return LLM(str(model), kv_device_bytes=kw.pop("kv_device_bytes", "4M"), **kw)


def _disk_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.mark.slow
def test_default_model_restore_from_each_tier_equals_recompute(tmp_path, redis_server):
    # write-on-evict: each tier holds only what is parked to it (write-behind would put every turn's
    # blocks on disk and Redis too, and the restore would come from the fastest of them)
    llm = _engine("default", kv_device_bytes="256M", kv_host_bytes="64M", kv_disk_dir=str(tmp_path / "kv"),
                  kv_redis_url=redis_server.url, kv_write_policy="write-on-evict")  # the exact path (see _engine)
    eng = llm.engine
    tok = llm.tokenizer
    for tier in ("host", "disk", "remote"):
        msgs = [{"role": "system", "content": f"You answer questions about {tier} storage. " * 8},
                {"role": "user", "content": "Why do caches help agents?"}]
        ids = tok.encode_chat(msgs)
        cold = llm.generate([ids], PARAMS)[0]
        assert cold.metrics.cached_prompt_tokens == 0
        res = eng.offload.park(ids, tier)
        assert res["blocks_written"] > 0 and res["device_blocks_freed"] > 0
        assert eng.kv.locate(ids).get(tier, 0) >= len(ids) // 16 * 16 - 16
        warm = llm.generate([ids], PARAMS)[0]
        by_tier = warm.metrics.cached_prompt_tokens_by_tier
        assert by_tier.get(tier, 0) >= 16 * (len(ids) // 16 - 1), by_tier
        assert warm.metrics.computed_prompt_tokens == len(ids) - warm.metrics.cached_prompt_tokens
        assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    eng.close()


def test_tiny_restore_with_int8_cold_codec_is_close(tiny_llama, tmp_path):
    """int8 per-channel K/V in the cold tiers: not exact, so measure how many greedy tokens survive."""
    llm = _engine(tiny_llama, kv_disk_dir=str(tmp_path / "kv"), kv_cold_codec="int8")
    ids = llm.tokenizer.encode(SHARED)
    cold = llm.generate([ids], PARAMS)[0]
    llm.engine.offload.park(ids, "disk")
    warm = llm.generate([ids], PARAMS)[0]
    assert warm.metrics.cached_prompt_tokens_by_tier.get("disk", 0) > 0
    a, b = cold.outputs[0].token_ids, warm.outputs[0].token_ids
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    # int8 is lossy: on this deliberately peaky random model greedy paths agree for the first tokens
    # only; docs/tiers.md reports the agreement measured on the default model
    assert agree >= 1, (a, b)


def _run_generate(args: list[str], env=None) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvstrata.cli.main", "generate", "--json", *args],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy", ["write-through", "write-on-evict"])
def test_second_process_reuses_the_disk_tier(tiny_llama, tmp_path, policy):
    common = ["--model", str(tiny_llama), "--kv-device-bytes", "4M", "--kv-disk-dir", str(tmp_path / "kv"),
              "--kv-write-policy", policy, "--max-tokens", "8", "--ignore-eos", SHARED]
    first = _run_generate(common)
    assert first["cached_prompt_tokens"] == 0
    second = _run_generate(common)
    n = first["prompt_tokens"]
    assert second["cached_prompt_tokens_by_tier"].get("disk", 0) == (n - 1) // 16 * 16
    assert second["token_ids"] == first["token_ids"]


def test_second_process_reuses_redis(tiny_llama, redis_server):
    common = ["--model", str(tiny_llama), "--kv-device-bytes", "4M", "--kv-redis-url", redis_server.url,
              "--kv-write-policy", "write-through", "--max-tokens", "8", "--ignore-eos", SHARED + " redis"]
    first = _run_generate(common)
    second = _run_generate(common)
    assert second["cached_prompt_tokens_by_tier"].get("remote", 0) == (first["prompt_tokens"] - 1) // 16 * 16
    assert second["token_ids"] == first["token_ids"]


def _parked(tiny_llama, tmp_path):
    llm = _engine(tiny_llama, kv_disk_dir=str(tmp_path / "kv"))
    ids = llm.tokenizer.encode(SHARED)
    cold = llm.generate([ids], PARAMS)[0]
    llm.engine.offload.park(ids, "disk", pin=False)
    assert llm.engine.offload.stack.flush(30)  # writes behind the turn are done: the files below are final
    return llm, ids, cold


def _discards(llm) -> dict:
    return llm.engine.kv_stats()["tiers"]["disk"]["discards"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
def test_damaged_disk_blocks_are_discarded_and_recomputed(tiny_llama, tmp_path, damage):
    from kvstrata.tiers import codec as kvcodec

    llm, ids, cold = _parked(tiny_llama, tmp_path)
    files = _disk_files(tmp_path / "kv")
    assert files
    victim = files[len(files) // 2]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) - 100] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # same key and tokens, written by "another model": a different fingerprint in the header
        hdr = kvcodec.read_header(bytes(data))
        x = kvcodec.decode(bytes(data), hdr.fingerprint, hdr.key, hdr.token_ids)
        data = bytearray(kvcodec.encode(x, key=hdr.key, token_ids=hdr.token_ids, fingerprint="f" * 64))
    victim.write_bytes(bytes(data))
    warm = llm.generate([ids], PARAMS)[0]
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert sum(_discards(llm).values()) == 1, _discards(llm)
    assert warm.metrics.cached_prompt_tokens < len(ids) - 16  # the blocks from the damaged one on were recomputed


def test_killed_writer_leaves_nothing_that_is_read(tiny_llama, tmp_path):
    """A writer killed mid-block leaves only its temp file; a new engine ignores and removes it."""
    from kvstrata.core import chain_keys
    from kvstrata.tiers import codec as kvcodec

    llm, ids, cold = _parked(tiny_llama, tmp_path)
    keys = chain_keys(ids, 16, llm.engine.fingerprint)
    llm.engine.close()
    files = _disk_files(tmp_path / "kv")
    f = next(p for p in files if kvcodec.read_header(p.read_bytes()).key == keys[2])
    partial = f.parent / f".{f.stem}.999.1.deadbeef.tmp"  # the disk tier's temp-file pattern
    partial.write_bytes(f.read_bytes()[:100])
    f.unlink()  # as if the kill came before the rename
    again = _engine(tiny_llama, kv_disk_dir=str(tmp_path / "kv"))
    assert not partial.exists()  # stray temp files are removed when the tier opens
    out = again.generate([ids], PARAMS)[0]
    assert out.outputs[0].token_ids == cold.outputs[0].token_ids
    assert out.metrics.cached_prompt_tokens_by_tier == {"disk": 32}  # the chain stops at the missing block


def test_redis_stopped_mid_run_and_started_again(tiny_llama, own_redis):
    llm = _engine(tiny_llama, kv_redis_url=own_redis.url, kv_write_policy="write-through")
    ids = llm.tokenizer.encode(SHARED)
    cold = llm.generate([ids], PARAMS)[0]
    llm.engine.offload.stack.flush(10)
    own_redis.stop()
    llm.engine.pool.reset_prefix_cache()
    during = llm.generate([ids], PARAMS)[0]  # misses, recompute, no exception
    assert during.outputs[0].token_ids == cold.outputs[0].token_ids
    assert during.metrics.cached_prompt_tokens == 0
    own_redis.start()
    import time

    time.sleep(1.0)  # past the tier's reconnect backoff
    ids2 = llm.tokenizer.encode("Once upon a time there was a little engine that could. " * 4)
    llm.generate([ids2], PARAMS)
    llm.engine.offload.stack.flush(10)
    llm.engine.pool.reset_prefix_cache()
    after = llm.generate([ids2], PARAMS)[0]
    assert after.metrics.cached_prompt_tokens_by_tier.get("remote", 0) > 0


def test_full_disk_tier_degrades_to_recompute(tiny_llama, tmp_path):
    """A disk tier with room for one block: writes fail or evict, output stays correct."""
    llm = _engine(tiny_llama, kv_disk_dir=str(tmp_path / "kv"), kv_disk_bytes=1)
    ids = llm.tokenizer.encode(SHARED)
    cold = llm.generate([ids], PARAMS)[0]
    res = llm.engine.offload.park(ids, "disk")
    assert res["failed"] == 1 and res["blocks_written"] == 0
    again = llm.generate([ids], PARAMS)[0]
    assert again.outputs[0].token_ids == cold.outputs[0].token_ids


def test_concurrency_with_every_tier_smaller_than_the_working_set(tiny_llama, tmp_path, redis_server):
    from kvstrata.kv.pool import BlockPool

    ref = _engine(tiny_llama, kv_device_bytes="16M")
    c = ref.engine.model_config
    blk = BlockPool.bytes_per_block(16, c.num_layers, c.num_kv_heads, c.head_dim)
    llm = _engine(tiny_llama, kv_device_bytes=24 * blk, kv_host_bytes=12 * blk, kv_disk_dir=str(tmp_path / "kv"),
                  kv_disk_bytes=20 * blk, kv_redis_url=redis_server.url, max_num_batched_tokens=128)
    texts = [SHARED[: 60 + 13 * i] + f" request {i}" for i in range(10)] + [f"unrelated {i} " * 12 for i in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [ref.generate(t, params)[0].outputs[0].token_ids for t in texts]
    eng = llm.engine
    for round_ in range(2):
        for t in texts:
            eng.add_request(t, params)
        done = {}
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
            eng.pool.check_invariants()
        got = [o.outputs[0].token_ids for _, o in sorted(done.items(), key=lambda kv: int(kv[0].split("-")[1]))]
        assert got == want
    stats = eng.kv_stats()
    assert stats["engine"]["blocks_written_down"] > 0
    assert sum(stats["cached_tokens_by_tier"].get(t, 0) for t in ("host", "disk", "remote")) > 0


def test_fp16_kv_pool_parks_and_restores_through_host_and_disk(tiny_llama, tmp_path):
    """--kv-dtype float16 (half the bytes of fp32 KV in the pool and in every tier): blocks go down and
    come back as fp16, restored turns give the recomputed tokens, and an engine with fp32 KV never reads
    them (its fingerprint differs)."""
    disk = str(tmp_path / "kv")
    llm = _engine(tiny_llama, kv_host_bytes="8M", kv_disk_dir=disk, kv_dtype="float16",
                  kv_write_policy="write-on-evict")  # each tier holds only what is parked to it
    eng = llm.engine
    assert eng.pool.k.dtype.itemsize == 2
    for tier in ("host", "disk"):
        ids = llm.tokenizer.encode(f"{tier}: {SHARED}")
        cold = llm.generate([ids], PARAMS)[0]
        assert eng.offload.park(ids, tier)["blocks_written"] > 0
        warm = llm.generate([ids], PARAMS)[0]
        assert warm.metrics.cached_prompt_tokens_by_tier.get(tier, 0) >= 16, warm.metrics.cached_prompt_tokens_by_tier
        assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    eng.close()
    other = _engine(tiny_llama, kv_disk_dir=disk, kv_dtype="float32")  # fp32 KV: a different fingerprint
    out = other.generate([llm.tokenizer.encode(f"disk: {SHARED}")], PARAMS)[0]
    assert out.metrics.cached_prompt_tokens == 0

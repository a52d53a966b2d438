"""Time to first token for a 4,096-token prompt whose prefix lives in each tier, against cold recompute.

Default model, one engine with host, disk and Redis tiers (a real redis-server on loopback, started
here). For each tier: the prefix is parked there (written, device copies dropped), then the same
prompt with a new tail (`--new`, 32 tokens) is generated; TTFT (median of `--reps`) is compared with a
cold run (no cached prefix) of the same engine: the quantization the server runs (`--quantization auto`:
int8 with the native decode step on a CPU) and its threads, after an untimed full-length prefill so the
cold run pays no first-use cost (each prompt's write-behind is waited for before the timed request);
and with the prefix in device memory, which is what a resumed turn
would cost if nothing had moved (issue 14: a restore costs at most 20 % over it).
Run: python -m benchmarks.tier_ttft [--tokens 4096] [--new 32] [--quantization auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch

from benchmarks.common import ceilings, machine, table, write_results
from kvstrata import LLM, SamplingParams
from kvstrata.core import chain_keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--new", type=int, default=32, help="new tokens after the stored prefix")
    ap.add_argument("--reps", type=int, default=3, help="TTFT is the median of this many prompts per place")
    ap.add_argument("--quantization", default="auto", help="as `kvstrata serve --quantization` (make serve: auto)")
    ap.add_argument("--name", default="tier_ttft", help="result file stem")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from tests.support.redis_server import RedisServer

    redis = RedisServer().start()
    tmp = tempfile.mkdtemp(prefix="kvstrata-ttft-")
    try:
        llm = LLM("default", kv_device_bytes="2G", kv_host_bytes="2G", kv_disk_dir=os.path.join(tmp, "kv"),
                  kv_redis_url=redis.url, max_num_batched_tokens=2048, quantization=a.quantization)
        eng = llm.engine
        g = torch.Generator().manual_seed(1)
        one = SamplingParams(max_tokens=1)
        ceil = {k: v for k, v in ceilings(redis_url=redis.url).items() if k != "profile"}
        rows, res = [], {"machine": machine(), "tokens": a.tokens, "new_tokens": a.new, "reps": a.reps, "ceilings": ceil,
                         "kv_bytes_per_value": eng.kv_dtype.itemsize}

        def prompt():
            return torch.randint(100, 49000, (a.tokens,), generator=g).tolist()

        llm.generate([prompt()], one)  # warm up at full length (first-use costs stay out of the cold run)
        eng.pool.reset_prefix_cache()
        base = prompt()
        cold = llm.generate([base], one)[0].metrics.ttft_s
        quant, threads = eng.config.quantization, torch.get_num_threads()
        res.update(cold_s=cold, quantization=quant, threads=threads)
        rows.append(["cold recompute", cold, 1.0, "", ""])
        for tier in ("device", "host", "disk", "remote"):
            times, got = [], {}
            for _ in range(a.reps):
                p = prompt()
                llm.generate([p], one)  # computes and caches the prefix
                # its write-behind (to disk and Redis) finishes first: timed is the restore, not the restore
                # racing the background writer for the two cores
                eng.offload.wait_durable(chain_keys(p, eng.pool.block_size, eng.offload.fingerprint), 60.0)
                if tier != "device":
                    eng.offload.park(p, tier, pin=False)
                    # and nowhere faster: write-behind also put the blocks on disk, which a restore reads
                    # before Redis (the remote row read the disk tier until this)
                    keys = chain_keys(p, eng.pool.block_size, eng.offload.fingerprint)
                    for faster in eng.offload.stack.tiers[:eng.offload.tier_names.index(tier)]:
                        for key in keys:
                            faster.remove(key)
                    if tier == "disk":  # a cold read from disk, not the page cache, as far as we can without root
                        os.sync()
                q = p[:-a.new] + torch.randint(100, 49000, (a.new,), generator=g).tolist()
                out = llm.generate([q], one)[0]
                times.append(out.metrics.ttft_s)
                got = out.metrics.cached_prompt_tokens_by_tier
            ttft = statistics.median(times)
            res[f"{tier}_s"], res[f"{tier}_all_s"] = ttft, times
            vs_device = "" if tier == "device" else f"{ttft / res['device_s']:.2f}x"
            rows.append([f"prefix in {tier}", ttft, cold / ttft, vs_device, f"{got}"])
        stats = eng.kv_stats()["tiers"]
        md = [f"# TTFT with the prefix in each tier\n\nDefault model, {a.tokens}-token prompts (the last {a.new} tokens "
              f"new), median of {a.reps} prompts per place, quantization {quant} (`--quantization {a.quantization}`), "
              f"{threads} threads, {machine()}; cold recompute on the same engine. Command: "
              f"`python -m benchmarks.tier_ttft --tokens {a.tokens} --new {a.new} --quantization {a.quantization}`.\n",
              table(["where the prefix lives", "TTFT s", "speed-up vs cold", "vs prefix in device", "tokens reused by tier"],
                    rows),
              "\nAims: host >= 20x, disk >= 10x, Redis on loopback >= 5x faster than cold (issue 3); a resumed turn "
              "within 1.2x of the same turn with its prefix in device memory (issue 14).\n",
              "Tier stats after the run (bytes moved, achieved GB/s):\n",
              table(["tier", "bytes read", "bytes written", "read GB/s", "write GB/s"],
                    [[n, s.get("bytes_read"), s.get("bytes_written"), s.get("read_gbps"), s.get("write_gbps")]
                     for n, s in stats.items()])]
        path = write_results(a.name, "\n".join(md) + "\n", res)
        print(path.read_text())
        eng.close(flush_device=False)
    finally:
        redis.close()


if __name__ == "__main__":
    main()

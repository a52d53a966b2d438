"""Prefill/decode disaggregation on a kvstrata cluster (Ray Serve), the default model.

1. Handover: a fresh 2,048-token prompt prefilled on the prefill replica and handed to the decode
   replica through the shared Redis tier or Ray's object store, against prefilling it on the decode
   replica itself: time to first token and the handover time the ingress measured.
2. Decode latency under long prefills: streaming decodes (short prompts, 96 tokens each, two at a
   time, back to back) while 2,048-token prompts arrive every few seconds; inter-token latency p50 /
   p99 of the streams and the total throughput, co-located (2 replicas that both prefill and decode)
   against disaggregated (1 prefill + 1 decode replica): the same two replicas, the same load.

    python -m benchmarks.cluster_pd [--seconds 60] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import machine, table, write_results

LONG = 2048


def prompt(n: int, seed: int) -> list[int]:
    g = random.Random(seed)
    return [g.randrange(1000, 40000) for _ in range(n)]


async def stream(client: httpx.AsyncClient, url: str, ids: list[int], max_tokens: int, prefill: str | None = None) -> dict:
    headers = {"X-Kvstrata-Prefill": prefill} if prefill else {}
    body = {"model": "default", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev.get("choices"):
                    times.append(time.perf_counter())
                if ev.get("usage"):
                    usage = ev["usage"]
    return {"ttft": times[0] - t0 if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": len(times), "usage": usage}


async def handover(url: str, reps: int) -> dict:
    out: dict[str, list[float]] = {}
    async with httpx.AsyncClient(timeout=600) as c:
        for rep in range(reps):
            for mode in ("local", "shared-tier", "object-store"):
                r = await stream(c, url, prompt(LONG, hash((mode, rep, time.time()))), 2, prefill=mode)
                out.setdefault(mode, []).append(r["ttft"])
    return {m: statistics.median(v) for m, v in out.items()}


async def mixed(url: str, seconds: float, prefill_every_s: float) -> dict:
    gaps: list[float] = []
    tokens = [0]
    stop = time.perf_counter() + seconds

    async def streams(k: int) -> None:
        async with httpx.AsyncClient(timeout=600) as c:
            i = 0
            while time.perf_counter() < stop:
                r = await stream(c, url, prompt(64, 1000 * k + i), 96, prefill="local")
                gaps.extend(r["gaps"])
                tokens[0] += r["tokens"] + 64
                i += 1

    async def prefills() -> None:
        async with httpx.AsyncClient(timeout=600) as c:
            i = 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await stream(c, url, prompt(LONG, 10**6 + i), 4)
                tokens[0] += r["tokens"] + LONG
                i += 1
                await asyncio.sleep(max(0.0, prefill_every_s - (time.perf_counter() - t)))

    t0 = time.perf_counter()
    await asyncio.gather(streams(1), streams(2), prefills())
    wall = time.perf_counter() - t0
    q = statistics.quantiles(gaps, n=1000, method="inclusive")
    return {"itl_p50_ms": 1000 * q[499], "itl_p99_ms": 1000 * q[989], "itl_p999_ms": 1000 * q[998],
            "itl_max_ms": 1000 * max(gaps), "tok_s": tokens[0] / wall, "gaps": len(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--prefill-every", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import ray
    from ray import serve

    from kvstrata.cluster.launch import APP_NAME, ClusterOptions, build_app, worker_env
    from kvstrata.cluster.redis_local import LocalRedis
    from kvstrata.config import EngineConfig

    seconds = 25 if args.quick else args.seconds
    cfg = EngineConfig(model="default", quantization="auto", kv_dtype="float16", num_threads=1,
                       kv_device_bytes="160M", kv_host_bytes="64M")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    res: dict = {}
    with LocalRedis() as redis:
        ray.init(num_cpus=4, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": worker_env()})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for name, opts in (("disaggregated (1 prefill + 1 decode)",
                                ClusterOptions(prefill_replicas=1, decode_replicas=1, replica_cpus=0)),
                               ("co-located (2 replicas)", ClusterOptions(replicas=2, replica_cpus=0))):
                serve.run(build_app(opts, cfg, store=str(Path(tempfile.gettempdir()) / f"kvstrata-pd-{port}-{len(res)}.db"), redis_url=redis.url,
                                    model_names=["default"], events_prefix=f"kvstrata:pd{len(res)}:"),
                          name=APP_NAME, route_prefix="/")
                r = {}
                if opts.disaggregated:
                    r["handover_ttft_s"] = asyncio.run(handover(url, 1 if args.quick else 3))
                r.update(asyncio.run(mixed(url, seconds, args.prefill_every)))
                res[name] = r
                print(name, json.dumps(r), flush=True)
                serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()
    dis, co = res["disaggregated (1 prefill + 1 decode)"], res["co-located (2 replicas)"]
    h = dis["handover_ttft_s"]
    md = "\n".join([
        "# Prefill/decode disaggregation (Ray Serve cluster)\n",
        f"`python -m benchmarks.cluster_pd` on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; the "
        "default model (int8, float16 KV, one thread per replica).\n",
        f"## Handover of a fresh {LONG:,}-token prompt (TTFT, median)\n",
        table(["prefill", "TTFT, s"], [[m, v] for m, v in h.items()]),
        f"\n## Streaming decodes under {LONG:,}-token prefills every {args.prefill_every:g} s ({seconds:g} s)\n",
        table(["layout", "ITL p50, ms", "ITL p99, ms", "ITL p99.9, ms", "ITL max, ms", "tokens/s (prompt + generated)"],
              [[n, r["itl_p50_ms"], r["itl_p99_ms"], r["itl_p999_ms"], r["itl_max_ms"], r["tok_s"]]
               for n, r in res.items()]),
        f"\nITL co-located / disaggregated: p99 {co['itl_p99_ms'] / dis['itl_p99_ms']:.2f}x, p99.9 "
        f"{co['itl_p999_ms'] / dis['itl_p999_ms']:.2f}x, max {co['itl_max_ms'] / dis['itl_max_ms']:.2f}x.\n"])
    write_results("cluster_pd", md, res)
    print(md)


if __name__ == "__main__":
    main()

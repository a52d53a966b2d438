"""Claude Code sessions replayed against a kvstrata cluster on Ray Serve: 1 replica, 3 replicas with
Ray's default router (power of two choices), 3 replicas with kvstrata's KV-aware router.

The traces (`shared/data/traces/claude-code/*.json`: per request the input and output token counts,
the 64-token block hash ids of the prompt and the tool / think time before it) are scaled by 1/16 for
the 8k-context default model: each hash id becomes 4 token ids drawn from a generator seeded by (trace,
hash id), so equal ids give equal tokens and a session's growing prompt shares its prefix with its
previous turn; the prompt's tokens beyond its hash ids are fresh. Each session runs its turns in
order, waiting its scaled think time between them, many sessions at once, through `/v1/completions`
(token-id prompts, streamed, `X-Session-Id` set to the trace id as an agent framework would).

Reported per configuration: the prompt-token cache hit rate (tokens loaded instead of computed, all
turns), split into the replica's own memory (device + host) and the shared Redis tier; TTFT p50 / p99
of resumed turns (every turn after a session's first); generated tokens per second over the run.

    python -m benchmarks.cluster_replay [--sessions 10 --turns 4 --data-dir DIR --quick]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import machine, table, write_results

REPO = Path(__file__).resolve().parents[1]
SCALE = 16  # trace tokens and block size / 16 (64-token blocks -> 4 tokens)
VOCAB = (1000, 40000)  # token ids drawn from here (ordinary text tokens of the default model)


def data_dirs(given: str | None) -> list[Path]:
    if given:
        return [Path(given)]
    env = os.environ.get("KVSTRATA_TRACES")
    return ([Path(env) / "claude-code"] if env else []) + [p / "shared" / "data" / "traces" / "claude-code"
                                                          for p in (REPO.parent, REPO.parent.parent)]


def load_sessions(data_dir: Path, n: int, turns: int, max_prompt: int = 6000, seed: int = 0) -> list[dict]:
    """`n` sessions of up to `turns` turns each, as token-id prompts (see the module docstring)."""
    files = sorted(glob.glob(str(data_dir / "trace_*.json")))
    if not files:
        raise SystemExit(f"no Claude Code traces in {data_dir}; pass --data-dir or set KVSTRATA_TRACES")
    random.Random(seed).shuffle(files)
    sessions = []
    for f in files:
        d = json.loads(Path(f).read_text())
        per_id = d.get("block_size", 64) // SCALE
        reqs = [r for r in d["requests"] if r.get("type") == "n" and "in" in r and r.get("hash_ids")]
        out = []
        for i, r in enumerate(reqs[:turns]):
            ids: list[int] = []
            for h in r["hash_ids"]:
                g = random.Random(f"{d['id']}:{h}")
                ids += [g.randrange(*VOCAB) for _ in range(per_id)]
            want = r["in"] // SCALE
            g = random.Random(f"{d['id']}:tail:{i}")
            ids = ids[:want] + [g.randrange(*VOCAB) for _ in range(max(0, want - len(ids)))]
            if len(ids) > max_prompt:
                break
            out.append({"prompt": ids, "max_tokens": max(4, min(32, r["out"] // SCALE)),
                        "think_s": min(3.0, (r.get("think_time") or 0.0) / SCALE)})
        if len(out) >= 2:
            sessions.append({"id": d["id"], "turns": out})
        if len(sessions) == n:
            break
    return sessions


async def one_turn(client: httpx.AsyncClient, url: str, sid: str, turn: dict) -> dict:
    body = {"model": "default", "prompt": turn["prompt"], "max_tokens": turn["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, usage, replica = None, None, None
    async with client.stream("POST", url + "/v1/completions", json=body, headers={"X-Session-Id": sid}) as r:
        replica = r.headers.get("x-kvstrata-replica")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            if ev.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                usage = ev["usage"]
    return {"ttft": ttft, "usage": usage, "replica": replica, "e2e": time.perf_counter() - t0}


async def replay(url: str, sessions: list[dict]) -> tuple[list[dict], float]:
    records: list[dict] = []

    async def run(s: dict, delay: float) -> None:
        await asyncio.sleep(delay)
        async with httpx.AsyncClient(timeout=600) as client:
            for i, turn in enumerate(s["turns"]):
                if i:
                    await asyncio.sleep(turn["think_s"])
                rec = await one_turn(client, url, s["id"], turn)
                records.append({**rec, "session": s["id"], "turn": i})

    t0 = time.perf_counter()
    await asyncio.gather(*(run(s, 0.2 * k) for k, s in enumerate(sessions)))
    return records, time.perf_counter() - t0


def summarize(records: list[dict], wall: float) -> dict:
    prompt = sum(r["usage"]["prompt_tokens"] for r in records)
    by_tier: dict[str, int] = {}
    for r in records:
        for t, n in (r["usage"]["prompt_tokens_details"].get("cached_tokens_by_tier") or {}).items():
            by_tier[t] = by_tier.get(t, 0) + n
    local = sum(n for t, n in by_tier.items() if t in ("device", "host", "disk"))
    resumed = sorted(r["ttft"] for r in records if r["turn"] > 0 and r["ttft"] is not None)
    gen = sum(r["usage"]["completion_tokens"] for r in records)
    q = statistics.quantiles(resumed, n=100, method="inclusive") if len(resumed) > 1 else resumed * 99
    return {"requests": len(records), "prompt_tokens": prompt, "hit_local": local / max(1, prompt),
            "hit_all": sum(by_tier.values()) / max(1, prompt), "by_tier": by_tier,
            "ttft_p50": q[49] if q else None, "ttft_p99": q[98] if q else None, "gen_tok_s": gen / wall,
            "wall_s": wall, "replicas_used": len({r["replica"] for r in records})}


def route_decisions(metrics_text: str) -> dict[str, float]:
    """{reason: count} of the router's decisions, from the ingress's /metrics."""
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("kvstrata_cluster_route_decisions_total{"):
            labels, value = line.split("{", 1)[1].split("} ")
            reason = dict(kv.split("=", 1) for kv in labels.split(","))["reason"].strip('"')
            out[reason] = out.get(reason, 0) + float(value)
    return out


def run_config(name: str, opts, cfg, sessions: list[dict], port: int, redis_url: str, store: str) -> dict:
    from ray import serve

    from kvstrata.cluster.launch import APP_NAME, build_app

    import redis

    try:
        serve.delete(APP_NAME)
    except Exception:  # noqa: BLE001 - nothing deployed yet
        pass
    redis.Redis.from_url(redis_url).flushdb()  # every configuration starts cold, the shared tier included
    t0 = time.perf_counter()
    serve.run(build_app(opts, cfg, store=store, redis_url=redis_url, model_names=["default"],
                        events_prefix=f"kvstrata:bench:{name}:"), name=APP_NAME, route_prefix="/")
    print(f"[{name}] up in {time.perf_counter() - t0:.0f}s; replaying {len(sessions)} sessions", flush=True)
    records, wall = asyncio.run(replay(f"http://127.0.0.1:{port}", sessions))
    res = summarize(records, wall)
    res["decisions"] = route_decisions(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
    print(f"[{name}] {json.dumps({k: v for k, v in res.items() if k != 'by_tier'}, default=str)}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--data-dir")
    ap.add_argument("--max-prompt", type=int, default=3000, help="a session ends before a longer prompt")
    ap.add_argument("--kv-device-bytes", default="512M",
                    help="per replica (float16 KV of the default model: ~22,000 tokens, the working set of 10 "
                         "sessions: one replica holds them all)")
    ap.add_argument("--quick", action="store_true", help="6 sessions of 3 turns")
    args = ap.parse_args()
    import ray
    from ray import serve

    from kvstrata.cluster.launch import ClusterOptions, worker_env
    from kvstrata.cluster.redis_local import LocalRedis
    from kvstrata.config import EngineConfig

    data_dir = next((p for p in data_dirs(args.data_dir) if p.is_dir()), None)
    if data_dir is None:
        raise SystemExit(f"Claude Code traces not found in {[str(p) for p in data_dirs(args.data_dir)]}")
    n, turns = (6, 3) if args.quick else (args.sessions, args.turns)
    sessions = load_sessions(data_dir, n, turns, args.max_prompt)
    cfg = EngineConfig(model="default", quantization="auto", kv_dtype="float16", num_threads=1,
                       kv_device_bytes=args.kv_device_bytes, kv_host_bytes="64M")
    configs = [("1 replica", ClusterOptions(replicas=1, replica_cpus=0)),
               ("3 replicas, Ray's default router", ClusterOptions(replicas=3, replica_cpus=0, router="ray-default")),
               ("3 replicas, kvstrata's router", ClusterOptions(replicas=3, replica_cpus=0))]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = {}
    with LocalRedis() as redis:
        ray.init(num_cpus=4, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": worker_env()})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for k, (name, opts) in enumerate(configs):
                results[name] = run_config(name, opts, cfg, sessions, port, redis.url,
                                           str(Path(tempfile.gettempdir()) / f"kvstrata-bench-{os.getpid()}-{k}.db"))
        finally:
            serve.shutdown()
            ray.shutdown()
    report(results, sessions, args, data_dir)


def report(results: dict, sessions: list[dict], args, data_dir: Path) -> None:
    base = results["1 replica"]["hit_local"]
    rows = [[name, r["requests"], f"{100 * r['hit_local']:.1f} %", f"{100 * r['hit_local'] / max(base, 1e-9):.0f} %",
             f"{100 * r['hit_all']:.1f} %", r["ttft_p50"], r["ttft_p99"], r["gen_tok_s"], r["replicas_used"]]
            for name, r in results.items()]
    prompts = [len(t["prompt"]) for s in sessions for t in s["turns"]]
    md = "\n".join([
        "# Claude Code sessions on a kvstrata cluster (Ray Serve)\n",
        f"`python -m benchmarks.cluster_replay` on {machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{len(sessions)} sessions, {len(prompts)} turns, prompts {min(prompts)}-{max(prompts)} tokens (traces scaled "
        "1/16), the default model (int8, float16 KV, one thread per replica), device pool "
        f"{args.kv_device_bytes} + host tier 64M per replica, one shared Redis tier.\n",
        table(["configuration", "turns", "hit rate (own memory)", "of 1 replica's", "hit rate (incl. shared tier)",
               "TTFT p50 resumed, s", "TTFT p99 resumed, s", "generated tok/s", "replicas used"], rows),
        "\nHit rate: prompt tokens loaded instead of computed / prompt tokens. Own memory: device pool and host "
        "tier of the replica that served the turn; the shared tier is the Redis tier every replica reads.\n"])
    write_results("cluster_replay", md, {"results": results, "sessions": len(sessions), "traces": data_dir.name})
    plot(results)
    print(md)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import RESULTS

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(range(len(names)), [100 * results[n]["hit_local"] for n in names], color=["#888", "#c66", "#4a8"])
    a.set_ylabel("prompt tokens from own memory, %")
    b.bar(range(len(names)), [results[n]["ttft_p50"] or 0 for n in names], color=["#888", "#c66", "#4a8"])
    b.set_ylabel("TTFT p50 of resumed turns, s")
    for ax in (a, b):
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "cluster_replay.png", dpi=110)


if __name__ == "__main__":
    main()

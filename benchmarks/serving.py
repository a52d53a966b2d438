"""Serving through HTTP: request throughput, TTFT and inter-token latency percentiles at several
concurrencies, on the default model, with streaming chat completions from the official `openai` client.

The server is `kvstrata serve` in its own process (so the client's Python does not share its GIL).
Each level runs `concurrency` closed-loop clients until `requests` requests have finished; every
request has a distinct prompt (no prefix shared beyond the chat template's few tokens) and a fixed
output length (`ignore_eos`). TTFT = request sent to first content chunk; inter-token latency (ITL) =
gap between consecutive content chunks, divided by the tokens they carry. Roofline: each engine step
reads every weight once, so weight bytes x steps / s is the weight traffic the decode loop achieved,
beside a memory-copy ceiling measured in the same run. Writes benchmarks/results/serving.md.

    PYTHONPATH=src .venv/bin/python -m benchmarks.serving [--levels 1,4,16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the ocean", "a city at night", "mountains", "a library", "trains", "the desert", "a garden", "winter",
          "a market", "rivers", "the moon", "a lighthouse", "forests", "a bakery", "storms", "bridges"]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_ceiling_gbs() -> float:
    import torch

    a = torch.empty(64 << 20, dtype=torch.float32)  # 256 MiB
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    dt = (time.perf_counter() - t0) / 5
    return 2 * a.numel() * 4 / dt / 1e9  # read + write


def engine_steps(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(r'^kvstrata_engine_counter\{name="steps"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else float("nan")


async def one_request(client, model: str, i: int, max_tokens: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    msgs = [{"role": "user", "content": f"Request {i}. Write a short paragraph about {topic}."}]
    t0 = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=msgs, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            stamps.append((time.perf_counter(), len(ch.choices[0].delta.content)))
        if ch.usage:
            usage = ch.usage
    t1 = time.perf_counter()
    ntok = usage.completion_tokens if usage else len(stamps)
    return {"ttft": stamps[0][0] - t0 if stamps else float("nan"), "e2e": t1 - t0, "tokens": ntok,
            "gaps": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]}


async def run_level(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600) as client:
        counter = iter(range(n_requests))
        results: list[dict] = []

        async def worker():
            for i in counter:
                results.append(await one_request(client, model, i + 1000 * concurrency, max_tokens))

        steps0 = engine_steps(url)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        steps = engine_steps(url) - steps0
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "req_per_s": len(results) / wall, "out_tok_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft": [r["ttft"] for r in results], "gaps": gaps,
        "steps_per_s": steps / wall,
    }


def start_server(args, port: int, store: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "kvstrata.cli.main", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--session-store", store, "--kv-device-bytes", "512M"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("server did not start in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--levels", default="1,4,16", help="comma-separated concurrencies")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "serving.md"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    ceiling = copy_ceiling_gbs()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(args, port, str(Path(tmp) / "s.db"))
        try:
            card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
            model, wbytes = card["id"], card.get("weight_bytes") or 0
            asyncio.run(run_level(url, model, 1, 1, 4))  # warm-up (first-call allocations)
            rows = []
            for c in levels:
                r = asyncio.run(run_level(url, model, c, max(c * args.requests_per_client, 4), args.max_tokens))
                rows.append(r)
                print(f"c={c}: {r['req_per_s']:.2f} req/s, {r['out_tok_per_s']:.1f} tok/s, "
                      f"TTFT p50 {pct(r['ttft'], 50) * 1e3:.0f} ms, ITL p50 {pct(r['gaps'], 50) * 1e3:.0f} ms",
                      flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    write_report(args, rows, wbytes, ceiling)


def write_report(args, rows: list[dict], wbytes: int, ceiling: float) -> None:
    import torch

    ms = lambda x: f"{x * 1e3:.0f}"  # noqa: E731
    lines = [
        "# Serving through HTTP",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}; torch {torch.__version__}; model `{args.model}` "
        f"({wbytes / 1e6:.0f} MB of fp32 weights in the engine). Server: `kvstrata serve` (own process); "
        f"clients: the official `openai` AsyncOpenAI, streaming chat completions, greedy, "
        f"{args.max_tokens} output tokens each (`ignore_eos`), distinct prompts, closed loop "
        f"({args.requests_per_client} requests per client). On a shared machine figures move by up to 2x "
        "between runs; compare within one run.",
        "",
        f"Command: `PYTHONPATH=src .venv/bin/python -m benchmarks.serving --levels {args.levels} "
        f"--max-tokens {args.max_tokens}`",
        "",
        "| concurrency | requests | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) "
        "| engine steps/s | weight GB/s | share of copy ceiling |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        gbs = r["steps_per_s"] * wbytes / 1e9
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
            f"{ms(pct(r['ttft'], 50))} / {ms(pct(r['ttft'], 90))} / {ms(pct(r['ttft'], 99))} | "
            f"{ms(pct(r['gaps'], 50))} / {ms(pct(r['gaps'], 90))} / {ms(pct(r['gaps'], 99))} | "
            f"{r['steps_per_s']:.1f} | {gbs:.2f} | {gbs / ceiling:.0%} |")
    lines += [
        "",
        f"Copy ceiling (one 256 MiB torch copy, read + write bytes), measured in this run: {ceiling:.1f} GB/s. "
        "Weight GB/s = engine steps per second x weight bytes: each step (a batch of decodes and prefill "
        "chunks) reads every weight once, so this is the decode loop's weight traffic; the KV reads come on top.",
        "",
        "ITL is the gap between consecutive streamed content chunks (a chunk is one token, or a few when a "
        "multi-byte character is held back until whole). TTFT includes queueing behind the other clients' "
        "requests and the prefill of the prompt.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

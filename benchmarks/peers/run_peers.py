"""Run kvstrata and its peers (llama.cpp, transformers) through the same workloads, side by side.

    python -m benchmarks.peers.run_peers [--quick] [--parts single_stream,kvstrata_single_stream,...]
                                         [--tau-control] [--skip-transformers] [--skip-kvstrata]
                                         [--tool-wait 0.5] [--kvstrata-quant int8] [--kvstrata-opt KEY=VALUE]

Writes benchmarks/results/peers.json (raw records) and benchmarks/results/peers.md (tables with
ratios, the goals, commands, versions, CPU pressure), plus PNG plots next to them.
The workload settings below are the contract every engine runs (`WORKLOADS`); kvstrata's engine
settings are `kvstrata_side.KVSTRATA_ENGINE`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.common import portable
from benchmarks.peers import kvstrata_side, llamacpp
from benchmarks.peers.common import (BANDWIDTH_SAMPLE, PeerMissingError, bandwidth_sample, cache_dir, cpu_pressure,
                                    default_gguf, interleaved, load_stamp, wait_for_quiet)
from benchmarks.peers.http_load import load
from benchmarks.peers.report import markdown, plots
from benchmarks.peers.tau_replay import load_sessions, replay
from kvstrata.core import KvstrataError

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"

# Chosen so the llama.cpp side runs in about 10-15 minutes on 2 cores.
WORKLOADS = {
    "prefill_tokens": [512, 2048, 8192],
    "decode_depths": [512, 4096],
    "decode_n_gen": 128,
    "concurrency": [8, 32, 64],
    # requests per concurrency level (each worker sends 2 requests; 64 streams get one wave each)
    "requests": {8: 16, 32: 32, 64: 64},
    "max_tokens": 64,
    "prompt_words": 100,  # ~140 prompt tokens with the chat template
    "load_max_seconds": 240,
    "slot_ctx": 512,  # per-slot KV for the load test: prompt + max_tokens fits with room
    "tau": {"n_sessions": 8, "concurrency": 4, "tool_wait_s": 0.5, "max_tokens_cap": 32, "max_chars": 16000,
            "slot_ctx": 8192, "cache_ram_mib": 8192},
}
QUICK = {"prefill_tokens": [512, 2048], "decode_depths": [512], "concurrency": [8],
         "requests": {8: 8}, "tau": {**WORKLOADS["tau"], "n_sessions": 2, "concurrency": 2}}


def machine() -> str:
    """CPU model and count, e.g. "AMD EPYC, 2 cpus (x86_64)"."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cpus ({platform.machine()})"


def run_single_stream(gguf: Path, w: dict) -> dict:
    rows = []
    for n in w["prefill_tokens"]:
        # a warmup prompt run is a full extra prefill; at 8 k tokens it doubles a ~2 min test, so skip it
        big = n >= 8192
        rows.append(llamacpp.prefill_tps(gguf, n, reps=1 if big else 2, warmup=not big))
        logger.info("llama.cpp prefill %d: %.1f tok/s", n, rows[-1]["tps"])
    dec = []
    for d in w["decode_depths"]:  # one llama-bench repetition per call, a bandwidth sample beside each
        runs, ceilings = interleaved(lambda: llamacpp.decode_tps(gguf, d, n_gen=w["decode_n_gen"], reps=1), 3)
        samples = [r["tps"] for r in runs]
        dec.append({"depth": d, "n_gen": w["decode_n_gen"], "tps": sum(samples) / len(samples), "samples_ts": samples,
                    "command": runs[0]["command"] + "  (3 calls, one repetition each)", "raw": [r["raw"] for r in runs],
                    "ceilings_GBps": ceilings})
        logger.info("llama.cpp decode @%d: %.1f tok/s", d, dec[-1]["tps"])
    wbytes = gguf_weight_bytes(gguf)
    for r in dec:  # what one decoded token reads: every weight once (the tied output reads token_embd) + the f16 KV
        r["bytes_per_token"] = wbytes + r["depth"] * kv_bytes_per_token(gguf, 2)
    return {"prefill": rows, "decode": dec}


def gguf_weight_bytes(gguf: Path) -> int:
    """Bytes of every tensor in the file, as stored (Q4_1 blocks, Q8_0 embedding, f32 norms)."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(gguf).tensors))


def kv_bytes_per_token(gguf: Path, elem_bytes: int) -> int:
    """K and V bytes one context token holds over all layers."""
    from kvstrata.loader.gguf_loader import gguf_config
    from kvstrata.loader.gguf_reader import read_gguf

    cfg = gguf_config(read_gguf(str(gguf)), str(gguf))
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem_bytes


def run_concurrency(gguf: Path, w: dict, logs: Path) -> list[dict]:
    out = []
    for c in w["concurrency"]:
        # split KV (one buffer per slot): independent prompts, so no cross-sequence attention (PR 14363)
        srv = llamacpp.LlamaServer(gguf, parallel=c, ctx=c * w["slot_ctx"], cache_ram=0, kv_unified=False,
                                   log_path=logs / f"llama-server-c{c}.log")
        with srv:
            load(srv.url, concurrency=2, num_requests=2, max_tokens=8, prompt_words=20, seed=99)  # warmup
            res = load(srv.url, concurrency=c, num_requests=w["requests"][c], max_tokens=w["max_tokens"],
                       prompt_words=w["prompt_words"], max_seconds=w["load_max_seconds"])
        out.append(res.to_dict() | {"server_command": srv.command})
    return out


def run_tau(gguf: Path, w: dict, logs: Path, *, cache_ram: int | None = None) -> dict:
    t = w["tau"]
    cram = t["cache_ram_mib"] if cache_ram is None else cache_ram
    sessions = load_sessions(n_sessions=t["n_sessions"], max_tokens_cap=t["max_tokens_cap"], max_chars=t["max_chars"])
    srv = llamacpp.LlamaServer(gguf, parallel=t["concurrency"], ctx=t["concurrency"] * t["slot_ctx"],
                               cache_ram=cram, log_path=logs / f"llama-server-tau-cram{cram}.log")
    with srv:
        res = replay(srv.url, sessions, concurrency=t["concurrency"], tool_wait_s=t["tool_wait_s"])
    return res | {"server_command": srv.command, "task_ids": [s.task_id for s in sessions]}


# Run order: each kvstrata part right after the llama.cpp part of the same workload, so both see about
# the same machine (other work on 2 cores moves the numbers by minutes).
PARTS = ("single_stream", "kvstrata_single_stream", "concurrency", "kvstrata_concurrency", "tau", "kvstrata_tau",
         "tau_no_cache_ram", "transformers")
DEFAULT_PARTS = tuple(p for p in PARTS if p != "tau_no_cache_ram")
KVSTRATA_PARTS = ("kvstrata_single_stream", "kvstrata_concurrency", "kvstrata_tau")
LLAMA_PARTS = ("single_stream", "concurrency", "tau", "tau_no_cache_ram")
RESULTS_JSON, RESULTS_MD = "peers.json", "peers.md"
LEGACY_JSON = "peers_llamacpp.json"  # the name before kvstrata joined; read once so partial reruns keep it


def _transformers(gguf: Path, w: dict) -> dict:
    from benchmarks.peers import transformers_peer

    return transformers_peer.measure(gguf, prefill=[n for n in w["prefill_tokens"] if n <= 2048],
                                     decode_depths=[w["decode_depths"][0]])


def _earlier(out_dir: Path, parts: tuple[str, ...]) -> dict:
    """Results of an earlier run to keep (all but `parts`); nothing when every part runs again."""
    if set(parts) == set(PARTS):
        return {}
    for name in (RESULTS_JSON, LEGACY_JSON):
        if (out_dir / name).is_file():
            return json.loads((out_dir / name).read_text())
    return {}


def run(*, quick: bool = False, parts: tuple[str, ...] = DEFAULT_PARTS, out_dir: Path = RESULTS_DIR,
        tool_wait_s: float | None = None, quiet_wait_s: float = 60.0, kvstrata_engine: dict | None = None,
        workloads: dict | None = None) -> dict:
    """Run the workloads in `parts`; returns the results dict, written to `out_dir` after each part.

    Parts not in `parts` keep their results from an earlier peers.json in `out_dir`, so one part can be
    rerun alone. Before each part it waits up to `quiet_wait_s` for the machine to be idle (load < 1)
    and records the CPU pressure before and after: other work on 2 cores skews the numbers.
    `kvstrata_engine`: EngineConfig settings for the kvstrata parts (default KVSTRATA_ENGINE);
    `workloads`: replaces WORKLOADS / QUICK entries (tests use it for tiny runs)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if set(parts) & set(LLAMA_PARTS):
        load_stamp()  # fail first, clearly, when the peer is not built
    settings = kvstrata_side.engine_settings(kvstrata_engine)  # a bad key fails here, before any part runs
    gguf = default_gguf()
    w = {**WORKLOADS, **(QUICK if quick else {}), **(workloads or {})}
    if tool_wait_s is not None:
        w["tau"] = {**w["tau"], "tool_wait_s": tool_wait_s}
    logs = cache_dir() / "logs" / "runs"  # server logs stay outside the repository
    logs.mkdir(parents=True, exist_ok=True)
    out_json = out_dir / RESULTS_JSON
    res = {k: v for k, v in _earlier(out_dir, parts).items() if k in PARTS or k in ("cpu_pressure", "seconds", "versions", "part_runs", "ceilings")}
    versions = dict(res.get("versions") or {})
    try:
        versions |= llamacpp.versions()
    except PeerMissingError as exc:  # only kvstrata / transformers parts asked for
        logger.info("llama.cpp versions not recorded: %s", exc)
    versions["kvstrata"] = kvstrata_side.versions()
    res |= {"model": str(gguf.name), "machine": machine(), "workloads": w, "versions": versions,
            "kvstrata_engine": settings}
    runners = {"single_stream": lambda: run_single_stream(gguf, w),
               "kvstrata_single_stream": lambda: kvstrata_side.single_stream(w, settings),
               "concurrency": lambda: run_concurrency(gguf, w, logs),
               "kvstrata_concurrency": lambda: kvstrata_side.concurrency(w, settings, logs),
               "tau": lambda: run_tau(gguf, w, logs),
               "kvstrata_tau": lambda: kvstrata_side.tau(w, settings, logs),
               "tau_no_cache_ram": lambda: run_tau(gguf, w, logs, cache_ram=0),
               "transformers": lambda: _transformers(gguf, w)}
    out_dir.mkdir(parents=True, exist_ok=True)
    single = [p for p in PARTS if p in parts and p in ("single_stream", "kvstrata_single_stream")]
    if single:  # the roofline both decode rows are read against: measured before and after them, the higher kept
        res["ceilings"] = {"memory_bw_samples_GBps": [], "method": BANDWIDTH_METHOD}
    for name in PARTS:
        if name not in parts:
            continue
        if single and name == single[0]:
            _add_bandwidth(res["ceilings"], [bandwidth_sample()])
        pressure = {"before": wait_for_quiet(quiet_wait_s)}
        s = time.monotonic()
        res[name] = runners[name]()
        res.setdefault("seconds", {})[name] = round(time.monotonic() - s, 1)
        res.setdefault("cpu_pressure", {})[name] = pressure | {"after": cpu_pressure()}
        res.setdefault("part_runs", {})[name] = {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": quick,
                                                 **({"kvstrata": versions["kvstrata"]} if name in KVSTRATA_PARTS else {})}
        if single and name in single:  # the samples taken beside its decode repetitions count too
            for r in (res[name] or {}).get("decode") or []:
                _add_bandwidth(res["ceilings"], r.get("ceilings_GBps") or [])
        if single and name == single[-1]:
            _add_bandwidth(res["ceilings"], [bandwidth_sample()])
        out_json.write_text(portable(json.dumps(res, indent=2)))
    res["plots"] = [str(p) for p in plots(res, out_dir)]
    out_json.write_text(portable(json.dumps(res, indent=2)))
    (out_dir / RESULTS_MD).write_text(portable(markdown(res)))
    return res


BANDWIDTH_METHOD = (f"{BANDWIDTH_SAMPLE}, sampled just before the first and just after the last single-stream part "
                    "and beside every decode repetition of both engines; the run's ceiling is the highest sample")


def _add_bandwidth(ceil: dict, samples: list[float]) -> None:
    """Adds memory read-bandwidth samples (GB/s) to `ceil`, keeping their maximum as memory_bw_GBps: on this
    VM a sample reads anywhere from 36 to 82 GB/s, and a ceiling below what decode then reads would make a
    share above 100 %."""
    ceil["memory_bw_samples_GBps"].extend(samples)
    ceil["memory_bw_GBps"] = max(ceil["memory_bw_samples_GBps"])
    ceil["at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kvstrata beside llama.cpp and transformers, same workloads, one run")
    ap.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    ap.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                    help=f"comma-separated parts to run, of {','.join(PARTS)} (others keep earlier results)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-kvstrata", action="store_true", help="peers only (the kvstrata parts keep earlier results)")
    ap.add_argument("--kvstrata-quant", default=None,
                    help=f"kvstrata --quantization (default {kvstrata_side.KVSTRATA_ENGINE.get('quantization')})")
    ap.add_argument("--kvstrata-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="another kvstrata EngineConfig setting for every kvstrata part, e.g. max_num_batched_tokens=4096")
    ap.add_argument("--tau-control", action="store_true", help="also replay tau-bench with --cache-ram 0")
    ap.add_argument("--tool-wait", type=float, default=None, help="seconds per tool call in the tau replay")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="seconds to wait for an idle machine per part")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        parts = [p for p in args.parts.split(",") if p]
        parts += ["tau_no_cache_ram"] if args.tau_control else []
        parts = [p for p in parts if not (args.skip_transformers and p == "transformers")]
        parts = [p for p in parts if not (args.skip_kvstrata and p in KVSTRATA_PARTS)]
        engine = dict(kvstrata_side.parse_opt(o) for o in args.kvstrata_opt)
        if args.kvstrata_quant:
            engine["quantization"] = args.kvstrata_quant
        res = run(quick=args.quick, parts=tuple(parts), out_dir=args.out, tool_wait_s=args.tool_wait,
                  quiet_wait_s=args.quiet_wait, kvstrata_engine=engine)
    except (KvstrataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

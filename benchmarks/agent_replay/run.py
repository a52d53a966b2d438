"""`python -m benchmarks.agent_replay`: the Claude Code replay against kvstrata and llama-server, same run.

    python -m benchmarks.agent_replay                  # 32 sessions, 16 at once, three peers (~1 h at most)
    python -m benchmarks.agent_replay --quick          # smoke form: 4 short sessions, a few minutes
    python -m benchmarks.agent_replay --trace mooncake --sessions 200 --peers kvstrata-tiers
    python -m benchmarks.agent_replay --url http://127.0.0.1:8000 --sessions 4   # any running server

Writes benchmarks/results/agent_replay.{json,md,png} (``--quick``: agent_replay_quick.*, labelled a smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from benchmarks.agent_replay import client, peers, report, traces
from benchmarks.agent_replay.prompts import PromptBuilder
from benchmarks.peers.common import cache_dir, cpu_pressure, default_gguf, peers_available, wait_for_quiet
from benchmarks.peers.kvstrata_side import engine_settings, kv_pool_bytes, parse_opt
from benchmarks.peers.kvstrata_side import versions as kvstrata_versions
from benchmarks.peers.llamacpp import versions as llamacpp_versions
from benchmarks.peers.run_peers import machine
from kvstrata.core import KvstrataError

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parents[1] / "results"
TOKEN_SCALE = {"claude-code": 1 / 16, "mooncake": 1 / 16, "tau-bench": 1.0}
QUICK = dict(sessions=4, concurrency=4, max_requests=6, max_wall_s=300.0, time_scale=0.002, device_tokens=8192)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="claude-code", help=f"one of {traces.FORMATS} or a path")
    ap.add_argument("--files", default=None, help="claude-code: comma-separated trace names (default: file order)")
    ap.add_argument("--sessions", type=int, default=32, help="top-level sessions replayed")
    ap.add_argument("--concurrency", type=int, default=16, help="top-level sessions running at once")
    ap.add_argument("--time-scale", type=float, default=0.01, help="real seconds per traced second of waiting")
    ap.add_argument("--token-scale", type=float, default=None, help="default 1/16 (claude-code, mooncake), 1 (tau)")
    ap.add_argument("--max-think-s", type=float, default=300.0, help="traced waits longer than this are cut to it")
    ap.add_argument("--session-gap-s", type=float, default=30.0, help="claude-code: traced gap between arrivals")
    ap.add_argument("--max-requests", type=int, default=None, help="keep the first N requests of each session")
    ap.add_argument("--max-wall-s", type=float, default=1200.0, help="per peer; unfinished sessions are cancelled")
    ap.add_argument("--peers", default=",".join(peers.DEFAULT_PEERS), help=f"of {peers.PEERS}")
    ap.add_argument("--device-tokens", type=int, default=32768, help="device KV budget of every peer, tokens")
    ap.add_argument("--host-mib", type=int, default=1024, help="kvstrata host tier = llama-server --cache-ram")
    ap.add_argument("--disk-gib", type=int, default=8, help="kvstrata disk tier")
    ap.add_argument("--llama-slots", type=int, default=None, help="llama-server -np (default device / context)")
    ap.add_argument("--kvstrata-max-seqs", type=int, default=None, help="default: --concurrency")
    ap.add_argument("--kvstrata-opt", action="append", default=[], metavar="KEY=VALUE", help="EngineConfig override")
    ap.add_argument("--url", default=None, help="replay against this running server only (peer 'external')")
    ap.add_argument("--quick", action="store_true", help=f"smoke form: {QUICK}")
    ap.add_argument("--quiet-wait-s", type=float, default=60.0, help="wait up to this for a quiet CPU per peer")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None, help="result file stem (default agent_replay, agent_replay_quick)")
    a = ap.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            if getattr(a, k) == ap.get_default(k):
                setattr(a, k, v)
    a.name = a.name or ("agent_replay_quick" if a.quick else "agent_replay")
    return a


def portable(text: str) -> str:
    """Result files name no machine's paths: the checkout becomes `.`, the home `~`, the temp folder `$TMPDIR`."""
    root = str(Path(__file__).resolve().parents[2])
    for path, short in ((root, "."), (tempfile.gettempdir(), "$TMPDIR"), (str(Path.home()), "~")):
        text = text.replace(path + "/", short + "/")
    return text


def model_facts() -> tuple[int, int]:
    """(vocab, context) of the default model's GGUF, the one every peer serves."""
    from kvstrata.planner.modelspec import ModelSpec

    spec = ModelSpec.from_gguf(default_gguf())
    return spec.vocab, spec.max_context or 8192


def working_set_peak(records: list[dict]) -> int:
    """Peak over the run of the tokens (latest prompt + output) of every (sub-)session still running."""
    last: dict[str, float] = {}
    for r in records:
        last[r["session"]] = max(last.get(r["session"], 0.0), r["sent_s"] + (r["latency_s"] or 0.0))
    events = [(r["sent_s"], 1, r["session"], r["prompt_tokens"] + r["max_tokens"]) for r in records]
    events += [(t, 0, s, 0) for s, t in last.items()]
    size: dict[str, int] = {}
    peak = 0
    for _, kind, s, n in sorted(events):
        if kind:
            size[s] = n
        else:
            size.pop(s, None)
        peak = max(peak, sum(size.values()))
    return peak


def replay_peer(peer: str, a: argparse.Namespace, budget: peers.Budget, sessions, builder, settings,
                overrides: dict) -> dict:
    """Start `peer` (or use --url), warm it up, replay, read its metrics and RSS, stop it; the peer's record."""
    pressure = wait_for_quiet(a.quiet_wait_s) if a.quiet_wait_s else cpu_pressure()
    out: dict = {"peer": peer, "cpu_pressure_before": pressure, "started_at": time.strftime("%H:%M:%S", time.gmtime())}
    if peer == "external":
        run = client.replay(a.url, sessions, builder, settings)
        out |= {"url": a.url, "server_metrics": peers.server_metrics(a.url)}
    else:
        with peers.serve(peer, budget, cache_dir() / "logs" / "runs", overrides) as srv:
            client.warmup(srv.url, settings.model)
            run = client.replay(srv.url, sessions, builder, settings)
            out |= {"command": srv.command, "config": srv.config, "peak_rss_bytes": peers.peak_rss_bytes(srv.pid),
                    "server_metrics": peers.server_metrics(srv.url)}
    return out | {"summary": report.summarize(run, sessions), "cpu_pressure_after": cpu_pressure(),
                  "working_set_peak_tokens": working_set_peak(run["records"]), "records": run["records"]}


def goals(results: list[dict]) -> list[str]:
    """Issue 14's speed goals from this run: reached / not reached / not measured."""
    by = {r["peer"]: r["summary"] for r in results if "summary" in r}
    k = by.get("kvstrata-tiers")

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("**reached**" if ok else "**not reached**")

    def sph(s: dict) -> float:
        return s["sessions_per_hour"] or 0.0

    def p99(s: dict) -> float | None:
        return s["ttft_resumed_ms"]["p99"]

    lines = []
    for base, want in (("llama-server", "at an equal or lower resumed-turn p99 TTFT"), ("kvstrata-recompute", "")):
        b = by.get(base)
        if not (k and b):
            lines.append(f"- kvstrata-tiers >= 3x the sessions per hour of {base} {want}: not measured")
            continue
        failed = k["requests_failed"] or b["requests_failed"]
        ratio = sph(k) / sph(b) if sph(b) else None
        b_eq = b["session_equivalents_per_hour"]
        eq = k["session_equivalents_per_hour"] / b_eq if b_eq else None
        ok = None if ratio is None and eq is None else (ratio or eq) >= 3 and not failed
        if want and ok and p99(k) is not None and p99(b) is not None:
            ok = p99(k) <= p99(b)
        shown = f"{ratio:.2f}x" if ratio is not None else (f"{eq:.2f}x in session-equivalents" if eq else "-")
        lines.append(f"- kvstrata-tiers >= 3x the sessions per hour of {base} {want}: {shown} "
                     f"(p99 resumed TTFT {p99(k)} vs {p99(b)} ms): {verdict(ok)}")
    lines.append("- resumed turns within 1.2x of computing only their new tokens with the prefix in device memory: "
                 "not measured by this replay")
    return lines


def markdown(meta: dict, results: list[dict]) -> str:
    a = meta["args"]
    smoke = "**SMOKE RUN (`--quick`): a few short sessions to prove the replay works; no speed conclusion.**\n\n" \
        if a["quick"] else ""
    b = meta["budget"]
    ws = max((r.get("working_set_peak_tokens") or 0 for r in results), default=0)
    lines = [
        f"# Agent replay: {a['trace']} traces against kvstrata and llama-server\n", smoke,
        f"Run {meta['when']} at commit {meta['versions'].get('commit')} on {meta['machine']}. "
        f"Command: `{meta['command']}`.\n",
        f"Workload: {meta['n_sessions']} sessions ({meta['n_subagents']} sub-agents, {meta['n_requests']} requests), "
        f"{a['concurrency']} at once; token counts and block size scaled by {meta['token_scale']:.4g} (a "
        f"{meta['block_tokens']}-token block becomes {meta['scaled_block']} tokens), outputs forced to their scaled "
        f"length (`ignore_eos`); waits scaled by {a['time_scale']:g}, each cut to {a['max_think_s']:g} traced s; "
        f"prompts sent as token ids to `/v1/completions`, streamed; at most {a['max_wall_s']:g} s per peer.\n",
        f"Memory budget of every peer: device KV {b['device_tokens']:,} tokens ({meta['device_mib']:,} MiB of fp16 "
        f"KV); "
        f"peak working set of the running sessions {ws:,} tokens ({ws / b['device_tokens']:.1f}x the device budget); "
        f"host {b['host_mib']:,} MiB (kvstrata host tier, llama-server `--cache-ram`); kvstrata disk tier "
        f"{b['disk_gib']} GiB. "
        f"llama-server {b['slots']} slots (`-np`), kvstrata `max_num_seqs` {b['kvstrata_max_seqs']}.\n",
        report.peer_table(results, "llama-server" if any(r["peer"] == "llama-server" and "summary" in r
                                                         for r in results) else None),
        "\nSessions per hour: sessions whose every request (sub-agents included) was answered, over the wall time. "
        "Session-equivalents: each session's share of answered requests. Cache: prompt tokens the server reports it "
        "reused (kvstrata `usage.prompt_tokens_details.cached_tokens_by_tier`; llama-server `timings.cache_n`, "
        "no tier), "
        "as a share of the prompt tokens and of the shareable ones (each prompt's common prefix with its session's "
        "previous prompt). "
        "Recomputed: prompt tokens sent minus reused. Decode: per request, tokens after the first over the time after "
        "the first (median), and all generated tokens over the wall time. Peak RSS: the server process's VmHWM.\n",
        "## Goals (issue 14)\n", *goals(results), "",
        "## Peers\n",
    ]
    for r in results:
        cmd = r.get("command") or r.get("url") or r.get("skipped") or r.get("error")
        lines.append(f"- **{r['peer']}** (started {r.get('started_at', '-')} UTC; CPU pressure before "
                     f"{r.get('cpu_pressure_before')}, after {r.get('cpu_pressure_after')}): `{cmd}`")
        if r["peer"].startswith("kvstrata") and r.get("server_metrics"):
            lines.append(f"  - server: {report.server_notes(r['server_metrics'])}")
    lines.append("\nConfiguration choices and why: `benchmarks/agent_replay/peers.py`; per-request records, server "
                 f"metrics (tiers, placement decisions) and versions in `{a['name']}.json`.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # SIGTERM (a timeout, a killed make bench) unwinds like Ctrl-C, so the server being measured is stopped too
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, before)


def _main(argv) -> int:
    a = parse_args(argv)
    fmt, _ = traces.resolve(a.trace)
    scale = a.token_scale or TOKEN_SCALE[fmt]
    sessions = traces.load(a.trace, a.sessions, session_gap_s=a.session_gap_s, max_requests=a.max_requests,
                           files=a.files.split(",") if a.files else None)
    vocab, context = model_facts()
    builder = PromptBuilder(vocab, scale, context=context)
    budget = peers.Budget(device_tokens=a.device_tokens, host_mib=a.host_mib, disk_gib=a.disk_gib, context=context,
                          kvstrata_max_seqs=a.kvstrata_max_seqs or a.concurrency, llama_slots=a.llama_slots)
    settings = client.Settings(concurrency=a.concurrency, time_scale=a.time_scale, max_think_s=a.max_think_s,
                               max_wall_s=a.max_wall_s)
    overrides = dict(parse_opt(o) for o in a.kvstrata_opt)
    names = ["external"] if a.url else [p.strip() for p in a.peers.split(",") if p.strip()]
    results = []
    for peer in names:
        logger.info("== %s", peer)
        if peer == "llama-server" and not (ok := peers_available())[0]:
            results.append({"peer": peer, "skipped": f"llama.cpp peer not built; run `make bench-peers` ({ok[1]})"})
            continue
        try:
            results.append(replay_peer(peer, a, budget, sessions, builder, settings, overrides))
        except (KvstrataError, OSError, RuntimeError, httpx.HTTPError) as exc:  # the peer failed; the others still run
            logger.exception("%s failed", peer)
            results.append({"peer": peer, "error": f"{type(exc).__name__}: {exc}"[:500]})
        if "summary" in results[-1]:
            logger.info("%s: %s", peer, json.dumps({k: v for k, v in results[-1]["summary"].items() if k != "errors"}))
    versions = kvstrata_versions()
    if peers_available()[0]:
        versions["llama.cpp"] = llamacpp_versions()
    first = sessions[0] if sessions else None
    meta = {"args": vars(a), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": versions,
            "machine": machine(), "command": shlex.join(["python", "-m", "benchmarks.agent_replay",
                                                          *(sys.argv[1:] if argv is None else argv)]),
            "budget": asdict(budget) | {"slots": budget.slots}, "token_scale": scale,
            "block_tokens": first.block_tokens if first else None,
            "scaled_block": builder.block_len(first) if first else None,
            "device_mib": round(kv_pool_bytes(budget.device_tokens, engine_settings()) / 2**20),
            "n_sessions": len(sessions), "n_requests": sum(s.all_requests() for s in sessions),
            "n_subagents": sum(len(r.subagents) for s in sessions for r in s.requests),
            "sessions": [s.id for s in sessions]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = portable(markdown(meta, results))
    (out / f"{a.name}.md").write_text(md)
    (out / f"{a.name}.json").write_text(portable(json.dumps({"meta": meta, "results": results}, indent=1, default=str)))
    report.plot(results, out / f"{a.name}.png", f"{a.trace}: {len(sessions)} sessions, {a.concurrency} at once"
                + (" (smoke run)" if a.quick else ""))
    print(md)
    return 0 if all("summary" in r or "skipped" in r for r in results) else 1

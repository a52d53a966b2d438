"""`kvstrata plan`: predict where bytes live, speed and cost of a model and workload across hardware.

    kvstrata plan list [--json]                      hardware, models, workloads by name
    kvstrata plan --model M --hardware H --workload W [--json]   two deployments per hardware
    kvstrata plan compare --model M --workload W [--hardware a,b | all]
    kvstrata plan cluster --model M --sessions N --workload answer,claude-code [--out-dir DIR]
    kvstrata plan calibrate [--quick] [--out PATH] [--disk-dir DIR] [--redis-url URL]
    kvstrata plan --hardware this [--results benchmarks/results]   this machine; against the engine's benchmarks
    kvstrata plan plot --model M --workload W --hardware a,b --out-dir DIR
    kvstrata plan validate [--json]                  predictions against published measurements
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

VERBS = ("plan", "list", "compare", "cluster", "calibrate", "plot", "validate")
CLUSTER_HARDWARE = "cerebras-wse3,groq-lpu,h100-sxm,h200,b200,mi300x,epyc-9554"
DEFAULT_COMPARE = "cerebras-wse3,groq-lpu,sambanova-sn40l,h100-sxm,h200,b200,gb200-nvl72,mi300x,mi355x,tpu-v5e,tpu-v6e,tpu-v7,epyc-9554,grace"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("verb", nargs="?", default="plan", choices=VERBS,
                   help="list | compare | cluster | calibrate | plot | validate; omit for a plain plan")
    p.add_argument("--model", default="default", help="built-in name, config.json, model directory or .gguf (default: SmolLM2-135M GGUF)")
    p.add_argument("--hardware", default=None, help="comma-separated hardware names, 'all', or 'this' (calibrated machine)")
    p.add_argument("--workload", default=None,
                   help="answer | agentic | claude-code | mooncake | azure-conv | azure-code | tau-bench | bfcl (default "
                        "answer; cluster: answer,claude-code, comma-separated)")
    p.add_argument("--sessions", type=int, default=None, help="override: concurrent sessions (cluster: default 1000)")
    p.add_argument("--context", type=int, default=None, help="override: tokens already cached per session")
    p.add_argument("--prompt", type=int, default=None, help="override: new prompt tokens per turn")
    p.add_argument("--output", type=int, default=None, help="override: output tokens per turn")
    p.add_argument("--tool-wait", type=float, default=None, help="override: seconds a session waits between turns")
    p.add_argument("--devices", type=int, default=None, help="fix the device count (default: searched)")
    p.add_argument("--limit", type=int, default=None,
                   help="most devices the fastest / cheapest deployment may use (default: the unit the vendor sells)")
    p.add_argument("--max-devices", type=int, default=4096)
    p.add_argument("--min-tps", type=float, default=None,
                   help="cluster: tokens/s every active session must keep (default 20 for answer, 5 for agent work)")
    p.add_argument("--dtype", default=None, help="weight dtype: bf16, fp8, int4, q4_0, native ... (default per hardware)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default per hardware)")
    p.add_argument("--spec-tokens", type=float, default=1.0,
                   help="speculative decoding: mean tokens accepted per step (1 = off)")
    p.add_argument("--spec-draft", type=int, default=0, help="speculative decoding: draft tokens verified per step")
    p.add_argument("--catalog", action="append", default=[], help="extra hardware catalog JSON (same format)")
    p.add_argument("--profile", default=None, help="calibration profile to read (default $KVSTRATA_HOME/calibration.json)")
    p.add_argument("--results", default=None, help="--hardware this: benchmark results folder to check the planner against")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    # calibrate
    p.add_argument("--quick", action="store_true", help="calibrate: small buffers, a few seconds")
    p.add_argument("--out", default=None, help="calibrate: where to save the profile")
    p.add_argument("--disk-dir", default=None, help="calibrate: directory whose disk to measure")
    p.add_argument("--redis-url", default=None, help="calibrate: also measure Redis round trip")
    # plot
    p.add_argument("--out-dir", default=None, help="plot / cluster: output directory (plot default: plan-plots)")


def run(args: argparse.Namespace) -> int:
    return {"plan": _plan, "list": _list, "compare": _compare, "cluster": _cluster, "calibrate": _calibrate,
            "plot": _plot, "validate": _validate}[args.verb](args)


# ---- helpers --------------------------------------------------------------------------------
def _catalog(args):
    from kvstrata.planner.calibration import load_profile
    from kvstrata.planner.catalog import THIS_MACHINE, load_catalog, this_machine

    hw, tiers = load_catalog(args.catalog)
    prof = load_profile(args.profile)
    if prof is not None:
        hw[THIS_MACHINE] = this_machine(prof)
    return hw, tiers


def _inputs(args, default_hw: str):
    from kvstrata.planner.catalog import resolve_hardware
    from kvstrata.planner.modelspec import resolve_model
    from kvstrata.planner.perf import PlanOptions
    from kvstrata.planner.workloads import get_workload

    cat, _ = _catalog(args)
    hardware = resolve_hardware(args.hardware or default_hw, cat)
    model = resolve_model(args.model)
    wl = get_workload(args.workload or "answer").with_overrides(
        sessions=args.sessions, context_tokens=args.context, prompt_tokens=args.prompt,
        output_tokens=args.output, tool_wait_s=args.tool_wait)
    if args.devices is not None and args.devices < 1:
        raise KvstrataError("--devices must be >= 1")
    if args.spec_tokens < 1 or args.spec_draft < 0 or (args.spec_tokens > 1 + args.spec_draft):
        raise KvstrataError("speculative decoding needs 1 <= --spec-tokens <= 1 + --spec-draft")
    opts = PlanOptions(weight_dtype=args.dtype, kv_dtype=args.kv_dtype, devices=args.devices,
                       max_devices=args.max_devices, spec_tokens_per_step=args.spec_tokens,
                       spec_draft_tokens=args.spec_draft)
    return model, hardware, wl, opts


def _fmt(v: Any, spec: str = ",.1f") -> str:
    return "-" if v is None else format(v, spec)


def _table(title: str, results, role: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    cols = (["hardware", "deployment"] if role else ["hardware"]) + ["devices", "dtype", "fits", "TTFT s", "tok/s/user",
                                                                    "tok/s total", "$/M tok", "$/task", "bound", "KV: device / below"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("hardware", "deployment", "dtype", "fits", "bound") else "right")
    for r in results:
        below = sum(p.sessions for p in r.placement[1:])
        row = [r.hardware] + ([r.role + (" + spec" if r.spec else "")] if role else [])
        row += [f"{r.devices or '-'} {r.unit}", r.weight_dtype, "yes" if r.fits else f"NO: {r.reason}",
                _fmt(r.ttft_s, ".3f"), _fmt(r.tokens_per_s_per_user), _fmt(r.tokens_per_s_aggregate, ",.0f"),
                _fmt(r.usd_per_million_tokens, ",.3f"), _fmt(r.usd_per_task, ",.4f"), r.bound,
                f"{r.placement[0].sessions if r.placement else 0} / {below}" if r.fits else "-"]
        t.add_row(*row)
    Console(width=180).print(t)


def _deployments(args, default_hw: str):
    from kvstrata.planner.deploy import deployments, ordered

    model, hardware, wl, opts = _inputs(args, default_hw)
    return model, wl, [ordered(deployments(model, hw, wl, opts, args.limit), wl) for hw in hardware]


def _pair_json(pair) -> dict:
    first = pair[0].to_dict()
    return {**first, "deployments": [r.to_dict() for r in pair]}


# ---- verbs ----------------------------------------------------------------------------------
def _plan(args) -> int:
    if args.hardware is None:
        raise KvstrataError("give --hardware NAME[,NAME] (see `kvstrata plan list`), or use `kvstrata plan compare`")
    model, wl, pairs = _deployments(args, args.hardware)
    if args.json:
        print(json.dumps([_pair_json(p) for p in pairs], indent=2))
    else:
        first = "fastest per user first (answer)" if pairs and pairs[0][0].role == "fastest" else "cheapest per task first"
        _table(f"{model.name} | {wl.name}: {wl.sessions} sessions, {wl.context_tokens}+{wl.prompt_tokens} in, "
               f"{wl.output_tokens} out, tool wait {wl.tool_wait_s:g}s | {first}", [r for p in pairs for r in p], role=True)
        for p in pairs:
            print(f"{p[0].hardware}: searched within {p[0].limit}" + (f"; fastest uses {p[1].spec or p[0].spec}"
                                                                       if (p[0].spec or p[1].spec) else ""))
    if args.hardware == "this" and args.results:
        _this_engine(model, args.results, args.json)
    return 0


def _this_engine(model, results_dir: str, as_json: bool) -> None:
    from kvstrata.planner.this_engine import checks, load_results, markdown

    rows, skipped = checks(load_results(results_dir), model)
    if as_json:
        print(json.dumps({"checks": [{**c.__dict__, "error": c.error} for c in rows], "skipped": skipped}, indent=2))
    else:
        print(f"\nthe engine's benchmarks in {results_dir} against the planner:\n" + markdown(rows, skipped))


def _compare(args) -> int:
    model, wl, pairs = _deployments(args, DEFAULT_COMPARE)
    fastest = sorted((max(p, key=lambda r: r.tokens_per_s_per_user or 0) for p in pairs),
                     key=lambda r: (not r.fits, -(r.tokens_per_s_per_user or 0)))
    if args.json:
        print(json.dumps([r.to_dict() for r in fastest], indent=2))
        return 0
    _table(f"compare: {model.name} | {wl.name} (the fastest deployment of each, within its vendor's unit)", fastest)
    return 0


def _cluster(args) -> int:
    from kvstrata.planner import plots
    from kvstrata.planner.catalog import resolve_hardware
    from kvstrata.planner.cluster import cluster_plan, markdown_table
    from kvstrata.planner.modelspec import resolve_model
    from kvstrata.planner.perf import PlanOptions
    from kvstrata.planner.workloads import get_workload

    cat, _ = _catalog(args)
    hardware = resolve_hardware(args.hardware or CLUSTER_HARDWARE, cat)
    model = resolve_model(args.model if args.model != "default" else "llama-3.1-70b")
    n = args.sessions or 1000
    if n < 1:
        raise KvstrataError("--sessions must be >= 1")
    opts = PlanOptions(weight_dtype=args.dtype, kv_dtype=args.kv_dtype, devices=args.devices)
    plans = []
    for name in (args.workload or "answer,claude-code").split(","):
        wl = get_workload(name.strip()).with_overrides(context_tokens=args.context, prompt_tokens=args.prompt,
                                                       output_tokens=args.output, tool_wait_s=args.tool_wait)
        min_tps = args.min_tps if args.min_tps is not None else (20.0 if wl.tool_wait_s == 0 and wl.turns == 1 else 5.0)
        plans += [cluster_plan(model, hw, wl, n, opts, min_tps) for hw in hardware]
    if args.json:
        print(json.dumps([c.to_dict() for c in plans], indent=2, default=str))
    else:
        print(markdown_table(plans))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"cluster_{model.name}"
        (out / f"{stem}.md").write_text(
            f"# Cluster plans: {model.name}, {n:,} concurrent sessions\n\n"
            f"Command: `kvstrata plan cluster --model {model.name} --sessions {n} --workload "
            f"{args.workload or 'answer,claude-code'} --out-dir {args.out_dir}`\n\n{markdown_table(plans)}\n")
        for p in plots.plot_cluster_comparison(plans, out, stem) + [out / f"{stem}.md"]:
            print(p)
    return 0


def _list(args) -> int:
    from kvstrata.planner.catalog import essay_ratios
    from kvstrata.planner.modelspec import builtin_models
    from kvstrata.planner.workloads import BUILTIN, trace_profiles

    hw, tiers = _catalog(args)
    models = builtin_models()
    data = {
        "hardware": {n: {"title": h.title, "unit": h.unit, "memory_GB": h.capacity_GB, "bandwidth_GBps": h.bandwidth_GBps,
                         "usd_per_hour": h.usd_per_hour} for n, h in hw.items()},
        "tiers": {n: {"title": t["title"], "bandwidth_GBps": t["bandwidth_GBps"], "capacity_GB": t.get("capacity_GB")}
                  for n, t in tiers.items()},
        "models": {n: {"params": m.params, "active_params": m.active_params, "kv_bytes_per_token_bf16": m.kv_bytes_per_token(2)}
                   for n, m in models.items()},
        "workloads": {n: w.description for n, w in {**BUILTIN, **trace_profiles()}.items()},
        "essay": essay_ratios(hw),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console(width=160)
    t = Table(title="hardware (per device)")
    for c in ("name", "title", "memory GB", "GB/s", "$/hour"):
        t.add_column(c)
    for n, h in hw.items():
        t.add_row(n, h.title, f"{h.capacity_GB:g}", f"{h.bandwidth_GBps:,.0f}", _fmt(h.usd_per_hour, ".2f"))
    con.print(t)
    t = Table(title="memory and I/O tiers")
    for c in ("name", "title", "GB/s"):
        t.add_column(c)
    for n, d in tiers.items():
        t.add_row(n, d["title"], f"{d['bandwidth_GBps']:g}")
    con.print(t)
    t = Table(title="models")
    for c in ("name", "params (B)", "active (B)", "KV KB/token bf16"):
        t.add_column(c)
    for n, m in models.items():
        t.add_row(n, f"{m.params / 1e9:.2f}", f"{m.active_params / 1e9:.2f}", f"{m.kv_bytes_per_token(2) / 1024:.1f}")
    con.print(t)
    con.print("workloads: " + ", ".join(data["workloads"]))
    e = data["essay"]
    con.print(f"WSE-3 / H100: bandwidth x{e['bandwidth_ratio']:,.0f}, capacity x{e['capacity_ratio']:.2f}")
    return 0


def _calibrate(args) -> int:
    from kvstrata.planner.calibration import calibrate, save_profile

    prof = calibrate(quick=args.quick, disk_dir=args.disk_dir, redis_url=args.redis_url)
    path = save_profile(prof, args.out)
    if args.json:
        print(json.dumps({"path": str(path), **prof.to_dict()}, indent=2))
    else:
        print(f"memory read {prof.memory_bw_GBps:.1f} GB/s, copy {prof.host_copy_GBps:.1f} GB/s, "
              f"matmul fp32 {prof.matmul_fp32_GFLOPs:.1f} GFLOP/s ({prof.matmul_backend}), "
              f"disk read {prof.disk_read_GBps:.2f} / write {prof.disk_write_GBps:.2f} GB/s"
              + (f", redis rtt {prof.redis_rtt_ms:.3f} ms" if prof.redis_rtt_ms is not None else ""))
        print(f"saved {path}")
    return 0


def _plot(args) -> int:
    from kvstrata.planner import plots
    from kvstrata.planner.perf import plan

    model, hardware, wl, opts = _inputs(args, "cerebras-wse3,h100-sxm,h200,b200,mi355x,epyc-9554")
    out = Path(args.out_dir or "plan-plots")
    paths = plots.plot_context_sweep(model, hardware, wl, opts, out)
    paths += plots.plot_cost_vs_concurrency(model, hardware, wl, opts, out)
    paths += plots.plot_placement([plan(model, hw, wl, opts) for hw in hardware], out)
    for p in paths:
        print(p)
    return 0


def _validate(args) -> int:
    from kvstrata.planner.validation import markdown_table, run_validation, summary, summary_line

    rows = run_validation(_catalog(args)[0])
    if args.json:
        print(json.dumps({"rows": [{**r.__dict__, "error": r.error} for r in rows], "summary": summary(rows)}, indent=2))
    else:
        print(markdown_table(rows))
        print(summary_line(summary(rows)))
    return 0

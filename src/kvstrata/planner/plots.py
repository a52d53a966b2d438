"""Planner plots (PNG and SVG): the SRAM cliff, cost against concurrency, where the bytes live.

matplotlib is imported inside each function with the Agg backend, so importing this module is cheap
and no display is needed.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kvstrata.planner.catalog import HardwareSpec
from kvstrata.planner.modelspec import ModelSpec
from kvstrata.planner.perf import PlanOptions, PlanResult, plan
from kvstrata.planner.workloads import Workload

if TYPE_CHECKING:
    from kvstrata.planner.cluster import ClusterPlan

log = logging.getLogger(__name__)

CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return paths


def weights_only_devices(model: ModelSpec, hw: HardwareSpec, wl: Workload, opts: PlanOptions) -> int | None:
    """Devices the planner picks for one short session: the machine held fixed while context grows."""
    small = replace(wl, sessions=1, context_tokens=0, prompt_tokens=min(wl.prompt_tokens, 512), output_tokens=1, tool_wait_s=0)
    return plan(model, hw, small, replace(opts, devices=None)).devices


def context_sweep(model: ModelSpec, hardware: Sequence[HardwareSpec], wl: Workload, opts: PlanOptions,
                  contexts: Sequence[int] = CONTEXTS) -> dict[str, list[PlanResult]]:
    """Per machine (device count fixed at what the weights need), one plan per context length."""
    out = {}
    for hw in hardware:
        n = opts.devices or weights_only_devices(model, hw, wl, opts)
        rows = []
        for c in contexts:
            w = replace(wl, context_tokens=c, prompt_tokens=min(wl.prompt_tokens, c), tool_wait_s=0.0)
            rows.append(plan(model, hw, w, replace(opts, devices=n)))
        out[hw.name] = rows
    return out


def plot_context_sweep(model, hardware, wl, opts, out_dir: Path, contexts: Sequence[int] = CONTEXTS) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in context_sweep(model, hardware, wl, opts, contexts).items():
        xs = [c for c, r in zip(contexts, rows) if r.fits]
        ys = [r.tokens_per_s_per_user for r in rows if r.fits]
        n = rows[0].devices
        ax.plot(xs, ys, marker="o", label=f"{name} ({n} x {rows[0].unit})")
    ax.set(xscale="log", yscale="log", xlabel="context tokens per session",
           ylabel="tokens/s per user", title=f"{model.name}, {wl.sessions} session(s): speed against context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "context_sweep")


def plot_cost_vs_concurrency(model, hardware, wl, opts, out_dir: Path,
                             concurrency: Sequence[int] = CONCURRENCY) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for hw in hardware:
        pts = [(s, r.usd_per_million_tokens) for s in concurrency
               for r in [plan(model, hw, replace(wl, sessions=s), opts)] if r.fits and r.usd_per_million_tokens]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=hw.name)
    ax.set(xscale="log", yscale="log", xlabel="concurrent sessions", ylabel="USD per million output tokens",
           title=f"{model.name}, {wl.name}: cost against concurrency (machines with a published price)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "cost_vs_concurrency")


def plot_placement(results: Sequence[PlanResult], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [r.hardware for r in results]
    bottoms = [0.0] * len(results)
    weights = [r.weights_GB if r.fits else 0.0 for r in results]
    ax.bar(names, weights, label="weights (device memory)")
    bottoms = weights[:]
    tiers = ["device"] + ["spill 1", "spill 2", "spill 3"]
    for level, label in enumerate(tiers):
        kv = [(r.placement[level].kv_GB if r.fits and level < len(r.placement) else 0.0) for r in results]
        if any(kv):
            ax.bar(names, kv, bottom=bottoms, label=f"KV in {label}")
            bottoms = [b + k for b, k in zip(bottoms, kv)]
    ax.set(ylabel="GB", title="where the bytes live")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "placement")


def plot_cluster_comparison(plans: Sequence["ClusterPlan"], out_dir: Path, stem: str = "cluster_comparison") -> list[Path]:
    """Side by side per workload: cost per finished session (log scale) and tokens/s per user."""
    plt = _pyplot()
    workloads = list(dict.fromkeys(c.workload for c in plans))
    hardware = list(dict.fromkeys(c.hardware for c in plans))
    fig, axes = plt.subplots(2, len(workloads), figsize=(5.5 * len(workloads), 7), squeeze=False)
    for j, w in enumerate(workloads):
        by_hw = {c.hardware: c for c in plans if c.workload == w}
        xs = range(len(hardware))
        cost = [by_hw[h].usd_per_session if h in by_hw and by_hw[h].fits and by_hw[h].usd_per_session else 0 for h in hardware]
        speed = [by_hw[h].tokens_per_s_per_user or 0 if h in by_hw and by_hw[h].fits else 0 for h in hardware]
        ax = axes[0][j]
        ax.bar(xs, cost, color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(f"{w}: $ per finished session")
        ax = axes[1][j]
        ax.bar(xs, speed, color="tab:orange")
        ax.set_title(f"{w}: tokens/s per user")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(list(xs))
            ax.set_xticklabels(hardware, rotation=35, ha="right", fontsize=8)
            for x, h in zip(xs, hardware):
                if h not in by_hw or not by_hw[h].fits:
                    ax.text(x, ax.get_ylim()[0], "does not fit", rotation=90, fontsize=7, ha="center", va="bottom")
    n = plans[0].sessions if plans else 0
    fig.suptitle(f"{plans[0].model if plans else ''}: {n:,} concurrent sessions, cheapest cluster of each hardware "
                 "(SRAM wafer / LPU, HBM GPUs, CPU + DRAM)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, stem)

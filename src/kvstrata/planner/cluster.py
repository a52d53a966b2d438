"""Cluster plans: N concurrent sessions of a workload on replicas of one kind of hardware.

    cluster_plan(model, hw, workload, sessions, options) -> ClusterPlan

A replica is one deployment (devices laid out as in planner.deploy, up to the vendor's unit) that
carries `sessions_per_replica` sessions; the planner searches device counts, dtypes and sessions per
replica (powers of two up to N) for the lowest device cost per finished session whose every active
session still decodes at `min_tokens_per_s` or more. From that replica:

- replicas = ceil(N / sessions per replica); devices and price per hour follow;
- prefill / decode split: the share of device time prefill takes in the replica (new prompt tokens of
  each turn, after the cached context); with disaggregated serving, that share of the devices would
  be prefill replicas (Splitwise, Patel et al. ISCA 2024; DistServe, Zhong et al. OSDI 2024);
- host memory: the KV the plan places below device memory in host DRAM, over all replicas;
- SSD: every session's KV at its peak context, written behind each turn so a crash or a long pause
  costs a reload, not a recompute (the engine's write-behind rule, docs/architecture.md);
- shared store: every session's KV in the cold tier's int8 codec (1 byte a value), so any replica
  can resume any session (Ray Serve routing, ../shared/docs/ARCHITECTURE.md "Scale-out");
- cost per finished session = price per hour / finished sessions per hour; per million output
  tokens, and per million processed tokens (new prompt + output; cached context is not processed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

from kvstrata.planner.catalog import HardwareSpec
from kvstrata.planner.deploy import device_counts
from kvstrata.planner.modelspec import ModelSpec
from kvstrata.planner.perf import PlanOptions, PlanResult, plan
from kvstrata.planner.workloads import Workload

GB = 1e9
COLD_BYTES_PER_VALUE = 1.0  # the int8 cold codec (kvstrata.tiers.codec)


@dataclass
class ClusterPlan:
    hardware: str
    model: str
    workload: str
    sessions: int
    fits: bool
    reason: str = ""
    unit: str = ""
    weight_dtype: str = ""
    devices_per_replica: int = 0
    sessions_per_replica: int = 0
    replicas: int = 0
    devices: int = 0
    tokens_per_s_per_user: float | None = None
    ttft_s: float | None = None
    session_s: float | None = None
    prefill_share: float = 0.0
    prefill_devices: int = 0
    decode_devices: int = 0
    device_memory_GB: float = 0.0
    host_memory_GB: float = 0.0
    ssd_GB: float = 0.0
    shared_store_GB: float = 0.0
    usd_per_hour: float | None = None
    usd_per_session: float | None = None
    usd_per_million_output_tokens: float | None = None
    usd_per_million_tokens: float | None = None
    replica: PlanResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sessions_grid(n: int) -> list[int]:
    out, s = [], 1
    while s < n:
        out.append(s)
        s *= 2
    return out + [n]


def _replica_candidates(model: ModelSpec, hw: HardwareSpec, wl: Workload, n_sessions: int, opts: PlanOptions,
                        min_tps: float) -> Iterable[PlanResult]:
    dtypes = [opts.weight_dtype] if opts.weight_dtype else list(hw.deployment.get("dtypes") or [hw.default_weight_dtype])
    counts = [opts.devices] if opts.devices else list(device_counts(hw, hw.max_devices))
    for dt in dtypes:
        for n in counts:
            for s in _sessions_grid(n_sessions):
                r = plan(model, hw, replace(wl, sessions=s), replace(opts, weight_dtype=dt, devices=n))
                if not r.fits:
                    break  # more sessions on the same devices will not fit either
                if (r.tokens_per_s_per_user or 0) < min_tps:
                    break  # nor get faster
                yield r


def cluster_plan(model: ModelSpec, hw: HardwareSpec, wl: Workload, sessions: int, opts: PlanOptions = PlanOptions(),
                 min_tokens_per_s: float = 10.0) -> ClusterPlan:
    """The cheapest cluster of `hw` replicas that carries `sessions` concurrent sessions of `wl`."""
    out = ClusterPlan(hw.name, model.name, wl.name, sessions, False, unit=hw.unit)
    cands = list(_replica_candidates(model, hw, wl, sessions, opts, min_tokens_per_s))
    if not cands:
        out.reason = (f"no deployment of up to {hw.deployment_limit} holds even one session at "
                      f">= {min_tokens_per_s:g} tokens/s per user")
        return out

    def cost(r: PlanResult) -> tuple[float, float]:
        reps = math.ceil(sessions / r.sessions)
        usd = (r.usd_per_hour or 0.0) * r.devices * reps
        return (usd * r.session_s / sessions if r.usd_per_hour is not None else float(r.devices * reps),
                -(r.tokens_per_s_per_user or 0.0))

    best = min(cands, key=cost)
    return _describe(out, model, wl, sessions, best)


def _describe(out: ClusterPlan, model: ModelSpec, wl: Workload, sessions: int, r: PlanResult) -> ClusterPlan:
    reps = math.ceil(sessions / r.sessions)
    out.fits, out.replica, out.weight_dtype = True, r, r.weight_dtype
    out.devices_per_replica, out.sessions_per_replica, out.replicas = r.devices, r.sessions, reps
    out.devices = r.devices * reps
    out.tokens_per_s_per_user, out.ttft_s, out.session_s = r.tokens_per_s_per_user, r.ttft_s, r.session_s
    # prefill share of device time: the active batch's turn = decode of its outputs + prefill of its prompts
    decode_time = wl.output_tokens / r.tokens_per_s_per_user
    busy = r.active_sessions * wl.output_tokens / r.tokens_per_s_aggregate  # decode + prefill of one round
    out.prefill_share = max(0.0, min(1.0, 1.0 - decode_time / busy)) if busy > 0 else 0.0
    out.prefill_devices = round(out.devices * out.prefill_share)
    out.decode_devices = out.devices - out.prefill_devices
    out.device_memory_GB = r.placement[0].capacity_GB * reps
    out.host_memory_GB = sum(t.kv_GB for t in r.placement[1:] if "DRAM" in t.tier or "LPDDR" in t.tier
                             or "DDR" in t.tier) * reps
    peak_kv = model.kv_bytes(wl.peak_context, r.kv_dtype)
    out.ssd_GB = sessions * peak_kv / GB
    values = model.kv_bytes(wl.peak_context, 1.0)  # one byte per value
    out.shared_store_GB = sessions * values * COLD_BYTES_PER_VALUE / GB
    if r.usd_per_hour is not None:
        out.usd_per_hour = r.usd_per_hour * out.devices
        sessions_per_hour = sessions * 3600 / r.session_s
        out.usd_per_session = out.usd_per_hour / sessions_per_hour
        out.usd_per_million_output_tokens = out.usd_per_session / (wl.turns * wl.output_tokens) * 1e6
        out.usd_per_million_tokens = out.usd_per_session / (wl.turns * (wl.prompt_tokens + wl.output_tokens)) * 1e6
    return out


def compare(model: ModelSpec, hardware: Iterable[HardwareSpec], workloads: Iterable[Workload], sessions: int,
            opts: PlanOptions = PlanOptions(), min_tokens_per_s: float = 10.0) -> list[ClusterPlan]:
    """One cluster plan per (workload, hardware): the essay's comparison, side by side."""
    return [cluster_plan(model, hw, wl, sessions, opts, min_tokens_per_s) for wl in workloads for hw in hardware]


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(plans: list[ClusterPlan]) -> str:
    """One row per (workload, hardware): the replica, the cluster, the tiers below, the cost."""
    lines = ["| workload | hardware | replica | replicas | devices | tok/s/user | TTFT s | prefill share | "
             "host GB | SSD TB | shared store TB | $/hour | $/session | $/M out | $/M tokens |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in plans:
        if not c.fits:
            lines.append(f"| {c.workload} | {c.hardware} | does not fit: {c.reason} |" + " |" * 12)
            continue
        lines.append(
            f"| {c.workload} | {c.hardware} | {c.devices_per_replica} {c.unit}s {c.weight_dtype}, "
            f"{c.sessions_per_replica} sessions | {c.replicas:,} | {c.devices:,} | {_f(c.tokens_per_s_per_user, ',.0f')} | "
            f"{_f(c.ttft_s, '.2g')} | {c.prefill_share:.0%} | {c.host_memory_GB:,.0f} | {c.ssd_GB / 1e3:,.1f} | "
            f"{c.shared_store_GB / 1e3:,.1f} | {_f(c.usd_per_hour, ',.0f')} | {_f(c.usd_per_session, '.3g')} | "
            f"{_f(c.usd_per_million_output_tokens, '.3g')} | {_f(c.usd_per_million_tokens, '.3g')} |")
    return "\n".join(lines)

"""The performance model: capacity first, then prefill, decode, communication and cost.

    plan(model, hardware, workload, options) -> PlanResult

1. Capacity. Weights must sit in device memory (a fraction `reserve` is kept for activations and
   the runtime). Sessions that are generating (active) keep their KV there too; sessions paused on a
   tool wait fill what device memory is left, then the hardware's spill tiers (host DRAM, NVMe, ...).
   With `devices=None` the planner picks the fewest devices that hold weights + active KV (tensor
   parallel degree rounded up to a power of two inside the scale-up domain, whole domains beyond);
   with a fixed device count, active KV that does not fit is read from the next tier during decode
   (the SRAM cliff). If weights or KV fit nowhere, the result says fits=False and gives no speeds.
2. Layout. Tensor-parallel machines shard each layer over a scale-up domain and pipeline across
   domains; pipeline machines (wafers, LPUs) split the layers over devices.
3. Decode: cost.decode_step per pipeline stage, micro-batches of ceil(batch / stages); a token
   crosses all stages: T = stages * t_stage + (stages - 1) * hop latency. Speculative decoding
   verifies K drafted tokens per step (wider compute, same weight reads), pays K steps of the draft
   model and keeps the accepted tokens per step E: per-user tokens/s = E / T (Leviathan et al.
   2023); aggregate = batch / T, less the share of device time prefill takes.
4. Prefill / TTFT: max(FLOPs / compute, weights / bandwidth, layers * per-layer latency) plus
   tensor-parallel all-reduces; a paused session first restores its KV by the cheaper of reload and
   recompute (cost.best_restore). TTFT = restore + prefill + one decode step; no queueing.
5. Cost per million tokens = price per device-hour * devices / (aggregate tokens/s * 3600) * 1e6;
   cost per finished session (task) = price per hour * devices * session wall time / sessions held.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from kvstrata.planner.catalog import HardwareSpec
from kvstrata.planner.cost import allreduce_time_s, best_restore, decode_step
from kvstrata.planner.modelspec import ModelSpec, builtin_model
from kvstrata.planner.workloads import Workload

GB = 1e9
ACT_BYTES = 2  # activations exchanged between devices in bf16


@dataclass(frozen=True)
class PlanOptions:
    weight_dtype: str | None = None  # None: the hardware's default
    kv_dtype: str | None = None
    devices: int | None = None  # None: the fewest that fit
    max_devices: int = 4096
    reserve: float = 0.1  # share of device memory kept for activations and runtime
    spec_tokens_per_step: float = 1.0  # speculative decoding: mean tokens accepted per step (1 = off)
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens verified per step
    spec_draft_model: str | None = None  # built-in model that drafts (its steps are paid for); None: free drafts
    compute_dtype: str | None = None  # dtype the matmuls run in; None: the weight dtype (weight-only quantisation: bf16)
    memory_efficiency: float | None = None  # None: the hardware's figure
    bandwidth_scale: float = 1.0  # multiply the device bandwidth (what-if analysis, property tests)


@dataclass
class TierUse:
    tier: str
    capacity_GB: float
    weights_GB: float = 0.0
    kv_GB: float = 0.0
    sessions: int = 0  # sessions whose KV is placed here
    sessions_capacity: int = 0  # sessions whose peak KV this tier could hold on its own


@dataclass
class PlanResult:
    hardware: str
    model: str
    workload: str
    devices: int | None
    unit: str
    fits: bool
    reason: str = ""
    tensor_parallel: int = 1
    pipeline_stages: int = 1
    weight_dtype: str = ""
    kv_dtype: str = ""
    weights_GB: float = 0.0
    kv_GB_per_session: float = 0.0
    sessions: int = 0
    active_sessions: int = 0
    output_tokens: int = 0  # per turn
    placement: list[TierUse] = field(default_factory=list)
    ttft_s: float | None = None
    prefill_s: float | None = None
    restore_s: float = 0.0
    restore_via: str = ""
    decode_step_s: float | None = None
    bound: str = ""
    tokens_per_s_per_user: float | None = None
    tokens_per_s_aggregate: float | None = None
    usd_per_hour: float | None = None
    usd_per_million_tokens: float | None = None
    session_s: float | None = None  # wall time of one finished session: turns x (TTFT + decode + tool wait)
    usd_per_task: float | None = None  # device cost of one finished session (an answer, an agent task)
    price_basis: str = ""
    role: str = ""  # cheapest | fastest, when chosen by planner.deploy
    limit: str = ""  # the deployment limit searched within
    spec: str = ""  # speculative decoding in use, if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weight_bytes(model: ModelSpec, dtype: str) -> float:
    return model.weight_bytes(dtype)


def _round_devices(n: int, hw: HardwareSpec) -> int:
    if hw.parallelism == "pipeline" or n <= 1:
        return max(1, n)
    dom = max(1, hw.scale_up.domain)
    if n <= dom:
        p = 1 << (n - 1).bit_length()
        return min(p, dom) if p <= dom else dom
    return math.ceil(n / dom) * dom


def _layout(n: int, hw: HardwareSpec) -> tuple[int, int]:
    if hw.parallelism == "pipeline":
        return 1, n
    tp = min(n, max(1, hw.scale_up.domain))
    return tp, math.ceil(n / tp)


def _place(n: int, hw: HardwareSpec, weights: float, kv_peak: float, active: int, sessions: int,
           reserve: float) -> tuple[list[TierUse], float, str]:
    """Tier use, the share of active KV spilled below device memory, and a reason if it does not fit."""
    usable = n * hw.capacity_GB * GB * (1 - reserve)
    dev = TierUse(hw.memory_name, n * hw.capacity_GB, weights_GB=weights / GB)
    free = usable - weights
    dev.sessions_capacity = int(max(free, 0) // kv_peak) if kv_peak > 0 else sessions
    tiers = [dev] + [TierUse(t.title, n * t.capacity_GB, sessions_capacity=int(n * t.capacity_GB * GB // kv_peak)
                             if kv_peak > 0 else sessions) for t in hw.spill_tiers]
    if free < 0:
        return tiers, 0.0, (f"weights need {weights / GB:.1f} GB but {n} x {hw.capacity_GB:g} GB "
                            f"(less {reserve:.0%} reserve) hold {usable / GB:.1f} GB")
    on_dev = min(sessions, dev.sessions_capacity)
    dev.sessions, dev.kv_GB = on_dev, on_dev * kv_peak / GB
    rest = sessions - on_dev
    for t in tiers[1:]:
        k = min(rest, t.sessions_capacity)
        t.sessions, t.kv_GB, rest = k, k * kv_peak / GB, rest - k
    if rest > 0:
        return tiers, 0.0, (f"KV of {sessions} sessions x {kv_peak / GB:.2f} GB does not fit in device memory "
                            f"and the tiers below ({rest} sessions left over)")
    spilled_active = max(0, active - on_dev)
    return tiers, spilled_active / active if active else 0.0, ""


def plan(model: ModelSpec, hw: HardwareSpec, wl: Workload, opts: PlanOptions = PlanOptions()) -> PlanResult:
    wdt = opts.weight_dtype or hw.default_weight_dtype
    kdt = opts.kv_dtype or hw.default_kv_dtype
    weights = _weight_bytes(model, wdt)
    kv_peak = model.kv_bytes(wl.peak_context, kdt)
    res = PlanResult(hw.name, model.name, wl.name, None, hw.unit, False, weight_dtype=wdt, kv_dtype=kdt,
                     weights_GB=weights / GB, kv_GB_per_session=kv_peak / GB, sessions=wl.sessions,
                     output_tokens=wl.output_tokens,
                     usd_per_hour=hw.usd_per_hour, price_basis=hw.price_basis)
    if model.max_context and wl.peak_context > model.max_context:
        res.reason = (f"sessions reach {wl.peak_context} tokens but {model.name} supports {model.max_context}; "
                      "lower --context / --prompt / --output")
        return res
    active = wl.sessions
    for _ in range(3):  # active sessions depend on turn time, which depends on the layout
        n = opts.devices or _auto_devices(hw, weights, kv_peak, active, wl.sessions, opts)
        if n is None:
            res.reason = f"needs more than {opts.max_devices} {hw.unit}s to hold weights and active KV"
            return res
        out = _evaluate(model, hw, wl, opts, n, active, weights, kv_peak, wdt, kdt, res)
        if not out.fits or wl.tool_wait_s <= 0:
            return out
        turn = (out.ttft_s or 0) + wl.output_tokens / out.tokens_per_s_per_user
        new_active = min(wl.sessions, max(1, math.ceil(wl.sessions * turn / (turn + wl.tool_wait_s))))
        if new_active == active:
            return out
        active = new_active
    return out


def _auto_devices(hw: HardwareSpec, weights: float, kv_peak: float, active: int, sessions: int,
                  opts: PlanOptions) -> int | None:
    per = hw.capacity_GB * GB * (1 - opts.reserve)
    n = _round_devices(max(1, math.ceil((weights + active * kv_peak) / per)), hw)
    while n <= opts.max_devices:
        _, _, why = _place(n, hw, weights, kv_peak, active, sessions, opts.reserve)
        if not why and (n * per - weights) >= active * kv_peak:
            return n
        n = _round_devices(n + 1, hw)
    return None


def _evaluate(model: ModelSpec, hw: HardwareSpec, wl: Workload, o: PlanOptions, n: int, active: int,
              weights: float, kv_peak: float, wdt: str, kdt: str, base: PlanResult) -> PlanResult:
    res = PlanResult(**{**base.to_dict(), "placement": []})
    res.devices, res.active_sessions = n, active
    tiers, spill, why = _place(n, hw, weights, kv_peak, active, wl.sessions, o.reserve)
    res.placement = tiers
    if why:
        res.reason = why
        return res
    if spill > 0 and not hw.spill_tiers:
        res.reason = "active KV exceeds device memory and this hardware lists no tier below it"
        return res
    tp, pp = _layout(n, hw)
    res.tensor_parallel, res.pipeline_stages = tp, pp
    bw = hw.bandwidth_GBps * o.bandwidth_scale * tp
    gflops = hw.tflops(o.compute_dtype or wdt) * 1e3 * tp
    mem_eff = o.memory_efficiency if o.memory_efficiency is not None else hw.memory_efficiency
    ce = hw.compute_efficiency_for(o.compute_dtype or wdt)
    layers_stage = model.n_layers / pp
    b = math.ceil(active / pp)
    verify = 1 + max(0, o.spec_draft_tokens)

    def tp_comm(tokens: int) -> float:  # two all-reduces per layer (after attention and after the MLP)
        return 2 * layers_stage * allreduce_time_s(tokens * model.hidden * ACT_BYTES, tp, hw.scale_up.bandwidth_GBps,
                                                   hw.scale_up.latency_us * 1e-6)

    step = decode_step(model, b, wl.decode_context, bandwidth_GBps=bw, compute_GFLOPs=gflops, weight_dtype=wdt,
                       kv_dtype=kdt, memory_efficiency=mem_eff, compute_efficiency=ce,
                       attention_efficiency=hw.attention_efficiency, overlap=hw.overlap,
                       per_layer_latency_s=hw.per_layer_latency_us * 1e-6, spill_fraction=spill,
                       spill_bandwidth_GBps=(hw.spill_tiers[0].link_GBps * tp) if hw.spill_tiers else 0.0,
                       layers_fraction=1.0 / pp, comm_s=tp_comm(b * verify), tokens_per_step=verify)
    hop = hw.scale_out.latency_us * 1e-6 + (b * model.hidden * ACT_BYTES / (hw.scale_out.bandwidth_GBps * GB)
                                            if hw.scale_out.bandwidth_GBps > 0 else 0.0)
    t_token = pp * step.total_s + (pp - 1) * hop
    if o.spec_draft_model and o.spec_draft_tokens > 0:  # the draft model's own steps, on the same devices
        draft = builtin_model(o.spec_draft_model)
        d = decode_step(draft, b, wl.decode_context, bandwidth_GBps=bw, compute_GFLOPs=gflops, weight_dtype=wdt,
                        kv_dtype=kdt, memory_efficiency=mem_eff, compute_efficiency=ce,
                        attention_efficiency=hw.attention_efficiency, overlap=hw.overlap,
                        per_layer_latency_s=hw.per_layer_latency_us * 1e-6)
        t_token += o.spec_draft_tokens * d.total_s
        res.spec = f"{o.spec_draft_model} drafts {o.spec_draft_tokens}, {o.spec_tokens_per_step:g} accepted per step"
    res.decode_step_s, res.bound = t_token, step.bound
    res.tokens_per_s_per_user = o.spec_tokens_per_step / t_token

    # prefill of one turn (new prompt tokens after the cached context); one stage at a time works on it.
    # Matmuls run at the weight dtype's rate, attention at the 16-bit (or fp32) rate.
    new = max(1, round(wl.prompt_tokens))
    comp_all = gflops * 1e9 * ce
    comp_attn = hw.attention_tflops() * 1e12 * tp * hw.compute_efficiency
    compute_s = model.matmul_flops(new) / comp_all + model.attention_flops(new, wl.context_tokens) / comp_attn
    prefill = max(compute_s, weights / (bw * GB * mem_eff),
                  model.n_layers * hw.per_layer_latency_us * 1e-6) + pp * tp_comm(new) + (pp - 1) * hop
    res.prefill_s = prefill
    parked = wl.tool_wait_s > 0 and tiers[0].sessions < wl.sessions and wl.context_tokens > 0
    if parked:
        kv_ctx = model.kv_bytes(wl.context_tokens, kdt)
        links = {t.name: t.link_GBps * tp for t in hw.spill_tiers}
        res.restore_via, res.restore_s = best_restore(kv_ctx, wl.context_tokens, model, links,
                                                      gflops * pp, ce)
    res.ttft_s = res.restore_s + prefill + t_token
    # aggregate: output tokens of the active batch over decode time plus the prefill they need
    decode_time = wl.output_tokens / res.tokens_per_s_per_user
    prefill_busy = active * compute_s / pp
    res.tokens_per_s_aggregate = active * wl.output_tokens / (decode_time + prefill_busy)
    res.session_s = wl.turns * (res.ttft_s + decode_time + wl.tool_wait_s)
    if hw.usd_per_hour is not None:
        res.usd_per_million_tokens = hw.usd_per_hour * n / (res.tokens_per_s_aggregate * 3600) * 1e6
        res.usd_per_task = hw.usd_per_hour * n / 3600 * res.session_s / wl.sessions
    res.fits = True
    return res


def max_sessions(model: ModelSpec, hw: HardwareSpec, devices: int, context_tokens: int, weight_dtype: str | None = None,
                 kv_dtype: str | None = None, reserve: float = 0.1) -> int:
    """Sequences whose KV at `context_tokens` fits in device memory beside the weights (0 if none)."""
    free = devices * hw.capacity_GB * GB * (1 - reserve) - model.weight_bytes(weight_dtype or hw.default_weight_dtype)
    per = model.kv_bytes(max(1, context_tokens), kv_dtype or hw.default_kv_dtype)
    return max(0, int(free // per))

"""The cost model: pure functions shared by the planner and the engine's placement decisions.

Stable interface (the engine imports these; keep signatures):
    ModelSpec                                   model shapes, params, KV bytes, FLOPs
    reload_time_s(nbytes, tier_bandwidth_GBps, latency_s=0)
    recompute_time_s(num_tokens, context_tokens, model, compute_GFLOPs, efficiency=1.0)
    prefill_flops(model, num_tokens, context_tokens=0)
    decode_step(...) -> StepTime  /  decode_step_time_s(...) -> float
    best_restore(kv_nbytes, num_tokens, model, tier_bandwidths_GBps, compute_GFLOPs, efficiency=1.0)

Decode step model (one step = one new token for each of `batch` sequences). The weight matmuls and
attention are different kernels that run one after the other, so each gets its own roofline
(Williams et al. 2009) and their times add:
    matmuls   = max(weight bytes / (bandwidth * eff), matmul FLOPs / (peak * eff))
    attention = max(KV bytes in device memory / (bandwidth * eff), attention FLOPs / (peak * eff))
                + KV bytes read from a lower tier / that tier's link bandwidth
    latency   = layers * per-layer latency      (dataflow / SRAM machines; kernel floor on GPUs)
    step      = max(matmuls + attention, latency) + communication
A single max() over the whole step (one roofline) is optimistic at large batch, where the matmuls
are compute bound and attention is memory bound at the same time. The latency floor matters on SRAM
machines: a pure roofline over on-chip bandwidth overpredicts wafer-scale speed by orders of
magnitude, because each layer costs a fixed fabric latency however few bytes it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from kvstrata.planner.modelspec import DTYPE_BYTES, ModelSpec, dtype_bytes

__all__ = [
    "ModelSpec", "DTYPE_BYTES", "dtype_bytes", "StepTime", "reload_time_s", "recompute_time_s",
    "prefill_flops", "decode_step", "decode_step_time_s", "best_restore", "allreduce_time_s",
]


def reload_time_s(nbytes: float, tier_bandwidth_GBps: float, latency_s: float = 0.0) -> float:
    """Seconds to bring `nbytes` back from a tier that moves `tier_bandwidth_GBps` (1e9 B/s)."""
    if tier_bandwidth_GBps <= 0:
        raise ValueError(f"tier bandwidth must be > 0 GB/s, got {tier_bandwidth_GBps}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return latency_s + nbytes / (tier_bandwidth_GBps * 1e9)


def prefill_flops(model: ModelSpec, num_tokens: int, context_tokens: int = 0) -> float:
    """FLOPs to prefill `num_tokens` new tokens after `context_tokens` already cached."""
    if num_tokens < 0 or context_tokens < 0:
        raise ValueError("token counts must be >= 0")
    return model.forward_flops(num_tokens, context_tokens)


def recompute_time_s(num_tokens: int, context_tokens: int, model: ModelSpec, compute_GFLOPs: float,
                     efficiency: float = 1.0) -> float:
    """Seconds to recompute the KV of `num_tokens` tokens (after `context_tokens` kept ones) by prefill."""
    if compute_GFLOPs <= 0 or efficiency <= 0:
        raise ValueError("compute rate and efficiency must be > 0")
    return prefill_flops(model, num_tokens, context_tokens) / (compute_GFLOPs * 1e9 * efficiency)


def best_restore(kv_nbytes: float, num_tokens: int, model: ModelSpec, tier_bandwidths_GBps: Mapping[str, float],
                 compute_GFLOPs: float, efficiency: float = 1.0) -> tuple[str, float]:
    """The cheaper way to get a paused session's KV back: reload from a tier or recompute ('recompute')."""
    options = {name: reload_time_s(kv_nbytes, bw) for name, bw in tier_bandwidths_GBps.items() if bw > 0}
    options["recompute"] = recompute_time_s(num_tokens, 0, model, compute_GFLOPs, efficiency)
    choice = min(options, key=options.__getitem__)
    return choice, options[choice]


def allreduce_time_s(nbytes: float, devices: int, bandwidth_GBps: float, latency_s: float) -> float:
    """Ring all-reduce: latency plus 2 (p - 1) / p of the bytes over each device's link (Patarasuk & Yuan 2009)."""
    if devices <= 1:
        return 0.0
    bw = bandwidth_GBps * 1e9 if bandwidth_GBps > 0 else math.inf
    return latency_s + 2.0 * (devices - 1) / devices * nbytes / bw


def _roof(mem: float, comp: float, p: float) -> float:
    """A kernel's time from its memory and compute times: max() when they overlap perfectly (p = inf),
    the p-norm when they do not quite (near the ridge point both cost; p = 1 would be their sum)."""
    if math.isinf(p) or mem == 0 or comp == 0 or math.isinf(mem) or math.isinf(comp):
        return max(mem, comp)
    hi = max(mem, comp)
    return hi * ((mem / hi) ** p + (comp / hi) ** p) ** (1 / p)


@dataclass(frozen=True)
class StepTime:
    weights_s: float  # weight bytes over device bandwidth
    matmul_compute_s: float  # matmul FLOPs over compute
    kv_s: float  # KV bytes over device bandwidth, plus spilled KV over its link
    attention_compute_s: float  # attention FLOPs over compute
    latency_s: float  # per-layer latency floor
    comm_s: float  # tensor-parallel all-reduces

    @property
    def memory_s(self) -> float:
        return self.weights_s + self.kv_s

    @property
    def compute_s(self) -> float:
        return self.matmul_compute_s + self.attention_compute_s

    overlap: float = math.inf  # p of the soft roofline (m^p + c^p)^(1/p); inf = max(m, c)

    @property
    def kernels_s(self) -> float:
        return _roof(self.weights_s, self.matmul_compute_s, self.overlap) + _roof(self.kv_s, self.attention_compute_s,
                                                                                 self.overlap)

    @property
    def total_s(self) -> float:
        return max(self.kernels_s, self.latency_s) + self.comm_s

    @property
    def bound(self) -> str:
        if self.latency_s >= self.kernels_s:
            return "latency"
        mem = max(self.weights_s, self.matmul_compute_s) == self.weights_s
        mem_attn = max(self.kv_s, self.attention_compute_s) == self.kv_s
        parts = {"memory": self.weights_s * mem + self.kv_s * mem_attn,
                 "compute": self.matmul_compute_s * (not mem) + self.attention_compute_s * (not mem_attn)}
        return max(parts, key=parts.__getitem__)


def decode_step(model: ModelSpec, batch: int, context_tokens: int, *, bandwidth_GBps: float, compute_GFLOPs: float,
                weight_dtype: str | float = "bf16", kv_dtype: str | float = "bf16", memory_efficiency: float = 1.0,
                compute_efficiency: float = 1.0, per_layer_latency_s: float = 0.0, spill_fraction: float = 0.0,
                spill_bandwidth_GBps: float = 0.0, layers_fraction: float = 1.0, comm_s: float = 0.0,
                tokens_per_step: int = 1, attention_efficiency: float | None = None,
                overlap: float = math.inf) -> StepTime:
    """Time of one decode step for `batch` sequences of `context_tokens` each on one group of devices.

    `bandwidth_GBps` / `compute_GFLOPs` are the group's totals (tensor parallel: summed over devices).
    `layers_fraction` is the share of layers this group runs (pipeline stage). `spill_fraction` of the
    KV lives in a lower tier read at `spill_bandwidth_GBps`. `tokens_per_step` > 1 is the verify width
    of speculative decoding (compute grows, weight reads do not). `attention_efficiency` is the share
    of bandwidth attention reads the KV cache at (paged, scattered reads), `memory_efficiency` if None.
    `overlap` is p of the soft roofline each kernel follows (see _roof); inf is the classic max().
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if not 0.0 <= spill_fraction <= 1.0:
        raise ValueError("spill_fraction must be in [0, 1]")
    bw = bandwidth_GBps * 1e9 * memory_efficiency
    comp = compute_GFLOPs * 1e9 * compute_efficiency
    w = model.weight_bytes_read_per_step(batch * tokens_per_step, weight_dtype) * layers_fraction
    kv = batch * model.kv_bytes(context_tokens, kv_dtype) * layers_fraction
    kv_bw = bw if attention_efficiency is None else bandwidth_GBps * 1e9 * attention_efficiency
    kv_s = kv * (1.0 - spill_fraction) / kv_bw
    if spill_fraction > 0:
        kv_s = math.inf if spill_bandwidth_GBps <= 0 else kv_s + kv * spill_fraction / (spill_bandwidth_GBps * 1e9)
    mm = batch * model.matmul_flops(tokens_per_step, logits_tokens=tokens_per_step) * layers_fraction
    at = batch * model.attention_flops(tokens_per_step, context_tokens) * layers_fraction
    lat = model.n_layers * layers_fraction * per_layer_latency_s
    return StepTime(w / bw, mm / comp, kv_s, at / comp, lat, comm_s, overlap)


def decode_step_time_s(model: ModelSpec, batch: int, context_tokens: int, **kw: float | str) -> float:
    """Seconds per decode step; same arguments as decode_step."""
    return decode_step(model, batch, context_tokens, **kw).total_s  # type: ignore[arg-type]

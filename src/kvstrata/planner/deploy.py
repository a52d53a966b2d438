"""Two deployments per plan: the cheapest that fits, and the fastest per user within the vendor's limit.

    deployments(model, hw, workload, options) -> (cheapest, fastest)

A plan for "the fewest devices that fit" answers a question nobody asks: providers serve a 70B model
on a whole 8-GPU server, in FP8, often with speculative decoding. So the planner searches every
device count the hardware can be laid out on (powers of two inside a scale-up domain, whole domains
beyond; any count for pipelined machines) up to the deployment the vendor sells as one unit (a node,
a rack, a chip count: `deployment.max_devices` in hardware.json), over the dtypes that hardware is
served in, with and without the speculative decoding its provider publicly runs:

- cheapest: the lowest device cost per finished session (`usd_per_task`); without a price, the
  fewest devices. Agentic work is bought by the task, so `agentic` shows this one first.
- fastest: the most tokens/s per user; ties go to fewer devices. A person waiting on an answer
  feels this one, so `answer` shows it first.

The fastest search over a larger limit contains every deployment of a smaller one, so more devices
never make the fastest plan slower (a property test holds the planner to it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from kvstrata.planner.catalog import HardwareSpec, spec_profile
from kvstrata.planner.modelspec import ModelSpec
from kvstrata.planner.perf import PlanOptions, PlanResult, plan
from kvstrata.planner.workloads import Workload

LOW_PRECISION = ("fp8", "nvfp4", "fp4", "int8")


def device_counts(hw: HardwareSpec, limit: int) -> Iterator[int]:
    """Every count the hardware is laid out on, ascending, up to `limit`."""
    if hw.parallelism == "pipeline":
        yield from range(1, limit + 1)
        return
    dom = max(1, hw.scale_up.domain)
    n = 1
    while n <= min(limit, dom):
        yield n
        n *= 2
    if dom <= limit and dom & (dom - 1):  # a domain that is not a power of two (NVL72) is a layout too
        yield dom
    k = 2
    while k * dom <= limit:
        yield k * dom
        k += 1


def _kv_dtype(hw: HardwareSpec, weight_dtype: str, opts: PlanOptions) -> str:
    if opts.kv_dtype:
        return opts.kv_dtype
    return "fp8" if weight_dtype in ("fp8", "nvfp4", "fp4") and "fp8" in hw.compute_TFLOPs else hw.default_kv_dtype


def _candidates(model: ModelSpec, hw: HardwareSpec, wl: Workload, opts: PlanOptions, limit: int,
                with_spec: bool) -> list[PlanResult]:
    dtypes = [opts.weight_dtype] if opts.weight_dtype else list(hw.deployment.get("dtypes") or [hw.default_weight_dtype])
    counts = [opts.devices] if opts.devices else list(device_counts(hw, limit))
    spec = spec_profile(hw, model.name) if with_spec and opts.spec_tokens_per_step == 1.0 else None
    variants = [opts]
    if spec:
        variants.append(replace(opts, spec_tokens_per_step=float(spec["accepted_tokens_per_step"]),
                                spec_draft_tokens=int(spec["draft_tokens"]), spec_draft_model=spec["draft_model"]))
    out = []
    for dt in dtypes:
        for o in variants:
            o = replace(o, weight_dtype=dt, kv_dtype=_kv_dtype(hw, dt, opts))
            for n in counts:
                r = plan(model, hw, wl, replace(o, devices=n))
                if r.fits:
                    out.append(r)
    return out


def deployments(model: ModelSpec, hw: HardwareSpec, wl: Workload, opts: PlanOptions = PlanOptions(),
                limit: int | None = None) -> tuple[PlanResult, PlanResult]:
    """(cheapest, fastest) within `limit` devices (default: the vendor's unit, at least what fits).

    When nothing fits within the limit, both are the plain capacity-first plan (fits=False with its
    reason, or the fewest devices that fit beyond the vendor's unit, saying so in `limit`).
    """
    lim = limit or max(hw.max_devices, 1)
    words = hw.deployment_limit if limit is None else f"{lim} {hw.unit}s"
    cands = _candidates(model, hw, wl, opts, lim, with_spec=True)
    base = plan(model, hw, wl, opts)
    if not cands and base.fits and limit is None:  # beyond the vendor's unit: say so
        lim, words = base.devices or lim, f"{base.devices} {hw.unit}s (more than {hw.deployment_limit})"
        cands = _candidates(model, hw, wl, opts, lim, with_spec=True)
    if not cands:
        r = replace(base, limit=words)
        return replace(r, role="cheapest"), replace(r, role="fastest")
    cheapest = min(cands, key=lambda r: (r.usd_per_task if r.usd_per_task is not None else float("inf"),
                                         r.devices, -(r.tokens_per_s_per_user or 0)))
    fastest = max(cands, key=lambda r: (r.tokens_per_s_per_user or 0, -(r.devices or 0)))
    return replace(cheapest, role="cheapest", limit=words), replace(fastest, role="fastest", limit=words)


def ordered(pair: tuple[PlanResult, PlanResult], workload: Workload) -> list[PlanResult]:
    """`answer`-like work (one person waiting, no tool waits) shows the fastest first, agentic the cheapest."""
    cheapest, fastest = pair
    return [fastest, cheapest] if workload.tool_wait_s == 0 and workload.sessions <= 1 else [cheapest, fastest]

"""The planner against the engine's own benchmarks: predicted vs measured on this machine.

    checks(results, model) -> (list[Check], list[str])     # what was compared, what was skipped and why

`results` maps a result-file stem to its parsed JSON (benchmarks/results/<stem>.json, as `make bench`
writes them): `engine` (decode and prefill, with the machine ceilings calibrated in the same run)
and `tier_ttft` (TTFT with a 4,096-token prefix in each tier). Predictions use only those ceilings
and the planner's equations, the same ones `kvstrata plan --hardware this` runs:

- decode, batch 1, int8 weights (the engine's CPU fast path): the weights read once per token plus
  the KV of the context, over the measured memory read rate (roofline; efficiency 1.0: measured);
- prefill of N tokens: matmul FLOPs at the measured fp32 (or int8) matmul rate, attention FLOPs at
  the fp32 rate, both at catalog.CPU_PREFILL_EFFICIENCY;
- restore from a tier: TTFT with the prefix in that tier minus TTFT with it in device memory,
  predicted as KV bytes x (1 / tier read + 1 / block checksum + 1 / host copy) (catalog.restore_GBps).

A figure whose inputs are missing from the files is skipped with the reason, never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kvstrata.planner.catalog import CPU_PREFILL_EFFICIENCY, restore_GBps
from kvstrata.planner.modelspec import ModelSpec

FP32 = 4.0
RESULT_STEMS = ("engine", "tier_ttft")


@dataclass(frozen=True)
class Check:
    figure: str
    predicted: float
    measured: float
    unit: str
    basis: str

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0


def load_results(directory: str | Path) -> dict[str, Any]:
    """The result files present in `directory`, by stem (missing ones are simply absent)."""
    out = {}
    for stem in RESULT_STEMS:
        p = Path(directory) / f"{stem}.json"
        if p.is_file():
            out[stem] = json.loads(p.read_text())
    return out


def decode_tokens_per_s(model: ModelSpec, context: int, memory_bw_GBps: float, weight_dtype: str = "int8",
                        kv_bytes_per_value: float = FP32) -> float:
    nbytes = model.weight_bytes_read_per_step(1, weight_dtype) + model.kv_bytes(context, kv_bytes_per_value)
    return memory_bw_GBps * 1e9 / nbytes


def prefill_tokens_per_s(model: ModelSpec, tokens: int, matmul_GFLOPs: float, fp32_GFLOPs: float,
                         efficiency: float = CPU_PREFILL_EFFICIENCY) -> float:
    t = model.matmul_flops(tokens) / (matmul_GFLOPs * 1e9 * efficiency) + \
        model.attention_flops(tokens, 0) / (fp32_GFLOPs * 1e9 * efficiency)
    return tokens / t


def _engine_checks(res: Mapping[str, Any], model: ModelSpec, out: list[Check], skipped: list[str]) -> None:
    ceil = res.get("ceilings") or {}
    bw, fl = ceil.get("memory_bw_GBps"), ceil.get("matmul_fp32_GFLOPs")
    int8 = res.get("int8") or {}
    fp32 = res.get("fp32") or {}
    if bw and "decode_b1" in int8:
        out.append(Check("decode, batch 1, int8 weights, 512 context (engine.json)",
                         decode_tokens_per_s(model, 512, bw), int8["decode_b1"], "tok/s",
                         f"memory roofline at the run's {bw:.1f} GB/s"))
    else:
        skipped.append("engine.json: no int8 decode_b1 or no memory_bw_GBps ceiling")
    for n in (512, 2048):
        key = f"prefill_{n}"
        if fl and key in fp32:
            out.append(Check(f"prefill {n} tokens, fp32 (engine.json)", prefill_tokens_per_s(model, n, fl, fl),
                             fp32[key], "tok/s", f"{fl:.0f} GFLOP/s x {CPU_PREFILL_EFFICIENCY}"))
        else:
            skipped.append(f"engine.json: no fp32 {key} or no matmul_fp32_GFLOPs ceiling")
        i8 = ceil.get("matmul_int8_GOPs")
        if i8 and fl and key in int8:
            out.append(Check(f"prefill {n} tokens, int8 (engine.json)", prefill_tokens_per_s(model, n, i8, fl),
                             int8[key], "tok/s", f"int8 matmul {i8:.0f} GOP/s, attention fp32, x {CPU_PREFILL_EFFICIENCY}"))
        elif key in int8:
            skipped.append(f"engine.json: int8 {key} measured but no matmul_int8_GOPs ceiling recorded in that run")


def _restore_checks(res: Mapping[str, Any], model: ModelSpec, out: list[Check], skipped: list[str]) -> None:
    ceil = res.get("ceilings") or {}
    copy, crc = ceil.get("host_copy_GBps"), ceil.get("checksum_GBps") or ceil.get("crc32_GBps")  # (older runs: CRC-32)
    if not (copy and crc and "device_s" in res):
        skipped.append("tier_ttft.json: no ceilings of its own run (host_copy_GBps, checksum_GBps) or no device_s; "
                       "restores need the rates measured beside them")
        return
    cached = int(res.get("tokens", 4096)) - int(res.get("new_tokens", 32))
    nbytes = model.kv_bytes(cached, float(res.get("kv_bytes_per_value", FP32)))
    reads = {"host": None, "disk": ceil.get("disk_read_GBps"), "remote": ceil.get("redis_read_GBps")}
    for tier, read in reads.items():
        key = f"{tier}_s"
        if key not in res or (tier != "host" and not read):
            skipped.append(f"tier_ttft.json: no {key} or no read rate for the {tier} tier")
            continue
        rate = restore_GBps(read, copy, crc)
        out.append(Check(f"restore of {cached:,} tokens from {tier} (tier_ttft.json)", nbytes / (rate * 1e9),
                         res[key] - res["device_s"], "s", f"{nbytes / 1e6:.0f} MB at {rate:.2f} GB/s (read + checksum + copy)"))


def checks(results: Mapping[str, Any], model: ModelSpec) -> tuple[list[Check], list[str]]:
    out: list[Check] = []
    skipped: list[str] = []
    if "engine" in results:
        _engine_checks(results["engine"], model, out, skipped)
    else:
        skipped.append("engine.json missing (python -m benchmarks.engine_bench writes it)")
    if "tier_ttft" in results:
        _restore_checks(results["tier_ttft"], model, out, skipped)
    else:
        skipped.append("tier_ttft.json missing (python -m benchmarks.tier_ttft writes it)")
    return out, skipped


def markdown(rows: list[Check], skipped: list[str]) -> str:
    lines = ["| figure | predicted | measured | error | basis |", "|---|---:|---:|---:|---|"]
    lines += [f"| {c.figure} | {c.predicted:,.4g} {c.unit} | {c.measured:,.4g} {c.unit} | {c.error:+.0%} | {c.basis} |"
              for c in rows]
    return "\n".join(lines + [f"\nnot compared: {s}" for s in skipped])

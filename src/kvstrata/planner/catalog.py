"""The hardware catalog: machines and memory / I/O tiers, every figure with its source.

The data lives in `data/hardware.json`. Users add machines in the same format in a file passed with
`--catalog` or in `$KVSTRATA_HOME/hardware.json`; a user entry with an existing name replaces it.
The machine the engine runs on is the entry `this`, built from the calibration profile.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from kvstrata.core import KvstrataError, kvstrata_home

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
THIS_MACHINE = "this"


@dataclass(frozen=True)
class SpillTier:
    """A memory tier below the device memory that can hold KV (host DRAM, NVMe, external memory)."""

    name: str
    title: str
    capacity_GB: float
    link_GBps: float  # bandwidth from this tier to one device, per direction


@dataclass(frozen=True)
class Link:
    name: str
    domain: int  # devices reachable over this link (scale-up) ; unused for scale-out
    bandwidth_GBps: float  # per device, per direction
    latency_us: float


@dataclass(frozen=True)
class HardwareSpec:
    """One device (a GPU, a wafer, a chip, a CPU socket) and how devices of its kind connect."""

    name: str
    title: str
    kind: str  # gpu | sram | dataflow | tpu | cpu
    unit: str
    memory_name: str
    capacity_GB: float
    bandwidth_GBps: float
    compute_TFLOPs: Mapping[str, float]
    parallelism: str  # tensor: shard every layer over devices in the scale-up domain; pipeline: layers split
    scale_up: Link
    scale_out: Link
    spill_tiers: tuple[SpillTier, ...]
    per_layer_latency_us: float
    memory_efficiency: float
    compute_efficiency: float
    default_weight_dtype: str
    default_kv_dtype: str
    usd_per_hour: float | None  # rental price per device-hour, or purchase amortised over 3 years
    price_basis: str
    sources: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    efficiency_class: str = ""
    attention_efficiency: float | None = None  # share of bandwidth decode attention reads KV at; None: memory
    overlap: float = float("inf")  # p of the soft roofline of each kernel (cost._roof); inf: max(memory, compute)
    compute_efficiency_by_dtype: Mapping[str, float] = field(default_factory=dict)  # "compute_<dtype>" overrides

    def compute_efficiency_for(self, dtype: str) -> float:
        key = "fp4" if dtype.lower() == "nvfp4" else dtype.lower()
        return float(self.compute_efficiency_by_dtype.get(key, self.compute_efficiency))
    # the largest deployment the vendor sells as one unit: max_devices, limit (words), dtypes served, spec profile
    deployment: Mapping[str, Any] = field(default_factory=dict)

    @property
    def max_devices(self) -> int:
        return int(self.deployment.get("max_devices") or max(1, self.scale_up.domain))

    @property
    def deployment_limit(self) -> str:
        return str(self.deployment.get("limit") or f"{self.max_devices} {self.unit}s")

    def tflops(self, dtype: str) -> float:
        """Dense peak for the dtype matmuls run in (weight-only quantised formats compute in bf16 / fp16)."""
        c = self.compute_TFLOPs
        key = "fp4" if dtype.lower() == "nvfp4" else dtype.lower()
        if key in c:
            return float(c[key])
        if key.startswith("q") or key in ("int4", "fp4"):
            key = "bf16"
        for k in (key, "bf16", "fp16", "fp32"):
            if k in c:
                return float(c[k])
        raise KvstrataError(f"hardware {self.name!r} lists no compute figure")

    def attention_tflops(self) -> float:
        """Dense peak attention runs at: 16-bit where the machine has it, else fp32 (CPU engines)."""
        for k in ("bf16", "fp16", "fp32"):
            if k in self.compute_TFLOPs:
                return float(self.compute_TFLOPs[k])
        return self.tflops(self.default_weight_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "kind": self.kind, "unit": self.unit,
            "memory": {"name": self.memory_name, "capacity_GB": self.capacity_GB, "bandwidth_GBps": self.bandwidth_GBps},
            "compute_TFLOPs": dict(self.compute_TFLOPs), "parallelism": self.parallelism,
            "usd_per_hour": self.usd_per_hour, "price_basis": self.price_basis,
            "spill_tiers": [t.__dict__ for t in self.spill_tiers], "sources": dict(self.sources),
        }


AMORTISE_HOURS = 3 * 365 * 24  # purchase prices are spread over three years of continuous use


def _link(d: Mapping[str, Any] | None) -> Link:
    d = d or {}
    return Link(str(d.get("name", "none")), int(d.get("domain", 1)), float(d.get("bandwidth_GBps", 0) or 0),
                float(d.get("latency_us", 0) or 0))


def hardware_from_dict(name: str, d: Mapping[str, Any], classes: Mapping[str, Any] | None = None) -> HardwareSpec:
    """Build one entry (efficiencies: its class's, then its own); raises KvstrataError naming what is wrong."""
    cls_name = str(d.get("efficiency_class", ""))
    if cls_name and classes is not None and cls_name not in classes:
        raise KvstrataError(f"hardware entry {name!r}: unknown efficiency_class {cls_name!r}; known: "
                            f"{', '.join(k for k in classes if not k.startswith('_'))}")
    try:
        mem = d["memory"]
        price = d.get("price") or {}
        hourly, basis = price.get("usd_per_hour"), "rental"
        if hourly is None and price.get("purchase_usd"):
            hourly, basis = float(price["purchase_usd"]) / AMORTISE_HOURS, "purchase / 3 years (no power, no hosting)"
        if hourly is None:
            basis = "not published"
        eff = {**((classes or {}).get(cls_name) or {}), **(d.get("efficiency") or {})}
        spec = HardwareSpec(
            name=name, title=str(d.get("title", name)), kind=str(d.get("kind", "gpu")), unit=str(d.get("unit", "device")),
            memory_name=str(mem.get("name", "memory")), capacity_GB=float(mem["capacity_GB"]),
            bandwidth_GBps=float(mem["bandwidth_GBps"]), compute_TFLOPs=dict(d["compute_TFLOPs"]),
            parallelism=str(d.get("parallelism", "tensor")), scale_up=_link(d.get("scale_up")),
            scale_out=_link(d.get("scale_out")),
            spill_tiers=tuple(SpillTier(str(t["tier"]), str(t.get("title", t["tier"])), float(t["capacity_GB"]),
                                        float(t["link_GBps"])) for t in d.get("spill_tiers", [])),
            per_layer_latency_us=float(d.get("per_layer_latency_us", 0)),
            memory_efficiency=float(eff.get("memory", 0.8)), compute_efficiency=float(eff.get("compute", 0.5)),
            default_weight_dtype=str(d.get("default_weight_dtype", "bf16")),
            default_kv_dtype=str(d.get("default_kv_dtype", "bf16")),
            usd_per_hour=None if hourly is None else float(hourly), price_basis=basis,
            sources=dict(d.get("sources", {})), aliases=tuple(d.get("aliases", ())),
            efficiency_class=cls_name, deployment=dict(d.get("deployment") or {}),
            attention_efficiency=float(eff["attention"]) if eff.get("attention") is not None else None,
            overlap=float(eff.get("overlap", float("inf"))),
            compute_efficiency_by_dtype={k[len("compute_"):]: float(v) for k, v in eff.items() if k.startswith("compute_")},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise KvstrataError(f"hardware entry {name!r} is malformed ({type(e).__name__}: {e}); "
                            "see src/kvstrata/planner/data/hardware.json for the format") from e
    if spec.capacity_GB <= 0 or spec.bandwidth_GBps <= 0:
        raise KvstrataError(f"hardware entry {name!r}: memory capacity and bandwidth must be > 0")
    if spec.parallelism not in ("tensor", "pipeline"):
        raise KvstrataError(f"hardware entry {name!r}: parallelism must be 'tensor' or 'pipeline'")
    return spec



def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise KvstrataError(f"catalog file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise KvstrataError(f"catalog file {path} is not valid JSON: {e}") from e


def load_catalog(extra: Iterable[str | os.PathLike] = ()) -> tuple[dict[str, HardwareSpec], dict[str, dict[str, Any]]]:
    """(hardware by name, tiers by name): the built-in file, then $KVSTRATA_HOME/hardware.json, then `extra`."""
    raw = _read_json(DATA_DIR / "hardware.json")
    classes = dict(raw.get("efficiency_classes", {}))
    hw_raw: dict[str, Any] = dict(raw["hardware"])
    tiers: dict[str, dict[str, Any]] = dict(raw.get("tiers", {}))
    paths = [kvstrata_home() / "hardware.json"] if (kvstrata_home() / "hardware.json").is_file() else []
    paths += [Path(p) for p in extra]
    for p in paths:
        user = _read_json(p)
        if not isinstance(user, dict) or not isinstance(user.get("hardware", {}), dict):
            raise KvstrataError(f"catalog file {p} must hold an object with a 'hardware' object")
        hw_raw.update(user.get("hardware", {}))
        tiers.update(user.get("tiers", {}))
        log.info("catalog: %d entries from %s", len(user.get("hardware", {})), p)
    return {n: hardware_from_dict(n, d, classes) for n, d in hw_raw.items()}, tiers


def catalog_section(name: str) -> dict[str, Any]:
    """A top-level section of the built-in hardware.json (efficiency_classes, spec_profiles), `_about` left out."""
    return {k: v for k, v in _read_json(DATA_DIR / "hardware.json").get(name, {}).items() if not k.startswith("_")}


def spec_profile(hw: HardwareSpec, model_name: str) -> dict[str, Any] | None:
    """The speculative decoding the hardware's provider publicly runs for this model, or None."""
    name = hw.deployment.get("spec")
    prof = catalog_section("spec_profiles").get(name) if name else None
    return prof if prof and model_name in prof.get("targets", ()) else None


def resolve_hardware(names: str | Iterable[str], catalog: Mapping[str, HardwareSpec]) -> list[HardwareSpec]:
    """Comma-separated names or aliases, or 'all'. `this` must be in the catalog (see this_machine())."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if names == ["all"]:
        return [h for n, h in catalog.items() if n != THIS_MACHINE]
    by_alias = {a: h for h in catalog.values() for a in (h.name, *h.aliases)}
    out = []
    for n in names:
        if n not in by_alias:
            hint = " (run `kvstrata plan calibrate` first)" if n == THIS_MACHINE else ""
            raise KvstrataError(f"unknown hardware {n!r}{hint}; known: {', '.join(sorted(catalog))}")
        out.append(by_alias[n])
    return out


# Share of the calibration's 1024 x 1024 matmul rate the engine's CPU prefill reaches (the rest goes to
# skinny matmuls, norms, RoPE, softmax): FITTED once to the engine benchmark of 2026-11-30 10:08 UTC
# (benchmarks/results/engine.json: fp32 prefill of 512 and 2,048 tokens reached 69% and 77% of that
# run's 216 GFLOP/s), the log-mean of the two; tests/planner/test_this_engine.py checks later runs.
CPU_PREFILL_EFFICIENCY = 0.73


def restore_GBps(read_GBps: float | None, copy_GBps: float, crc_GBps: float | None) -> float:
    """Bytes/s of bringing KV back from a tier the way the engine does: read (None: the host tier keeps a
    reference, no read), verify every block's checksum, copy into the device pool; the three in sequence."""
    t = 1.0 / copy_GBps + (1.0 / crc_GBps if crc_GBps else 0.0) + (1.0 / read_GBps if read_GBps else 0.0)
    return 1.0 / t


def this_machine(profile: Any) -> HardwareSpec:
    """The machine the engine runs on, from a calibration profile (measured, so memory efficiency 1.0).

    Device memory = the DRAM the engine's CPU device pool lives in. Weights default to int8, the
    engine's CPU fast path (`--quantization auto`, what `make serve` runs); fp32 is the other path.
    Compute = the measured fp32 and int8 matmul rates at CPU_PREFILL_EFFICIENCY. Spill tiers = the
    measured disk (and Redis when calibrated with one), each at its restore rate (read + checksum + copy).
    """
    mem_GB = (profile.total_memory_bytes or 8e9) / 1e9
    disk_free_GB = (profile.disk_free_bytes or 100e9) / 1e9
    crc = profile.checksum_GBps or profile.crc32_GBps  # (the block checksum: XXH3 now, CRC-32 before)
    compute = {"fp32": profile.matmul_fp32_GFLOPs / 1000.0}
    if profile.matmul_int8_GOPs:
        compute["int8"] = profile.matmul_int8_GOPs / 1000.0
    tiers = [SpillTier("disk", "local disk (read + checksum + copy)", disk_free_GB,
                       restore_GBps(profile.disk_read_GBps, profile.host_copy_GBps, crc))]
    if profile.redis_read_GBps:
        tiers.append(SpillTier("remote", "Redis (GET + checksum + copy)", 1e6,
                               restore_GBps(profile.redis_read_GBps, profile.host_copy_GBps, crc)))
    return HardwareSpec(
        name=THIS_MACHINE, title=f"this machine ({profile.hostname}, calibrated {profile.measured_at})", kind="cpu",
        unit="machine", memory_name="DRAM (measured)", capacity_GB=mem_GB, bandwidth_GBps=profile.memory_bw_GBps,
        compute_TFLOPs=compute, parallelism="tensor",
        scale_up=Link("none", 1, 0, 0), scale_out=Link("none", 1, 0, 0), spill_tiers=tuple(tiers),
        per_layer_latency_us=0.0, memory_efficiency=1.0, compute_efficiency=CPU_PREFILL_EFFICIENCY,
        default_weight_dtype="int8", default_kv_dtype="fp32", usd_per_hour=None, price_basis="not applicable",
        sources={"all": f"kvstrata plan calibrate on {profile.hostname} at {profile.measured_at}",
                 "compute_efficiency": "CPU_PREFILL_EFFICIENCY, fitted to one engine benchmark (see catalog.py)"},
        deployment={"max_devices": 1, "limit": "this machine", "dtypes": ["int8", "fp32"], "spec": None},
    )


def essay_ratios(catalog: Mapping[str, HardwareSpec]) -> dict[str, float]:
    """The essay's two numbers: WSE-3 over H100 memory bandwidth (~6,270x) and capacity (~0.55x)."""
    w, h = catalog["cerebras-wse3"], catalog["h100-sxm"]
    return {"bandwidth_ratio": w.bandwidth_GBps / h.bandwidth_GBps, "capacity_ratio": w.capacity_GB / h.capacity_GB}

"""Engine configuration: one frozen dataclass, a docstring per field, CLI flags generated from it.

`add_engine_args(parser)` adds `--<field-name>` for every field plus `--config FILE` (TOML or JSON
with the same keys); `engine_config_from_args(args)` builds the config, rejecting unknown keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstrata.core import KvstrataError


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def parse_bytes(v: str | int | None) -> int | None:
    """'512M', '2GiB', '1.5G', '1000000' -> bytes."""
    if v is None or isinstance(v, int):
        return v
    s = str(v).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise KvstrataError(f"not a byte size: {v!r} (use e.g. 512M, 2G, 1000000)") from None


@dataclass(frozen=True)
class EngineConfig:
    model: str = _f("default", "a .gguf file, a Hugging Face checkpoint directory, or `default` (SmolLM2-135M-Instruct)")
    dtype: str = _f("auto", "weights and KV dtype: float32, bfloat16 or auto (float32 on CPU, bfloat16 on CUDA)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    quantization: str = _f("none", "weights in compute: none (as loaded, dequantized), int8 (CPU fast path: int8 weights, int8 activations quantized per row), int4 (CPU: 4-bit groups of 32, fp32 activations in the native step) or auto (int8 where the engine computes in float32 on CPU, else none)")
    kv_dtype: str = _f("auto", "dtype of the KV pool and its tiers: auto (the compute dtype), float32, float16 or bfloat16; float16 halves the KV bytes of the CPU fp32/int8 paths (attention still computes in fp32)")
    block_size: int = _f(16, "tokens per KV block (the unit of prefix caching and of every tier)")
    kv_device_bytes: int | None = _f(None, "bytes of the device KV pool (e.g. 2G); default: --kv-device-fraction of free memory", bytes=True)
    kv_device_fraction: float = _f(0.25, "fraction of free device memory (host RAM on CPU) for the KV pool when --kv-device-bytes is unset")
    kv_host_bytes: int | None = _f(None, "bytes of the host DRAM tier below the device pool (0 or unset: off)", bytes=True)
    kv_disk_dir: str | None = _f(None, "directory of the disk tier (unset: off); survives restarts")
    kv_disk_bytes: int | None = _f(None, "byte budget of the disk tier (default 10G)", bytes=True)
    kv_redis_url: str | None = _f(None, "redis:// URL of a shared Redis/Valkey tier (unset: off)")
    kv_write_policy: str = _f("write-on-evict", "when blocks go down the tiers: write-on-evict or write-through")
    kv_cold_codec: str = _f("raw", "codec of the disk and remote tiers: raw or int8")
    max_model_len: int | None = _f(None, "longest prompt + output in tokens (default: the model's context length)")
    max_num_seqs: int = _f(64, "most sequences running at once")
    max_num_batched_tokens: int = _f(2048, "token budget of one engine step, shared by prefill chunks and decodes")
    enable_prefix_caching: bool = _f(True, "reuse KV blocks of earlier requests that share a prefix")
    num_threads: int | None = _f(None, "torch intra-op threads on CPU (default: the machine's cores)")
    native_decode: str = _f("auto", "the native C step for every CPU float32 step, prefill and decode, fp32 / int8 / int4 weights (native/, built with the host's C compiler; batch-invariant): auto (use it when it builds), on (fail if it cannot) or off (the torch path)")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise KvstrataError(f"block_size must be a power of two, got {self.block_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise KvstrataError(f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.kv_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise KvstrataError(f"kv_dtype must be auto, float32, float16 or bfloat16, got {self.kv_dtype!r}")
        if self.quantization not in ("none", "int8", "int4", "auto"):
            raise KvstrataError(f"quantization must be none, int8, int4 or auto, got {self.quantization!r}")
        if self.native_decode not in ("auto", "on", "off"):
            raise KvstrataError(f"native_decode must be auto, on or off, got {self.native_decode!r}")
        if self.kv_write_policy not in ("write-on-evict", "write-through"):
            raise KvstrataError(f"kv_write_policy must be write-on-evict or write-through, got {self.kv_write_policy!r}")
        if self.kv_cold_codec not in ("raw", "int8"):
            raise KvstrataError(f"kv_cold_codec must be raw or int8, got {self.kv_cold_codec!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise KvstrataError("max_num_seqs and max_num_batched_tokens must be >= 1")
        for f in dataclasses.fields(self):
            if f.metadata.get("bytes"):
                object.__setattr__(self, f.name, parse_bytes(getattr(self, f.name)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(norm) - names)
        if unknown:
            raise KvstrataError(f"{source}: unknown keys {unknown}; known keys: {sorted(names)}")
        return cls(**norm)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--config", help="TOML or JSON file with engine settings (same keys as the flags)")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            base_type = str(f.type).replace(" | None", "").strip()  # annotations are strings here
            typ = {"int": int, "float": float}.get(base_type, str)
            if f.metadata.get("bytes"):
                typ = str
            g.add_argument(flag, type=typ, default=None, help=f.metadata["help"] + f" (default: {f.default})")


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    base: dict[str, Any] = {}
    if getattr(args, "config", None):
        p = Path(args.config)
        if not p.is_file():
            raise KvstrataError(f"config file {p} does not exist")
        try:
            base = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise KvstrataError(f"{p}: cannot parse ({e})") from None
        EngineConfig.from_dict(base, str(p))  # reject unknown keys early
    for f in dataclasses.fields(EngineConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            base[f.name] = v
    base.update({k: v for k, v in overrides.items() if v is not None})
    return EngineConfig.from_dict(base)

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
    quantization: str = _f("auto", "weights in compute: auto (int8 where the engine computes in float32 on CPU, else none), none (as loaded, dequantized), int8 (CPU fast path: int8 weights, int8 activations quantized per row) or int4 (CPU: 4-bit groups of 32, fp32 activations in the native step)")
    kv_dtype: str = _f("auto", "dtype of the KV pool and its tiers: auto (float16 on the CPU int8 fast path, else the compute dtype), float32, float16 or bfloat16; float16 halves the KV bytes of the CPU fp32/int8 paths (attention still computes in fp32)")
    block_size: int = _f(16, "tokens per KV block (the unit of prefix caching and of every tier)")
    kv_device_bytes: int | None = _f(None, "most bytes of the device KV pool (e.g. 2G); default: --kv-device-fraction of free memory. On CPU it is reserved, not filled: memory is committed as blocks are first used", bytes=True)
    kv_device_fraction: float = _f(0.25, "fraction of free device memory (host RAM on CPU, there capped at max_num_seqs sequences of max_model_len tokens) the KV pool may grow to when --kv-device-bytes is unset")
    kv_host_bytes: int | None = _f(None, "bytes of the host DRAM tier below the device pool (0 or unset: off)", bytes=True)
    kv_disk_dir: str | None = _f(None, "directory of the disk tier (unset: off); survives restarts")
    kv_disk_bytes: int | None = _f(None, "byte budget of the disk tier (default 10G)", bytes=True)
    kv_redis_url: str | None = _f(None, "redis:// URL of a shared Redis/Valkey tier (unset: off)")
    kv_write_policy: str = _f("write-behind", "when blocks go down the tiers: write-behind (evicted blocks go down, and each finished request's blocks are written to the disk / remote tiers behind it, so a crash after a turn costs no recompute), write-on-evict (only evicted blocks go down) or write-through (every block as it fills, to every tier)")
    kv_cold_codec: str = _f("raw", "codec of the disk and remote tiers: raw or int8")
    max_model_len: int | None = _f(None, "longest prompt + output in tokens (default: the model's context length)")
    max_num_seqs: int = _f(64, "most sequences running at once")
    max_num_batched_tokens: int = _f(2048, "token budget of one engine step, shared by prefill chunks and decodes")
    enable_prefix_caching: bool = _f(True, "reuse KV blocks of earlier requests that share a prefix")
    num_threads: int | None = _f(None, "torch intra-op threads on CPU (default: the machine's cores)")
    program_priority: bool = _f(True, "order waiting work by agent program: requests of a session or job task that has had less service go first (least attained service); --no-program-priority: arrival order")
    pause_ttl: bool = _f(True, "a paused session whose KV the cost model keeps in device memory is moved down once its wait outlasts the break-even time (a TTL), instead of being held until it resumes")
    prefetch_ahead: bool = _f(True, "a paused session whose KV went to a tier is prefetched into device memory shortly before its tool is expected to return")
    program_pause: bool = _f(False, "requests that name an agent program but no stored session (X-Session-Id or prompt_cache_key on completions and chat) pause like a session's turns when they finish: the cost model keeps, moves down or drops the program's KV until its next request, with the two timers above. Off by default: on the Claude Code replay it moved most paused KV to the host tier and back (3.5x the host reads) and finished 8 % fewer sessions per hour than leaving it to the LRU (docs/agent_replay.md)")
    speculative: str = _f("auto", "speculative decoding by prompt lookup (drafts from the sequence's own tokens and from earlier outputs, verified in one native step; greedy output identical, sampling distribution preserved, seeded sampled requests never drafted so they reproduce; engine/speculative.py): auto (where the native step runs), on (fail without it) or off")
    speculative_shared: int = _f(32768, "output tokens of finished requests that speculative drafts may also come from, the most recent first (engine/speculative.py OutputHistory; shared by all requests, like the prefix cache); 0: drafts from each sequence's own tokens only")
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
        if self.speculative not in ("auto", "on", "off"):
            raise KvstrataError(f"speculative must be auto, on or off, got {self.speculative!r}")
        if self.speculative_shared < 0:
            raise KvstrataError(f"speculative_shared must be >= 0, got {self.speculative_shared}")
        if self.kv_write_policy not in ("write-behind", "write-on-evict", "write-through"):
            raise KvstrataError("kv_write_policy must be write-behind, write-on-evict or write-through, got "
                                f"{self.kv_write_policy!r}")
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


@dataclass(frozen=True)
class ServerConfig:
    """`kvstrata serve`'s own settings (the engine's are EngineConfig's, the request limits ServerLimits')."""

    host: str = _f("127.0.0.1", "address to bind (0.0.0.0 for all)")
    port: int = _f(8000, "TCP port")
    api_key: tuple[str, ...] = _f((), "accept this API key (repeatable); with none, the server is open", repeat=True)
    api_key_file: str | None = _f(None, "file of API keys, one per line (# comments allowed)")
    session_store: str | None = _f(None, "session store: a SQLite path or postgresql:// URL (default $KVSTRATA_HOME/sessions.db)")
    max_waiting: int = _f(256, "requests allowed to wait for the engine; more get 429 with Retry-After")
    served_model_name: tuple[str, ...] = _f((), "model name(s) clients use (repeatable; default: the --model value and the file's name)", repeat=True)
    shutdown_timeout: float = _f(30.0, "seconds in-flight requests get to finish on SIGTERM")
    park_on_shutdown: bool = _f(True, "park the sessions this process served at the disk tier on shutdown")
    resume_jobs: bool = _f(True, "resume, at start, the unfinished jobs clients submitted to /v1/jobs (turn off when several servers share one session store: each would resume them)")
    recall: bool = _f(True, "embed session messages in the background for recall (/v1/memory/search, the memory_search tool; docs/memory.md)")
    default_sampling: str | None = _f(None, "sampling for requests that set none of temperature, top_p, top_k, min_p: e.g. 'temperature=0.7,top_k=20' (fields not named keep the model's; default: the model's recommended sampling from generation_config.json or GGUF general.sampling.*, else llama.cpp's temperature=0.8,top_k=40,top_p=0.95,min_p=0.05)")
    retention_session_ttl: float | None = _f(None, "delete sessions (conversations) not updated for this many seconds, with their responses (default: keep)")
    retention_max_sessions: int | None = _f(None, "keep at most this many sessions per API key, the most recently updated (default: no limit)")
    retention_response_ttl: float | None = _f(None, "delete stored responses older than this many seconds; their sessions stay (default: keep)")
    retention_max_responses: int | None = _f(None, "keep at most this many stored responses per API key, the newest (default: no limit)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_key", tuple(self.api_key))
        object.__setattr__(self, "served_model_name", tuple(self.served_model_name))
        if not 0 <= self.port < 65536:
            raise KvstrataError(f"port must be 0..65535, got {self.port}")
        if self.max_waiting < 0:
            raise KvstrataError("max_waiting must be >= 0")
        if self.shutdown_timeout < 0:
            raise KvstrataError("shutdown_timeout must be >= 0 seconds")
        if self.default_sampling is not None:
            parse_sampling(self.default_sampling)
        for name in ("retention_max_sessions", "retention_max_responses"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise KvstrataError(f"{name} must be >= 1")
        for name in ("retention_session_ttl", "retention_response_ttl"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise KvstrataError(f"{name} must be > 0 seconds")


# -- flags and config files, generated from the dataclasses --------------------------------------
def add_config_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """`--<field-name>` for every field of `cls` (help and default from the field), in a group `title`.
    The first call also adds `--config FILE`; the classes added are remembered so that a config file's
    keys can be checked against all of them."""
    sections = parser.get_default("config_sections")
    if sections is None:
        parser.add_argument("--config", help="TOML or JSON file of settings (the flags' names, with _ or -)")
        sections = ()
    parser.set_defaults(config_sections=(*sections, cls))
    g = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"].replace("%", "%%")  # argparse formats help with %: "8 %" is not a field
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{help_} (default: {f.default})")
        elif f.metadata.get("repeat"):
            g.add_argument(flag, action="append", default=None, help=help_)
        else:
            base_type = str(f.type).replace(" | None", "").strip()  # annotations are strings here
            typ = str if f.metadata.get("bytes") else {"int": int, "float": float}.get(base_type, str)
            g.add_argument(flag, type=typ, default=None, help=f"{help_} (default: {f.default})")


def _config_file(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's settings ({} without one), parsed once, keys checked against every section."""
    cached = getattr(args, "_config_values", None)
    if cached is not None:
        return cached
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        p = Path(args.config)
        if not p.is_file():
            raise KvstrataError(f"config file {p} does not exist")
        try:
            raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise KvstrataError(f"{p}: cannot parse ({e})") from None
        values = {k.replace("-", "_"): v for k, v in raw.items()}
        known = {f.name for cls in getattr(args, "config_sections", None) or (EngineConfig,)
                 for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KvstrataError(f"{p}: unknown keys {unknown}; known keys: {sorted(known)}")
    args._config_values = values
    return values


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of `cls` from the config file, then the flags given, then `overrides` (not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    base = {k: v for k, v in _config_file(args).items() if k in names}
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            base[name] = v
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**base)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, EngineConfig, "engine")


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    return config_from_args(EngineConfig, args, **overrides)


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p")


def parse_sampling(text: str) -> dict[str, float]:
    """`temperature=0.7,top_k=20` -> {"temperature": 0.7, "top_k": 20.0}; KvstrataError on anything else."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in SAMPLING_FIELDS:
            raise KvstrataError(f"default_sampling: unknown field {name!r}; use {', '.join(SAMPLING_FIELDS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise KvstrataError(f"default_sampling: {name} needs a number, got {value.strip()!r}") from None
    return out

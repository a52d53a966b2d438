"""Engine start-up helpers: device and dtype choice, model construction, KV pool sizing."""

from __future__ import annotations

import logging

import torch

from kvstrata.config import EngineConfig
from kvstrata.core import KvstrataError
from kvstrata.engine.layout import cached_int8_model, layout_enabled, model_from_weights, save_int8_layout
from kvstrata.kv.pool import BlockPool
from kvstrata.model.config import ModelConfig
from kvstrata.model.llama import LlamaModel
from kvstrata.model.quant import PerTokenInt8Linear

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise KvstrataError(f"device {dev!r} asked for but no CUDA device is available; use --device cpu")
    device = torch.device(dev)
    if cfg.dtype == "auto":
        # bf16 matmul has no native CPU support on common x86 parts (~1.3 GFLOP/s measured): fp32 there.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[cfg.dtype]
    return device, dtype


def keep_freed_host_memory() -> bool:
    """Tells glibc malloc to keep freed activation buffers for reuse instead of returning them to the OS.

    A CPU step allocates and frees tens of MB of activations. By default glibc serves blocks over its
    mmap threshold with fresh mmaps and trims the heap top eagerly, so every step page-faults its
    buffers in again (1.8 M minor faults in a 64-request wave of the default model). With allocations
    up to 32 MB kept on the heap and trimming only above 1 GB of free top, the same wave ran in 9.5 s
    instead of 11.8 s with 0.6 M faults. The price: up to ~1 GB of freed memory stays with the process.
    Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def trim_freed_host_memory() -> None:
    """Hands the heap's freed memory back to the OS (glibc malloc_trim) once the start-up temporaries
    (quantized copies, packing buffers) are gone: `keep_freed_host_memory` would keep up to 1 GB of them."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model(lm, dtype: torch.dtype, device: torch.device, quantization: str = "none") -> LlamaModel:
    """The model the engine runs, in `quantization` (resolved, not auto). The CPU int8 path comes from the
    layout cache when it holds this checkpoint, and is stored there when built (engine/layout.py)."""
    cache = quantization == "int8" and device.type == "cpu" and dtype == torch.float32 and layout_enabled(lm)
    if cache:
        model = cached_int8_model(lm)
        if model is not None:
            return model
    model = apply_quantization(model_from_weights(lm, dtype, device), quantization, device, dtype)
    if cache:
        save_int8_layout(lm, model)
    return model


def release_int8_copies(model: LlamaModel) -> None:
    """After the native step copied the int8 weights: the copies the layout cache mapped give their pages
    back to the page cache (fbgemm's packed copy for the torch path is made from them if that path ever
    runs); copies built in memory are packed for the torch path and dropped."""
    from kvstrata.loader.tensor_file import drop_pages

    for mod in model.modules():
        if isinstance(mod, PerTokenInt8Linear):
            if mod.mapped and mod.int8 is not None:
                drop_pages(mod.int8[0])
            else:
                mod.release_int8()


def resolve_kv_dtype(cfg: EngineConfig, dtype: torch.dtype, quantization: str) -> torch.dtype:
    """--kv-dtype auto: float16 on the CPU int8 fast path (half the KV bytes; its accuracy bound against
    transformers holds unchanged, tests/engine/test_reference.py), else the compute dtype (the exact
    paths stay exact)."""
    if cfg.kv_dtype != "auto":
        return _DTYPES[cfg.kv_dtype]
    return torch.float16 if quantization == "int8" and dtype == torch.float32 else dtype


def auto_quantization(device: torch.device, dtype: torch.dtype) -> str:
    """What --quantization auto means here: int8 (and with it the native decode step) where the engine
    computes in float32 on CPU, the weights as loaded anywhere else."""
    return "int8" if device.type == "cpu" and dtype == torch.float32 else "none"


def apply_quantization(model: LlamaModel, mode: str, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    if mode == "none":
        return model
    if mode == "int8":
        if device.type != "cpu" or dtype != torch.float32:
            raise KvstrataError("--quantization int8 is the CPU fast path: it needs --device cpu and float32")
        from kvstrata.model.quant import quantize_model_int8

        return quantize_model_int8(model)
    if mode == "int4":
        if device.type != "cpu" or dtype != torch.float32:
            raise KvstrataError("--quantization int4 is a CPU path: it needs --device cpu and float32")
        from kvstrata.model.quant import quantize_model_int4

        return quantize_model_int4(model)
    raise KvstrataError(f"unknown quantization {mode!r}; choose none, int8 or int4")


def setup_native_decode(cfg: EngineConfig, model: LlamaModel, pool: BlockPool, device: torch.device):
    """The native step (native/) for this engine, or None when it is off or cannot run here.

    `auto` uses it on CPU in float32 (fp32, int8 or int4 weights) when it builds and says why when it
    does not; `on` makes any reason an error."""
    from kvstrata.startup import discard_arena, take_arena

    if cfg.native_decode == "off" or (cfg.native_decode == "auto" and device.type != "cpu"):
        discard_arena()
        return None
    from kvstrata.native import library, native_status
    from kvstrata.native.decode import NativeDecoder, unsupported_reason

    reason = unsupported_reason(model, pool.k.dtype) if device.type == "cpu" else "the native decode step runs on CPU"
    lib = None
    if reason is None:
        lib = library()
        reason = None if lib is not None else native_status()["reason"]
    if reason is not None:
        discard_arena()
        if cfg.native_decode == "on":
            raise KvstrataError(f"--native-decode on: {reason}")
        log.warning("native step off (the torch path is not batch-invariant): %s", reason)
        return None
    base, length, waited = take_arena()  # (backed while the command started, startup.py)
    nat = NativeDecoder(model, pool, lib, (base, length))
    if base:
        log.debug("weight arena: %s map backed during start-up (%.0f MiB; waited %.3f s for it)",
                  "in the" if nat.arena_mapped else "too small to use, replaced by its own:", length / 2**20, waited)
    return nat


def pool_blocks(cfg: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device,
                max_model_len: int | None = None) -> int:
    """Blocks of the device KV pool: --kv-device-bytes, else --kv-device-fraction of free memory, on CPU
    at most what max_num_seqs sequences of max_model_len tokens can use. On CPU this is a cap reserved as
    address space, committed as blocks are first used (kv/pool.py); on CUDA it is allocated up front."""
    per_block = BlockPool.bytes_per_block(cfg.block_size, mc.num_layers, mc.num_kv_heads, mc.head_dim, dtype)
    if cfg.kv_device_bytes:
        budget = cfg.kv_device_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cfg.kv_device_fraction)
    else:
        budget = int(_available_ram() * cfg.kv_device_fraction)
        ctx = max_model_len or mc.max_position_embeddings
        budget = min(budget, per_block * (-(-ctx // cfg.block_size)) * cfg.max_num_seqs)
    n = budget // per_block
    if n < 1:
        raise KvstrataError(f"the KV pool budget ({budget} bytes) holds no block of {per_block} bytes; raise --kv-device-bytes")
    return int(n)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30

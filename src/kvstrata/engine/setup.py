"""Engine start-up helpers: device and dtype choice, model construction, KV pool sizing.

Devices and dtypes are named by strings here ("cpu", "float16"), so an engine on the CPU fast path can be
set up without importing torch (engine/llm_engine.py); `resolve_device_dtype` gives the torch objects.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvstrata.config import EngineConfig
from kvstrata.core import KvstrataError, dtype_name
from kvstrata.engine.layout import (cached_int8_arrays, cached_int8_model, int8_model_streamed, layout_enabled, model_from_weights,
                                    save_int8_layout)
from kvstrata.kv.pool import BlockPool
from kvstrata.model.config import ModelConfig
from kvstrata.startup import torch_may_have_cuda

if TYPE_CHECKING:
    import torch

    from kvstrata.model.llama import LlamaModel

log = logging.getLogger(__name__)


def device_dtype_names(cfg: EngineConfig) -> tuple[str, str]:
    """(device, compute dtype) as names ("cpu" / "cuda:1", "float32"); imports torch only to ask for CUDA
    where a CUDA build of torch is installed."""
    dev = cfg.device
    if dev == "auto" or dev.startswith("cuda"):
        has_cuda = False
        if torch_may_have_cuda():
            import torch

            has_cuda = torch.cuda.is_available()
        if dev == "auto":
            dev = "cuda" if has_cuda else "cpu"
        elif not has_cuda:
            raise KvstrataError(f"device {dev!r} asked for but no CUDA device is available; use --device cpu")
    if cfg.dtype == "auto":
        # bf16 matmul has no native CPU support on common x86 parts (~1.3 GFLOP/s measured): fp32 there.
        return dev, "bfloat16" if dev.startswith("cuda") else "float32"
    return dev, cfg.dtype


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    import torch

    dev, dt = device_dtype_names(cfg)
    return torch.device(dev), getattr(torch, dt)


def device_type(device: Any) -> str:
    """"cpu" / "cuda" from a name ("cuda:1") or a torch device."""
    return str(device).split(":")[0]


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


def _layout_cacheable(lm, dtype: Any, device: Any, quantization: str) -> bool:
    return (quantization == "int8" and device_type(device) == "cpu" and dtype_name(dtype) == "float32"
            and layout_enabled(lm))


def layout_arrays(lm, dtype: Any, device: Any, quantization: str):
    """The int8 layout's arrays where this engine's model would come from the layout cache and the cache
    holds it (read without torch), else None."""
    return cached_int8_arrays(lm) if _layout_cacheable(lm, dtype, device, quantization) else None


def build_model(lm, dtype: Any, device: Any, quantization: str = "none") -> LlamaModel:
    """The model the engine runs, in `quantization` (resolved, not auto). The CPU int8 path comes from the
    layout cache when it holds this checkpoint, and is stored there when built (engine/layout.py)."""
    import torch

    dtype, device = getattr(torch, dtype_name(dtype)), torch.device(str(device))
    cache = _layout_cacheable(lm, dtype, device, quantization)
    if cache:
        model = cached_int8_model(lm)
        if model is not None:
            return model
    if quantization == "int8" and device.type == "cpu" and dtype == torch.float32:
        model = int8_model_streamed(lm)  # (a layer's float weights at a time: the first start's peak memory)
    else:
        model = apply_quantization(model_from_weights(lm, dtype, device), quantization, device, dtype)
    if cache:
        save_int8_layout(lm, model)
    return model


def release_int8_copies(model: LlamaModel) -> None:
    """After the native step copied the int8 weights: the copies the layout cache mapped give their pages
    back to the page cache (fbgemm's packed copy for the torch path is made from them if that path ever
    runs); copies built in memory are packed for the torch path and dropped."""
    from kvstrata.loader.tensor_file import drop_pages
    from kvstrata.model.quant import PerTokenInt8Linear

    for mod in model.modules():
        if isinstance(mod, PerTokenInt8Linear):
            if mod.mapped and mod.int8 is not None:
                drop_pages(mod.int8[0])
            else:
                mod.release_int8()


def resolve_kv_dtype(cfg: EngineConfig, dtype: Any, quantization: str) -> str:
    """The KV dtype's name. --kv-dtype auto: float16 on the CPU int8 fast path (half the KV bytes; its
    accuracy bound against transformers holds unchanged, tests/engine/test_reference.py), else the compute
    dtype (the exact paths stay exact)."""
    if cfg.kv_dtype != "auto":
        return cfg.kv_dtype
    return "float16" if quantization == "int8" and dtype_name(dtype) == "float32" else dtype_name(dtype)


def auto_quantization(device: Any, dtype: Any) -> str:
    """What --quantization auto means here: int8 (and with it the native decode step) where the engine
    computes in float32 on CPU, the weights as loaded anywhere else."""
    return "int8" if device_type(device) == "cpu" and dtype_name(dtype) == "float32" else "none"


def apply_quantization(model: LlamaModel, mode: str, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    import torch
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


def setup_native_decode(cfg: EngineConfig, model, pool: BlockPool, device: Any):
    """The native step (native/) for this engine, or None when it is off or cannot run here. `model`: a
    LlamaModel or an int8 layout's arrays (native.decode.LayoutWeights).

    `auto` uses it on CPU in float32 (fp32, int8 or int4 weights) when it builds and says why when it
    does not; `on` makes any reason an error."""
    from kvstrata.startup import discard_arena, take_arena

    on_cpu = device_type(device) == "cpu"
    if cfg.native_decode == "off" or (cfg.native_decode == "auto" and not on_cpu):
        discard_arena()
        return None
    from kvstrata.native import library, native_status
    from kvstrata.native.decode import NativeDecoder, unsupported_reason

    reason = unsupported_reason(model, pool.dtype_name) if on_cpu else "the native decode step runs on CPU"
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
    nat = NativeDecoder(model, pool, lib, (base, length), threads=cfg.num_threads)
    if base:
        log.debug("weight arena: %s map backed during start-up (%.0f MiB; waited %.3f s for it)",
                  "in the" if nat.arena_mapped else "too small to use, replaced by its own:", length / 2**20, waited)
    return nat


def pool_blocks(cfg: EngineConfig, mc: ModelConfig, dtype: Any, device: Any, max_model_len: int | None = None) -> int:
    """Blocks of the device KV pool: --kv-device-bytes, else --kv-device-fraction of free memory, on CPU
    at most what max_num_seqs sequences of max_model_len tokens can use. On CPU this is a cap reserved as
    address space, committed as blocks are first used (kv/pool.py); on CUDA it is allocated up front."""
    per_block = BlockPool.bytes_per_block(cfg.block_size, mc.num_layers, mc.num_kv_heads, mc.head_dim, dtype)
    if cfg.kv_device_bytes:
        budget = cfg.kv_device_bytes
    elif device_type(device) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(str(device)))
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

"""Building the model from a checkpoint, and the int8 fast path's built weights cached on disk.

`model_from_weights` assembles a LlamaModel from a LoadedModel's dequantized weights. Its skeleton is
built with every initializer skipped (`_no_init`): the parameters are assigned from the checkpoint
right after, and random initialization is not free (on the meta device nn.Embedding's normal_ alone
imports ~800 modules of torch's Python decompositions, about 2 s; on CPU it fills every weight).

The int8 layout: making the int8 model from the default GGUF file means dequantizing every tensor
(numpy, ~1 s), undoing the Q/K permutation, fusing projections and quantizing each per output channel
(~2-4 s on 2 cores). The result (int8 weights with their fp32 scales; float embeddings, norms, biases)
is saved once under $KVSTRATA_HOME/layouts, one file per checkpoint path (~250 MB for the default
model), and memory-mapped on later starts after its checks (loader/tensor_file.py). It is keyed by the
checkpoint's identity (path, size, mtime, sampled content: loader.file_identity): when the checkpoint
changes, or is touched, it is rebuilt and overwritten. KVSTRATA_LAYOUT_CACHE=0 turns it off.

The file also holds the RoPE cos / sin tables for every position the model has (as model/layers.py
builds them in torch), so the native step can start from the file alone without importing torch
(`cached_int8_arrays`, ~1.1 s of a 1.6 s start here); the LlamaModel is then built from the same
arrays only when something asks for it (`int8_model_from_arrays`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvstrata.core import KvstrataError

if TYPE_CHECKING:
    import torch

    from kvstrata.model.llama import LlamaModel

log = logging.getLogger(__name__)
# bump when what is stored, or how it is built, changes (v2: XXH3 checksums; v3: the RoPE tables)
LAYOUT_VERSION = "int8-v3"
_INT8_W, _INT8_S = ".int8_weight", ".int8_scale"
ROPE_COS, ROPE_SIN = "rotary.cos_table", "rotary.sin_table"  # (num_positions, head_dim) float32
_NO_INIT_LOCK = threading.Lock()


@contextmanager
def _no_init():
    """nn.Linear and nn.Embedding constructors skip their random initializers while this is held (one
    holder at a time: the patched class attributes are process-wide)."""
    from torch import nn

    with _NO_INIT_LOCK:
        saved = [(cls, cls.__dict__["reset_parameters"]) for cls in (nn.Linear, nn.Embedding)]
        try:
            for cls, _ in saved:
                cls.reset_parameters = lambda self: None
            yield
        finally:
            for cls, fn in saved:
                cls.reset_parameters = fn


def _skeleton(lm, dtype: torch.dtype) -> LlamaModel:
    """A LlamaModel whose parameters are uninitialized CPU memory (allocated, never touched, so never
    resident): every one is replaced from the checkpoint before use."""
    from kvstrata.model.llama import LlamaModel

    with _no_init():
        return LlamaModel(lm.config, dtype, lm.rope_freqs)


def model_from_weights(lm, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    model = _skeleton(lm, dtype)
    model.load_state_dict(lm.weights, strict=True, assign=True)  # (the dict is not kept: see LoadedModel)
    for layer in model.layers:
        layer.fuse_projections()
    return model.to(device).eval()


def int8_model_streamed(lm) -> LlamaModel:
    """The int8 model `apply_quantization(model_from_weights(...), "int8")` builds, the same bits, built
    layer by layer from `lm.iter_weights()`: a layer is quantized as soon as its last tensor is read, so the
    float copies of one layer are alive at a time, not the whole model's (a first start of the default
    model peaked at 1.36 GiB building it whole; fp32 weights alone are 0.54 GB)."""
    import torch

    from kvstrata.model.quant import quantize_head_int8, quantize_layer_int8

    model = _skeleton(lm, torch.float32)
    prefixes = [f"layers.{i}." for i in range(len(model.layers))]
    wanted = [set(layer.state_dict()) for layer in model.layers]  # each layer's names, without its prefix
    top_names = {k for k in model.state_dict() if not k.startswith("layers.")}
    pending: list[dict[str, torch.Tensor]] = [{} for _ in model.layers]
    top: dict[str, torch.Tensor] = {}
    complete: set[int] = set()
    for name, t in lm.iter_weights():
        i = _layer_of(name)
        if i is None or i >= len(model.layers):
            if name not in top_names or name in top:
                raise KvstrataError(f"{lm.path}: weight {name!r} has no place in this model")
            top[name] = t
            continue
        key = name[len(prefixes[i]):]
        if key not in wanted[i] or key in pending[i] or i in complete:
            raise KvstrataError(f"{lm.path}: weight {name!r} has no place in this model")
        pending[i][key] = t
        if len(pending[i]) == len(wanted[i]):
            layer = model.layers[i]
            layer.load_state_dict(pending[i], strict=True, assign=True)
            pending[i] = {}
            layer.fuse_projections()
            quantize_layer_int8(layer)
            complete.add(i)
    missing = sorted(top_names - top.keys())
    for i in range(len(model.layers)):
        if i not in complete:
            missing += [prefixes[i] + k for k in sorted(wanted[i] - pending[i].keys())]
    if missing:
        raise KvstrataError(f"{lm.path}: weights missing for this model: {missing[:3]}")
    model.load_state_dict(top, strict=False, assign=True)
    return quantize_head_int8(model.eval())


def _layer_of(name: str) -> int | None:
    if not name.startswith("layers."):
        return None
    head = name.split(".", 2)[1]
    return int(head) if head.isdigit() else None


def layout_enabled(lm) -> bool:
    return lm.identity is not None and os.environ.get("KVSTRATA_LAYOUT_CACHE", "1") != "0"


def layout_path(lm) -> Path:
    from kvstrata.core import kvstrata_home

    name = hashlib.sha256(f"{os.path.realpath(lm.path)}|{LAYOUT_VERSION}".encode()).hexdigest()[:24]
    return kvstrata_home() / "layouts" / f"{name}.kvt"


def _identity(lm) -> str:
    return f"{LAYOUT_VERSION}|torch {_torch_version()}|{lm.identity}"


@functools.cache
def _torch_version() -> str:
    """torch's version as installed, read without importing it."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        import torch

        return torch.__version__


def save_int8_layout(lm, model: LlamaModel) -> None:
    """Stores an int8 model's built weights (before the engine releases its plain int8 copies)."""
    from kvstrata.loader.tensor_file import save_tensors
    from kvstrata.model.quant import PerTokenInt8Linear

    state: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PerTokenInt8Linear):
            assert mod.int8 is not None, f"{name}: its int8 weights were released before the layout was saved"
            state[name + _INT8_W], state[name + _INT8_S] = mod.int8
    for name, p in model.named_parameters():
        state[name] = p.detach()
    import torch

    n = lm.config.max_position_embeddings  # (the engine slices its max_model_len from these)
    state[ROPE_COS], state[ROPE_SIN] = (t.to(torch.float32).contiguous() for t in model.rotary._cos_sin(torch.arange(n)))
    if save_tensors(layout_path(lm), _identity(lm), state):
        log.info("cached the int8 layout of %s at %s", lm.path, layout_path(lm))


def cached_int8_arrays(lm) -> dict[str, np.ndarray] | None:
    """The int8 layout of `lm` as numpy views of its file (no torch import), or None when there is no
    trustworthy entry, or one this engine cannot read without torch (bfloat16 tensors, no RoPE tables)."""
    from kvstrata.loader.tensor_file import load_arrays

    got = load_arrays(layout_path(lm), _identity(lm))
    if got is None or ROPE_COS not in got or any(dtype == "bfloat16" for _, dtype in got.values()):
        return None
    return {name: a for name, (a, _) in got.items()}


def cached_int8_model(lm) -> LlamaModel | None:
    """The int8 model from the layout cache, or None when there is no trustworthy entry for `lm`."""
    arrays = cached_int8_arrays(lm)
    return None if arrays is None else int8_model_from_arrays(lm, arrays)


def int8_model_from_arrays(lm, arrays: dict[str, np.ndarray]) -> LlamaModel | None:
    """The int8 LlamaModel over the layout's arrays (shared, not copied), with the stored RoPE tables for
    every position; None (logged) when they do not fit the model."""
    from kvstrata.loader.tensor_file import as_tensor

    state = {k: as_tensor(a, str(a.dtype)) for k, a in arrays.items()}
    try:
        model = _int8_model_from_state(lm, state)
    except (KeyError, ValueError, RuntimeError, AttributeError) as e:  # a layout of another shape
        log.warning("ignoring the cached layout %s (it will be rebuilt): %s", layout_path(lm), e)
        return None
    model.rotary.cos_table, model.rotary.sin_table = state[ROPE_COS], state[ROPE_SIN]
    return model


def _int8_model_from_state(lm, state: dict[str, torch.Tensor]) -> LlamaModel:
    import torch
    from torch import nn

    from kvstrata.loader.tensor_file import drop_pages
    from kvstrata.model.quant import PerTokenInt8Linear

    if "x86" in torch.backends.quantized.supported_engines:  # as quantize_model_int8 sets it (before packing)
        torch.backends.quantized.engine = "x86"
    model = _skeleton(lm, torch.float32)
    names = [k.removesuffix(_INT8_W) for k in state if k.endswith(_INT8_W)]

    def build(name: str) -> PerTokenInt8Linear:
        bias = state.get(name + ".bias")  # (copied, as the float weights below)
        return PerTokenInt8Linear(state[name + _INT8_W], state[name + _INT8_S], None if bias is None else bias.clone(),
                                  mapped=True)

    modules = [build(name) for name in names]  # (fbgemm packs on the torch path's first use: quant.py)
    placed, assigned = {ROPE_COS, ROPE_SIN}, set()
    for name, mod in zip(names, modules):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, mod)
        placed |= {name + _INT8_W, name + _INT8_S, name + ".bias"}
        assigned.add(name + ".bias")
    for key, t in state.items():
        if key not in placed:
            parent, _, attr = key.rpartition(".")
            mod = model.get_submodule(parent)
            if not isinstance(getattr(mod, attr, None), nn.Parameter) or getattr(mod, attr).shape != t.shape:
                raise ValueError(f"{key} {tuple(t.shape)} has no place in this model")
            # left in the map (never written), its pages given back: the embedding table is read a row
            # per token, so only the rows in use come back from the page cache
            setattr(mod, attr, nn.Parameter(t, requires_grad=False))
            drop_pages(t)
            assigned.add(key)
    if "lm_head.weight" not in state and model.lm_head is not None:  # its int8 copy replaced it
        model.lm_head = None
    for layer in model.layers:  # the unfused projections the fused int8 ones replaced
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            if name in layer._modules:
                delattr(layer, name)
    unset = [n for n, _ in model.named_parameters() if n not in assigned]
    if unset or model.lm_head_q is None:
        raise ValueError(f"the layout leaves parameters unset: {unset[:3] or ['lm_head_q']}")
    return model.eval()

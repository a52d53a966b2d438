"""NativeDecoder: runs every engine step of a CPU float32 LlamaModel (or of an int8 layout's arrays,
without torch) through the native step (step.c); logits come back as numpy arrays.

One C call per step computes every scheduled row, prefill chunks and decodes alike, so each token gets
the same arithmetic whatever else is in the step (batch invariance, native/kv.h). Weights: fp32 (read in
place from the model's tensors), int8 (copied into one huge-page arena as VNNI panels; the torch path's
fbgemm copy stays, so int8 weights are held twice) or int4 (read in place). It reads and writes the
engine's KV pool in place (fp32, fp16 or bf16). Models it cannot run (not float32 compute, a matmul that
is none of the three, head_dim > 512) stay on the torch path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstrata.core import KvstrataError, dtype_name
from kvstrata.model.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from kvstrata.model.llama import LlamaModel

# (model/quant.py's PROJECTIONS: the fused projections of a layer, in the order the C side reads them)
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_KV_TYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
_F32, _I8, _I4 = 0, 1, 2


@dataclass
class LayoutWeights:
    """An int8 layout's arrays (engine/layout.py: int8 projections and head, float embeddings and norms,
    RoPE tables) and its model's config: everything the native step reads, without torch."""

    cfg: ModelConfig
    arrays: dict[str, np.ndarray]
    num_positions: int  # rows of the RoPE tables in use (the engine's max_model_len)

    def missing(self) -> str | None:
        """The first array the native step needs and this layout lacks, or None."""
        need = ["embed_tokens.weight", "norm.weight", "lm_head_q.int8_weight", "lm_head_q.int8_scale",
                "rotary.cos_table", "rotary.sin_table"]
        for i in range(self.cfg.num_layers):
            need += [f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"]
            need += [f"layers.{i}.{n}.int8_{part}" for n in PROJECTIONS for part in ("weight", "scale")]
        return next((n for n in need if n not in self.arrays), None)


def _format(mod: nn.Module | None) -> int | None:
    import torch
    from torch import nn

    from kvstrata.model.quant import Int4Linear, PerTokenInt8Linear

    if isinstance(mod, PerTokenInt8Linear):
        return _I8
    if isinstance(mod, Int4Linear):
        return _I4
    if isinstance(mod, nn.Linear) and mod.weight.dtype == torch.float32:
        return _F32
    return None


def _head(model: LlamaModel) -> nn.Module:
    if model.lm_head_q is not None:
        return model.lm_head_q
    return model.lm_head if model.lm_head is not None else model.embed_tokens


def _shape_reason(cfg: ModelConfig) -> str | None:
    if cfg.head_dim > 512 or cfg.num_heads % cfg.num_kv_heads:
        return "the native step needs head_dim <= 512 and whole query groups"
    return None


def unsupported_reason(model: LlamaModel | LayoutWeights, kv_dtype: Any) -> str | None:
    """Why the native step cannot run this model (or layout), or None when it can."""
    if dtype_name(kv_dtype) not in _KV_TYPES:
        return "the native step needs a float32, float16 or bfloat16 KV pool"
    if isinstance(model, LayoutWeights):
        missing = model.missing()
        return f"the layout has no {missing}" if missing else _shape_reason(model.cfg)
    import torch
    from torch import nn

    cfg = model.cfg
    if model.dtype != torch.float32 or model.embed_tokens.weight.device.type != "cpu":
        return "the native step needs a CPU model computing in float32"
    head = _head(model)
    if not (isinstance(head, nn.Embedding) or _format(head) in (_F32, _I8)) or any(
            _format(getattr(layer, n, None)) is None for layer in model.layers for n in PROJECTIONS):
        return "the native step runs float32, int8 and int4 weights only"
    if _shape_reason(cfg):
        return _shape_reason(cfg)
    if model.rotary.cos_table is None:
        return "the RoPE table is not built"
    return None


def _int8_parts(mod) -> list:
    w, scale = mod.int8_weight()  # the same int8 values and per-channel scales the torch path multiplies with
    return [w.contiguous(), scale.float().contiguous(), None,
            None if mod.bias is None else mod.bias.detach().float().contiguous()]


def _model_pointers(model: LlamaModel, ptr) -> tuple[list[int], list[int], int]:
    """(formats, pointers, RoPE rows) of a LlamaModel's weights, in the order kv_model_new reads them;
    `ptr(tensor, copied=False)` keeps a tensor alive and gives its address."""
    from torch import nn

    def mat(mod: nn.Module) -> tuple[int, list[int]]:
        if isinstance(mod, nn.Embedding):  # a tied LM head: the embedding table itself
            return _F32, [ptr(mod.weight.detach().contiguous()), 0, 0, 0]
        fmt = _format(mod)
        bias = None if mod.bias is None else mod.bias.detach().float().contiguous()
        if fmt == _I8:
            return fmt, [ptr(t, True) for t in _int8_parts(mod)]
        if fmt == _I4:
            return fmt, [ptr(mod.q4), ptr(mod.d), ptr(mod.m), ptr(bias)]
        return fmt, [ptr(mod.weight.detach().contiguous()), 0, 0, ptr(bias)]

    rot = model.rotary
    fmt, head = mat(_head(model))
    fmts = [fmt]
    ptrs = [ptr(model.embed_tokens.weight.detach().contiguous()), ptr(model.norm.weight.detach().float().contiguous()),
            ptr(rot.cos_table.contiguous()), ptr(rot.sin_table.contiguous()), *head]
    for layer in model.layers:
        ptrs += [ptr(layer.input_layernorm.weight.detach().contiguous()),
                 ptr(layer.post_attention_layernorm.weight.detach().contiguous())]
        for name in PROJECTIONS:
            fmt, p = mat(getattr(layer, name))
            fmts.append(fmt)
            ptrs += p
    return fmts, ptrs, int(rot.cos_table.shape[0])


def _layout_pointers(w: LayoutWeights, ptr) -> tuple[list[int], list[int], int]:
    """The same from an int8 layout's arrays: every projection and the head int8."""
    a = w.arrays

    def arr(name: str, dtype=np.float32) -> np.ndarray | None:
        x = a.get(name)
        return None if x is None else np.ascontiguousarray(x, dtype=dtype)

    def int8(name: str) -> list[int]:
        return [ptr(arr(name + ".int8_weight", np.int8), True), ptr(arr(name + ".int8_scale"), True), 0,
                ptr(arr(name + ".bias"), True)]

    n = w.num_positions
    ptrs = [ptr(arr("embed_tokens.weight")), ptr(arr("norm.weight")), ptr(arr("rotary.cos_table")[:n]),
            ptr(arr("rotary.sin_table")[:n]), *int8("lm_head_q")]
    fmts = [_I8]
    for i in range(w.cfg.num_layers):
        ptrs += [ptr(arr(f"layers.{i}.input_layernorm.weight")), ptr(arr(f"layers.{i}.post_attention_layernorm.weight"))]
        for name in PROJECTIONS:
            fmts.append(_I8)
            ptrs += int8(f"layers.{i}.{name}")
    return fmts, ptrs, n


def _address(x) -> int:
    return x.ctypes.data if isinstance(x, np.ndarray) else x.data_ptr()


class NativeDecoder:
    def __init__(self, model: LlamaModel | LayoutWeights, pool, lib: ctypes.CDLL, arena: tuple[int, int] = (0, 0),
                 threads: int | None = None) -> None:
        """`model`: a LlamaModel, or an int8 layout's arrays (LayoutWeights: no torch needed). `arena`:
        (base, length) of a map backed for the weight arena while the process started
        (startup.take_arena), owned by the native step from here, or (0, 0) for an arena of its own.
        `threads`: the step's threads (None: native.default_threads() at every step)."""
        reason = unsupported_reason(model, pool.dtype_name)
        if reason:
            if arena[0]:
                from kvstrata.startup import unmap

                unmap(*arena)
            raise KvstrataError(reason)
        self.lib, self.pool, self.threads = lib, pool, threads
        cfg = model.cfg
        self.vocab = cfg.vocab_size
        keep: list = []  # what the C side keeps pointing at lives as long as this object
        copied: list = []  # int8 weights, scales, biases: copied into the C arena

        def ptr(t, copy: bool = False) -> int:
            if t is None:
                return 0
            (copied if copy else keep).append(t)
            return _address(t)

        fmts, ptrs, positions = (_layout_pointers(model, ptr) if isinstance(model, LayoutWeights)
                                 else _model_pointers(model, ptr))
        self.formats = sorted({("fp32", "int8", "int4")[f] for f in fmts[1:]})
        ints = np.array([cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                         cfg.intermediate_size, cfg.vocab_size, pool.block_size, positions,
                         _KV_TYPES[pool.dtype_name]], dtype=np.int64)
        floats = np.array([cfg.rms_norm_eps, cfg.head_dim**-0.5], dtype=np.float64)
        fm = np.array(fmts, dtype=np.int64)
        pv = np.array(ptrs, dtype=np.int64)
        self._keep = keep
        self.handle = lib.kv_model_new(ints.ctypes.data, floats.ctypes.data, fm.ctypes.data, pv.ctypes.data,
                                       arena[0] or None, arena[1])
        copied.clear()  # the C arena holds its own copies
        if not self.handle:
            raise KvstrataError("the native step could not allocate its weights")
        self.weight_bytes = int(lib.kv_model_weight_bytes(self.handle))  # its own int8 copy, beside fbgemm's
        self.arena_mapped = bool(lib.kv_model_arena_mapped(self.handle))  # in the map given, backed ahead
        # int8 products of 4 rows or more on AMX tiles (native/gemm.c): a step's extra rows cost less
        self.amx = self.formats == ["int8"] and bool(lib.kv_amx(-1))

    def __del__(self) -> None:
        h, self.handle = getattr(self, "handle", None), None
        if h:
            self.lib.kv_model_free(h)

    def step(self, tokens, positions, slots, row_seq, tables: list[list[int]], out_rows) -> np.ndarray:
        """One engine step: rows (T,) of token, position, pool slot and index into `tables` (one block table
        per sequence; any integer sequences or CPU tensors); each row attends over positions 0..its own of
        its sequence. -> next-token logits (len(out_rows), vocab) float32 for the rows out_rows: a numpy
        array, or a torch tensor (sharing its memory) when the tokens came as one."""
        from kvstrata.native import default_threads

        meta = np.array([np.asarray(x, dtype=np.int64) for x in (tokens, positions, slots, row_seq)], dtype=np.int64)
        T = int(meta.shape[1])
        outs = np.ascontiguousarray(np.asarray(out_rows, dtype=np.int64))
        n_out = int(outs.shape[0])
        nb = max(len(t) for t in tables)
        bt = np.zeros((len(tables), nb), dtype=np.int64)  # padded with block 0
        for i, t in enumerate(tables):
            bt[i, : len(t)] = t
        logits = np.empty((n_out, self.vocab), dtype=np.float32)
        k, v = self.pool.pointers()
        base = meta.ctypes.data
        rc = self.lib.kv_step(self.handle, T, base, base + 8 * T, base + 16 * T, base + 24 * T, bt.ctypes.data, nb,
                              k, v, self.pool.layer_stride, n_out, outs.ctypes.data, logits.ctypes.data,
                              self.threads or default_threads())
        if rc != 0:
            raise KvstrataError({-1: "the native step ran out of memory",
                                 -2: "a position lies outside the RoPE table (max_model_len)",
                                 -3: "a token id or an output row is out of range"}.get(rc, f"native step failed ({rc})"))
        if not isinstance(tokens, (list, tuple, np.ndarray)):
            import torch

            return torch.from_numpy(logits)
        return logits

    def decode(self, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> np.ndarray:
        """One decode token for each of B sequences -> next-token logits (B, vocab) float32."""
        rows = np.arange(len(tokens))
        return self.step(tokens, positions, slots, rows, tables, rows)

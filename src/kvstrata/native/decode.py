"""NativeDecoder: runs every engine step of a CPU float32 LlamaModel through the native step (step.c).

One C call per step computes every scheduled row, prefill chunks and decodes alike, so each token gets
the same arithmetic whatever else is in the step (batch invariance, native/kv.h). Weights: fp32 (read in
place from the model's tensors), int8 (copied into one huge-page arena as VNNI panels; the torch path's
fbgemm copy stays, so int8 weights are held twice) or int4 (read in place). It reads and writes the
engine's KV pool in place (fp32, fp16 or bf16). Models it cannot run (not float32 compute, a matmul that
is none of the three, head_dim > 512) stay on the torch path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from kvstrata.core import KvstrataError
from kvstrata.model.llama import LlamaModel
from kvstrata.model.quant import PROJECTIONS, Int4Linear, PerTokenInt8Linear

_KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_F32, _I8, _I4 = 0, 1, 2


def _format(mod: nn.Module | None) -> int | None:
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


def unsupported_reason(model: LlamaModel, kv_dtype: torch.dtype) -> str | None:
    """Why the native step cannot run this model, or None when it can."""
    cfg = model.cfg
    if model.dtype != torch.float32 or model.embed_tokens.weight.device.type != "cpu":
        return "the native step needs a CPU model computing in float32"
    if kv_dtype not in _KV_TYPES:
        return "the native step needs a float32, float16 or bfloat16 KV pool"
    head = _head(model)
    if not (isinstance(head, nn.Embedding) or _format(head) in (_F32, _I8)) or any(
            _format(getattr(layer, n, None)) is None for layer in model.layers for n in PROJECTIONS):
        return "the native step runs float32, int8 and int4 weights only"
    if cfg.head_dim > 512 or cfg.num_heads % cfg.num_kv_heads:
        return "the native step needs head_dim <= 512 and whole query groups"
    if model.rotary.cos_table is None:
        return "the RoPE table is not built"
    return None


def _int8_parts(mod: PerTokenInt8Linear) -> list[torch.Tensor | None]:
    w, scale = mod.int8_weight()  # the same int8 values and per-channel scales the torch path multiplies with
    return [w.contiguous(), scale.float().contiguous(), None,
            None if mod.bias is None else mod.bias.detach().float().contiguous()]


class NativeDecoder:
    def __init__(self, model: LlamaModel, pool, lib: ctypes.CDLL, arena: tuple[int, int] = (0, 0)) -> None:
        """`arena`: (base, length) of a map backed for the weight arena while the process started
        (startup.take_arena), owned by the native step from here, or (0, 0) for an arena of its own."""
        reason = unsupported_reason(model, pool.k.dtype)
        if reason:
            if arena[0]:
                from kvstrata.startup import unmap

                unmap(*arena)
            raise KvstrataError(reason)
        self.lib, self.pool = lib, pool
        cfg = model.cfg
        self.vocab = cfg.vocab_size
        keep: list[torch.Tensor] = []  # what the C side keeps pointing at lives as long as this object
        copied: list[torch.Tensor] = []  # int8 weights, scales, biases: copied into the C arena

        def ptr(t: torch.Tensor | None, into: list[torch.Tensor] = keep) -> int:
            if t is None:
                return 0
            into.append(t)
            return t.data_ptr()

        def mat(mod: nn.Module) -> tuple[int, list[int]]:
            if isinstance(mod, nn.Embedding):  # a tied LM head: the embedding table itself
                return _F32, [ptr(mod.weight.detach().contiguous()), 0, 0, 0]
            fmt = _format(mod)
            bias = None if mod.bias is None else mod.bias.detach().float().contiguous()
            if fmt == _I8:
                return fmt, [ptr(t, copied) for t in _int8_parts(mod)]
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
        self.formats = sorted({("fp32", "int8", "int4")[f] for f in fmts[1:]})
        ints = torch.tensor([cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                             cfg.intermediate_size, cfg.vocab_size, pool.block_size, rot.cos_table.shape[0],
                             _KV_TYPES[pool.k.dtype]], dtype=torch.int64)
        floats = torch.tensor([cfg.rms_norm_eps, cfg.head_dim**-0.5], dtype=torch.float64)
        fm = torch.tensor(fmts, dtype=torch.int64)
        pv = torch.tensor(ptrs, dtype=torch.int64)
        self._keep = keep
        self.handle = lib.kv_model_new(ints.data_ptr(), floats.data_ptr(), fm.data_ptr(), pv.data_ptr(), arena[0] or None,
                                       arena[1])
        copied.clear()  # the C arena holds its own copies
        if not self.handle:
            raise KvstrataError("the native step could not allocate its weights")
        self.weight_bytes = int(lib.kv_model_weight_bytes(self.handle))  # its own int8 copy, beside fbgemm's
        self.arena_mapped = bool(lib.kv_model_arena_mapped(self.handle))  # in the map given, backed ahead

    def __del__(self) -> None:
        h, self.handle = getattr(self, "handle", None), None
        if h:
            self.lib.kv_model_free(h)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, row_seq: torch.Tensor,
             tables: list[list[int]], out_rows: torch.Tensor) -> torch.Tensor:
        """One engine step: rows (T,) int64 of token, position, pool slot and index into `tables` (one block
        table per sequence); each row attends over positions 0..its own of its sequence. -> next-token
        logits (len(out_rows), vocab) fp32 for the rows out_rows."""
        T, n_out = int(tokens.shape[0]), int(out_rows.shape[0])
        nb = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.int64)  # padded with block 0
        meta = torch.stack([tokens, positions, slots, row_seq]).to(torch.int64).contiguous()
        outs = out_rows.to(torch.int64).contiguous()
        logits = torch.empty(n_out, self.vocab, dtype=torch.float32)
        k, v = self.pool.k, self.pool.v
        base = meta.data_ptr()
        rc = self.lib.kv_step(self.handle, T, base, base + 8 * T, base + 16 * T, base + 24 * T, bt.data_ptr(), nb,
                              k.data_ptr(), v.data_ptr(), k.stride(0), n_out, outs.data_ptr(), logits.data_ptr(),
                              torch.get_num_threads())
        if rc != 0:
            raise KvstrataError({-1: "the native step ran out of memory",
                                 -2: "a position lies outside the RoPE table (max_model_len)",
                                 -3: "a token id or an output row is out of range"}.get(rc, f"native step failed ({rc})"))
        return logits

    def decode(self, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode token for each of B sequences -> next-token logits (B, vocab) fp32."""
        B = len(tokens)
        rows = torch.arange(B)
        return self.step(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots), rows, tables, rows)

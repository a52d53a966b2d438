"""NativeDecoder: runs an all-decode engine step of an int8 LlamaModel through decode.c in one call.

It reads the int8 weights and per-channel scales the int8 path already made (model/quant.py); the C side
keeps one plain row-major copy of them in a single huge-page arena (fbgemm's packed copy stays for
prefill, so int8 weights are held twice), and it reads and writes the engine's KV pool in place.
Steps with a prefill chunk, more than `max_batch` sequences, or a model it cannot run (not int8, KV neither fp32 nor fp16, head_dim > 512) stay on the torch path.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from kvstrata.core import KvstrataError
from kvstrata.model.llama import LlamaModel
from kvstrata.model.quant import PROJECTIONS, PerTokenInt8Linear


def unsupported_reason(model: LlamaModel, kv_dtype: torch.dtype) -> str | None:
    """Why the native step cannot run this model, or None when it can."""
    cfg = model.cfg
    if not isinstance(model.lm_head_q, PerTokenInt8Linear) or any(
            not isinstance(getattr(layer, n, None), PerTokenInt8Linear) for layer in model.layers for n in PROJECTIONS):
        return "the native decode step needs --quantization int8"
    if model.dtype != torch.float32 or kv_dtype not in (torch.float32, torch.float16):
        return "the native decode step needs float32 activations and a float32 or float16 KV pool"
    if cfg.head_dim > 512 or cfg.num_heads % cfg.num_kv_heads:
        return "the native decode step needs head_dim <= 512 and whole query groups"
    if model.rotary.cos_table is None:
        return "the RoPE table is not built"
    return None


def _int8_parts(mod: PerTokenInt8Linear) -> list[torch.Tensor | None]:
    if mod.int8 is not None:  # the same int8 values and per-channel scales the torch path multiplies with
        w, scale = mod.int8
    else:  # (released already: unpack fbgemm's copy)
        qw = mod.dyn.weight()
        w, scale = qw.int_repr(), qw.q_per_channel_scales().float()
    w = w.contiguous()
    rowsum = torch.from_numpy(w.numpy().sum(axis=1, dtype=np.int32))  # numpy: ~50x torch's int8 reduction here
    return [w, scale.float().contiguous(), rowsum,
            None if mod.bias is None else mod.bias.detach().float().contiguous()]


class NativeDecoder:
    def __init__(self, model: LlamaModel, pool, lib: ctypes.CDLL, max_batch: int = 64) -> None:
        reason = unsupported_reason(model, pool.k.dtype)
        if reason:
            raise KvstrataError(reason)
        self.lib, self.pool, self.max_batch = lib, pool, max_batch
        cfg = model.cfg
        self.vocab = cfg.vocab_size
        keep: list[torch.Tensor] = []  # what the C side keeps pointing at lives as long as this object
        copied: list[torch.Tensor] = []  # int8 weights, scales, row sums, biases: copied into the C arena

        def ptr(t: torch.Tensor | None, into: list[torch.Tensor] = keep) -> int:
            if t is None:
                return 0
            into.append(t)
            return t.data_ptr()

        def mat(mod: PerTokenInt8Linear) -> list[int]:
            return [ptr(t, copied) for t in _int8_parts(mod)]

        rot = model.rotary
        ptrs = [ptr(model.embed_tokens.weight.detach().contiguous()), ptr(model.norm.weight.detach().float().contiguous()),
                ptr(rot.cos_table.contiguous()), ptr(rot.sin_table.contiguous())]
        ptrs += mat(model.lm_head_q)[:3]
        for layer in model.layers:
            ptrs += [ptr(layer.input_layernorm.weight.detach().contiguous()),
                     ptr(layer.post_attention_layernorm.weight.detach().contiguous())]
            for name in PROJECTIONS:
                ptrs += mat(getattr(layer, name))
        ints = torch.tensor([cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                             cfg.intermediate_size, cfg.vocab_size, pool.block_size, rot.cos_table.shape[0],
                             int(pool.k.dtype == torch.float16)], dtype=torch.int64)
        floats = torch.tensor([cfg.rms_norm_eps, cfg.head_dim**-0.5], dtype=torch.float64)
        pv = torch.tensor(ptrs, dtype=torch.int64)
        self._keep = keep
        self.handle = lib.kv_model_new(ints.data_ptr(), floats.data_ptr(), pv.data_ptr())
        del copied
        if not self.handle:
            raise KvstrataError("the native decode step could not allocate its weights")
        self.weight_bytes = int(lib.kv_model_weight_bytes(self.handle))  # its own int8 copy, beside fbgemm's

    def __del__(self) -> None:
        h, self.handle = getattr(self, "handle", None), None
        if h:
            self.lib.kv_model_free(h)

    def decode(self, tokens: list[int], positions: list[int], slots: list[int], lens: list[int],
               tables: list[list[int]]) -> torch.Tensor:
        """One decode token for each of B sequences -> next-token logits (B, vocab) fp32."""
        B = len(tokens)
        nb = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.int64)  # padded with block 0
        meta = torch.tensor([tokens, positions, slots, lens], dtype=torch.int64)
        logits = torch.empty(B, self.vocab, dtype=torch.float32)
        k, v = self.pool.k, self.pool.v
        base = meta.data_ptr()
        rc = self.lib.kv_decode(self.handle, B, base, base + 8 * B, base + 16 * B, base + 24 * B, bt.data_ptr(), nb,
                                k.data_ptr(), v.data_ptr(), k.stride(0), logits.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise KvstrataError({-1: "the native decode step ran out of memory",
                                 -2: "a position lies outside the RoPE table (max_model_len)"}.get(rc, f"native decode failed ({rc})"))
        return logits

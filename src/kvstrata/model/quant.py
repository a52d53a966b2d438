"""CPU fast path: int8 weights with dynamically quantized activations (fbgemm / oneDNN x86 kernels).

Decode is memory-bound: fp32 weights make every step read 4 bytes per parameter. int8 weights read
one, and PyTorch's x86 dynamic-quantized linear (per-channel symmetric int8 weights, per-tensor
activations quantized on the fly) runs 4-8x faster than fp32 `linear` on the 2-core machines this
project targets (measured in benchmarks/results/engine.md). The cost is accuracy: about 1-2% relative
error per projection, so greedy output can drift from the fp32 reference after some tokens; the
benchmark reports token agreement against fp32. Embedding lookups stay fp32; the LM head (tied or not)
gets its own int8 copy.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)
_PROJ = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # after DecoderLayer.fuse_projections


class PerTokenInt8Linear(nn.Module):
    """y = x W^T + b with int8 W, each activation row quantized with its own scale.

    PyTorch's dynamic linear quantizes the whole activation matrix with one scale; in a prefill one
    token with massive activations (attention-sink positions such as BOS) would crush every other
    row's resolution. Linear maps commute with row scaling, so each row is scaled to max |x| = 1
    first and the output rows are scaled back: per-token quantization with the same fast kernel.
    """

    def __init__(self, dyn: nn.Module, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.dyn = dyn
        self.packed = dyn._packed_params._packed_params  # the op's own handle: no module call per matmul
        self.reduce_range = not _has_vnni()
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, in)
        if x.shape[0] == 1:  # one row: the op's per-tensor activation scale already is per-token
            y = torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        else:
            s = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-6)  # (T, 1)
            y = torch.ops.quantized.linear_dynamic(x / s, self.packed, self.reduce_range).mul_(s)
        return y if self.bias is None else y.add_(self.bias)


@functools.cache
def _has_vnni() -> bool:
    """True when the CPU has VNNI (u8 x s8 dot products accumulate in int32, no int16 saturation).

    Without VNNI, fbgemm's AVX2 kernels sum pairs of u8 x s8 products in int16, which can saturate, so
    activations must be quantized to 7 bits (`reduce_range`); with it, the full 8 bits are safe and the
    activation rounding error halves."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A per-token dynamic-quantized Linear with per-output-channel symmetric int8 weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    w = weight.detach().float()
    out_f, in_f = w.shape
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    with warnings.catch_warnings():  # torch.ao warns that it is moving to torchao; the kernels stay
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(w, scale, torch.zeros(out_f, dtype=torch.long), 0, torch.qint8)
        m = DynLinear(in_f, out_f, bias_=False, dtype=torch.qint8)
    m.set_weight_bias(qw, None)
    return PerTokenInt8Linear(m, bias)


def quantize_model_int8(model: nn.Module) -> nn.Module:
    """Swaps every projection and the LM head of a LlamaModel (fp32, CPU) for int8 versions, in place."""
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    for layer in model.layers:
        for name in _PROJ:
            lin: nn.Linear = getattr(layer, name)
            setattr(layer, name, int8_linear(lin.weight, lin.bias))
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head_q = int8_linear(head, None)
    if model.lm_head is not None:
        model.lm_head = None
        model.cfg_tied_head_dropped = True
    return model

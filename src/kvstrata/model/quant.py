"""CPU weight quantization: int8 (per-channel symmetric weights) and int4 (groups of 32, as GGUF Q4_1).

Decode is memory-bound: fp32 weights make every step read 4 bytes per parameter, int8 one, int4 half.
The engine's CPU step (native/) multiplies these weights itself, each activation row quantized on its
own; the modules here hold the quantized weights and are also the torch path's linears (where no C
compiler is found), on PyTorch's x86 kernels. The cost is accuracy: about 1-2% relative error per
projection for int8, so greedy output can drift from the fp32 reference after some tokens (bounds in
tests/engine/test_reference.py). Embedding lookups stay fp32; the LM head (tied or not) gets its own
int8 copy.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)
_PACK_LOCK = threading.Lock()
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # after DecoderLayer.fuse_projections


class PerTokenInt8Linear(nn.Module):
    """y = x W^T + b with int8 W, each activation row quantized on its own.

    This is the torch path's int8 linear (the native step, native/, quantizes each row itself and is
    what the engine runs on CPU). PyTorch's dynamic linear quantizes the whole activation matrix with one
    scale and zero point from its min and max, which couples the rows: in a prefill one token with
    massive activations (attention-sink positions such as BOS) would crush every other row's
    resolution, and a row's result would depend on what else shares the step. Linear maps commute with
    row scaling, so each row is scaled to max |x| = 1 first and the output rows scaled back; a constant
    extra row [-1, 1, 0, ...] pins the matrix's range to exactly [-1, 1], so every row is quantized with
    the same fixed grid whatever the other rows hold, and the int8 x int8 sums are exact: a row's result
    is the same alone or in any batch.

    The int8 weight (out, in) and its fp32 per-channel scales (out,) are what the layout cache stores and
    the native step copies; fbgemm's packed copy, which only this torch path multiplies, is made on the
    first forward (~0.7 CPU-s for the default model, most of a cached start, so an engine whose native
    step runs every step never pays it). `release_int8` lets the plain copy go once it is not needed.
    """

    def __init__(self, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, mapped: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = w8.shape
        self.reduce_range = not _has_vnni()
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = (w8, scale.float())
        self.mapped = mapped  # int8 views of a file map (the layout cache): dropping their pages frees them
        self.dyn: nn.Module | None = None  # fbgemm's packed copy, once made
        pin = torch.zeros(1, self.in_features)
        pin[0, 0], pin[0, min(1, self.in_features - 1)] = -1.0, 1.0
        self.register_buffer("range_row", pin, persistent=False)

    @property
    def packed(self):
        """fbgemm's packed weight (the op's own handle: no module call per matmul), made on first use."""
        if self.dyn is None:
            with _PACK_LOCK:
                if self.dyn is None:
                    self.dyn = _pack(*self.int8)
        return self.dyn._packed_params._packed_params

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weight (out, in) and fp32 per-channel scales (out,), from whichever copy is held."""
        if self.int8 is not None:
            return self.int8
        qw = self.dyn.weight()
        return qw.int_repr(), qw.q_per_channel_scales().float()

    def release_int8(self) -> None:
        """Lets the plain int8 copy go (packed for the torch path first) once the native step has its own.
        A copy that views a file map (`mapped`) is kept instead, its pages returned to the page cache by
        the caller (engine/setup.py), so a later torch-path pack reads it from the file again."""
        if self.int8 is not None and not self.mapped:
            _ = self.packed
            self.int8 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, in)
        s = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-6)  # (T, 1)
        y = torch.ops.quantized.linear_dynamic(torch.cat([x / s, self.range_row]), self.packed, self.reduce_range)
        y = y[:-1].mul_(s)
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


INT8_ROWS = 8192  # output channels quantized per pass (each channel on its own: the same values in any split)


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A per-token dynamic-quantized Linear with per-output-channel symmetric int8 weights. Quantized
    INT8_ROWS channels at a time into the int8 weight, so the temporaries (|w|, the qint8 tensor) stay a
    few tens of MB: a large LM head or embedding (49k x 576 for the default model, 128k x 4096 for an 8B)
    does not add its float size again to a start's peak memory."""
    w = weight.detach().float()
    n = w.shape[0]
    w8, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(n, dtype=torch.float32)
    for r0 in range(0, n, INT8_ROWS):
        part = w[r0: r0 + INT8_ROWS]
        s = scale[r0: r0 + INT8_ROWS]
        torch.clamp((part.abs().amax(dim=1) / 127.0), min=1e-12, out=s)
        with warnings.catch_warnings():  # torch.ao warns that it is moving to torchao; the kernels stay
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(part, s.double(), torch.zeros(part.shape[0], dtype=torch.long), 0,
                                            torch.qint8)
        w8[r0: r0 + INT8_ROWS] = qw.int_repr()
    return PerTokenInt8Linear(w8, scale, bias)


def _pack(w8: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """fbgemm's dynamic int8 Linear holding w8 (out, in) with per-channel scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    out_f, in_f = w8.shape
    qw = torch._make_per_channel_quantized_tensor(w8.contiguous(), scale.double(), torch.zeros(out_f, dtype=torch.long), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = DynLinear(1, 1, bias_=False, dtype=torch.qint8)  # (its constructor packs a zero weight of the size it is given)
    m.set_weight_bias(qw, None)
    m.in_features, m.out_features = in_f, out_f
    return m


def quantize_model_int8(model: nn.Module) -> nn.Module:
    """Swaps every projection and the LM head of a LlamaModel (fp32, CPU) for int8 versions, in place."""
    for layer in model.layers:
        quantize_layer_int8(layer)
    return quantize_head_int8(model)


def quantize_layer_int8(layer: nn.Module) -> nn.Module:
    """One decoder layer's fused projections swapped for int8 versions, in place (engine/layout.py builds
    a model layer by layer with it, the float weights of one layer alive at a time)."""
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    for name in PROJECTIONS:
        lin: nn.Linear = getattr(layer, name)
        setattr(layer, name, int8_linear(lin.weight, lin.bias))
    return layer


def quantize_head_int8(model: nn.Module) -> nn.Module:
    """The LM head (the embedding where tied) as an int8 copy beside the float embedding, in place."""
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.lm_head_q = int8_linear(head, None)
    model.lm_head = None  # (the int8 head replaces it)
    return model


GROUP = 32  # int4 group size: the GGUF Q4_0 / Q4_1 block, so a Q4_1 file's groups map one to one


class Int4Linear(nn.Module):
    """y = x W^T + b with W in asymmetric 4-bit groups of 32 along the input (a scale d and a minimum m per
    group and output channel, w = d * q + m with q in 0..15, as GGUF Q4_1 stores them). Re-quantizing a
    Q4_1 file's dequantized weights gives back its own groups.

    Kept as `q4` (n, k / 32, 16) bytes (byte j of a group: q of element j in the low nibble, of j + 16
    in the high one), `d` and `m` (n, k / 32) fp32: what the native step multiplies (fp32 activations,
    native/gemm.c). The torch path (no C compiler, CUDA excluded) uses PyTorch's CPU int4 kernel
    (`_weight_int4pack_mm_for_cpu`, bf16 activations and scales), packed on first use: it reads half the
    bytes of int8 but does not block for many rows (from 8 rows on 3-4x slower than the int8 kernel)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        n, k = w.shape
        g = w.view(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)  # (n, k/32, 32)
        self.register_buffer("q4", (q[..., :16] | (q[..., 16:] << 4)).contiguous(), persistent=False)
        self.register_buffer("d", scale.contiguous(), persistent=False)
        self.register_buffer("m", lo.contiguous(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._torch_pack: tuple[torch.Tensor, torch.Tensor] | None = None

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._torch_pack is None:
            n = self.q4.shape[0]
            q = torch.cat([self.q4 & 15, self.q4 >> 4], dim=-1).to(torch.int32).view(n, -1)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            # the kernel computes (q - 8) * scale + zero: zero = m + 8 * d; laid out (k / GROUP, n, 2)
            sz = torch.stack([self.d.t(), (self.m + 8 * self.d).t()], dim=-1).contiguous().to(torch.bfloat16)
            self._torch_pack = (packed, sz)
        return self._torch_pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, in) fp32
        packed, sz = self._pack()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, sz).float()
        return y if self.bias is None else y.add_(self.bias)


def quantize_model_int4(model: nn.Module) -> nn.Module:
    """Swaps every projection of a LlamaModel (fp32, CPU) for Int4Linear, in place; the LM head gets the
    int8 kernel (a 49k-row matmul where int8's blocking wins). Needs input widths that are multiples of 32."""
    for layer in model.layers:
        for name in PROJECTIONS:
            lin: nn.Linear = getattr(layer, name)
            if lin.weight.shape[1] % GROUP:
                raise KvstrataError(f"--quantization int4 needs input widths divisible by {GROUP}; {name} has {lin.weight.shape[1]}")
            setattr(layer, name, Int4Linear(lin.weight, lin.bias))
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    model.lm_head_q = int8_linear(head, None)
    model.lm_head = None
    return model

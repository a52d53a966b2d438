"""Small building blocks of the Llama-family decoder: RMSNorm and rotary position embedding.

Both follow the Hugging Face `transformers` Llama implementation op for op (same dtype casts), so
that our logits agree with the reference to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvstrata.model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused kernel, same arithmetic (measured identical in fp32)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with llama3 / linear scaling (RoFormer, Su et al. 2021).

    `rope_freqs` is the per-dimension divisor GGUF files store (tensor `rope_freqs.weight`) for
    llama3-style scaling instead of the HF parameters.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rope_freqs is not None:  # (a numpy array from the GGUF loader, or a tensor)
        return inv / torch.as_tensor(rope_freqs).float()
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / float(rs["factor"])
    # llama3: Meta's frequency-dependent scaling (as in HF `_compute_llama3_parameters`)
    factor = float(rs["factor"])
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(nn.Module):
    """Applies RoPE to q (T, H, d) and k (T, KVH, d) at integer positions (T,).

    cos/sin come from a table built once for every position up to the engine's max_model_len
    (`build_table`), so a step costs two row gathers instead of a sin and a cos of the whole batch. The
    sin table is sign-folded (first half negated): rotate_half(x) * sin == swap_halves(x) * sin_folded,
    which saves a negation per layer; both are exact, so values equal the HF formula's.
    """

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.cos_table: torch.Tensor | None = None
        self.sin_table: torch.Tensor | None = None

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fp32 (T, d)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
        half = freqs.shape[-1]
        sin = emb.sin()
        sin[:, :half].neg_()
        return emb.cos(), sin

    def build_table(self, num_positions: int, dtype: torch.dtype) -> None:
        pos = torch.arange(num_positions, device=self.inv_freq.device)
        cos, sin = self._cos_sin(pos)
        self.cos_table, self.sin_table = cos.to(dtype), sin.to(dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 1, d) cos and sign-folded sin in `dtype`."""
        if self.cos_table is not None and self.cos_table.dtype == dtype:
            return self.cos_table.index_select(0, positions)[:, None, :], self.sin_table.index_select(0, positions)[:, None, :]
        cos, sin = self._cos_sin(positions)
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin, with `sin` sign-folded (see the class docstring)."""
        half = x.shape[-1] // 2
        # not addcmul: in bf16 it rounds once where the reference rounds twice, and the ulps add up
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin

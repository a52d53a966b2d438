"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV pool.

forward() takes a flat step of T tokens from many sequences (see model/attention.py for the layout)
and returns logits only at the positions the sampler needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvstrata.model.attention import AttnMetadata, paged_attention, write_kv
from kvstrata.model.config import ModelConfig
from kvstrata.model.layers import RMSNorm, Rotary, rope_inv_freq


def _linear(i: int, o: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(i, o, bias=bias, dtype=dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = _linear(h, cfg.num_heads * hd, cfg.attention_bias, dtype)
        self.k_proj = _linear(h, cfg.num_kv_heads * hd, cfg.attention_bias, dtype)
        self.v_proj = _linear(h, cfg.num_kv_heads * hd, cfg.attention_bias, dtype)
        self.o_proj = _linear(cfg.num_heads * hd, h, False, dtype)
        self.gate_proj = _linear(h, cfg.intermediate_size, False, dtype)
        self.up_proj = _linear(h, cfg.intermediate_size, False, dtype)
        self.down_proj = _linear(cfg.intermediate_size, h, False, dtype)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.scale = hd**-0.5
        self.inter = cfg.intermediate_size

    def fuse_projections(self) -> None:
        """Concatenates q/k/v and gate/up into one weight each: two matmuls per layer instead of five.

        Decode is dominated by per-op cost at batch 1, so fewer, larger kernels win; the outputs are the
        same dot products, only summed by one kernel call (measured in benchmarks/results/engine.md)."""
        def cat(mods: list[nn.Linear]) -> nn.Linear:
            w = torch.cat([m.weight.detach() for m in mods])
            lin = nn.Linear(w.shape[1], w.shape[0], bias=mods[0].bias is not None, device="meta", dtype=w.dtype)
            lin.weight = nn.Parameter(w, requires_grad=False)
            if mods[0].bias is not None:
                lin.bias = nn.Parameter(torch.cat([m.bias.detach() for m in mods]), requires_grad=False)
            return lin

        self.qkv_proj = cat([self.q_proj, self.k_proj, self.v_proj])
        self.gate_up_proj = cat([self.gate_proj, self.up_proj])
        del self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        cos: torch.Tensor,  # (T, 1, d)
        sin: torch.Tensor,  # (T, 1, d), sign-folded: rotate_half(x) * sin == swap_halves(x) * sin
        k_cache: torch.Tensor,  # (num_blocks, block_size, KVH, d)
        v_cache: torch.Tensor,
        meta: AttnMetadata,
    ) -> torch.Tensor:
        T, H, KVH, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x))
        # RoPE on q and k in one pass: they are adjacent columns of the fused projection
        qk = Rotary.apply(qkv[:, : (H + KVH) * d].view(T, H + KVH, d), cos, sin)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, (H + KVH) * d :].view(T, KVH, d)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        x = x + self.o_proj(attn.reshape(T, -1))
        gu = self.gate_up_proj(self.post_attention_layernorm(x))
        # SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))
        return x + self.down_proj(F.silu(gu[:, : self.inter]) * gu[:, self.inter :])


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, rope_freqs: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype)
        self.rotary = Rotary(rope_inv_freq(cfg, rope_freqs))
        self.lm_head_q: nn.Module | None = None  # int8 LM head (model/quant.py), when quantized

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        k_caches: list[torch.Tensor],  # per layer (num_blocks, block_size, KVH, d)
        v_caches: list[torch.Tensor],
        meta: AttnMetadata,
        logits_indices: torch.Tensor,  # (S,) rows of the step whose next-token logits are wanted
    ) -> torch.Tensor:  # (S, vocab) fp32
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, k_caches[i], v_caches[i], meta)
        x = self.norm(x[logits_indices])
        if self.lm_head_q is not None:
            return self.lm_head_q(x).float()
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w).float()

"""Attention over the paged KV pool.

The pool stores, per layer, K and V as (num_blocks, block_size, num_kv_heads, head_dim). A sequence's
context is the concatenation of the blocks in its block table. Tokens in a step are laid out as
[decode tokens (one per decoding sequence) | prefill chunks, one span per sequence]; see AttnMetadata.

Decodes are attended as one batch (block tables padded, masked); each prefill chunk attends to its
cached context plus itself with a causal mask offset by the context length. Grouped-query attention
goes through SDPA's `enable_gqa` so K/V heads are never repeated in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


# One sequence with a short context: two small matmuls beat SDPA's CPU kernel setup (measured at 512
# tokens: ~10% faster per token); from here on, and for every batch, SDPA reads the strided K/V faster.
_SDPA_MIN_LEN_ONE_SEQ = 1024
# Up to this many decoding sequences, each attends alone: exact lengths (a padded batch gathers and
# attends over every sequence's padding up to the longest; at agentic contexts of 1-5 k tokens that is
# up to half the bytes) and no mask; beyond it, one batched call amortizes the per-call cost.
PER_SEQ_DECODE_MAX = 4  # (a lone sequence keeps the batched path: measured 15-20 % faster there at 4 k context)


@dataclass
class PrefillSpan:
    q_start: int  # offset of this chunk's first token in the step's token list
    q_len: int
    ctx_len: int  # tokens of this sequence already in the pool before this chunk
    block_table: torch.Tensor  # (ceil((ctx_len + q_len) / block_size),) int64


@dataclass
class DecodeSeq:
    """One decoding sequence's context in the pool, for the per-sequence decode path."""

    length: int  # tokens to attend over (its new token included, already in the pool)
    block_table: torch.Tensor  # (ceil(length / block_size),) int64
    first_block: int | None = None  # set when the blocks are adjacent (b0, b0+1, ...): a pool slice, no gather


@dataclass
class AttnMetadata:
    """Per-step attention layout, built by the model runner and read by every layer."""

    slot_mapping: torch.Tensor  # (T,) int64: pool slot (block * block_size + offset) of each new token
    num_decodes: int = 0  # the first num_decodes tokens are single-token decodes
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) int64, padded with block 0
    decode_mask: torch.Tensor | None = None  # (B, 1, 1, max_blocks * block_size) bool, True = attend
    prefills: list[PrefillSpan] = field(default_factory=list)
    # set for 2..PER_SEQ_DECODE_MAX decoding sequences: each attends alone over its exact length
    decode_each: list[DecodeSeq] | None = None
    decode_len1: int = 0  # context length when exactly one sequence decodes
    decode_first_block: int | None = None  # set when that sequence's blocks are adjacent (b0, b0+1, ...)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Scatter new K/V (T, KVH, d) into the pool (num_blocks, block_size, KVH, d) at `slots` (T,)."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slots, v.to(v_cache.dtype))


_NO_CUDNN = None


def _sdpa_exact(q: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA over a decoding sequence's exact length (no mask). On CUDA without the cuDNN backend: it
    builds an execution plan per new shape, and this length grows by one every step (on an H200 that
    cost ~0.9 ms of host time per call: batch-1 decode of an 8B model at 6 % of its roofline)."""
    global _NO_CUDNN
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, kk, vv, scale=scale, enable_gqa=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _NO_CUDNN is None:
        _NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(_NO_CUDNN):
        return F.scaled_dot_product_attention(q, kk, vv, scale=scale, enable_gqa=True)


def _decode_one(q: torch.Tensor, ds: DecodeSeq, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """q (H, d) of one decoding sequence over its `ds.length` pooled tokens -> (H, d)."""
    H, d = q.shape
    nb, bs, kvh = ds.block_table.shape[0], k_cache.shape[1], k_cache.shape[2]
    if ds.first_block is not None:
        kk, vv = k_cache[ds.first_block : ds.first_block + nb], v_cache[ds.first_block : ds.first_block + nb]
    else:
        kk, vv = k_cache.index_select(0, ds.block_table), v_cache.index_select(0, ds.block_table)
    kk = kk.view(1, nb * bs, kvh, d)[:, : ds.length].transpose(1, 2).to(q.dtype)  # (1, KVH, L, d), strided
    vv = vv.view(1, nb * bs, kvh, d)[:, : ds.length].transpose(1, 2).to(q.dtype)
    if ds.length < _SDPA_MIN_LEN_ONE_SEQ and q.device.type == "cpu":
        qq = q.reshape(1, kvh, H // kvh, d)  # (1, KVH, G, d): GQA without repeating K/V
        scores = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # (1, KVH, G, L)
        o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), vv)  # (1, KVH, G, d)
        return o.reshape(H, d)
    return _sdpa_exact(q.view(1, H, 1, d), kk, vv, scale).view(H, d)


def paged_attention(
    q: torch.Tensor,  # (T, H, d), RoPE applied
    k: torch.Tensor,  # (T, KVH, d), RoPE applied (already written to the pool)
    v: torch.Tensor,  # (T, KVH, d)
    k_cache: torch.Tensor,  # (num_blocks, block_size, KVH, d)
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:  # (T, H, d)
    T, H, d = q.shape
    kvh = k.shape[1]
    out = torch.empty_like(q)
    B = meta.num_decodes
    if B and meta.decode_each is not None:
        for i, ds in enumerate(meta.decode_each):
            out[i] = _decode_one(q[i], ds, k_cache, v_cache, scale)
    elif B:
        bt = meta.decode_block_tables  # (B, nb)
        nb, bs = bt.shape[1], k_cache.shape[1]
        if meta.decode_first_block is not None:  # one sequence on adjacent blocks: a view of the pool, no copy
            b0 = meta.decode_first_block
            kk, vv = k_cache[b0 : b0 + nb], v_cache[b0 : b0 + nb]
        else:  # index_select, not k_cache[bt]: advanced indexing on CPU is ~1000x slower here
            kk, vv = k_cache.index_select(0, bt.reshape(-1)), v_cache.index_select(0, bt.reshape(-1))
        # (B, KVH, L, d) as strided views: SDPA reads them in place (a transposing copy cost 2-10x the
        # whole attention on CPU), and `enable_gqa` shares each K/V head among its query heads.
        kk = kk.view(B, nb * bs, kvh, d).transpose(1, 2)
        vv = vv.view(B, nb * bs, kvh, d).transpose(1, 2)
        mask = meta.decode_mask
        if B == 1:  # exact length: no mask
            kk, vv, mask = kk[:, :, : meta.decode_len1], vv[:, :, : meta.decode_len1], None
        kk, vv = kk.to(q.dtype), vv.to(q.dtype)  # a KV pool in a narrower dtype (--kv-dtype) is read in q's
        if B == 1 and kk.shape[2] < _SDPA_MIN_LEN_ONE_SEQ and q.device.type == "cpu":
            qq = q[:1].reshape(1, kvh, H // kvh, d)  # (1, KVH, G, d): GQA without repeating K/V
            scores = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # (1, KVH, G, L)
            o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), vv)  # (1, KVH, G, d)
            out[:1] = o.reshape(1, H, d)
        elif mask is None:
            out[:B] = _sdpa_exact(q[:B].unsqueeze(2), kk, vv, scale).squeeze(2)
        else:
            o = F.scaled_dot_product_attention(q[:B].unsqueeze(2), kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
            out[:B] = o.squeeze(2)
    for span in meta.prefills:
        s, n, c = span.q_start, span.q_len, span.ctx_len
        qq = q[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, H, n, d)
        if c == 0:
            kk = k[s : s + n].transpose(0, 1).unsqueeze(0)  # (1, KVH, n, d)
            vv = v[s : s + n].transpose(0, 1).unsqueeze(0)
            if k_cache.dtype != q.dtype:  # as the pool holds them, so a chunked prefill computes the same
                kk, vv = kk.to(k_cache.dtype).to(q.dtype), vv.to(k_cache.dtype).to(q.dtype)
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
        else:
            L = c + n
            kk = k_cache.index_select(0, span.block_table).view(-1, kvh, d)[:L].transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, KVH, L, d)
            vv = v_cache.index_select(0, span.block_table).view(-1, kvh, d)[:L].transpose(0, 1).unsqueeze(0).to(q.dtype)
            # query i (absolute position c + i) sees keys 0 .. c + i
            mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(diagonal=c)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s : s + n] = o.squeeze(0).transpose(0, 1)
    return out

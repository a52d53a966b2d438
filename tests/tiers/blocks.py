"""Tiny KV blocks for the tier tests: (2 K|V, 2 layers, 4 tokens, 2 heads, 8 dims)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstrata.core import block_key
from kvstrata.tiers import codec

FP = "f" * 16 + "0123456789abcdef" * 3  # a model fingerprint (hex)
SHAPE = (2, 2, 4, 2, 8)  # (K|V, layers, block_size, kv_heads, head_dim)


@dataclass
class Block:
    key: bytes
    token_ids: list[int]
    x: torch.Tensor  # SHAPE

    def blob(self, codec_name: str = "raw", fingerprint: str = FP) -> bytes:
        return codec.encode(self.x, key=self.key, token_ids=self.token_ids, fingerprint=fingerprint,
                            codec=codec_name)


def make_block(i: int, fingerprint: str = FP, dtype: torch.dtype = torch.float32) -> Block:
    token_ids = [i * 4 + j for j in range(SHAPE[2])]
    g = torch.Generator().manual_seed(i)
    return Block(block_key(None, token_ids, fingerprint), token_ids, torch.randn(SHAPE, generator=g).to(dtype))


BLOB_BYTES = len(make_block(0).blob())

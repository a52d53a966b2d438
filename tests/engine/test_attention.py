"""Decode attention over the paged pool against dense float64 attention, on every branch it takes:
one sequence on adjacent blocks (a view of the pool) or scattered blocks (a gather), short (two
matmuls) or long (SDPA), and a padded, masked batch. The reference is softmax(q K^T / sqrt(d)) V written
out in float64 over the sequence's own keys, with each K/V head shared by its query-head group."""

from __future__ import annotations

import pytest
import torch

from kvstrata.model.attention import _SDPA_MIN_LEN_ONE_SEQ, PER_SEQ_DECODE_MAX, AttnMetadata, DecodeSeq, paged_attention

BS, KVH, G, D = 16, 2, 3, 32


def _dense(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """q (H, d); keys/vals (L, KVH, d) -> (H, d), in float64."""
    q, keys, vals = q.double(), keys.double(), vals.double()
    out = []
    for h in range(q.shape[0]):
        kv = h // G
        w = torch.softmax(keys[:, kv] @ q[h] / D**0.5, dim=0)
        out.append(w @ vals[:, kv])
    return torch.stack(out)


def _run(tables: list[list[int]], lens: list[int], pool_blocks: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(pool_blocks, BS, KVH, D, generator=g)
    vc = torch.randn(pool_blocks, BS, KVH, D, generator=g)
    B, H = len(tables), KVH * G
    q = torch.randn(B, H, D, generator=g)
    nb = max(len(t) for t in tables)
    bt = torch.zeros(B, nb, dtype=torch.long)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    ln = torch.tensor(lens)
    meta = AttnMetadata(slot_mapping=torch.zeros(B, dtype=torch.long), num_decodes=B)
    if 1 < B <= PER_SEQ_DECODE_MAX:  # as the model runner lays it out: each sequence alone
        meta.decode_each = [DecodeSeq(n, torch.tensor(t), t[0] if t == list(range(t[0], t[0] + len(t))) else None)
                            for t, n in zip(tables, lens)]
    else:  # one padded, masked batch
        meta.decode_block_tables = bt
        meta.decode_mask = (torch.arange(nb * BS)[None, :] < ln[:, None]).view(B, 1, 1, -1)
        if B == 1:
            meta.decode_len1 = lens[0]
            t = tables[0]
            if t == list(range(t[0], t[0] + len(t))):
                meta.decode_first_block = t[0]
    new_kv = torch.zeros(B, KVH, D)  # unused by decode attention: the new token's K/V is already in the pool
    out = paged_attention(q, new_kv, new_kv, kc, vc, meta, D**-0.5)
    for i, t in enumerate(tables):
        keys = kc[t].reshape(-1, KVH, D)[: lens[i]]
        vals = vc[t].reshape(-1, KVH, D)[: lens[i]]
        ref = _dense(q[i], keys, vals)
        assert torch.allclose(out[i].double(), ref, atol=1e-5, rtol=1e-4), (i, (out[i].double() - ref).abs().max())


@pytest.mark.parametrize("length", [37, _SDPA_MIN_LEN_ONE_SEQ + 77])
@pytest.mark.parametrize("adjacent", [True, False])
def test_one_sequence(length: int, adjacent: bool) -> None:
    n = -(-length // BS)
    table = list(range(5, 5 + n)) if adjacent else torch.randperm(n + 40, generator=torch.Generator().manual_seed(1))[:n].tolist()
    if not adjacent:
        assert table != list(range(table[0], table[0] + n))
    _run([table], [length], pool_blocks=n + 45, seed=length)


@pytest.mark.parametrize("lens", [[3, 40, 17, 100], [3, 40, 17, 100, 1200, 64]])
def test_batches(lens: list[int]) -> None:
    """Up to PER_SEQ_DECODE_MAX sequences attend one by one, more as one padded masked batch."""
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(2)).tolist()
    tables, used = [], 0
    for n in lens:
        k = -(-n // BS)
        tables.append(perm[used : used + k])
        used += k
    tables[0] = list(range(150, 150 + len(tables[0])))  # one with adjacent blocks (a pool slice)
    _run(tables, lens, pool_blocks=200, seed=3)

"""The model runner: turns a SchedulerOutput into tensors, runs the model, returns logits."""

from __future__ import annotations

import logging

import torch

from kvstrata.core import KvstrataError
from kvstrata.kv.manager import KVManager
from kvstrata.model.attention import PER_SEQ_DECODE_MAX, AttnMetadata, DecodeSeq, PrefillSpan
from kvstrata.model.llama import LlamaModel
from kvstrata.sched.scheduler import SchedulerOutput
from kvstrata.sched.sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVManager, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.pool = kv.pool
        self.device = device
        self.bs = kv.block_size
        self.native = None  # a NativeDecoder (native/decode.py) for all-decode steps, set by the engine
        self.native_steps = 0

    def _execute_native(self, so: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor] | None:
        """All-decode steps of at most native.max_batch sequences, in one native call; None: not eligible."""
        sched = so.scheduled
        if not sched or len(sched) > self.native.max_batch:
            return None
        bs = self.bs
        tokens, positions, slots, lens, tables, seqs = [], [], [], [], [], []
        for s in sched:
            seq = s.seq
            p = seq.num_computed_tokens
            if s.num_new_tokens != 1 or p + 1 != seq.num_tokens:
                return None
            table = seq.block_table
            tokens.append(seq.token_at(p))
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(table)
            seqs.append(seq)
        logits = self.native.decode(tokens, positions, slots, lens, tables)
        self.native_steps += 1
        return seqs, logits

    def execute(self, so: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor | None]:
        """Runs one step. Returns the sequences that get a next token this step and their logits (S, V)."""
        if self.native is not None:
            try:
                out = self._execute_native(so)
            except KvstrataError as e:  # the step wrote nothing it needs: the torch path redoes it
                log.error("native decode step failed (%s); continuing on the torch path", e)
                self.native = None
                out = None
            if out is not None:
                return out
        dev, bs = self.device, self.bs
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        meta = AttnMetadata(slot_mapping=None)  # type: ignore[arg-type]
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        offset = 0
        for s in so.scheduled:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            toks = seq.all_token_ids[start : start + n]
            ids.extend(toks)
            pos = torch.arange(start, start + n)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1:
                meta.num_decodes += 1
                dec_tables.append(seq.block_table)
                dec_lens.append(start + 1)
            else:
                nblk = self.kv.blocks_needed(start + n)
                meta.prefills.append(PrefillSpan(offset, n, start, table[:nblk].to(dev)))
            if start + n == seq.num_tokens:  # caught up: the last position's logits give the next token
                sample_rows.append(offset + n - 1)
                sample_seqs.append(seq)
            offset += n
        if 1 < meta.num_decodes <= PER_SEQ_DECODE_MAX:
            meta.decode_each = [
                DecodeSeq(n, torch.tensor(t, dtype=torch.long).to(dev), _first_block_if_adjacent(t))
                for t, n in zip(dec_tables, dec_lens)
            ]
        elif meta.num_decodes:
            nb = max(len(t) for t in dec_tables)
            bt = torch.zeros(meta.num_decodes, nb, dtype=torch.long)
            for i, t in enumerate(dec_tables):
                bt[i, : len(t)] = torch.tensor(t)
            meta.decode_block_tables = bt.to(dev)
            if meta.num_decodes == 1:  # attends over its exact length: no mask
                meta.decode_len1 = dec_lens[0]
                meta.decode_first_block = _first_block_if_adjacent(dec_tables[0])
            else:
                lens = torch.tensor(dec_lens)
                meta.decode_mask = (torch.arange(nb * bs)[None, :] < lens[:, None]).view(len(dec_lens), 1, 1, -1).to(dev)
        meta.slot_mapping = torch.cat(slots).to(dev)
        if not ids:
            return [], None
        logits = self.model(
            torch.tensor(ids, device=dev),
            torch.cat(positions).to(dev),
            self.pool.k_layers,
            self.pool.v_layers,
            meta,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        return sample_seqs, logits


def _first_block_if_adjacent(table: list[int]) -> int | None:
    """The first block id when the table is b0, b0+1, ... (attention then reads a slice of the pool)."""
    if table[-1] - table[0] == len(table) - 1 and table == list(range(table[0], table[0] + len(table))):
        return table[0]
    return None

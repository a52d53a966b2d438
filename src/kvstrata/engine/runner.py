"""The model runner: turns a SchedulerOutput into tensors, runs the model, returns logits.

On CPU in float32 every step goes to the native step (native/) when the engine has one: each row's
arithmetic is then independent of the rest of the step. The torch path below (CUDA, bf16 compute, no C
compiler) batches rows through PyTorch kernels whose summation order can change with the batch.
The native step needs no torch: the model, and torch with it, is asked for (`get_model`) only when a
step takes the torch path."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from kvstrata.core import KvstrataError
from kvstrata.kv.manager import KVManager
from kvstrata.sched.scheduler import SchedulerOutput
from kvstrata.sched.sequence import Sequence

if TYPE_CHECKING:
    import torch

    from kvstrata.model.llama import LlamaModel

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, get_model: Callable[[], LlamaModel], kv: KVManager, device: Any) -> None:
        """`get_model`: gives the model (built on first call where the engine started without it)."""
        self.get_model = get_model
        self.kv = kv
        self.pool = kv.pool
        self.device = device  # a torch device or its name
        self.bs = kv.block_size
        # a NativeDecoder (native/decode.py), set by the engine: every step then runs in one C call, each
        # row with the same arithmetic whatever else the step holds (batch invariance)
        self.native = None
        self.native_steps = 0

    @property
    def model(self) -> LlamaModel:
        return self.get_model()

    def _execute_native(self, so: SchedulerOutput) -> tuple[list[Sequence], Any]:
        """The whole step (prefill chunks and decodes of any number of sequences) in one native call."""
        bs = self.bs
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_seq: list[int] = []
        tables: list[list[int]] = []
        out_rows: list[int] = []
        seqs: list[Sequence] = []
        for i, s in enumerate(so.scheduled):
            seq, n = s.seq, s.num_new_tokens
            start, table = seq.num_computed_tokens, seq.block_table
            if n == 1:
                tokens.append(seq.token_at(start))
            else:
                tokens.extend(_step_tokens(seq, start, n))
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            row_seq.extend([i] * n)
            tables.append(table)
            if seq.draft_token_ids:  # the last token and its drafts: every row's logits are verified
                out_rows.extend(range(len(tokens) - n, len(tokens)))
                seqs.append(seq)
            elif start + n == seq.num_tokens:  # caught up: the last position's logits give the next token
                out_rows.append(len(tokens) - 1)
                seqs.append(seq)
        logits = self.native.step(tokens, positions, slots, row_seq, tables, out_rows)
        self.native_steps += 1
        return seqs, logits

    def execute(self, so: SchedulerOutput) -> tuple[list[Sequence], Any]:
        """Runs one step. Returns the sequences that get a next token this step and their logits (a numpy
        array from the native step, a tensor from the torch path): one row each, or
        1 + len(seq.draft_token_ids) consecutive rows for a sequence with drafts."""
        if self.native is not None and so.scheduled:
            try:
                return self._execute_native(so)
            except KvstrataError as e:  # the step wrote nothing it needs: the torch path redoes it
                log.error("native step failed (%s); continuing on the torch path, which is not batch-invariant", e)
                self.native = None
        import torch

        from kvstrata.model.attention import PER_SEQ_DECODE_MAX, AttnMetadata, DecodeSeq, PrefillSpan

        model = self.model  # (first, so a model built now sets its threads before torch runs)
        dev, bs = torch.device(str(self.device)), self.bs
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
            ids.extend(_step_tokens(seq, start, n))
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
            if seq.draft_token_ids:
                sample_rows.extend(range(offset, offset + n))
                sample_seqs.append(seq)
            elif start + n == seq.num_tokens:  # caught up: the last position's logits give the next token
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
        logits = model(
            torch.tensor(ids, device=dev),
            torch.cat(positions).to(dev),
            self.pool.k_layers,
            self.pool.v_layers,
            meta,
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        return sample_seqs, logits


def _step_tokens(seq: Sequence, start: int, n: int) -> list[int]:
    """The tokens at positions start..start+n-1: the sequence's own, then its drafts."""
    if seq.draft_token_ids:  # (a decode with drafts: start is the last token's position)
        return [seq.token_at(start), *seq.draft_token_ids[: n - 1]]
    return seq.all_token_ids[start : start + n]


def _first_block_if_adjacent(table: list[int]) -> int | None:
    """The first block id when the table is b0, b0+1, ... (attention then reads a slice of the pool)."""
    if table[-1] - table[0] == len(table) - 1 and table == list(range(table[0], table[0] + len(table))):
        return table[0]
    return None

"""Continuous batching with chunked prefill under a per-step token budget."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from kvstrata.core import RequestClass
from kvstrata.kv.manager import KVManager
from kvstrata.sched.sequence import Sequence, SeqStatus

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed for seq this step, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    """What the runner computes this step: single-token work first, then prefill chunks."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if seq.request_class == RequestClass.INTERACTIVE:
            # answer inference is admitted first: ahead of any waiting batch work
            idx = next((i for i, s in enumerate(self.waiting) if s.request_class == RequestClass.BATCH), None)
            if idx is not None:
                self.waiting.insert(idx, seq)
                return
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        # Invariant: each request's computed tokens catch up to its known tokens (prompt + output so
        # far), under a token budget per step shared by prefill chunks and decodes. No prefill or decode
        # modes: a decode is a sequence one token behind, a prefill chunk is one many tokens behind.
        out = SchedulerOutput()
        budget = self.budget
        for seq in list(self.running):  # oldest first; the newest are preempted first
            if budget == 0:
                break
            if seq not in self.running:  # preempted to make room for an older one
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, n, out):
                continue
            self.kv.allocate_slots(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0 and not seq.block_table:
                self.kv.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.can_allocate(seq, n):
                # keep the reused prefix only if it will be used soon; release it so memory is not pinned
                self.kv.free(seq)
                break
            self.waiting.popleft()
            self.kv.allocate_slots(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        # single-token work first: the runner batches those as decodes
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences (batch class first) until seq's next n tokens fit."""
        while not self.kv.can_allocate(seq, n):
            victims = [s for s in self.running if s is not seq and all(s is not x.seq for x in out.scheduled)]
            if not victims:
                self._preempt(seq, out)
                return False
            batch = [s for s in victims if s.request_class == RequestClass.BATCH]
            self._preempt((batch or victims)[-1], out)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute-preemption: its blocks go back to the pool (still cached by key), it waits again."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        log.debug("preempted %s (%d tokens)", seq.seq_id, seq.num_tokens)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

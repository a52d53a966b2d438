"""Continuous batching with chunked prefill under a per-step token budget.

Admission order: interactive before batch (answer inference is never starved); within a class,
preempted work first, then by agent program: requests of a program (a session, a job task) that has
had less service so far go first (least attained service by program, as Autellix does; levels of
doubling size so that programs of similar service stay first-come first-served, and anything waiting
longer than STARVE_S goes to the top level). An agent user pays for whole sessions finished, and many
short programs finishing beats all of them progressing slowly. `program_priority=False` keeps plain
arrival order within a class.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
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
    out_of_memory: bool = False  # running work had to be preempted for room: admit nothing new this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


PROGRAM_QUANTUM = 2048  # tokens of service of the first level; level k holds [Q 2^(k-1), Q 2^k)
STARVE_S = 30.0  # waiting longer than this puts a request in the first level whatever its program had
PROGRAMS_REMEMBERED = 65536


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int,
                 program_priority: bool = True) -> None:
        self.kv = kv
        self.program_priority = program_priority
        self.attained: OrderedDict[str, int] = OrderedDict()  # program -> tokens computed for it so far
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Called with a sequence about to be preempted, before its blocks are freed (the engine moves
        # a batch sequence's KV down a tier there when that is cheaper than recomputing it).
        self.on_preempt = None
        self.reused_tokens_by_tier: dict[str, int] = {}  # every admission, re-admissions included

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

    def level(self, seq: Sequence, now: float) -> int:
        """The program's priority level: 0 for little service (or a long wait), one more per doubling."""
        got = self.attained.get(seq.program or seq.request_id, 0)
        if got < PROGRAM_QUANTUM or now - seq.arrival_time > STARVE_S:
            return 0
        return 1 + int(math.log2(got / PROGRAM_QUANTUM))

    def _order_waiting(self) -> None:
        """Class first, then preempted work, then program level, then arrival (a stable sort)."""
        if not self.program_priority or len(self.waiting) < 2:
            return
        now = time.monotonic()
        self.waiting = deque(sorted(self.waiting, key=lambda s: (
            s.request_class != RequestClass.INTERACTIVE, s.num_preemptions == 0, self.level(s, now), s.arrival_time)))

    def _served(self, seq: Sequence, n: int) -> None:
        p = seq.program or seq.request_id
        self.attained[p] = self.attained.pop(p, 0) + n  # most recently served last
        if len(self.attained) > PROGRAMS_REMEMBERED:
            self.attained.popitem(last=False)

    def schedule(self) -> SchedulerOutput:
        # Invariant: each request's computed tokens catch up to its known tokens (prompt + output so
        # far), under a token budget per step shared by prefill chunks and decodes. No prefill or decode
        # modes: a decode is a sequence one token behind, a prefill chunk is one many tokens behind.
        out = SchedulerOutput()
        budget = self.budget
        self._order_waiting()
        # interactive work first (its decodes are never starved by batch prefill), then oldest first
        self.running.sort(key=lambda s: s.request_class != RequestClass.INTERACTIVE)
        reserve = self._make_room_for_interactive(out)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted to make room for an older one
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.draft_token_ids:  # a decode with drafts: never preempt or exceed the budget for them
                k = min(len(seq.draft_token_ids), budget - 1)
                if k and not self.kv.can_allocate(seq, 1 + k):
                    k = 0
                del seq.draft_token_ids[k:]
                n = 1 + k
            elif seq.request_class == RequestClass.BATCH and n > 1:
                n = min(n, max(budget - reserve, 0))  # batch prefill leaves room for waiting interactive work
                if n == 0:
                    continue
            if not self._make_room(seq, n, out):
                continue
            self.kv.allocate_slots(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.out_of_memory:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0 and not seq.block_table:
                self.kv.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.can_allocate(seq, n):
                # keep the reused prefix only if it will be used soon; release it so memory is not pinned
                self.kv.free(seq)
                break
            self.waiting.popleft()
            for tier, k in seq.last_hit_by_tier.items():
                self.reused_tokens_by_tier[tier] = self.reused_tokens_by_tier.get(tier, 0) + k
            self.kv.allocate_slots(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        # single-token work first: the runner batches those as decodes
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        for s in out.scheduled:
            self._served(s.seq, s.num_new_tokens)
        return out

    def _make_room_for_interactive(self, out: SchedulerOutput) -> int:
        """If interactive work waits, preempt running batch work until it can be admitted this step.
        Returns the token budget to keep free of batch prefill for it."""
        if not self.waiting or self.waiting[0].request_class != RequestClass.INTERACTIVE:
            return 0
        head = self.waiting[0]
        first_chunk = min(head.num_tokens, self.budget)
        while True:
            batch = [s for s in self.running if s.request_class == RequestClass.BATCH]
            full = len(self.running) >= self.max_num_seqs
            short = self.kv.blocks_needed(first_chunk) > self.kv.pool.num_available
            if not batch or not (full or short):
                break
            self._preempt(batch[-1], out)
        return first_chunk

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences (batch class first) until seq's next n tokens fit."""
        while not self.kv.can_allocate(seq, n):
            victims = [s for s in self.running if s is not seq and all(s is not x.seq for x in out.scheduled)]
            if not victims:
                self._preempt(seq, out)
                out.out_of_memory = True
                return False
            batch = [s for s in victims if s.request_class == RequestClass.BATCH]
            self._preempt((batch or victims)[-1], out)
            out.out_of_memory = True
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute-preemption: its blocks go back to the pool (still cached by key), it waits again."""
        self.running.remove(seq)
        seq.draft_token_ids.clear()
        if self.on_preempt is not None:
            self.on_preempt(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        # back to the front of its class: waiting interactive work stays ahead of preempted batch work
        idx = 0
        if seq.request_class == RequestClass.BATCH:
            idx = next((i for i, s in enumerate(self.waiting) if s.request_class == RequestClass.BATCH),
                       len(self.waiting))
        self.waiting.insert(idx, seq)
        out.preempted.append(seq)
        log.debug("preempted %s (%d tokens)", seq.seq_id, seq.num_tokens)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

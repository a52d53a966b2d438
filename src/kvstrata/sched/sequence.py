"""A sequence: one completion being generated, with its tokens, blocks and progress."""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field
import numpy as np

from kvstrata.core import FinishReason, RequestClass, RequestMetrics, SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    request_class: RequestClass = RequestClass.INTERACTIVE
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # keys of the full blocks registered so far
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    text: str = ""
    num_preemptions: int = 0
    generator: np.random.Generator | None = None
    metrics: RequestMetrics = None  # type: ignore[assignment]
    detok: object = None  # IncrementalDetokenizer, set by the engine
    # Constrained decoding state (engine/structured.py LogitsProcessor): mask(logits) before sampling,
    # accept(token) after; is_terminated() once the grammar is complete.
    logits_processor: object = None
    last_hit_by_tier: dict = field(default_factory=dict)  # where the last prefix match found its blocks
    # the agent program this request belongs to (a session, a job task): the scheduler orders waiting work
    # by the service its program has had so far (sched/scheduler.py); None: the request alone
    program: str | None = None
    # speculative decoding (engine/speculative.py): tokens proposed to follow this step's last token,
    # computed with it as one chunk and verified from its logits; never part of the sequence's tokens
    draft_token_ids: list[int] = field(default_factory=list)
    drafter: object = None  # NgramDrafter, set by the engine when speculation is on

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=time.time(), prompt_tokens=len(self.prompt_token_ids))
        if self.params.logprobs is not None:
            self.logprobs = []
        if not self.params.greedy:
            # a seeded request gets the same draws alone or in any batch: each completion its own PCG64
            seed = (self.params.seed + self.index) & (2**63 - 1) if self.params.seed is not None else random.getrandbits(63)
            self.generator = np.random.Generator(np.random.PCG64(seed))

    @property
    def seq_id(self) -> str:
        return f"{self.request_id}#{self.index}"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_token_ids)

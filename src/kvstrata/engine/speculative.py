"""Speculative decoding by prompt lookup: drafts from a sequence's own tokens and from earlier outputs,
verified in one step.

Agents repeat themselves: tool names, JSON arguments, file contents, earlier answers. For a decoding
sequence the drafter finds the most recent earlier occurrence of the longest suffix (MAX_NGRAM down to
MIN_NGRAM tokens) of its tokens (prompt + output) and proposes the k tokens that followed it there. When
its own tokens hold no match of MIN_SHARED_NGRAM or more tokens, the drafts come from the outputs of
earlier requests (`OutputHistory`, the engine's last `--speculative-shared` output tokens) where they hold
one: agents doing the same kind of task phrase their answers alike across turns and sessions (suffix
decoding, Oliaro et al. 2024, draws from the same well). The
scheduler then computes the sequence's last token and its k drafts as one chunk of k + 1 rows, all of whose
logits come back; the native step's batch invariance makes row i's logits exactly those a plain decode
of the same prefix would give (docs/batch_invariance.md), so:

- greedy: drafts are accepted while they equal the argmax of the request's processed logits, and the first
  mismatch is replaced by that argmax: the tokens are those of decoding without speculation, bit for bit;
- sampling: draft x is accepted with probability p(x) under the request's whole sampling transform
  (penalties, temperature, top-k / top-p / min-p); on rejection the token is drawn from p with x removed
  and renormalised. For a deterministic draft this emits exactly p (Leviathan et al. 2023, Chen et al.
  2023, with q a point mass at x). The draws come from the request's own generator, but how many it
  takes depends on the drafts, which are cut by the step's draft budget (so by how many sequences decode
  beside it), its token budget or memory, and may come from earlier requests' outputs. So a seeded
  sampled request gets no drafts at all (llm_engine.py `_propose_drafts`): it reproduces whatever runs
  beside it, as without speculation.

On by default (`--speculative auto`) wherever the native step runs: greedy requests get the same tokens
faster, unseeded sampled ones the same distribution; drafting pauses itself where it is not accepted
(below). Like the prefix cache, drafts from earlier outputs are shared by every request of an engine: a
draft changes how fast tokens come, never which, but its timing could tell one client that its answer
resembles an earlier one; `--speculative-shared 0` keeps drafts to each request's own tokens.

Structured output (a grammar: JSON schema, forced tool call; engine/structured.py) drafts too: the drafts
are the tokens the grammar forces from its state (a forced call's `<tool_call>{"name": "`), else the
n-gram drafts cut where the grammar stops allowing them; verification masks row i in the grammar's state
after rows 0 .. i-1 (each emitted token advances it), which is the state plain decoding would mask that
row in, so greedy tokens stay identical there too.

Rejected drafts leave no trace: the engine sets `num_computed_tokens` to the accepted tokens only, so the
pool slots of rejected rows are overwritten before anything reads them, and only full blocks of accepted
tokens are ever registered into the prefix cache or written down the tiers (kv/manager.py `commit`).

Adaptive per sequence: the draft length grows by 2 while every draft is accepted (to MAX_DRAFT) and
shrinks by one on a rejection; when the acceptance rate (a moving average) drops below LOW_ACCEPT the
sequence stops drafting for a pause that doubles each time (up to MAX_PAUSE steps). Within that limit a
draft is cut to the length that gives the step the most expected tokens per unit of its time
(`draft_length`): each draft row's attention costs more the longer the context, and beside other
decoding sequences a draft row slows all of them for the one that drafts, so it must beat the step's
own rate (at 4-7 sequences over ~4.7k-token contexts drafting by the batch-1 rule lost 6 % of aggregate
throughput).

Batch-aware: a step verifies at most STEP_ROWS rows of decodes and drafts together (`draft_budget`). A
decode step on a CPU reads every weight once whatever its rows, so a few draft rows ride almost free at
batch 1; with many sequences the step is compute-bound and every rejected row is lost work (at 8 and 32
sequences drafting without a budget lost 30 % and 23 % of aggregate throughput). The budget goes to the
sequences that accept most; from STEP_ROWS decoding sequences on, nobody drafts.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from kvstrata.engine.sampler import filter_logits, processed, token_logprob
from kvstrata.sched.sequence import Sequence

MAX_NGRAM, MIN_NGRAM = 4, 1
MIN_SHARED_NGRAM = 3  # shortest suffix matched against earlier outputs (and own matches that win over them)
START_DRAFT, MAX_DRAFT = 4, 12
LOW_ACCEPT, EMA = 0.3, 0.3  # acceptance below which drafting pauses; weight of the latest verification
MAX_PAUSE = 64
# tokens of a sequence's own history the drafter indexes when it first drafts (its last ones; what it
# generates after is added): ~8 MiB of index, built in ~12 ms on the engine thread, however long the context
INDEX_WINDOW = 16384
STEP_ROWS = 8  # decode rows + draft rows one step may verify
ROW_COST_CTX = 8000  # context (tokens) whose attention costs one row as much as the step's weight pass
ROW_FLOOR = 0.087  # the least a row adds, in weight passes: its share of the weight products


def row_attention(context: int) -> float:
    """What one row over `context` tokens adds to a step, in units of the step's weight pass: its weight
    products ride along almost free, its attention over the whole context does not (on this CPU's native
    step, ~1 ms of a 5 ms decode at 512 context, ~3.2 of 9.5 ms at 4,096: attention is bound by its FMAs,
    not by memory). A step of rows over contexts c_j then costs 1 + sum of row_attention(c_j)."""
    return max(ROW_FLOOR, context / ROW_COST_CTX)


def expected_accepted(k: int, accept: float) -> float:
    """Draft tokens expected to be accepted of k, each accepted with probability `accept` while all before
    it were: p + p^2 + ... + p^k."""
    p = min(accept, 0.95)
    return sum(p ** i for i in range(1, k + 1))


def draft_length(k_max: int, accept: float, context: int, tokens: float = 1.0, cost: float | None = None) -> int:
    """The draft length of at most k_max that gives the step the most expected tokens per unit of its
    time, 0 when none beats the step without it: (tokens + p + ... + p^k) / (cost + k * row_attention),
    p the acceptance rate, `tokens` and `cost` the step's expected tokens and cost (in weight passes)
    before this draft; by default a step of this sequence alone (1 token, 1 + its row). So at batch 1 a
    draft must beat one plain decode, and beside other decoding sequences it must beat the step's own
    rate: a draft row slows every sequence of the step, for the one that drafts."""
    p, a = min(accept, 0.95), row_attention(context)
    cost = 1.0 + a if cost is None else cost
    best, best_k, expected, pk = tokens / cost, 0, tokens, 1.0
    for k in range(1, k_max + 1):
        pk *= p
        expected += pk
        rate = expected / (cost + k * a)
        if rate > best:
            best, best_k = rate, k
    return best_k


def draft_budget(decoding: int) -> int:
    """Draft tokens a step with `decoding` sequences decoding may add."""
    return max(0, STEP_ROWS - decoding)


def ngram_keys(toks: list[int], n: int, first: int, last: int):
    """The n-grams of toks that start at first .. last - 1, in order, as tuples (built by zip, in C: a
    Python loop slicing each one cost 0.8 s on a 32k-token prompt). The one that starts at s is followed
    by position s + n."""
    return zip(*(toks[first + i: last + i] for i in range(n)))


class NgramDrafter:
    """Per-sequence prompt-lookup state: an index of every n-gram of its tokens to where it last ended."""

    def __init__(self) -> None:
        self.tokens: list[int] = []  # a copy of the sequence's tokens, extended as it grows
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_NGRAM + 1)]
        self.indexed = 0  # n-grams ending before this position are in the index
        self.k = START_DRAFT
        self.accept_rate = 1.0
        self.pause = 0  # steps left without drafting
        self.next_pause = 2

    def _sync(self, seq: Sequence) -> None:
        toks, n_prompt = self.tokens, len(seq.prompt_token_ids)
        if len(toks) < n_prompt:
            toks.extend(seq.prompt_token_ids[len(toks):])
        toks.extend(seq.output_token_ids[len(toks) - n_prompt:])
        self.indexed = max(self.indexed, len(toks) - INDEX_WINDOW)  # (older tokens are never indexed)
        # index n-grams that end at j for indexed <= j <= len - 2, mapped to j + 1 (where their continuation
        # starts); the suffix itself (ending at len - 1) is not indexed yet, so a lookup finds an earlier
        # occurrence. In position order, so the latest occurrence wins.
        end = len(toks) - 1
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            s0, s1 = max(self.indexed, n - 1) - n + 1, end - n + 1  # n-gram starts
            if s1 > s0:
                self.index[n].update(zip(ngram_keys(toks, n, s0, s1), range(s0 + n, s1 + n)))
        self.indexed = max(self.indexed, end)

    def propose(self, seq: Sequence, limit: int, shared: OutputHistory | None = None,
                step: tuple[float, float] | None = None) -> list[int]:
        """Up to min(self.k, limit) draft tokens to follow seq's tokens ([] when none match or paused): from
        the longest match in its own tokens, or from `shared` when that holds a match of MIN_SHARED_NGRAM
        or more tokens and its own tokens do not. `step`: the step's expected tokens and cost so far
        (`draft_length`; None: a step of this sequence alone)."""
        self._sync(seq)
        if self.pause > 0:
            self.pause -= 1
            return []
        toks = self.tokens
        k = draft_length(min(self.k, limit), self.accept_rate, len(toks), *(step or ()))
        if k <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(toks)), MIN_NGRAM - 1, -1):
            start = self.index[n].get(tuple(toks[len(toks) - n:]))
            if start is not None:
                break
        else:
            n = 0
        if n < MIN_SHARED_NGRAM and shared is not None:
            drafts = shared.lookup(toks, k)
            if drafts:
                return drafts
        return toks[start: start + k] if n else []

    def update(self, drafted: int, accepted: int) -> None:
        """After a verification of `drafted` tokens of which the first `accepted` were kept."""
        if drafted == 0:
            return
        self.k = min(self.k + 2, MAX_DRAFT) if accepted == drafted else max(1, self.k - 1)
        self.accept_rate = (1 - EMA) * self.accept_rate + EMA * accepted / drafted
        if self.accept_rate < LOW_ACCEPT:
            self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE)
            self.accept_rate = 0.5  # start again from neutral when the pause ends
        elif self.accept_rate > 0.6:
            self.next_pause = 2


class OutputHistory:
    """The last `max_tokens` tokens of finished outputs, every n-gram of MIN_SHARED_NGRAM to MAX_NGRAM
    tokens indexed to where its continuation starts (the latest occurrence wins). Shared by every request
    of one engine, like the prefix cache; a draft from it changes how fast a request gets its tokens, never
    which tokens (verification decides)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.clear()

    def clear(self) -> None:
        self.tokens = 0
        self.outputs: OrderedDict[int, list[int]] = OrderedDict()
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (output id, continuation start)
        self._next = 0

    def add(self, output: list[int]) -> None:
        if len(output) <= MIN_SHARED_NGRAM or len(output) > self.max_tokens:
            return
        oid, toks = self._next, list(output)
        self._next += 1
        self.outputs[oid] = toks
        self.tokens += len(toks)
        for n in range(MIN_SHARED_NGRAM, MAX_NGRAM + 1):  # n-grams with at least one token after them
            self.index.update(zip(ngram_keys(toks, n, 0, len(toks) - n),
                                  zip(itertools.repeat(oid), range(n, len(toks)))))
        while self.tokens > self.max_tokens:
            old_id, old = self.outputs.popitem(last=False)
            self.tokens -= len(old)
            for n in range(MIN_SHARED_NGRAM, MAX_NGRAM + 1):
                for key in ngram_keys(old, n, 0, len(old) - n):
                    if self.index.get(key, (None,))[0] == old_id:
                        del self.index[key]

    def lookup(self, toks: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix of toks (MAX_NGRAM down to MIN_SHARED_NGRAM
        tokens) in an earlier output; [] without one."""
        for n in range(min(MAX_NGRAM, len(toks)), MIN_SHARED_NGRAM - 1, -1):
            hit = self.index.get(tuple(toks[len(toks) - n:]))
            if hit is not None:
                return self.outputs[hit[0]][hit[1]: hit[1] + k]
        return []


def target_probs(seq: Sequence, row: torch.Tensor) -> torch.Tensor | None:
    """The request's sampling distribution for one row of logits (V,) under its whole transform, given the
    tokens the sequence holds now; None when it is degenerate (the sampler then takes the mode)."""
    p = seq.params
    row = filter_logits(processed(seq, row) / p.temperature, p.top_k, p.top_p, p.min_p)
    probs = torch.softmax(row, -1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return None
    return probs


def verify_token(seq: Sequence, row: torch.Tensor, draft: int | None) -> int:
    """The token to emit at this row given the draft proposed for it (None: the row past the drafts).
    Greedy: the argmax (so a draft is kept iff it is the argmax). Sampling: the draft kept with
    probability p(draft), else a draw from p without it; without a draft, a draw from p. Logprobs of the
    emitted token (from the raw logits, as the sampler takes them) are appended when asked. A grammar
    (structured output) masks the row in its current state and then takes the emitted token, so row i
    is masked as if drafts 0 .. i-1 were emitted: they were, or verification stopped before row i."""
    p = seq.params
    if p.greedy:
        tok = int(processed(seq, row).argmax())
    else:
        probs = target_probs(seq, row)
        if probs is None:
            tok = int(processed(seq, row).argmax())
        elif draft is None:
            tok = int(torch.multinomial(probs, 1, generator=seq.generator))
        elif float(torch.rand((), generator=seq.generator)) < float(probs[draft]):
            tok = draft
        else:
            rest = probs.clone()
            rest[draft] = 0.0
            if float(rest.sum()) <= 0:  # (p(draft) == 1 and the uniform draw was 1.0: keep the draft)
                tok = draft
            else:
                tok = int(torch.multinomial(rest / rest.sum(), 1, generator=seq.generator))
    if seq.logits_processor is not None:
        seq.logits_processor.accept(tok)
    if p.logprobs is not None:
        seq.logprobs.append(token_logprob(row, tok, p.logprobs))
    return tok

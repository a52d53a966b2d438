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

How long a draft is depends on how likely its tokens are to be accepted, learned per kind of match
(`DraftStats`, one per engine): where it came from (own tokens / earlier outputs), how long the suffix it
matched (NGRAMS: 1-4 or 8+ tokens) and whether the request samples. On tau-bench's assistant turns a
first draft token after a 1-token match of the sequence's own tokens was accepted 23 % of the time, after a
4-token one 90 % (and ~94 % after an 8-token one); each later token, given the ones before it, 70-93 %. So a
kind keeps counts of its first drafts and of its later drafts (a prior of 0.6 / 0.85, halved past
STATS_WINDOW so they follow the workload), and a draft is cut to the length that gives the step the most
expected tokens per unit of its time (`draft_length`, with `StepCost`, the native step's time model:
each draft row's attention over the whole context costs more the longer the context, ~1/3 of a decode
step at 2.8k tokens on this CPU's native step). A kind whose drafts do not pay is still tried with one
token every PROBE_EVERY-th time it is passed over, so its rate can recover. Per sequence, drafting pauses
where acceptance (a moving average) drops below LOW_ACCEPT, for a pause that doubles each time (up to
MAX_PAUSE steps). Beside other decoding sequences a draft row slows all of them for the one that drafts,
so a draft must beat the step's own rate (at 4-7 sequences over ~4.7k-token contexts drafting by the
batch-1 rule lost 6 % of aggregate throughput).

Batch-aware: a step verifies at most STEP_ROWS rows of decodes and drafts together (`draft_budget`). A
decode step on a CPU reads every weight once whatever its rows, so a few draft rows ride almost free at
batch 1; with many sequences the step is compute-bound and every rejected row is lost work (at 8 and 32
sequences drafting without a budget lost 30 % and 23 % of aggregate throughput). The budget goes to the
sequences that accept most; from STEP_ROWS decoding sequences on, nobody drafts.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from kvstrata.sched.sequence import Sequence

NGRAMS = (8, 4, 3, 2, 1)  # suffix lengths matched, longest first (5-7 add nothing measurable over 4 and 8)
MAX_NGRAM, MIN_NGRAM = max(NGRAMS), min(NGRAMS)
MIN_SHARED_NGRAM = 3  # shortest suffix matched against earlier outputs
SHARED_NGRAMS = tuple(n for n in NGRAMS if n >= MIN_SHARED_NGRAM)
MAX_DRAFT = 12
LOW_ACCEPT, EMA = 0.3, 0.3  # acceptance below which a sequence pauses drafting; weight of the latest verification
MAX_PAUSE = 64
# tokens of a sequence's own history the drafter indexes when it first drafts (its last ones; what it
# generates after is added): ~10 MiB of index, built in ~15 ms on the engine thread, however long the context
INDEX_WINDOW = 16384
STEP_ROWS = 8  # decode rows + draft rows one step may verify
PRIOR_FIRST, PRIOR_NEXT, PRIOR_WEIGHT = 0.6, 0.85, 4.0  # a kind's acceptance before it has been seen
STATS_WINDOW = 512  # a kind's counts are halved past this many drafts
PROBE_EVERY = 32  # a kind passed over this many times is drafted one token


@dataclass(frozen=True)
class StepCost:
    """A native decode step's time in units of its weight pass (reading and multiplying every weight once).
    A plain step of sequences over contexts c_j costs 1 + sum((read + attend) * c_j) + (n - 1) * row: each
    decoding sequence's K / V read once (memory) and attended (FMAs), each row beyond the first paying its
    share of the weight products; a draft row adds row + attend * c (its sequence's K / V are read once for
    all its rows). `read` and `attend` scale with the model: K / V bytes and attention FMAs per context
    token, per byte of weights. Fitted on the default model (SmolLM2-135M, int8, fp16 KV, 2 threads) from
    the native step's own times over 40 tau-bench turns at 1-8 rows and 1-4.5k context: a weight pass of
    3.85 ms, a row 0.59 ms + 0.63 us per context token, a context token's K / V read 0.44 us. Beside other
    decoding sequences a draft row costs more (`busy` per other sequence): with 4 sequences at 2,800
    tokens, 2 or 4 draft rows of one of them added 0.45-0.51 of a one-sequence step each, not 0.35 (the
    step is compute-bound by then, and nothing hides under its loads). On a CPU with AMX a row's share of the
    weight products nearly vanishes (native/gemm.c): fitted the same way on an Intel Xeon (Sapphire Rapids)
    VM, 1-8 rows at 256 and 2,500 context, a row costs 0.067 of the weight pass, `attend` and `read` as
    here (1.65e-4, 1.09e-4)."""

    row: float = 0.153  # AMX_ROW where int8 products of 4 rows or more run on AMX tiles
    read: float = 1.14e-4  # per context token
    attend: float = 1.64e-4  # per context token, per row
    busy: float = 0.1  # a draft row's extra cost per other decoding sequence of the step

    @classmethod
    def of(cls, layers: int, heads: int, kv_heads: int, head_dim: int, kv_bytes: int, weight_bytes: int,
           amx: bool = False) -> StepCost:
        """Scaled to a model: the fitted rates per K / V byte and per attention FMA, against its weights."""
        ref = cls()
        ref_w, ref_kv, ref_fma = 138.4e6, 2 * 30 * 3 * 64 * 2, 2 * 30 * 9 * 64
        return cls(AMX_ROW if amx else ref.row, ref.read * ref_w / ref_kv * (2 * layers * kv_heads * head_dim * kv_bytes) / weight_bytes,
                   ref.attend * ref_w / ref_fma * (2 * layers * heads * head_dim) / weight_bytes, ref.busy)

    def plain(self, contexts: list[int]) -> float:
        return 1.0 + sum((self.read + self.attend) * c for c in contexts) + max(len(contexts) - 1, 0) * self.row

    def draft_row(self, context: int, decoding: int = 1) -> float:
        """One draft row over `context` tokens, in a step where `decoding` sequences decode."""
        return (self.row + self.attend * context) * (1.0 + self.busy * max(decoding - 1, 0))


STEP_COST = StepCost()
AMX_ROW = 0.067  # StepCost.row where the native step multiplies on AMX tiles


def expected_accepted(k: int, accept: float | tuple[float, float]) -> float:
    """Draft tokens expected to be accepted of k: the first with probability p0, each later one with p1
    while all before it were (p0 + p0 p1 + ... + p0 p1^(k-1)); one float: p0 = p1."""
    p0, p1 = (accept, accept) if isinstance(accept, (int, float)) else accept
    p0, p1 = min(p0, 0.97), min(p1, 0.97)
    return sum(p0 * p1 ** i for i in range(k))


def draft_length(k_max: int, accept: float | tuple[float, float], context: int, tokens: float = 1.0,
                 cost: float | None = None, model: StepCost = STEP_COST, decoding: int = 1) -> int:
    """The draft length of at most k_max that gives the step the most expected tokens per unit of its
    time, 0 when none beats the step without it: (tokens + expected_accepted(k)) / (cost + k * draft row),
    `tokens` and `cost` the step's expected tokens and cost before this draft; by default a step of this
    sequence alone (1 token, a plain step over its context). So at batch 1 a draft must beat one plain
    decode, and beside other decoding sequences it must beat the step's own rate: a draft row slows every
    sequence of the step, for the one that drafts (and costs more there: `decoding` sequences decode)."""
    p0, p1 = (accept, accept) if isinstance(accept, (int, float)) else accept
    p0, p1 = min(p0, 0.97), min(p1, 0.97)
    a = model.draft_row(context, decoding)
    cost = model.plain([context]) if cost is None else cost
    best, best_k, expected, pk = tokens / cost, 0, tokens, 1.0
    for k in range(1, k_max + 1):
        pk *= p0 if k == 1 else p1
        expected += pk
        rate = expected / (cost + k * a)
        if rate > best:
            best, best_k = rate, k
    return best_k


def draft_budget(decoding: int) -> int:
    """Draft tokens a step with `decoding` sequences decoding may add."""
    return max(0, STEP_ROWS - decoding)


class DraftStats:
    """Acceptance of drafts per kind (source, suffix length matched, sampled), shared by an engine's
    sequences: counts of first drafts accepted / verified and of later drafts accepted / verified (given
    the ones before them were), on top of a prior; halved past STATS_WINDOW so they follow the workload."""

    def __init__(self) -> None:
        self.kinds: dict[tuple, list[float]] = {}
        self.passed: dict[tuple, int] = {}

    def _counts(self, kind: tuple) -> list[float]:
        c = self.kinds.get(kind)
        if c is None:
            w = PRIOR_WEIGHT
            c = self.kinds[kind] = [PRIOR_FIRST * w, w, PRIOR_NEXT * w, w]
        return c

    def rates(self, kind: tuple) -> tuple[float, float]:
        """(first draft's acceptance, each later draft's given the ones before it)."""
        c = self._counts(kind)
        return c[0] / c[1], c[2] / c[3]

    def record(self, kind: tuple, drafted: int, accepted: int) -> None:
        c = self._counts(kind)
        c[0] += accepted >= 1
        c[1] += 1
        later = min(drafted, accepted + 1) - 1  # later drafts verified: up to the first rejection
        c[2] += max(min(accepted, drafted) - 1, 0)
        c[3] += max(later, 0)
        for i in (0, 2):
            if c[i + 1] > STATS_WINDOW:
                c[i], c[i + 1] = c[i] / 2, c[i + 1] / 2

    def probe(self, kind: tuple) -> bool:
        """A draft of this kind was passed over; True every PROBE_EVERY-th time (draft one token anyway)."""
        n = self.passed.get(kind, 0) + 1
        self.passed[kind] = n % PROBE_EVERY
        return n == PROBE_EVERY


def ngram_keys(toks: list[int], n: int, first: int, last: int):
    """The n-grams of toks that start at first .. last - 1, in order, as tuples (built by zip, in C: a
    Python loop slicing each one cost 0.8 s on a 32k-token prompt). The one that starts at s is followed
    by position s + n."""
    return zip(*(toks[first + i: last + i] for i in range(n)))


class NgramDrafter:
    """Per-sequence prompt-lookup state: an index of every n-gram (n in NGRAMS) of its tokens to where it
    last ended."""

    def __init__(self) -> None:
        self.tokens: list[int] = []  # a copy of the sequence's tokens, extended as it grows
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAMS}
        self.indexed = 0  # n-grams ending before this position are in the index
        self.kind: tuple | None = None  # the kind of the drafts proposed last (None: none, or not n-gram ones)
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
        for n, index in self.index.items():
            s0, s1 = max(self.indexed, n - 1) - n + 1, end - n + 1  # n-gram starts
            if s1 > s0:
                index.update(zip(ngram_keys(toks, n, s0, s1), range(s0 + n, s1 + n)))
        self.indexed = max(self.indexed, end)

    def match(self, limit: int, shared: OutputHistory | None, stats: DraftStats, sampled: bool) -> tuple[tuple | None, list[int]]:
        """(kind, up to `limit` tokens) of the drafts to follow the tokens synced: the longest suffix match in
        its own tokens or in `shared` (MIN_SHARED_NGRAM tokens or more), whichever kind's first drafts are
        accepted more, on a tie the longer match, then the own one; (None, []) without a match."""
        toks, cands = self.tokens, []
        for n, index in self.index.items():
            start = index.get(tuple(toks[len(toks) - n:])) if n <= len(toks) else None
            if start is not None:
                cands.append((("own", n, sampled), toks[start: start + limit]))
                break
        if shared is not None:
            n, drafts = shared.lookup(toks, limit)
            if drafts:
                cands.append((("shared", n, sampled), drafts))
        if not cands:
            return None, []
        return max(cands, key=lambda c: (stats.rates(c[0])[0], c[0][1]))  # (max keeps the first of equals)

    def propose(self, seq: Sequence, limit: int, shared: OutputHistory | None = None,
                step: tuple[float, float, int] | None = None, stats: DraftStats | None = None,
                model: StepCost = STEP_COST) -> list[int]:
        """Up to `limit` draft tokens to follow seq's tokens ([] when none match, none pay, or paused), cut
        to the length `draft_length` gives with its kind's acceptance in `stats` (None: the prior).
        `step`: the step's expected tokens, cost so far and decoding sequences (None: this sequence alone)."""
        self._sync(seq)
        self.kind = None
        if self.pause > 0:
            self.pause -= 1
            return []
        if limit <= 0:
            return []
        stats = stats if stats is not None else DraftStats()
        kind, drafts = self.match(limit, shared, stats, seq.params.temperature > 0)
        if kind is None:
            return []
        tokens, cost, decoding = step if step is not None else (1.0, None, 1)
        k = draft_length(len(drafts), stats.rates(kind), len(self.tokens), tokens, cost, model, decoding)
        if k == 0 and stats.probe(kind):
            k = 1
        self.kind = kind if k else None
        return drafts[:k]

    def update(self, drafted: int, accepted: int, stats: DraftStats | None = None) -> None:
        """After a verification of `drafted` tokens of which the first `accepted` were kept."""
        if drafted == 0:
            return
        if stats is not None and self.kind is not None:
            stats.record(self.kind, drafted, accepted)
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
        for n in SHARED_NGRAMS:  # n-grams with at least one token after them
            self.index.update(zip(ngram_keys(toks, n, 0, len(toks) - n),
                                  zip(itertools.repeat(oid), range(n, len(toks)))))
        while self.tokens > self.max_tokens:
            old_id, old = self.outputs.popitem(last=False)
            self.tokens -= len(old)
            for n in SHARED_NGRAMS:
                for key in ngram_keys(old, n, 0, len(old) - n):
                    if self.index.get(key, (None,))[0] == old_id:
                        del self.index[key]

    def lookup(self, toks: list[int], k: int) -> tuple[int, list[int]]:
        """(n, up to k tokens) that followed the longest suffix of toks (n in NGRAMS, MIN_SHARED_NGRAM or
        more tokens) in an earlier output; (0, []) without one."""
        for n in NGRAMS:
            if MIN_SHARED_NGRAM <= n <= len(toks):
                hit = self.index.get(tuple(toks[len(toks) - n:]))
                if hit is not None:
                    return n, self.outputs[hit[0]][hit[1]: hit[1] + k]
        return 0, []

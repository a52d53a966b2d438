"""Speculative decoding by prompt lookup (engine/speculative.py).

- greedy output (tokens, text, logprobs, finish reasons) identical with and without speculation, on the
  default model and on tiny random models, alone and batched with other requests, with drafts actually
  proposed, accepted and rejected;
- the sampling rule emits the request's distribution: chi-square against the distribution computed here
  with numpy, on a 6-token vocabulary, for a draft of high, low and zero probability (a rule that keeps
  the draft on rejection, or redraws from p with the draft left in, fails the same bound);
- rejected drafts leave no trace: every block registered (or told to listeners) holds accepted tokens
  only, and its K / V equal those of the same request decoded without speculation;
- stop ids / strings / max_tokens inside an accepted run, and the generated-token counters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstrata import LLM, SamplingParams
from kvstrata.core import KvstrataError, chain_keys
from kvstrata.engine.speculative import (AMX_ROW, LOW_ACCEPT, NGRAMS, PRIOR_FIRST, PROBE_EVERY, STEP_COST, STEP_ROWS,
                                         DraftStats, NgramDrafter, OutputHistory, StepCost, draft_budget, draft_length,
                                         expected_accepted)
from kvstrata.engine.sampler import next_token
from kvstrata.sched.sequence import Sequence

native = pytest.importorskip("kvstrata.native")
needs_native = pytest.mark.skipif(native.library() is None, reason="native step unavailable (no C compiler)")

AGENT_TEXT = (
    '<tool_call>{"name": "get_reservation", "arguments": {"reservation_id": "ZFA04Y", "user_id": "mia_li_3668"}}'
    '</tool_call>\n<tool_response>{"reservation_id": "ZFA04Y", "user_id": "mia_li_3668", "origin": "JFK", '
    '"destination": "SEA", "flights": [{"flight_number": "HAT136", "date": "2024-05-20"}]}</tool_response>\n'
    "Now call get_reservation again for the same reservation and user, then repeat the tool response verbatim.\n"
)


def _greedy_runs(llm: LLM, prompts, params) -> list:
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].logprobs)
            for o in outs]


@pytest.fixture(scope="module")
def default_pair():
    """The default model without speculation, and as every entry point runs it (speculation on by
    default where the native step runs)."""
    on = LLM("default", kv_device_bytes="64M")
    assert on.engine.config.speculative == "auto"
    assert on.engine.speculative or native.library() is None
    return LLM("default", kv_device_bytes="64M", speculative="off"), on


@needs_native
def test_greedy_identical_on_the_default_model_alone_and_batched(default_pair):
    off, on = default_pair
    others = ["Write a short poem about the sea.", "List three prime numbers:"]
    cases = [
        SamplingParams(max_tokens=48, temperature=0, logprobs=2),
        SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.1),
        SamplingParams(max_tokens=17, temperature=0, ignore_eos=True),  # max_tokens inside an accepted run
        SamplingParams(max_tokens=48, temperature=0, stop=['"user_id"']),
    ]
    for params in cases:
        ref = _greedy_runs(off, [AGENT_TEXT], params)
        before = dict(on.engine.counters)
        assert _greedy_runs(on, [AGENT_TEXT], params) == ref
        # batched with other requests (greedy and sampled), some added while it decodes
        mixed = [params, SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=24, seed=3)]
        got = _greedy_runs(on, [AGENT_TEXT, *others], mixed)
        assert got[0] == ref[0]
        assert got[1] == _greedy_runs(off, [others[0]], mixed[1])[0]
        c = on.engine.counters
        drafted, accepted = c["draft_tokens"] - before["draft_tokens"], c["accepted_draft_tokens"] - before["accepted_draft_tokens"]
        assert drafted > 0 and accepted > 0, (params, drafted, accepted)
    c = on.engine.counters
    assert c["accepted_draft_tokens"] < c["draft_tokens"]  # rejections happened too
    assert on.engine.runner.native_steps < c["generated_tokens"]  # fewer steps than tokens


@needs_native
def test_a_seeded_sampled_request_gets_no_drafts_and_reproduces(default_pair):
    """Its draws depend on the drafts, and those on what runs beside it: so it gets none, and its tokens
    are those of the engine without speculation, alone or beside a greedy request that drafts."""
    off, on = default_pair
    seeded = SamplingParams(max_tokens=32, temperature=0.9, seed=11)
    ref = off.generate([AGENT_TEXT], seeded)[0].outputs[0].token_ids
    seen = []
    orig = on.engine._verify

    def spy(seq, logits):
        seen.append(seq.params.seed)
        return orig(seq, logits)

    on.engine._verify = spy
    try:
        assert on.generate([AGENT_TEXT], seeded)[0].outputs[0].token_ids == ref
        outs = on.generate([AGENT_TEXT, AGENT_TEXT + " Again."], [seeded, SamplingParams(max_tokens=32, temperature=0)])
    finally:
        del on.engine._verify
    assert outs[0].outputs[0].token_ids == ref
    assert seen and set(seen) == {None}  # the greedy one drafted, the seeded one never


@needs_native
def test_structured_output_is_drafted_and_stays_identical(default_pair):
    """Under a grammar (a forced tool call, a JSON schema) the drafts are the tokens it forces, else the
    n-gram drafts it allows; each verified row is masked in the grammar's state after the rows before it,
    so the tokens are those of decoding without speculation, alone and batched."""
    from kvstrata.tokenizer.tools import forced_tool_call_spec

    off, on = default_pair
    args = {"type": "object", "properties": {"reservation_id": {"type": "string"}, "user_id": {"type": "string"}},
            "required": ["reservation_id", "user_id"]}
    tools = [{"type": "function", "function": {"name": "get_reservation", "parameters": args}},
             {"type": "function", "function": {"name": "cancel_reservation", "parameters": args}}]
    specs = [forced_tool_call_spec(tools, "required"), {"type": "json_schema", "schema": args}]
    for spec in specs:
        params = SamplingParams(max_tokens=64, temperature=0, structured=spec)
        before = dict(on.engine.counters)
        ref = _greedy_runs(off, [AGENT_TEXT], params)
        assert _greedy_runs(on, [AGENT_TEXT], params) == ref
        assert _greedy_runs(on, [AGENT_TEXT, "Say hello."], [params, SamplingParams(max_tokens=16, temperature=0)])[0] \
            == ref[0]
        c = on.engine.counters
        assert c["accepted_draft_tokens"] - before["accepted_draft_tokens"] >= 8, (spec["type"], c, before)
        assert on.engine.runner.native_steps  # (drafted rows ran in the native step)


@needs_native
def test_a_full_batch_does_not_draft_and_a_small_one_shares_the_budget(default_pair):
    """The step's draft budget (STEP_ROWS rows of decodes and drafts): STEP_ROWS sequences decoding
    together draft nothing (the step is compute-bound: rejected rows would be lost work); fewer share the
    rest; greedy output is unchanged either way."""
    off, on = default_pair
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = [AGENT_TEXT + f" Step {i}." for i in range(STEP_ROWS)]
    before = on.engine.counters["draft_tokens"]
    assert _greedy_runs(on, full, params) == _greedy_runs(off, full, params)
    assert on.engine.counters["draft_tokens"] == before  # every step had STEP_ROWS decodes
    assert draft_budget(STEP_ROWS) == 0 and draft_budget(1) == STEP_ROWS - 1
    pair = full[:2]
    ref = _greedy_runs(off, pair, params)
    seen = []
    orig = on.engine._verify

    def spy(seq, logits):
        seen.append(len(seq.draft_token_ids))
        return orig(seq, logits)

    on.engine._verify = spy
    try:
        assert _greedy_runs(on, pair, params) == ref
    finally:
        del on.engine._verify
    assert seen and max(seen) <= draft_budget(2)


class _OracleDrafter(NgramDrafter):
    """Drafts from a reference run's output, five at a time, every fifth token of the output drafted wrong:
    random weights do not copy their context, so this forces long accepted runs and rejections at known
    places."""

    reference: dict[tuple[int, ...], list[int]] = {}

    def propose(self, seq, limit, shared=None, step=None, stats=None, model=None):
        ref = self.reference[tuple(seq.prompt_token_ids)]
        n = len(seq.output_token_ids)
        drafts = ref[n : n + min(5, limit)]
        return [t if (n + i) % 5 else (t + 1) % 300 for i, t in enumerate(drafts)]


@needs_native
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_greedy_identical_on_tiny_random_models(arch, request, monkeypatch):
    path = str(request.getfixturevalue(arch))
    kw = dict(kv_device_bytes="64M", quantization="none", max_num_batched_tokens=64)
    off, on = LLM(path, speculative="off", **kw), LLM(path, speculative="on", **kw)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, 200, (12,), generator=g).tolist()
    prompts = [base * 4 + base[:5], base[3:] * 3, torch.randint(3, 200, (40,), generator=g).tolist()]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=1),
              SamplingParams(max_tokens=33, temperature=0, ignore_eos=True, presence_penalty=0.5),
              SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)]
    ref = [_greedy_runs(off, [p], sp)[0] for p, sp in zip(prompts, params)]
    monkeypatch.setattr("kvstrata.engine.llm_engine.NgramDrafter", _OracleDrafter)
    _OracleDrafter.reference = {tuple(p): r[0] for p, r in zip(prompts, ref)}
    for p, sp, r in zip(prompts, params, ref):
        assert _greedy_runs(on, [p], sp)[0] == r
    assert _greedy_runs(on, prompts, params) == ref  # batched under a small token budget
    c = on.engine.counters
    assert c["accepted_draft_tokens"] > c["draft_tokens"] / 2 and c["accepted_draft_tokens"] < c["draft_tokens"]
    assert c["generated_tokens"] == 2 * sum(sp.max_tokens for sp in params)


def _ref_probs(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    x = logits / temperature
    x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    e = np.exp(x - x.max())
    return e / e.sum()


def _emitted(logits: torch.Tensor, draft: int, params: SamplingParams, n: int, rule=next_token) -> np.ndarray:
    seq = Sequence("r", 0, [0], params)  # its own seeded generator
    counts = np.zeros(logits.shape[0])
    for _ in range(n):
        counts[rule(seq, logits, draft)] += 1
    return counts


CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


@pytest.mark.parametrize("draft", [0, 3, 5])  # likely, unlikely, removed by top-k
def test_sampling_rule_preserves_the_distribution(draft):
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 0.9, -3.0])
    params = SamplingParams(temperature=0.8, top_k=5, seed=1234)
    p = _ref_probs(logits.double().numpy(), 0.8, 5)
    n = 20000
    counts = _emitted(logits, draft, params, n)
    keep = p > 0
    assert counts[~keep].sum() == 0
    chi2 = (((counts - n * p) ** 2)[keep] / (n * p[keep])).sum()
    assert chi2 < CHI2_DF5_P001, (counts, n * p)

    def broken(seq, row, d):  # on rejection, redraws from p with the draft left in
        if seq.generator.random() < p[d]:
            return d
        return int(seq.generator.choice(len(p), p=p))

    if 0 < p[draft] < 1:
        bad = _emitted(logits, draft, params, n, broken)
        assert (((bad - n * p) ** 2)[keep] / (n * p[keep])).sum() > CHI2_DF5_P001


class _NoOne:
    """A grammar that never allows token 1 (and records what it was given to take)."""

    def __init__(self) -> None:
        self.taken: list[int] = []

    def mask(self, row):
        if isinstance(row, np.ndarray):  # (the native step's logits)
            return np.where(np.arange(row.shape[0]) == 1, np.float32("-inf"), row)
        return row.masked_fill(torch.arange(row.shape[0]) == 1, float("-inf"))

    def accept(self, tok):
        self.taken.append(tok)

    def is_terminated(self):
        return False


@pytest.mark.parametrize("draft", [0, 1])  # allowed, disallowed by the grammar
def test_sampling_rule_preserves_the_masked_distribution(draft):
    """Under a grammar the draft is accepted, or the token drawn, from the masked distribution (mask after
    penalties, before temperature and top-k, as the sampler takes it); the grammar takes each token."""
    logits = torch.tensor([2.0, 1.5, 0.3, -0.5, 0.9, -3.0])
    params = SamplingParams(temperature=0.8, top_k=4, seed=99)
    masked = logits.double().numpy().copy()
    masked[1] = -np.inf
    p = _ref_probs(masked, 0.8, 4)
    seq = Sequence("r", 0, [0], params)
    seq.logits_processor = g = _NoOne()
    n = 20000
    counts = np.zeros(6)
    for _ in range(n):
        counts[next_token(seq, logits, draft)] += 1
    keep = p > 0
    assert counts[~keep].sum() == 0 and counts[1] == 0
    chi2 = (((counts - n * p) ** 2)[keep] / (n * p[keep])).sum()
    assert chi2 < 16.27, (counts, n * p)  # chi-square, 3 degrees of freedom, p = 0.001
    assert len(g.taken) == n and sorted(set(g.taken)) == [i for i in range(6) if keep[i]]


def test_sampling_rule_applies_penalties():
    """A repetition penalty on the draft lowers its acceptance to the penalised probability."""
    logits = torch.tensor([1.0, 1.2, 0.2, 0.0, -1.0, 0.5])
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, seed=7)
    pen = logits.double().numpy().copy()
    pen[0] = pen[0] / 2.0  # token 0 is the prompt's: CTRL penalty on a positive logit
    p = _ref_probs(pen, 1.0, 6)
    n = 20000
    counts = _emitted(logits, 0, params, n)
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < CHI2_DF5_P001, (counts, n * p)


def test_drafter_finds_the_latest_longest_match_and_pauses_where_it_is_not_accepted():
    seq = Sequence("r", 0, [1, 2, 3, 9, 9, 7, 2, 3, 4, 5, 6, 8, 2, 3], SamplingParams(temperature=0))
    d, stats = NgramDrafter(), DraftStats()
    sure = DraftStats()
    sure.kinds[("own", 2, False)] = [1.0, 1.0, 1.0, 1.0]  # (every draft of this kind accepted: the whole limit)
    # suffix (2, 3): its latest earlier occurrence is followed by 4 5 6 8 (not by 9 9)
    assert d.propose(seq, 4, stats=sure) == [4, 5, 6, 8] and d.kind == ("own", 2, False)
    assert d.propose(seq, 2, stats=sure) == [4, 5]
    seq.output_token_ids += [4, 5, 6]
    assert d.propose(seq, 3, stats=sure) == [8, 2, 3]  # the index follows the sequence as it grows
    assert d.kind == ("own", 4, False)  # (3, 4, 5, 6) came before
    sampled, d2 = Sequence("s", 0, seq.prompt_token_ids + seq.output_token_ids, SamplingParams(temperature=0.7)), NgramDrafter()
    d2._sync(sampled)
    assert d2.match(3, None, DraftStats(), True) == (("own", 4, True), [8, 2, 3])  # a sampled request: its own kinds
    for _ in range(4):  # acceptance 1 -> 0.7 -> 0.49 -> 0.34 -> 0.24 (< LOW_ACCEPT)
        d.update(4, 0, stats)
    assert d.accept_rate == 0.5 and d.pause > 0 and d.propose(seq, 8, stats=sure) == [] and d.kind is None
    assert 0.7**4 < LOW_ACCEPT < 0.7**3
    assert Sequence("r", 0, [5, 6, 7], SamplingParams()).draft_token_ids == []
    assert NgramDrafter().propose(Sequence("r", 0, [5, 6, 7], SamplingParams()), 4) == []  # no match


def test_draft_stats_learn_each_kinds_acceptance_and_drafts_follow_them():
    """A kind's first-draft and later-draft rates start at the prior and follow what verification finds;
    a kind whose drafts do not pay gets no drafts but one token every PROBE_EVERY-th time it is passed
    over, so its rate can recover."""
    stats, kind = DraftStats(), ("own", 1, False)
    assert stats.rates(kind) == pytest.approx((PRIOR_FIRST, 0.85))
    for _ in range(400):
        stats.record(kind, 4, 0)  # first drafts always rejected: later ones never verified
    p0, p1 = stats.rates(kind)
    assert p0 < 0.02 and p1 == pytest.approx(0.85)
    for _ in range(400):
        stats.record(kind, 4, 2)  # first accepted, second accepted, third rejected: later 1 of 2
    p0, p1 = stats.rates(kind)
    assert 0.5 < p1 < 0.55
    # past STATS_WINDOW the counts are halved: the first-draft rate leans to the latest 400, not to all 800
    assert 0.62 < p0 < 0.7
    # drafts are cut by their kind's rates: the same match, a long draft where they pay, none where not
    seq = Sequence("r", 0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 1], SamplingParams(temperature=0))
    good, bad = DraftStats(), DraftStats()
    good.kinds[kind] = [0.95 * 64, 64, 0.95 * 64, 64]
    bad.kinds[kind] = [0.05 * 64, 64, 0.5 * 64, 64]
    assert NgramDrafter().propose(seq, 6, stats=good) == [2, 3, 4, 5, 6, 7]
    d = NgramDrafter()
    got = [d.propose(seq, 6, stats=bad) for _ in range(2 * PROBE_EVERY)]
    assert got.count([2]) == 2 and got.count([]) == 2 * PROBE_EVERY - 2  # probed with one token, twice


def test_drafts_of_the_kind_accepted_more_win():
    hist = OutputHistory(max_tokens=20)
    hist.add([41, 42, 43, 44, 45])
    seq = Sequence("r", 0, [41, 42, 9, 9, 8, 41, 42, 43], SamplingParams(temperature=0))
    stats = DraftStats()
    # (43) never came before in its own tokens: the history's (41, 42, 43) match drafts
    assert NgramDrafter().propose(seq, 2, hist, stats=stats) == [44, 45]
    seq = Sequence("r", 0, [42, 43, 7, 7, 41, 42, 43], SamplingParams(temperature=0))  # own (42, 43) -> 7 7
    stats.kinds[("shared", 3, False)] = [0.1 * 64, 64, 0.5 * 64, 64]
    stats.kinds[("own", 2, False)] = [0.9 * 64, 64, 0.9 * 64, 64]
    assert NgramDrafter().propose(seq, 2, hist, stats=stats) == [7, 7]  # the own kind is accepted more
    stats.kinds[("own", 2, False)] = [0.05 * 64, 64, 0.5 * 64, 64]
    stats.kinds[("shared", 3, False)] = [0.95 * 64, 64, 0.95 * 64, 64]
    assert NgramDrafter().propose(seq, 2, hist, stats=stats) == [44, 45]  # now the history's


def test_the_drafters_index_holds_every_ngrams_latest_continuation_however_it_grew():
    # the definition, one position at a time: n-grams ending at j (j <= len - 2) -> j + 1, the latest wins
    def reference(toks):
        idx = {n: {} for n in NGRAMS}
        for j in range(len(toks) - 1):
            for n in NGRAMS:
                if n <= j + 1:
                    idx[n][tuple(toks[j - n + 1: j + 1])] = j + 1
        return idx

    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        vocab = (3, 5, 50)[trial % 3]  # small vocabularies: many repeated n-grams
        prompt = torch.randint(0, vocab, (1 + trial % 40,), generator=g).tolist()
        seq, d = Sequence("r", 0, prompt, SamplingParams(temperature=0)), NgramDrafter()
        d._sync(seq)
        for i, tok in enumerate(torch.randint(0, vocab, (trial % 17,), generator=g).tolist()):
            seq.output_token_ids.append(tok)
            if i % 3 != 1:  # synced after one token, or after two
                d._sync(seq)
        d._sync(seq)
        assert d.index == reference(prompt + seq.output_token_ids), trial


def test_the_drafters_index_covers_only_the_last_index_window_tokens():
    """A long context is indexed over its last INDEX_WINDOW tokens only (bounded memory and time on the
    engine thread), and what it generates after joins them."""
    from kvstrata.engine.speculative import INDEX_WINDOW

    n = INDEX_WINDOW + 5000
    toks = [1000 + (i % 7919) for i in range(n)]  # (no n-gram repeats inside the window)
    toks[10:14] = [5, 6, 7, 8]  # an n-gram only before the window
    toks[-3000:-2996] = [9, 10, 11, 12]  # and one inside it
    seq = Sequence("r", 0, toks, SamplingParams(temperature=0))
    d = NgramDrafter()
    d._sync(seq)
    first = min(min(ix.values()) for ix in d.index.values())
    assert first >= n - INDEX_WINDOW
    assert sum(map(len, d.index.values())) <= len(NGRAMS) * INDEX_WINDOW
    assert (5, 6, 7, 8) not in d.index[4] and (9, 10, 11, 12) in d.index[4]
    seq.output_token_ids += [9, 10, 11]
    drafts = d.propose(seq, 4)
    assert drafts and drafts == toks[-2997:-2997 + len(drafts)]  # drafted from inside the window: 12, ...
    seq.output_token_ids += [77, 5, 6, 7]
    assert d.propose(seq, 4) == []  # 5 6 7 -> 8 only before it: no draft


def test_drafts_come_from_earlier_outputs_only_without_a_long_own_match():
    hist = OutputHistory(max_tokens=20)
    hist.add([40, 41, 42, 43, 44, 45, 46])
    hist.add([50, 51, 52, 53, 54, 55])
    assert hist.lookup([7, 41, 42, 43], 3) == (3, [44, 45, 46])  # the longest suffix (4 tokens would need 40)
    assert hist.lookup([40, 41, 42, 43], 9) == (4, [44, 45, 46])  # at most what the output holds
    assert hist.lookup([7, 8, 43], 3) == (0, [])  # shorter than MIN_SHARED_NGRAM: no draft from others
    # own tokens hold only a 2-token match of the suffix (..., 41, 42): before anything is learned (equal
    # rates) the earlier output's 3-token one wins
    sure = DraftStats()
    for kind in (("own", 2, False), ("own", 3, False), ("shared", 3, False), ("shared", 4, False)):
        sure.kinds[kind] = [1.0, 1.0, 1.0, 1.0]
    seq = Sequence("r", 0, [41, 42, 9, 9, 40, 41, 42], SamplingParams(temperature=0))
    assert NgramDrafter().propose(seq, 4, hist, stats=sure) == [43, 44, 45, 46]
    assert NgramDrafter().propose(seq, 4, stats=sure) == [9, 9, 40, 41]  # without the history: its own match
    # an own match as long as the history's wins on equal rates
    seq = Sequence("r", 0, [40, 41, 42, 8, 8, 40, 41, 42], SamplingParams(temperature=0))
    assert NgramDrafter().propose(seq, 4, hist, stats=sure) == [8, 8, 40, 41]
    # the oldest outputs go once the history holds more than max_tokens, their n-grams with them
    hist.add([60, 61, 62, 63, 64, 65, 66, 67])
    assert hist.tokens == 14 and list(hist.outputs) == [1, 2]
    assert hist.lookup([41, 42, 43], 3) == (0, []) and hist.lookup([51, 52, 53], 2) == (3, [54, 55])
    assert all(oid in hist.outputs for oid, _ in hist.index.values())
    hist.add([1, 2, 3])  # too short to hold a continuation: not kept
    hist.add(list(range(100, 130)))  # longer than the whole history: not kept
    assert list(hist.outputs) == [1, 2]


@needs_native
def test_a_repeated_answer_is_drafted_from_the_earlier_output(default_pair):
    off, on = default_pair
    prompt = off.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    sp = SamplingParams(max_tokens=48, temperature=0)
    ref = _greedy_runs(off, [prompt], sp)[0]
    assert _greedy_runs(on, [prompt], sp)[0] == ref
    c0 = dict(on.engine.counters)
    assert _greedy_runs(on, [prompt], sp)[0] == ref  # the same answer again: its drafts from the first one
    c = on.engine.counters
    drafted, accepted = c["draft_tokens"] - c0["draft_tokens"], c["accepted_draft_tokens"] - c0["accepted_draft_tokens"]
    assert accepted >= 0.8 * (len(ref[0]) - 1) and accepted >= 0.9 * drafted
    assert c["steps"] - c0["steps"] < len(ref[0]) / 2  # far fewer steps than tokens


def test_the_draft_length_shrinks_with_the_context_and_the_acceptance():
    # a draft row's attention grows with the context, so the same acceptance buys shorter drafts there
    assert draft_length(8, 1.0, 100) == 8  # everything accepted so far, short context: the whole limit
    lengths = [draft_length(12, 0.85, ctx) for ctx in (100, 1000, 4000, 16000)]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1] >= 1
    assert [draft_length(12, p, 4000) for p in (0.9, 0.6, 0.2)] == sorted(
        [draft_length(12, p, 4000) for p in (0.9, 0.6, 0.2)], reverse=True)
    assert draft_length(12, 0.2, 16000) == 0  # no length beats a plain decode: no draft
    assert draft_length(0, 1.0, 100) == 0
    # a likely first token and unlikely later ones: one draft; the reverse: none or many
    assert draft_length(12, (0.9, 0.1), 1000) == 1
    assert draft_length(12, (0.15, 0.95), 4000) == 0 < draft_length(12, (0.5, 0.95), 4000)


def test_beside_other_decoding_sequences_a_draft_must_beat_the_steps_own_rate():
    """A draft row slows every sequence of the step for the one that drafts: at batch 1 a 50 % draft over
    a ~4.7k-token context pays, beside three more such sequences it does not; over short contexts (75 %),
    or with drafts nearly always accepted, it still does. The batch-1 default is the step of this sequence
    alone, and the rule there is the plain-decode one: (1 + p0 + p0 p1 + ... ) / (1 + k c), c a draft
    row's cost over the one-row step's."""
    m = STEP_COST
    alone = draft_length(12, 0.5, 4700)
    assert alone >= 1 and draft_length(12, 0.5, 4700, tokens=1, cost=m.plain([4700])) == alone
    assert draft_length(12, 0.5, 4700, tokens=4, cost=m.plain([4700] * 4), decoding=4) == 0
    assert draft_length(12, 0.97, 4700, tokens=4, cost=m.plain([4700] * 4), decoding=4) >= 1
    assert draft_length(12, 0.75, 300, tokens=4, cost=m.plain([300] * 4), decoding=4) >= 1
    # a draft row costs more beside other decoding sequences (the step is compute-bound there)
    assert m.draft_row(2800, 4) == pytest.approx(m.draft_row(2800) * (1 + 3 * m.busy)) and m.busy > 0
    for ctx in (100, 1000, 4000, 16000):  # the batch-1 rule, written with the one-row step's share c
        c = m.draft_row(ctx) / m.plain([ctx])
        for p in ((0.3, 0.3), (0.6, 0.85), (0.9, 0.9)):
            gains = [(1 + expected_accepted(k, p)) / (1 + k * c) for k in range(13)]
            best = max(range(13), key=lambda k: (round(gains[k], 12), -k))
            assert draft_length(12, p, ctx) == (best if gains[best] > 1 else 0), (ctx, p)
    assert expected_accepted(3, 0.5) == 0.5 + 0.25 + 0.125 and expected_accepted(0, 0.9) == 0
    assert expected_accepted(3, (0.5, 0.8)) == pytest.approx(0.5 + 0.4 + 0.32)


def test_the_step_cost_scales_with_the_model():
    """The fitted rates are per K / V byte and per attention FMA against the weights: the default model's
    shape gives back the fit, a model with 4x the weights and the same attention a quarter of the
    per-token costs, and a float32 pool twice the read."""
    ref = StepCost.of(30, 9, 3, 64, 2, int(138.4e6))
    assert (ref.row, ref.read, ref.attend) == pytest.approx((STEP_COST.row, STEP_COST.read, STEP_COST.attend))
    big = StepCost.of(30, 9, 3, 64, 2, int(4 * 138.4e6))
    assert big.read == pytest.approx(ref.read / 4) and big.attend == pytest.approx(ref.attend / 4)
    assert StepCost.of(30, 9, 3, 64, 4, int(138.4e6)).read == pytest.approx(2 * ref.read)
    assert ref.plain([1000, 2000]) == pytest.approx(1 + 3000 * (ref.read + ref.attend) + ref.row)
    assert ref.draft_row(1000) == pytest.approx(ref.row + 1000 * ref.attend)
    # on AMX tiles a row's weight products cost less, its attention the same: longer drafts pay
    amx = StepCost.of(30, 9, 3, 64, 2, int(138.4e6), amx=True)
    assert amx.row == AMX_ROW < ref.row and (amx.read, amx.attend) == (ref.read, ref.attend)
    assert draft_length(12, (0.5, 0.8), 256, model=amx) > draft_length(12, (0.5, 0.8), 256, model=ref)


class _Recorder:
    def __init__(self) -> None:
        self.runs: list[list[int]] = []

    def stored(self, keys, parent, token_ids) -> None:
        self.runs.append(list(token_ids))

    def removed(self, keys) -> None:
        pass


@needs_native
def test_rejected_drafts_leave_no_trace(tiny_llama, monkeypatch):
    kw = dict(kv_device_bytes="64M", quantization="none", block_size=4)
    off, on = LLM(str(tiny_llama), speculative="off", **kw), LLM(str(tiny_llama), speculative="on", **kw)
    rec = _Recorder()
    on.engine.kv.listeners.append(rec)
    base = list(range(10, 22))
    prompt = base * 3 + [10, 11, 99]
    params = SamplingParams(max_tokens=37, temperature=0, ignore_eos=True)
    out_off = off.generate([prompt], params)[0].outputs[0].token_ids
    monkeypatch.setattr("kvstrata.engine.llm_engine.NgramDrafter", _OracleDrafter)
    _OracleDrafter.reference = {tuple(prompt): out_off}
    out_on = on.generate([prompt], params)[0].outputs[0].token_ids
    assert out_on == out_off
    c = on.engine.counters
    assert 0 < c["accepted_draft_tokens"] < c["draft_tokens"], "the test needs accepted and rejected drafts"
    tokens = prompt + out_on
    stream = [t for run in rec.runs for t in run]
    assert stream == tokens[: len(stream)]  # listeners (and write-behind) saw accepted tokens only
    keys = chain_keys(tokens, 4, on.engine.fingerprint)
    pool_on, pool_off = on.engine.pool, off.engine.pool
    registered = set(pool_on.key_to_block)
    assert registered <= set(keys)  # every cached block is a block of the true tokens
    assert len(registered) == (len(tokens) - 1) // 4
    for key in registered:  # and holds the K / V of decoding without speculation
        a, b = pool_on.key_to_block[key], pool_off.key_to_block[key]
        assert torch.equal(pool_on.k[:, a], pool_off.k[:, b]) and torch.equal(pool_on.v[:, a], pool_off.v[:, b])


def test_speculative_on_needs_the_native_step(tiny_llama):
    with pytest.raises(KvstrataError, match="native step"):
        LLM(str(tiny_llama), kv_device_bytes="64M", native_decode="off", speculative="on")
    llm = LLM(str(tiny_llama), kv_device_bytes="64M", native_decode="off", speculative="auto")
    assert not llm.engine.speculative  # auto: off on the torch path, which is not batch-invariant

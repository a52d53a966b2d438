"""Sampling: seeds, bounds of top-k / top-p / min-p (property tests), penalties, stops, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.sampling import torch_keep
from kvstrata import LLM, SamplingParams
from kvstrata.core import FinishReason, KvstrataError
from kvstrata.engine.sampler import distribution


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The sampler's filters (`distribution`) as a mask on the row: -inf where a token is not kept."""
    d = distribution(logits.numpy(), top_k, top_p, min_p)
    if d is None or d.ids is None:
        return logits
    keep = torch.zeros(logits.shape[0], dtype=torch.bool)
    keep[torch.from_numpy(d.ids)] = True
    return logits.masked_fill(~keep, float("-inf"))


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), kv_device_bytes="8M", quantization="none")  # the exact path: checked against transformers


def test_seed_reproduces_alone_and_in_a_batch(llm):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    alone = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    again = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    noise = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)  # unseeded neighbours
    batch = llm.generate(["The quick", "Once upon a time", "Paris is"], [noise, p, noise])
    assert alone == again == batch[1].outputs[0].token_ids
    other = llm.generate("Once upon a time", SamplingParams(max_tokens=20, temperature=1.0, seed=43, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


logit_vectors = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=64)


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.integers(1, 70))
def test_top_k_keeps_only_the_k_best(vals, k):
    x = torch.tensor(vals)
    kept = torch.isfinite(filter_logits(x, k, 1.0, 0.0))
    kth = torch.sort(x, descending=True).values[min(k, len(vals)) - 1]
    assert bool((x[kept] >= kth).all())  # ties at the k-th value may all stay
    assert int(kept.sum()) >= min(k, len(vals))


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(vals, p):
    x = torch.tensor(vals, dtype=torch.float64)
    kept = torch.isfinite(filter_logits(x, 0, p, 0.0))
    probs = torch.softmax(x, -1)
    assert bool(kept[probs.argmax()])
    # every kept token is at least as likely as every dropped one, and the kept mass reaches p ...
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max() - 1e-12
        assert probs[kept].sum() >= p - 1e-9
        # ... while dropping all the least likely kept members (ties) would fall short of p
        low = probs[kept].min()
        assert probs[kept & (probs > low)].sum() < p + 1e-9


@settings(max_examples=200, deadline=None)
@given(logit_vectors, st.floats(0.0, 1.0))
def test_min_p_drops_tokens_below_the_scaled_max(vals, m):
    x = torch.tensor(vals, dtype=torch.float64)
    kept = torch.isfinite(filter_logits(x, 0, 1.0, m))
    probs = torch.softmax(x, -1)
    assert bool((probs[kept] >= m * probs.max() - 1e-12).all())
    assert bool((probs[~kept] < m * probs.max()).all())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.floats(0.05, 0.9), st.integers(0, 10_000))
def test_sampled_tokens_respect_top_k_and_top_p_bounds(llm, k, p, seed):
    """End to end: every emitted token was inside the filtered set of its step's distribution."""

    ref = _ref(llm)
    ids = llm.tokenizer.encode("The quick brown fox")
    out = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0.8, top_k=k, top_p=p, seed=seed,
                                             ignore_eos=True))[0].outputs[0].token_ids
    ctx = list(ids)
    for tok in out:
        with torch.no_grad():
            logits = ref(torch.tensor([ctx])).logits[0, -1].double() / 0.8
        allowed = torch.isfinite(filter_logits(logits, k, p, 0.0))
        assert bool(allowed[tok]), (tok, k, p)
        ctx.append(tok)


_REF = {}


def _ref(llm):
    from transformers import AutoModelForCausalLM

    if "m" not in _REF:
        _REF["m"] = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32).eval()
    return _REF["m"]


def test_logprobs_match_the_reference_distribution(llm):
    ids = llm.tokenizer.encode("Paris is the capital of")
    out = llm.generate([ids], SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    ctx = list(ids)
    for lp in out.logprobs:
        with torch.no_grad():
            ref = torch.log_softmax(_ref(llm)(torch.tensor([ctx])).logits[0, -1].float(), -1)
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-3
        assert [t for t, _ in lp.top] == torch.topk(ref, 3).indices.tolist()
        assert lp.token_id == lp.top[0][0]  # greedy picks the best
        ctx.append(lp.token_id)


def test_penalties_change_choices_as_defined(llm):
    base = llm.generate("The quick brown fox", SamplingParams(max_tokens=30, ignore_eos=True))[0].outputs[0].token_ids
    pen = llm.generate("The quick brown fox", SamplingParams(max_tokens=30, ignore_eos=True, frequency_penalty=2.0,
                                                           presence_penalty=2.0))[0].outputs[0].token_ids
    # repeated tokens get rarer under the penalties
    assert len(set(pen)) >= len(set(base))
    from kvstrata.engine.sampler import apply_penalties
    from kvstrata.sched.sequence import Sequence

    seq = Sequence("r", 0, [1, 2], SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0))
    seq.output_token_ids = [3, 3, 4]
    logits = torch.tensor([1.0, 2.0, -2.0, 4.0, 0.0, 5.0])
    got = apply_penalties(logits, seq)
    # hand-computed: repetition on {1,2,3,4} (÷2 if >0 else ×2), then -0.5*count -0.25*present on outputs
    want = torch.tensor([1.0, 1.0, -4.0, 2.0 - 1.0 - 0.25, 0.0 - 0.5 - 0.25, 5.0])
    assert torch.allclose(got, want)


def test_stop_strings_and_stop_token_ids(llm):
    free = llm.generate("Once upon a time", SamplingParams(max_tokens=20, ignore_eos=True))[0].outputs[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=20, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    incl = llm.generate("Once upon a time", SamplingParams(max_tokens=20, ignore_eos=True, stop=[stop],
                                                          include_stop_str_in_output=True))[0].outputs[0]
    assert incl.text == text[: text.index(stop) + len(stop)]
    tok = free.token_ids[4]
    st_ = llm.generate("Once upon a time", SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=[tok]))[0]
    assert st_.outputs[0].token_ids == free.token_ids[: free.token_ids.index(tok) + 1]
    assert st_.outputs[0].stop_reason == tok


def test_detokenizer_never_splits_a_multibyte_character(llm):
    from kvstrata.tokenizer.tokenizer import IncrementalDetokenizer

    text = "Grüße aus Köln — 東京 は 大きい 🚀 émoji"
    ids = llm.tokenizer.encode(text)
    d = IncrementalDetokenizer(llm.tokenizer)
    pieces = [d.push(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize(
    "kw",
    [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-5),
     dict(presence_penalty=3), dict(repetition_penalty=0), dict(logprobs=50), dict(n=0), dict(stop=[""])],
)
def test_bad_sampling_params_are_rejected(kw):
    with pytest.raises(KvstrataError):
        SamplingParams(**kw)


def test_extreme_parameters_never_break_sampling(llm):
    outs = llm.generate(["Once upon a time"] * 3, [
        SamplingParams(max_tokens=4, temperature=1e-300, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=100.0, repetition_penalty=0.01, seed=2**70, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1.0, seed=-5, ignore_eos=True)])
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    greedy = llm.generate("Once upon a time", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert outs[0].outputs[0].token_ids == greedy.outputs[0].token_ids  # 1e-300 is greedy


def test_async_engine_survives_a_failing_step(llm):
    import asyncio

    from kvstrata.engine.async_engine import AsyncEngine

    aeng = AsyncEngine(llm.engine)
    real = llm.engine.runner.execute
    calls = {"n": 0}

    def flaky(so):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(so)

    llm.engine.runner.execute = flaky

    async def run(prompt):
        last = None
        async for out in aeng.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True)):
            last = out
        return last

    try:
        with pytest.raises(KvstrataError, match="injected"):
            asyncio.run(run("The quick brown"))
        out = asyncio.run(run("Paris is"))  # the next request is served
        assert len(out.outputs[0].token_ids) == 3
        assert llm.engine.pool.num_in_use == 0
    finally:
        llm.engine.runner.execute = real
        aeng.shutdown()


@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.9, 0.0), (40, 0.95, 0.05), (0, 0.95, 0.05), (0, 0.5, 0.0),
                                               (0, 1.0, 0.1)])
def test_filters_on_a_whole_vocabulary_match_a_full_sort(scale, top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(int(scale * 10) + top_k)
    x = torch.randn(49152, generator=gen) * scale
    kept = torch.isfinite(filter_logits(x, top_k, top_p, min_p))
    ref = torch_keep(x.double(), top_k, top_p, min_p)
    # (a token exactly on the nucleus' edge may fall either way with the rounding of the cumulative sum)
    assert int((kept != ref).sum()) <= 1 and int(kept.sum()) >= 1


@pytest.mark.parametrize("top_k", [0, 50])
def test_draws_follow_the_distribution_on_a_whole_vocabulary(top_k):
    """Draws from a 49k-token row (the vectorised softmax / cumulative-sum path) against its probabilities:
    the five likeliest tokens and the rest, chi-square."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(49152, generator=gen) * 2.0
    x[[11, 222, 3333, 44444, 49000]] = torch.tensor([11.0, 10.5, 10.0, 9.2, 9.0])
    kept = torch_keep(x.double(), top_k, 1.0, 0.0)
    p = torch.softmax(x.double().masked_fill(~kept, float("-inf")), -1).numpy()
    d = distribution(x.numpy(), top_k, 1.0, 0.0)
    rng = np.random.Generator(np.random.PCG64(7))
    draws = [d.draw(rng) for _ in range(20000)]
    top = [11, 222, 3333, 44444, 49000]
    counts = np.array([sum(t == k for t in draws) for k in top] + [sum(t not in top for t in draws)], dtype=float)
    expect = 20000 * np.array([*p[top], 1.0 - p[top].sum()])
    chi2 = ((counts - expect) ** 2 / expect).sum()
    assert chi2 < 20.52, (counts, expect)  # 5 degrees of freedom, p = 0.001
    if top_k:
        assert all(bool(kept[t]) for t in set(draws))


def test_argmax_takes_the_first_maximum_like_torch():
    from kvstrata.engine.sampler import argmax

    x = torch.randn(3, 49152)
    x[0, [5, 900]] = 50.0  # a tie: the first wins
    x[1, 77] = float("nan")  # NaN counts as the maximum
    x[2] = float("-inf")
    assert argmax(x).tolist() == x.argmax(-1).tolist() == [5, 77, 0]
    assert int(argmax(x[0])) == 5


def test_the_blockwise_inverse_cdf_picks_what_the_whole_cumulative_sum_picks():
    """A whole-vocabulary draw sums the row in blocks and accumulates only the block its target falls in;
    it must pick the token the plain cumulative sum picks, never a token without mass, the last token with
    mass when u rounds up to the total, and work for rows of any length around the block size."""
    from kvstrata.engine.sampler import _CDF_BLOCK, _inverse_cdf

    rng = np.random.default_rng(5)
    for n in (49152, 4097, 3 * _CDF_BLOCK + 1):
        p = np.exp(rng.standard_normal(n) * 3)
        p[rng.random(n) < 0.3] = 0.0  # tokens without mass, the tail among them
        p[-50:] = 0.0
        p /= p.sum()
        c = np.cumsum(p)
        for u in [*rng.random(2000), 0.0, np.nextafter(1.0, 0.0)]:
            j = _inverse_cdf(p, float(u))
            want = int(np.searchsorted(c, u * c[-1], side="right"))
            want = want if want < n else int(np.flatnonzero(p)[-1])
            assert p[j] > 0 and (j == want or abs(c[j] - u * c[-1]) < 1e-12), (n, u, j, want)

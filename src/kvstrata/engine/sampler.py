"""Next-token sampling: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

Order (as vLLM): repetition / frequency / presence penalties on the raw logits; logprobs are taken
from the raw model distribution (log_softmax of the logits before any processing); then temperature,
then top-k, top-p and min-p filtering of the tempered distribution, then one draw from the request's
own generator, so a seeded request gives the same tokens alone or in any batch.

On the CPU the filters and the draw run in numpy on the tokens the filters keep (`distribution`): after
top-k a few dozen, for top-p only the tokens that can be in the nucleus are sorted. torch's CPU sort,
multinomial and argmax over the default model's 49k-token row took 5 ms, 1.5 ms and 0.1 ms here, which
made a sampled token with llama.cpp's default settings cost ~3 ms beside a ~4 ms decode step
(`python -m benchmarks.sampling`).

Logits come as torch tensors (the torch path) or numpy arrays (the native step): greedy requests never
need torch, nor do sampled ones (draws from a per-request numpy PCG64), logprobs or grammars (their
masks take either kind).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence as Seq

import numpy as np

from kvstrata.core import TokenLogprob
from kvstrata.sched.sequence import Sequence

if TYPE_CHECKING:
    import torch

Logits = Any  # a torch tensor or a numpy array


def _torch(x: Logits) -> torch.Tensor:
    """The logits as a torch tensor (a numpy array shared, not copied)."""
    if isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(x)
    return x


def apply_penalties(logits: Logits, seq: Sequence) -> Logits:
    """logits (V,) for one sequence; returns a penalized copy on the CPU, of the kind given (or the same
    row when none apply). numpy: the same rules as torch ops on the row took 0.6-0.7 ms a token here."""
    p = seq.params
    if not p.has_penalties:
        return logits
    x = _rows(logits).copy()
    V = x.shape[0]
    if p.repetition_penalty != 1.0:  # CTRL (Keskar et al. 2019), over prompt and output, as HF does
        seen = np.zeros(V, dtype=np.bool_)
        seen[np.fromiter(seq.all_token_ids, dtype=np.int64)] = True
        ids = np.flatnonzero(seen)
        v, rp = x[ids], x.dtype.type(p.repetition_penalty)
        x[ids] = np.where(v > 0, v / rp, v * rp)
    if (p.frequency_penalty or p.presence_penalty) and seq.output_token_ids:  # OpenAI: output tokens only
        counts = np.bincount(np.fromiter(seq.output_token_ids, dtype=np.int64), minlength=V)[:V].astype(x.dtype)
        x -= x.dtype.type(p.frequency_penalty) * counts + x.dtype.type(p.presence_penalty) * (counts > 0)
    return x if isinstance(logits, np.ndarray) else _torch(x)


class Distribution:
    """A tempered, filtered next-token distribution: the tokens it keeps (`ids`, ascending; None: every
    token of the row) and their probabilities (float64, summing to 1)."""

    __slots__ = ("ids", "probs")

    def __init__(self, ids: np.ndarray | None, probs: np.ndarray) -> None:
        self.ids, self.probs = ids, probs

    def _at(self, token: int) -> int | None:
        """Where `token` is in `probs`, None when it is not kept."""
        if self.ids is None:
            return token if 0 <= token < self.probs.shape[0] else None
        j = int(np.searchsorted(self.ids, token))
        return j if j < self.ids.shape[0] and self.ids[j] == token else None

    def prob(self, token: int) -> float:
        j = self._at(token)
        return 0.0 if j is None else float(self.probs[j])

    def without(self, token: int) -> Distribution | None:
        """The distribution with `token` removed and the rest renormalised; None when nothing else is left."""
        p = self.probs.copy()
        j = self._at(token)
        if j is not None:
            p[j] = 0.0
        s = p.sum()
        return Distribution(self.ids, p / s) if s > 0 else None

    def draw(self, generator: np.random.Generator | None) -> int:
        """One token by inverse CDF, its uniform from the request's own generator."""
        j = _inverse_cdf(self.probs, _uniform(generator))
        return j if self.ids is None else int(self.ids[j])


_SMALL = 4096  # rows longer than this: exp in float32 (numpy's vectorised loop), then widened
_DEFAULT_RNG = np.random.default_rng()  # (draws of a sequence without a generator of its own)


_CDF_BLOCK = 1024


def _inverse_cdf(p: np.ndarray, u: float) -> int:
    """The first index whose cumulative probability exceeds u times the total (a token with mass). A long
    row is summed in blocks and only the block the target falls in is accumulated: numpy's cumsum over a
    49k-token row is a scalar loop (~180 us here), the block sums are vectorised."""
    n = p.shape[0]
    if n <= _SMALL:
        c = np.cumsum(p)
        j = int(np.searchsorted(c, u * c[-1], side="right"))
    else:
        B = _CDF_BLOCK
        cs = np.cumsum(np.add.reduceat(p, np.arange(0, n, B)))
        target = u * cs[-1]
        b = int(np.searchsorted(cs, target, side="right"))
        j = n
        if b < cs.shape[0]:
            lo = b * B
            c = np.cumsum(p[lo : lo + B])
            k = int(np.searchsorted(c, target - (cs[b - 1] if b else 0.0), side="right"))
            if k >= c.shape[0]:  # (rounding at the block's end: its last token with mass)
                nz = np.flatnonzero(p[lo : lo + B])
                k = int(nz[-1]) if nz.shape[0] else c.shape[0]
            j = lo + k
    if j >= n:  # (u * total rounded up to the total: the last token with mass)
        j = int(np.flatnonzero(p)[-1])
    return j


def _uniform(generator: np.random.Generator | None) -> float:
    """A uniform in [0, 1) from the request's generator (a PCG64 seeded per request: sched/sequence.py)."""
    return float((generator or _DEFAULT_RNG).random())


def _rows(t: Logits) -> np.ndarray:
    """Logits as a numpy array, without a copy for a CPU float32 / float64 tensor or array."""
    if isinstance(t, np.ndarray):
        return t if t.dtype in (np.float32, np.float64) else t.astype(np.float32)
    import torch

    t = t.detach()
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        t = t.to("cpu", torch.float32)
    return t.numpy()


def argmax(logits: Logits) -> np.ndarray:
    """Index of the first maximum of each row (NaN counts as the maximum, as torch.argmax). numpy: one
    pass; torch's CPU argmax over a 49k-token row takes ~100 us here, 20x longer."""
    if not isinstance(logits, np.ndarray) and logits.device.type != "cpu":
        return logits.argmax(-1).cpu().numpy()
    return _rows(logits).argmax(-1)


def distribution(x: np.ndarray, top_k: int, top_p: float, min_p: float) -> Distribution | None:
    """The sampling distribution of a tempered row of logits x (V,): softmax over the tokens that top-k, the
    top-p nucleus and min_p * the top probability keep; None when the row is degenerate (NaN, +inf, or
    every token -inf: the caller takes the mode). numpy on the kept tokens only (after top-k usually a few
    dozen): torch's CPU sort and multinomial over a 49k-token row took 5 ms and 1.5 ms here."""
    m = x.max()
    if not np.isfinite(m):
        return None
    V = x.shape[0]
    ids = None
    if top_k and top_k < V:
        kth = np.partition(x, V - top_k)[V - top_k]
        ids = np.flatnonzero(x >= kth)  # tokens tied with the k-th all stay
        x = x[ids]
    if x.shape[0] > _SMALL:  # a whole vocabulary: float32 exp (numpy's SIMD loop; float64's is ~5x slower)
        p = np.exp(x - m, dtype=np.float32).astype(np.float64)
        p *= 1.0 / p.sum()  # (a multiply: dividing 49k doubles took ~45 us here)
    else:
        p = np.exp((x - m).astype(np.float64, copy=False))
        p /= p.sum()
    keep = None
    if top_p < 1.0:
        # the smallest prefix of the sorted probabilities whose mass reaches top_p (the token that
        # crosses it is kept); tokens tied with the least likely kept one stay too, so the choice never
        # depends on sort order. Only candidates are sorted: a token below (1 - top_p) / n is never in the
        # nucleus (were it the last one kept, it and the n or fewer tokens after it would weigh less than
        # 1 - top_p, so the prefix before it would already reach top_p)
        head = p[p >= (1.0 - top_p) / p.shape[0]]
        desc = -np.sort(-head)
        last = min(int(np.searchsorted(np.cumsum(desc), top_p)), desc.shape[0] - 1)
        keep = p >= desc[last]
    if min_p > 0.0:
        above = p >= min_p * p.max()  # (a ratio to the top token: the same before or after top-p)
        keep = above if keep is None else keep & above
    if keep is not None:
        ids = np.flatnonzero(keep) if ids is None else ids[keep]
        p = p[keep]
        p /= p.sum()
    return Distribution(ids, p)


def processed(seq: Sequence, row: Logits) -> Logits:
    """One row of logits (V,) as a request samples from it before the temperature: penalties, then its
    grammar's mask (structured output) in the state the sequence's tokens so far left it in."""
    if seq.params.plain:
        return row
    row = apply_penalties(row, seq)
    return seq.logits_processor.mask(row) if seq.logits_processor is not None else row


def next_token(seq: Sequence, row: Logits, draft: int | None = None) -> int:
    """The token a request emits from one row of logits (V,), given the draft proposed for it (None: no
    draft; engine/speculative.py). Greedy: the argmax (so a draft is kept iff it is the argmax). Sampling:
    the draft kept with probability p(draft), else a draw from p without it; without a draft, a draw from
    p. The grammar (structured output) masks the row in its current state and then takes the emitted token,
    so with drafts row i is masked as if drafts 0 .. i-1 were emitted: they were, or verification stopped
    before row i. Logprobs of the emitted token (from the raw logits) are appended when asked."""
    p = seq.params
    x = processed(seq, row)
    d = None if p.greedy else distribution(_rows(x) / np.float32(p.temperature), p.top_k, p.top_p, p.min_p)
    if d is None:  # greedy, or a degenerate distribution (overflow): its mode
        tok = int(argmax(x))
    elif draft is None:
        tok = d.draw(seq.generator)
    elif _uniform(seq.generator) < d.prob(draft):
        tok = draft
    else:
        rest = d.without(draft)
        tok = draft if rest is None else rest.draw(seq.generator)  # (p(draft) == 1 and the draw was 1.0)
    if seq.logits_processor is not None:
        seq.logits_processor.accept(tok)
    if p.logprobs is not None:
        seq.logprobs.append(token_logprob(row, tok, p.logprobs))
    return tok


class Sampler:
    def __call__(self, seqs: Seq[Sequence], logits: Logits) -> list[int]:
        """logits (S, V) fp32 for S sequences -> one token id each; appends logprobs when asked."""
        S = logits.shape[0]
        out = [0] * S
        plain_greedy = [i for i, s in enumerate(seqs) if s.params.plain]
        if len(plain_greedy) == S:  # all greedy: no gather of their rows
            out = argmax(logits).tolist()
        elif plain_greedy:
            for i, t in zip(plain_greedy, argmax(logits[plain_greedy]).tolist()):
                out[i] = t
        for i, seq in enumerate(seqs):
            if not seq.params.plain:
                out[i] = next_token(seq, logits[i])
            elif seq.params.logprobs is not None:  # (plain: no grammar to advance)
                seq.logprobs.append(token_logprob(logits[i], out[i], seq.params.logprobs))
        return out


def token_logprob(logits: Logits, token: int, top_n: int) -> TokenLogprob:
    """The emitted token's log-probability under the raw logits and the top_n most likely tokens' (numpy,
    float64 accumulation: within 1e-6 of torch's float32 log_softmax)."""
    x = _rows(logits).astype(np.float64)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    top: list[tuple[int, float]] = []
    if top_n:
        k = min(top_n, lp.shape[0])
        ix = np.argpartition(-lp, k - 1)[:k]
        ix = ix[np.lexsort((ix, -lp[ix]))]  # most likely first; ties by token id
        top = [(int(i), float(lp[i])) for i in ix]
    return TokenLogprob(token, float(lp[token]), top)

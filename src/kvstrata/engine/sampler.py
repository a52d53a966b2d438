"""Next-token sampling: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

Order (as vLLM): repetition / frequency / presence penalties on the raw logits; logprobs are taken
from the raw model distribution (log_softmax of the logits before any processing); then temperature,
then top-k, top-p and min-p filtering of the tempered distribution, then one draw from the request's
own generator, so a seeded request gives the same tokens alone or in any batch.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from kvstrata.core import TokenLogprob
from kvstrata.sched.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """logits (V,) for one sequence; returns a penalized copy (or the same tensor when none apply)."""
    p = seq.params
    if not p.has_penalties:
        return logits
    logits = logits.clone()
    if p.repetition_penalty != 1.0:  # CTRL (Keskar et al. 2019), over prompt and output, as HF does
        seen = torch.tensor(sorted(set(seq.all_token_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and seq.output_token_ids:  # OpenAI: output tokens only
        counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=logits.shape[0]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Masks (to -inf) tokens outside top-k / the top-p nucleus / below min_p * max prob. logits (V,)."""
    if top_k and top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(logits, -1)
        sorted_p = torch.sort(probs, descending=True).values
        cum = sorted_p.cumsum(-1)
        # the smallest prefix whose mass reaches top_p (the token that crosses it is kept); tokens tied
        # with the least likely kept one stay too, so the choice never depends on sort order
        last = int(torch.searchsorted(cum, torch.tensor(top_p, dtype=cum.dtype)).clamp(max=len(cum) - 1))
        logits = logits.masked_fill(probs < sorted_p[last], float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def processed(seq: Sequence, row: torch.Tensor) -> torch.Tensor:
    """One row of logits (V,) as a request samples from it before the temperature: penalties, then its
    grammar's mask (structured output) in the state the sequence's tokens so far left it in."""
    if seq.params.plain:
        return row
    row = apply_penalties(row, seq)
    return seq.logits_processor.mask(row) if seq.logits_processor is not None else row


class Sampler:
    def __call__(self, seqs: Seq[Sequence], logits: torch.Tensor) -> list[int]:
        """logits (S, V) fp32 for S sequences -> one token id each; appends logprobs when asked."""
        S = logits.shape[0]
        out = [0] * S
        plain_greedy = [i for i, s in enumerate(seqs) if s.params.plain]
        if len(plain_greedy) == S:  # all greedy: no gather of their rows
            out = logits.argmax(-1).tolist()
        elif plain_greedy:
            idx = torch.tensor(plain_greedy)
            for i, t in zip(plain_greedy, logits[idx].argmax(-1).tolist()):
                out[i] = t
        for i, seq in enumerate(seqs):
            p = seq.params
            if not p.plain:
                row = processed(seq, logits[i])
                if p.greedy:
                    out[i] = int(row.argmax())
                else:
                    row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
                    probs = torch.softmax(row, -1)
                    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
                        out[i] = int(row.argmax())  # degenerate distribution (overflow): its mode
                    else:
                        out[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
            if seq.logits_processor is not None:
                seq.logits_processor.accept(out[i])
            if p.logprobs is not None:
                seq.logprobs.append(token_logprob(logits[i], out[i], p.logprobs))
        return out


def token_logprob(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    lp = torch.log_softmax(logits, -1)
    top: list[tuple[int, float]] = []
    if top_n:
        v, ix = torch.topk(lp, top_n)
        top = list(zip(ix.tolist(), v.tolist()))
    return TokenLogprob(token, float(lp[token]), top)

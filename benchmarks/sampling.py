"""Sampled decoding: what a sampled token costs beside a greedy one, on the default model.

Two parts, both in one process so the machine's state hits every row alike:
- The sampler alone, per row of real logits (the default model's 49,152-token rows, taken from a greedy
  run): kvstrata's sampler (engine/sampler.py: numpy on the tokens top-k / top-p keep, a draw by inverse
  CDF from a numpy PCG64) against the same rules as torch operations on the whole row (softmax, sort for top-p, topk, and
  torch.multinomial: how the sampler worked before, and how a plain torch sampler does it).
- Decode tokens/s at batch 1 and 8 with each sampling setting against greedy, the settings run in turn
  within each repetition (median of the repetitions), on the default engine and on one with speculative
  decoding off (at batch 1 greedy requests gain more from speculation than sampled ones, so the engine
  without it shows the sampler's own cost). "recommended" is what a request that sets no
  sampling field gets from the server on the default model (loader/sampling.py; llama.cpp's defaults
  for this GGUF).

    python -m benchmarks.sampling [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from benchmarks.common import machine, peak_rss_mib, table, write_results
from kvstrata import LLM, SamplingParams
from kvstrata.engine.sampler import distribution
from kvstrata.loader.sampling import recommended_sampling

PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how a hash map works.",
           "List five tips for writing clean Python code.", "Describe the water cycle to a ten-year-old."]


def torch_keep(x: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Which tokens of a tempered row (V,) the rules keep, as torch operations over the whole row with a
    full sort (the peer here; tests/engine/test_sampling.py's independent reference)."""
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k and top_k < x.shape[0]:
        keep &= x >= torch.topk(x, top_k).values[-1]
    probs = torch.softmax(x.masked_fill(~keep, float("-inf")), -1)
    if top_p < 1.0:
        desc = torch.sort(probs, descending=True).values
        last = min(int(torch.searchsorted(desc.cumsum(-1), torch.tensor(top_p, dtype=desc.dtype))), len(desc) - 1)
        keep &= probs >= desc[last]
    if min_p > 0.0:
        keep &= probs >= min_p * probs.max()
    return keep


def torch_rules(row: torch.Tensor, t: float, top_k: int, top_p: float, min_p: float, gen: torch.Generator) -> int:
    """The rules and the draw as torch operations over the whole row."""
    x = row / t
    x = x.masked_fill(~torch_keep(x, top_k, top_p, min_p), float("-inf"))
    return int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen))


def ours(row: torch.Tensor, t: float, top_k: int, top_p: float, min_p: float, gen: np.random.Generator) -> int:
    d = distribution(row.numpy() / np.float32(t), top_k, top_p, min_p)
    assert d is not None
    return d.draw(gen)


def per_row_us(fn, rows: list[torch.Tensor], cfg: dict, reps: int) -> float:
    # each its own generator: torch's for the torch rules, a PCG64 for kvstrata's (sched/sequence.py)
    gen = torch.Generator().manual_seed(0) if fn is torch_rules else np.random.Generator(np.random.PCG64(0))
    args = (cfg["temperature"], cfg.get("top_k", 0), cfg.get("top_p", 1.0), cfg.get("min_p", 0.0))
    fn(rows[0], *args, gen)
    t = time.perf_counter()
    for _ in range(reps):
        for r in rows:
            fn(r, *args, gen)
    return (time.perf_counter() - t) / (reps * len(rows)) * 1e6


def real_rows(llm: LLM, ids: list[list[int]], n: int) -> list[torch.Tensor]:
    rows: list[torch.Tensor] = []
    sampler = llm.engine.sampler
    orig = type(sampler).__call__

    def grab(self, seqs, logits):
        rows.extend(torch.tensor(np.array(logits[i])) for i in range(logits.shape[0]))  # (numpy from the native step)
        return orig(self, seqs, logits)

    type(sampler).__call__ = grab
    try:
        llm.generate(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    finally:
        type(sampler).__call__ = orig
    return rows


def decode_tok_s(llm: LLM, ids: list[list[int]], batch: int, cfg: dict, max_tokens: int) -> float:
    prompts = [ids[i % len(ids)] for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=1))  # prefixes cached: decode dominates
    if llm.engine.shared_outputs is not None:  # no drafts from this prompt's answer in an earlier repetition
        llm.engine.shared_outputs.clear()
    t = time.perf_counter()
    outs = llm.generate(prompts, [SamplingParams(max_tokens=max_tokens, ignore_eos=True, **cfg) for _ in prompts])
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 repetition, 48 tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=96)
    a = ap.parse_args()
    if a.quick:
        a.reps, a.max_tokens = 1, 48
    engines = {"default": LLM("default", kv_device_bytes="512M"),
               "speculation off": LLM("default", kv_device_bytes="512M", speculative="off")}
    llm = engines["default"]
    rec = recommended_sampling(llm.engine.model_path)
    cfgs = {"greedy": {"temperature": 0.0},
            f"recommended ({', '.join(f'{k} {v:g}' for k, v in rec.items())})": rec,
            "temperature 1 (OpenAI's default)": {"temperature": 1.0},
            "temperature 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9}}
    ids = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]

    rows = real_rows(llm, ids[:2], 16)
    sampler_rows, data = [], {"machine": machine(), "sampler_us": {}, "decode_tok_s": {}}
    for name, cfg in list(cfgs.items())[1:]:
        peer = per_row_us(torch_rules, rows, cfg, 1 if a.quick else 3)
        mine = per_row_us(ours, rows, cfg, 1 if a.quick else 3)
        data["sampler_us"][name] = {"kvstrata": mine, "torch_ops": peer}
        sampler_rows.append([name, f"{peer:,.0f}", f"{mine:,.0f}", f"{peer / mine:.1f}x"])

    runs: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(a.reps):
        for batch in (1, 8):
            for name, cfg in cfgs.items():  # (the two engines back to back on each setting)
                for ename, eng in engines.items():
                    runs.setdefault((ename, batch, name), []).append(decode_tok_s(eng, ids, batch, cfg, a.max_tokens))
    decode_rows = []
    for name in cfgs:
        row = [name]
        for batch in (1, 8):
            for ename in engines:
                r, g = (statistics.median(runs[(ename, batch, n)]) for n in (name, "greedy"))
                data["decode_tok_s"].setdefault(name, {})[f"{ename}, batch {batch}"] = runs[(ename, batch, name)]
                row.append(f"{r:.1f} ({r / g:.2f}x)")
        decode_rows.append(row)
    data["peak_rss_mib"] = peak_rss_mib()
    md = (f"# Sampled decoding on the default model\n\n{machine()}; {a.reps} repetition(s), {a.max_tokens} tokens "
          f"per sequence; peak RSS {data['peak_rss_mib']:.0f} MiB; load average at the end "
          f"{os.getloadavg()[0]:.1f}.\n\n"
          "## The sampler, per row of the default model's logits (microseconds)\n\n"
          + table(["setting", "torch ops on the whole row", "kvstrata", "speed-up"], sampler_rows)
          + "\n\n## Decode tokens/s, against greedy in the same repetitions (median)\n\n"
          + table(["setting", *(f"batch {b}, {e}: tok/s (of greedy)" for b in (1, 8) for e in engines)], decode_rows)
          + "\n")
    print(md)
    write_results("sampling", md, data)


if __name__ == "__main__":
    main()

"""The Hugging Face transformers peer: `generate` on the same GGUF, dequantized to fp32, batch 1.

Prefill tokens/s = N / time of ``generate(max_new_tokens=1)`` on an N-token prompt (prefill plus one
sampled token). Decode tokens/s at context D = (G - 1) / (time of G new tokens - time of 1 new token)
on a D-token prompt, with ``min_new_tokens=G`` so EOS cannot end it early. Prompts are random token
ids (seeded), which is what llama-bench feeds as well. Loading the GGUF takes ~40 s on 2 cores.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(gguf: Path, *, prefill: list[int] = (512, 2048), decode_depths: list[int] = (512,),
            n_gen: int = 64, reps: int = 2, threads: int = 2, seed: int = 0) -> dict:
    """Load `gguf` with transformers and time prefill and decode; returns a JSON-able dict."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)

    def prompt(n: int):  # (1, n) token ids, avoiding the first 100 ids (special tokens live there)
        return torch.randint(100, vocab, (1, n), generator=gen)

    def run(ids, new: int) -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)

    run(prompt(32), 4)  # warmup
    out: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float32",
                 "threads": threads, "load_s": round(load_s, 1), "prefill": [], "decode": []}
    for n in prefill:
        ids = prompt(n)
        t = _best(lambda: run(ids, 1), reps)
        out["prefill"].append({"tokens": n, "tps": round(n / t, 2), "seconds": round(t, 3)})
        logger.info("transformers prefill %d: %.1f tok/s", n, n / t)
    for d in decode_depths:
        ids = prompt(d)
        t1 = _best(lambda: run(ids, 1), reps)
        tg = _best(lambda: run(ids, n_gen), reps)
        tps = (n_gen - 1) / max(tg - t1, 1e-9)
        out["decode"].append({"depth": d, "n_gen": n_gen, "tps": round(tps, 2)})
        logger.info("transformers decode @%d: %.1f tok/s", d, tps)
    out["method"] = (f"AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32); "
                     f"torch.set_num_threads({threads}); generate(greedy, min_new_tokens=max_new_tokens); "
                     f"best of {reps}")
    return out

"""Engine core speed on the default model, against transformers and this machine's measured ceilings.

prefill tokens/s at 512 / 2,048; decode tokens/s at batch 1 and aggregate at 8 / 32 / 64; time to first
token with a shared 2,048-token prefix, prefix caching on vs off; the planner's prediction for this
machine beside each measurement. Run: python -m benchmarks.engine_bench [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import Timer, ceilings, machine, table, write_results
from kvstrata import LLM, SamplingParams

RNG = torch.Generator().manual_seed(0)


def rand_ids(n: int, vocab: int = 49152) -> list[int]:
    return torch.randint(100, vocab - 100, (n,), generator=RNG).tolist()


def bench_prefill(llm: LLM, n: int) -> float:
    ids = rand_ids(n)
    llm.engine.pool.reset_prefix_cache()
    out = llm.generate([ids], SamplingParams(max_tokens=1))[0]
    return n / out.metrics.ttft_s


def bench_decode(llm: LLM, batch: int, ctx: int, new: int) -> float:
    """Aggregate decode tokens/s of `batch` sequences, each with `ctx` prompt tokens (prefill excluded)."""
    eng = llm.engine
    eng.pool.reset_prefix_cache()
    p = SamplingParams(max_tokens=new, ignore_eos=True)
    for _ in range(batch):
        eng.add_request(rand_ids(ctx), p)
    while any(s.in_prefill for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()
    t0 = time.perf_counter()
    start = eng.counters["generated_tokens"]
    eng.run_to_completion()
    return (eng.counters["generated_tokens"] - start) / (time.perf_counter() - t0)


def bench_prefix_ttft(llm: LLM, shared: int) -> tuple[float, float]:
    prefix = rand_ids(shared)
    llm.engine.pool.reset_prefix_cache()
    a = llm.generate([prefix + rand_ids(32)], SamplingParams(max_tokens=1))[0].metrics.ttft_s
    b = llm.generate([prefix + rand_ids(32)], SamplingParams(max_tokens=1))[0].metrics.ttft_s
    return a, b


def hf_numbers(path: str, quick: bool) -> dict:
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(path)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for n in ([512] if quick else [512, 2048]):
            x = torch.tensor([rand_ids(n)])
            m(x)  # warm
            with Timer() as t:
                m(x)
            out[f"prefill_{n}"] = n / t.s
        x = torch.tensor([rand_ids(128)])
        m.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        new = 32
        with Timer() as t1:
            m.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        with Timer() as t:
            m.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        out["decode_b1"] = (new - 1) / (t.s - t1.s)
    return out


def measure(llm: LLM, ceil: dict, quick: bool) -> dict:
    mc = llm.engine.model_config
    w_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    w_bytes += sum(m.int8_weight()[0].numel() for m in llm.engine.model.modules() if hasattr(m, "int8_weight"))  # int8 weights
    if llm.engine.config.quantization != "none":  # the fp32 embedding table is only gathered from, not streamed
        w_bytes -= llm.engine.model.embed_tokens.weight.numel() * 4
    kv_tok = mc.kv_bytes_per_token
    res: dict = {"weight_bytes_per_step": w_bytes}
    for n in ([512] if quick else [512, 2048]):
        res[f"prefill_{n}"] = bench_prefill(llm, n)
    ctx = 512
    for b in ([1, 8] if quick else [1, 8, 32, 64]):
        tps = bench_decode(llm, b, ctx, 16 if quick else 32)
        res[f"decode_b{b}"] = tps
        res[f"decode_b{b}_GBps"] = (w_bytes + b * (ctx + 16) * kv_tok) * tps / b / 1e9
    res["ttft_prefix_cold_s"], res["ttft_prefix_hit_s"] = bench_prefix_ttft(llm, 2048)
    return res


def agreement(a: LLM, b: LLM, n: int = 64) -> float:
    """Mean fraction of greedy tokens b produces identically to a before the first difference."""
    msgs = [[{"role": "user", "content": q}] for q in
            ["What is the capital of France?", "Write a haiku about caches.", "List three prime numbers."]]
    p = SamplingParams(max_tokens=n, ignore_eos=True)
    fr = []
    for x, y in zip(a.chat(msgs, p), b.chat(msgs, p)):
        tx, ty = x.outputs[0].token_ids, y.outputs[0].token_ids
        fr.append(next((i for i, (u, v) in enumerate(zip(tx, ty)) if u != v), n) / n)
    return sum(fr) / len(fr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ceil = ceilings(quick=a.quick)
    from kvstrata.planner.modelspec import ModelSpec

    runs, llms = {}, {}
    for q in ("none", "int8"):
        # the engine's step against transformers' and the machine's ceilings: no speculative drafts (on
        # random-token prompts the greedy output repeats, and drafts would measure the repetition)
        llm = LLM("default", kv_device_bytes="6G", max_num_seqs=64, max_num_batched_tokens=2048, quantization=q,
                  speculative="off")
        llm.generate("warm up", SamplingParams(max_tokens=4))
        runs[q] = measure(llm, ceil, a.quick)
        llms[q] = llm
    agree = agreement(llms["none"], llms["int8"])
    spec = ModelSpec.from_gguf(llms["none"].engine.model_path)
    mc = llms["none"].engine.model_config
    del llms
    bw, fl = ceil["memory_bw_GBps"], ceil["matmul_fp32_GFLOPs"]
    rows = []
    for key, label in [("prefill_512", "prefill 512 tokens, tok/s"), ("prefill_2048", "prefill 2,048 tokens, tok/s"),
                       ("decode_b1", "decode batch 1 (ctx 512), tok/s"), ("decode_b8", "decode aggregate, 8 seqs, tok/s"),
                       ("decode_b32", "decode aggregate, 32 seqs, tok/s"), ("decode_b64", "decode aggregate, 64 seqs, tok/s")]:
        if key not in runs["none"]:
            continue
        f, i = runs["none"][key], runs["int8"][key]
        if key.startswith("prefill"):
            n = int(key.split("_")[1])
            roof = f"{spec.forward_flops(n, 0) * f / n / (fl * 1e9):.0%} of fp32 matmul"
        else:
            roof = f"{runs['none'][key + '_GBps']:.1f} / {runs['int8'][key + '_GBps']:.1f} GB/s = " \
                   f"{runs['none'][key + '_GBps'] / bw:.0%} / {runs['int8'][key + '_GBps'] / bw:.0%} of memory bw"
        rows.append([label, f, i, f"{i / f:.2f}x", roof])
    for q in ("int8", "none"):  # each against a cold prefill on its own quantization; int8 is what the server runs
        r = runs[q]
        name = "int8, the server's path" if q == "int8" else "fp32"
        cell = f"{r['ttft_prefix_cold_s']:.2f} / {r['ttft_prefix_hit_s']:.3f}"
        rows.append([f"TTFT 2,048-token shared prefix, cold prefill / cache hit, both {name}, s",
                     *((cell, "") if q == "none" else ("", cell)), "",
                     f"{r['ttft_prefix_cold_s'] / r['ttft_prefix_hit_s']:.1f}x faster with the prefix cache"])
    from kvstrata.planner.cost import decode_step_time_s, recompute_time_s

    pred_decode = 1.0 / decode_step_time_s(spec, 1, 512, bandwidth_GBps=bw, compute_GFLOPs=fl, weight_dtype=4, kv_dtype=4)
    pred_prefill = 512 / recompute_time_s(512, 0, spec, fl)
    from kvstrata.loader import default_model_path

    hf = {} if a.no_hf else hf_numbers(default_model_path(), a.quick)
    res = {"machine": machine(), "ceilings": {k: v for k, v in ceil.items() if k != "profile"}, "fp32": runs["none"],
           "int8": runs["int8"], "int8_greedy_agreement": agree, "transformers": hf,
           "planner": {"decode_b1": pred_decode, "prefill_512": pred_prefill}}
    cmp_rows = []
    for k, label in [("prefill_512", "prefill 512"), ("prefill_2048", "prefill 2,048"), ("decode_b1", "decode batch 1")]:
        if k in hf:
            cmp_rows.append([label, runs["none"][k], runs["int8"][k], hf[k], f"{runs['none'][k] / hf[k]:.2f}x",
                             f"{runs['int8'][k] / hf[k]:.2f}x"])
    md = [f"# Engine core benchmark\n\nDefault model (SmolLM2-135M-Instruct, GGUF Q4_1), {machine()}. "
          f"`fp32`: weights dequantized to fp32 (exact vs transformers); `int8`: `--quantization int8`.",
          f"Command: `python -m benchmarks.engine_bench{' --quick' if a.quick else ''}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n",
          f"Ceilings measured in this run: memory read {bw:.1f} GB/s, fp32 matmul {fl:.0f} GFLOP/s. Weights read per "
          f"decode step: {runs['none']['weight_bytes_per_step'] / 1e6:.0f} MB fp32, {runs['int8']['weight_bytes_per_step'] / 1e6:.0f} MB int8; "
          f"KV {mc.kv_bytes_per_token / 1e3:.1f} kB per token.\n",
          table(["measurement", "fp32", "int8", "int8 / fp32", "roofline"], rows),
          f"\nint8 greedy agreement with fp32 (share of 64 tokens identical before the first difference, 3 chat prompts): {agree:.0%}.",
          f"\nAggregate decode at 32 sequences vs batch 1: {runs['none'].get('decode_b32', float('nan')) / runs['none']['decode_b1']:.1f}x (fp32), "
          f"{runs['int8'].get('decode_b32', float('nan')) / runs['int8']['decode_b1']:.1f}x (int8).",
          "\n## Against Hugging Face transformers (same run, same file, fp32)\n",
          table(["workload", "kvstrata fp32 tok/s", "kvstrata int8 tok/s", "transformers tok/s", "fp32 ratio", "int8 ratio"], cmp_rows)
          if cmp_rows else "(skipped: --no-hf)",
          "\n## The planner's prediction for this machine (same calibration, fp32)\n",
          table(["workload", "predicted tok/s", "measured tok/s", "error"],
                [["decode batch 1", pred_decode, runs["none"]["decode_b1"], f"{pred_decode / runs['none']['decode_b1'] - 1:+.0%}"],
                 ["prefill 512", pred_prefill, runs["none"]["prefill_512"], f"{pred_prefill / runs['none']['prefill_512'] - 1:+.0%}"]])]
    path = write_results("engine", "\n".join(md) + "\n", res)
    print(path.read_text())


if __name__ == "__main__":
    main()

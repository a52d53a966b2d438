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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ceil = ceilings(quick=a.quick)
    llm = LLM("default", kv_device_bytes="6G", max_num_seqs=64, max_num_batched_tokens=2048)
    llm.generate("warm up", SamplingParams(max_tokens=4))
    mc = llm.engine.model_config
    w_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    kv_tok = mc.kv_bytes_per_token
    from kvstrata.planner.modelspec import ModelSpec

    spec = ModelSpec.from_gguf(llm.engine.model_path)
    res: dict = {"machine": machine(), "ceilings": {k: v for k, v in ceil.items() if k != "profile"}}
    rows = []
    for n in ([512] if a.quick else [512, 2048]):
        tps = bench_prefill(llm, n)
        flops = spec.forward_flops(n, 0) if hasattr(spec, "forward_flops") else 2 * mc.num_params() * n
        frac = flops * tps / n / (ceil["matmul_fp32_GFLOPs"] * 1e9)
        res[f"prefill_{n}"] = tps
        rows.append([f"prefill {n} tokens", tps, "tok/s", f"{frac:.0%} of fp32 matmul"])
    ctx = 512
    for b in ([1, 8] if a.quick else [1, 8, 32, 64]):
        tps = bench_decode(llm, b, ctx, 16 if a.quick else 32)
        bytes_per_step = w_bytes + b * (ctx + 16) * kv_tok
        gbps = bytes_per_step * tps / b / 1e9
        res[f"decode_b{b}"] = tps
        rows.append([f"decode batch {b} (ctx {ctx})", tps, "tok/s", f"{gbps:.1f} GB/s = {gbps / ceil['memory_bw_GBps']:.0%} of memory bw"])
    cold, warm = bench_prefix_ttft(llm, 2048)
    res["ttft_prefix_cold_s"], res["ttft_prefix_hit_s"] = cold, warm
    rows.append(["TTFT, 2,048-token shared prefix, cache off (cold)", cold, "s", ""])
    rows.append(["TTFT, same prefix, cache hit", warm, "s", f"{cold / warm:.1f}x faster"])
    # the planner's prediction for this machine, from the same calibration
    from kvstrata.planner.cost import decode_step_time_s, recompute_time_s

    pred_decode = 1.0 / decode_step_time_s(spec, 1, ctx, bandwidth_GBps=ceil["memory_bw_GBps"],
                                           compute_GFLOPs=ceil["matmul_fp32_GFLOPs"], weight_dtype=4, kv_dtype=4)
    pred_prefill = 512 / recompute_time_s(512, 0, spec, ceil["matmul_fp32_GFLOPs"])
    res["planner_decode_b1"], res["planner_prefill_512"] = pred_decode, pred_prefill
    hf = {} if a.no_hf else hf_numbers(llm.engine.model_path, a.quick)
    res["transformers"] = hf
    cmp_rows = []
    for k, label in [("prefill_512", "prefill 512"), ("prefill_2048", "prefill 2,048"), ("decode_b1", "decode batch 1")]:
        if k in res and k in hf:
            cmp_rows.append([label, res[k], hf[k], f"{res[k] / hf[k]:.2f}x"])
    md = [f"# Engine core benchmark\n\nDefault model (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32), {machine()}.",
          f"Command: `python -m benchmarks.engine_bench{' --quick' if a.quick else ''}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n",
          f"Ceilings measured in this run: memory read {ceil['memory_bw_GBps']:.1f} GB/s, fp32 matmul "
          f"{ceil['matmul_fp32_GFLOPs']:.0f} GFLOP/s. Weights read per decode step: {w_bytes / 1e6:.0f} MB; "
          f"KV per token {kv_tok / 1e3:.1f} kB.\n",
          table(["measurement", "value", "unit", "roofline / ratio"], rows),
          "\n## Against Hugging Face transformers (same run, same file)\n",
          table(["workload", "kvstrata tok/s", "transformers tok/s", "ratio"], cmp_rows) if cmp_rows else "(skipped)",
          f"\nAggregate decode at 32 sequences vs batch 1: {res.get('decode_b32', float('nan')) / res['decode_b1']:.1f}x.",
          "\n## The planner's prediction for this machine (same calibration)\n",
          table(["workload", "predicted tok/s", "measured tok/s", "error"],
                [["decode batch 1", pred_decode, res["decode_b1"], f"{pred_decode / res['decode_b1'] - 1:+.0%}"],
                 ["prefill 512", pred_prefill, res["prefill_512"], f"{pred_prefill / res['prefill_512'] - 1:+.0%}"]])]
    path = write_results("engine", "\n".join(md) + "\n", res)
    print(path.read_text())


if __name__ == "__main__":
    main()

"""The CUDA path in a few minutes: correctness on a small model first, then an 8B-shaped random Llama.

1. A tiny random Llama: greedy tokens of our engine on the GPU (fp32) equal transformers on the CPU.
2. An 8B-shaped Llama (Llama 3.1 8B dimensions, random bf16 weights made directly on the GPU):
   batch-1 decode against the GPU's memory-bandwidth roofline (a large device copy measured in the same
   run), aggregate decode at 32 and 64 sequences, and transformers' `generate` on the same GPU and
   weights shape.
3. Tier restore over PCIe: a 4,096-token prefix parked in the host tier and loaded back into the GPU
   pool, against recomputing it, and against a pinned host-to-device copy measured in the same run.
Writes benchmarks/results/gpu.md. Run through benchmarks/gpu.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from benchmarks.common import table, write_results  # noqa: E402
from kvstrata.config import EngineConfig  # noqa: E402
from kvstrata.core import SamplingParams  # noqa: E402
from kvstrata.engine.llm_engine import LLMEngine  # noqa: E402

LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=False)


def copy_bandwidth(device: str) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e9  # read + write


def correctness(device: str) -> bool:
    from tests.conftest import make_tiny_checkpoint
    from tests.engine.test_reference import _hf_greedy
    from transformers import AutoModelForCausalLM

    d = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "llama")
    eng = LLMEngine(EngineConfig(model=str(d), device=device, dtype="float32", kv_device_bytes=64 << 20))
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ok = True
    for text in ["The quick brown fox", "Paris is the capital of"]:
        ids = eng.tokenizer.encode(text)
        eng.add_request(ids, SamplingParams(max_tokens=32, ignore_eos=True), request_id=text)
        ours = eng.run_to_completion()[text].outputs[0].token_ids
        theirs = _hf_greedy(ref, ids, 32)
        ok &= ours == theirs
    return ok


def random_8b(device: str, layers: int):
    from kvstrata.loader import LoadedModel, load_model
    from kvstrata.model.config import ModelConfig

    cfg = ModelConfig.from_hf({**LLAMA8B, "num_hidden_layers": layers, "architectures": ["LlamaForCausalLM"]})
    g = torch.Generator(device=device).manual_seed(0)
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02)

    weights = {"embed_tokens.weight": w(cfg.vocab_size, h), "norm.weight": torch.ones(h, device=device, dtype=torch.bfloat16),
               "lm_head.weight": w(cfg.vocab_size, h)}
    for L in range(cfg.num_layers):
        p = f"layers.{L}."
        weights |= {p + "q_proj.weight": w(cfg.num_heads * hd, h), p + "k_proj.weight": w(cfg.num_kv_heads * hd, h),
                    p + "v_proj.weight": w(cfg.num_kv_heads * hd, h), p + "o_proj.weight": w(h, cfg.num_heads * hd),
                    p + "gate_proj.weight": w(i, h), p + "up_proj.weight": w(i, h), p + "down_proj.weight": w(h, i),
                    p + "input_layernorm.weight": torch.ones(h, device=device, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(h, device=device, dtype=torch.bfloat16)}
    from tests.conftest import make_tiny_checkpoint

    # token ids only (ids past its vocabulary decode to nothing); the random model has no vocabulary of its own
    tok = load_model(str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tok", "llama"))).tokenizer
    return LoadedModel(cfg, weights, tok, "random-8b", "random-8b"), cfg


def decode_rate(eng: LLMEngine, batch: int, ctx: int, new: int) -> float:
    g = torch.Generator().manual_seed(batch)
    for b in range(batch):
        eng.add_request(torch.randint(100, 40000, (ctx,), generator=g).tolist(), SamplingParams(max_tokens=new, ignore_eos=True))
    while any(s.in_prefill for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()
    torch.cuda.synchronize()
    t, n0 = time.perf_counter(), eng.counters["generated_tokens"]
    eng.run_to_completion()
    torch.cuda.synchronize()
    return (eng.counters["generated_tokens"] - n0) / (time.perf_counter() - t)


def h2d_bandwidth() -> float:
    """Pinned host memory to the GPU: the PCIe ceiling a host-tier restore is set against (GB/s)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    y = torch.empty_like(x, device="cuda")
    y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * x.numel() / (time.perf_counter() - t) / 1e9


def restore_over_pcie(lm, prefix: int) -> dict:
    """TTFT of a prefix computed cold, then parked in the host tier and restored (one new token each)."""
    eng = LLMEngine(EngineConfig(model="random-8b", device="cuda", dtype="bfloat16", kv_device_bytes=8 << 30,
                                 kv_host_bytes=8 << 30, max_num_batched_tokens=8192), loaded=lm)
    ids = torch.randint(100, 40000, (prefix + 1,), generator=torch.Generator().manual_seed(7)).tolist()

    def ttft(rid: str):
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng.add_request(ids, SamplingParams(max_tokens=1, ignore_eos=True), request_id=rid)
        out = eng.run_to_completion()[rid]
        torch.cuda.synchronize()
        return time.perf_counter() - t, out

    ttft("warm-up")
    eng.pool.reset_prefix_cache()
    cold, out_cold = ttft("cold")
    parked = eng.offload.park(ids, "host", pin=False)
    restored, out_warm = ttft("restored")
    kv_bytes = parked["tokens"] * eng.pool.block_bytes // eng.pool.block_size
    res = {"prefix_tokens": prefix, "cold_ttft_s": cold, "restored_ttft_s": restored,
           "restored_from_host_tokens": out_warm.metrics.cached_prompt_tokens_by_tier.get("host", 0),
           "kv_bytes": kv_bytes, "restore_GBps": kv_bytes / restored / 1e9, "h2d_GBps": h2d_bandwidth(),
           "same_token": out_cold.outputs[0].token_ids == out_warm.outputs[0].token_ids}
    eng.close(flush_device=False)
    eng = None  # freed before the next check
    torch.cuda.empty_cache()
    return res


def hf_rate(cfg_dict: dict, device: str, batch: int, ctx: int, new: int) -> float:
    import transformers

    with torch.device(device):
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg_dict)).to(torch.bfloat16).eval()
    x = torch.randint(100, 40000, (batch, ctx), device=device)
    with torch.no_grad():
        m.generate(x, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    del m
    torch.cuda.empty_cache()
    return batch * new / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quicker check")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--restore-tokens", type=int, default=4096)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU path only", file=sys.stderr)
        return 2
    dev = "cuda"
    res = {"gpu": torch.cuda.get_device_name(0), "correct_vs_cpu_reference": correctness(dev)}
    bw = copy_bandwidth(dev)
    lm, cfg = random_8b(dev, a.layers)
    eng = LLMEngine(EngineConfig(model="random-8b", device=dev, dtype="bfloat16", kv_device_bytes=24 << 30,
                                 max_num_seqs=64, max_num_batched_tokens=8192), loaded=lm)
    wbytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    rows = []
    for b in (1, 32, 64):
        r = decode_rate(eng, b, a.ctx, a.new)
        kv = b * (a.ctx + a.new) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
        roof = bw * 1e9 / ((wbytes + kv) / b)  # tok/s if each step only read the weights and the KV once
        h = hf_rate({**LLAMA8B, "num_hidden_layers": a.layers}, dev, b, a.ctx, a.new)
        res[f"decode_b{b}"], res[f"hf_decode_b{b}"], res[f"roofline_b{b}"] = r, h, roof
        rows.append([b, r, roof, f"{r / roof:.0%}", h, f"{r / h:.2f}x"])
    eng.close(flush_device=False)
    eng = None  # freed before the next check
    torch.cuda.empty_cache()
    r = res["restore"] = restore_over_pcie(lm, a.restore_tokens)
    md = [f"# GPU path check\n\n{res['gpu']}; Llama-3.1-8B shapes with {a.layers} layers, random bf16 weights "
          f"({wbytes / 1e9:.1f} GB), context {a.ctx}, {a.new} new tokens. Device copy bandwidth measured in this run: "
          f"{bw:.0f} GB/s. Tiny-model greedy tokens equal to transformers on CPU: {res['correct_vs_cpu_reference']}.\n",
          table(["batch", "kvstrata tok/s", "bandwidth roofline tok/s", "of roofline", "transformers tok/s", "ratio"], rows),
          f"\n## Tier restore over PCIe\n\nA {r['prefix_tokens']:,}-token prefix ({r['kv_bytes'] / 1e9:.2f} GB of KV): "
          f"time to first token cold {r['cold_ttft_s'] * 1e3:.0f} ms, restored from the host tier "
          f"{r['restored_ttft_s'] * 1e3:.0f} ms ({r['cold_ttft_s'] / r['restored_ttft_s']:.1f}x; "
          f"{r['restored_from_host_tokens']:,} tokens came from the host tier, same next token: {r['same_token']}); "
          f"restore at {r['restore_GBps']:.1f} GB/s against a pinned host-to-device copy of {r['h2d_GBps']:.1f} GB/s "
          f"({r['restore_GBps'] / r['h2d_GBps']:.0%}).\n"]
    write_results("gpu", "\n".join(md) + "\n", res)
    print("\n".join(md))
    print(json.dumps(res))
    return 0 if res["correct_vs_cpu_reference"] else 1


if __name__ == "__main__":
    sys.exit(main())

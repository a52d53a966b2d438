"""Effect of the int8 cold-tier codec on model output: greedy tokens after a restore from an int8 disk
tier against the same prompt computed in full, on the default model. Run: python -m benchmarks.kv_codec_effect
"""

from __future__ import annotations

import os
import tempfile

import torch

from benchmarks.common import machine, table, write_results
from kvstrata import LLM, SamplingParams

QUESTIONS = ["Explain why caches help agents that call tools.", "Write a haiku about caches.",
             "What is the capital of France? Answer in one sentence.",
             "List three prime numbers and explain why they are prime."]


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    d = tempfile.mkdtemp(prefix="kvstrata-codec-")
    llm = LLM("default", kv_device_bytes="512M", kv_disk_dir=os.path.join(d, "kv"), kv_cold_codec="int8")
    p = SamplingParams(max_tokens=64, ignore_eos=True, logprobs=0)
    rows, res = [], {"machine": machine(), "prompts": []}
    for q in QUESTIONS:
        msgs = [{"role": "system", "content": "You are a careful assistant. " * 12}, {"role": "user", "content": q}]
        ids = llm.tokenizer.encode_chat(msgs)
        cold = llm.generate([ids], p)[0]
        llm.engine.offload.park(ids, "disk", pin=False)
        warm = llm.generate([ids], p)[0]
        a, b = cold.outputs[0].token_ids, warm.outputs[0].token_ids
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        dlp = max(abs(x.logprob - y.logprob) for x, y in zip(cold.outputs[0].logprobs[:same], warm.outputs[0].logprobs[:same]))
        restored = warm.metrics.cached_prompt_tokens_by_tier.get("disk", 0)
        rows.append([q, len(ids), restored, f"{same}/64", dlp])
        res["prompts"].append({"prompt_tokens": len(ids), "restored": restored, "identical": same, "max_logprob_diff": dlp})
    md = ["# int8 cold-tier codec: effect on output\n",
          f"Default model, {machine()}; the prompt's KV is written to an int8 disk tier, its device copies dropped, "
          "and the prompt generated again (greedy, 64 tokens) from the restored blocks. Command: "
          "`python -m benchmarks.kv_codec_effect`.\n",
          table(["question", "prompt tokens", "tokens restored from int8", "greedy tokens identical",
                 "max |logprob diff| over them"], rows)]
    print(write_results("kv_codec_effect", "\n".join(md) + "\n", res).read_text())


if __name__ == "__main__":
    main()

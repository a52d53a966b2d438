"""Per-token cost of constrained decoding on the default model (not a test; run by hand).

    PYTHONPATH=src .venv/bin/python tests/structured/bench_mask.py

1. one-off costs: the token-level vocabulary view (LLTokenizer) and one grammar compile per spec;
2. per token: `mask(logits)` + `accept(token)` replayed over real constrained outputs of the model,
   with a (V,) fp32 logits row, exactly the sampler's calls; reported as ms/token (median of 5 replays);
3. end to end: decode ms/token of one greedy sequence with and without the constraint (same prompt;
   the outputs differ, so this is indicative, and noisy on a shared machine).
"""

from __future__ import annotations

import statistics
import time

import torch

from kvstrata import LLM
from kvstrata.core import SamplingParams
from kvstrata.engine import structured
from kvstrata.tokenizer.tools import forced_tool_call_spec, render_chat

PET = {"type": "object", "properties": {
    "name": {"type": "string"}, "species": {"enum": ["cat", "dog", "bird"]}, "age": {"type": "integer"},
    "owner": {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}}},
    "toys": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "species", "age", "owner", "toys"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}}]


def main() -> None:
    llm = LLM("default", kv_device_bytes="512M")
    tok, V = llm.tokenizer, llm.engine.model_config.vocab_size
    t0 = time.perf_counter()
    structured.ll_tokenizer(tok)
    print(f"vocabulary view (LLTokenizer), once per tokenizer: {(time.perf_counter() - t0) * 1e3:.0f} ms, V={V}")
    pet = render_chat(tok, [{"role": "user", "content": "Describe a pet as JSON."}])
    ask = render_chat(tok, [{"role": "user", "content": "Weather in Paris?"}], TOOLS, "required")
    cases = {
        "json_object": (pet, {"type": "json_object"}),
        "json_schema": (pet, {"type": "json_schema", "schema": PET}),
        "tool_call": (ask, forced_tool_call_spec(TOOLS, "required")),
        "regex": (pet, {"type": "regex", "pattern": r"[A-Z][a-z]+( [a-z]+){3,8}\."}),
    }
    print(f"{'spec':<12} {'compile ms':>10} {'tokens':>6} {'mask+accept ms/token':>21} {'decode ms/tok plain':>20} "
          f"{'constrained':>12}")
    for name, (prompt, spec) in cases.items():
        structured._grammars.clear()
        t0 = time.perf_counter()
        structured.build_processor(spec, tok, V)
        compile_ms = (time.perf_counter() - t0) * 1e3
        runs = {}
        for label, s in (("plain", None), ("constrained", spec)):
            t0 = time.perf_counter()
            out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=60, structured=s))[0]
            o = out.outputs[0]
            dec = out.metrics.finished_time - out.metrics.first_token_time if out.metrics.first_token_time else 0.0
            runs[label] = (o, dec / max(1, len(o.token_ids) - 1) * 1e3)
        ids = runs["constrained"][0].token_ids
        logits = torch.randn(V)
        reps = []
        for _ in range(5):
            proc = structured.build_processor(spec, tok, V)
            t0 = time.perf_counter()
            for t in ids:
                proc.mask(logits)
                proc.accept(t)
            reps.append((time.perf_counter() - t0) / len(ids) * 1e3)
        print(f"{name:<12} {compile_ms:>10.1f} {len(ids):>6} {statistics.median(reps):>21.3f} "
              f"{runs['plain'][1]:>20.1f} {runs['constrained'][1]:>12.1f}")


if __name__ == "__main__":
    main()

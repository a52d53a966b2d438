"""`kvstrata generate`: prompts (argument, --prompt-file, or --messages JSON) to text or JSON lines."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from kvstrata.config import add_engine_args, engine_config_from_args
from kvstrata.core import KvstrataError, SamplingParams
from kvstrata.startup import since_process_start

log = logging.getLogger(__name__)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="return the chosen token's logprob and the top N")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")


def sampling_from_args(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        seed=a.seed, presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
        repetition_penalty=a.repetition_penalty, stop=tuple(a.stop), stop_token_ids=tuple(a.stop_token_id),
        ignore_eos=a.ignore_eos, logprobs=a.logprobs, n=a.n,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="*", help="prompt text (each argument is one prompt)")
    p.add_argument("--prompt-file", help="file whose whole text is one prompt")
    p.add_argument("--messages", help="JSON file: a list of chat messages, or a list of such lists")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampling_args(p)
    add_engine_args(p)


def _read_inputs(a: argparse.Namespace, tokenizer) -> list[tuple[str, list[int]]]:
    """(label, prompt token ids) for every prompt given."""
    items: list[tuple[str, list[int]]] = [(t, tokenizer.encode(t)) for t in a.prompt]
    if a.prompt_file:
        path = Path(a.prompt_file)
        if not path.is_file():
            raise KvstrataError(f"--prompt-file {path} does not exist")
        text = path.read_text()
        items.append((text, tokenizer.encode(text)))
    if a.messages:
        path = Path(a.messages)
        if not path.is_file():
            raise KvstrataError(f"--messages {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise KvstrataError(f"--messages {path}: not valid JSON ({e})") from None
        convs = [data] if data and isinstance(data[0], dict) else data
        if not isinstance(convs, list) or not all(isinstance(c, list) for c in convs):
            raise KvstrataError(f"--messages {path}: expected a list of {{role, content}} messages")
        for conv in convs:
            items.append((json.dumps(conv), tokenizer.encode_chat(conv)))
    if not items:
        raise KvstrataError("give a prompt, --prompt-file FILE or --messages FILE")
    return items


def run(a: argparse.Namespace) -> int:
    from kvstrata.engine.llm_engine import LLMEngine

    params = sampling_from_args(a)
    engine = LLMEngine(engine_config_from_args(a))
    items = _read_inputs(a, engine.tokenizer)
    rids = [engine.add_request(ids, params) for _, ids in items]
    try:
        done = engine.run_to_completion()
    finally:
        engine.close()  # writes cached device blocks down (write-on-evict) so a later run finds them
    firsts = [done[r].metrics.first_token_time for r in rids if done[r].metrics.first_token_time is not None]
    if firsts:
        log.debug("first token %.3f s after process start", since_process_start(min(firsts)))
    for rid in rids:
        out = done[rid]
        m = out.metrics
        for c in out.outputs:
            if a.json:
                obj = {
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason.value if c.finish_reason else None,
                    "prompt_tokens": m.prompt_tokens,
                    "cached_prompt_tokens": m.cached_prompt_tokens,
                    "cached_prompt_tokens_by_tier": m.cached_prompt_tokens_by_tier,
                    "completion_tokens": len(c.token_ids),
                    "ttft_s": m.ttft_s,
                    "decode_tokens_per_s": m.decode_tokens_per_s(len(c.token_ids)),
                }
                if c.logprobs is not None:
                    obj["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in c.logprobs]
                print(json.dumps(obj, ensure_ascii=False))
            else:
                print(c.text)
    sys.stdout.flush()
    return 0

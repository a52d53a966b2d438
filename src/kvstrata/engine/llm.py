"""The Python API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(messages)`."""

from __future__ import annotations

from typing import Any, Sequence as Seq

from kvstrata.config import EngineConfig
from kvstrata.core import RequestClass, RequestOutput, SamplingParams
from kvstrata.engine.llm_engine import LLMEngine


class LLM:
    """`LLM(model, **EngineConfig fields)`. With no fields it runs what every entry point runs: on CPU the
    int8 fast path with the native decode step and a float16 KV pool (`quantization="none"` is the exact
    path, greedy output identical to transformers), the KV pool committed as it is used."""

    def __init__(self, model: str = "default", **config: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Seq[str] | Seq[Seq[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        request_class: RequestClass | str = RequestClass.INTERACTIVE,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids), all batched together; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.engine.add_request(p, sp, request_class=request_class) for p, sp in zip(prompts, plist)]
        done = self.engine.run_to_completion()
        return [done[i] for i in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or many; each rendered with the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt, tools=tools) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

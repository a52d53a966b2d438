"""The shared nouns of kvstrata: sampling parameters, requests, outputs, block keys, request classes.

Everything here is plain data; no torch import, so the planner and the server can use these types
without paying for the model stack.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


def imported(name: str):
    """The module `name` where it is imported and its import has finished, else None. `name in sys.modules`
    is not enough where the engine runs beside other threads: a module another thread is importing sits
    there half built (an engine step asking a half-imported torch for its thread count failed with
    "partially initialized module 'torch' has no attribute 'get_num_threads'")."""
    import sys

    mod = sys.modules.get(name)
    if mod is None or getattr(getattr(mod, "__spec__", None), "_initializing", False):
        return None
    return mod


def kvstrata_home() -> Path:
    """Where kvstrata keeps what it derives and measures (the session store, converted tokenizers, cached
    weight layouts, compiled kernels, the machine calibration): $KVSTRATA_HOME, else ~/.cache/kvstrata."""
    return Path(os.environ.get("KVSTRATA_HOME") or Path.home() / ".cache" / "kvstrata")

BLOCK_KEY_BYTES = 32  # sha256 digest


class KvstrataError(Exception):
    """An error a user can cause and fix: the message says what was wrong and what to do."""


class ContextLengthError(KvstrataError):
    """A prompt (plus the tokens asked for) does not fit in the model's context window."""


class RequestClass(str, enum.Enum):
    """Answer inference (a person waits) versus agentic inference (machines wait on machines)."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS / stop token id / stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the caller


def block_key(parent: bytes | None, token_ids: Sequence[int], fingerprint: str) -> bytes:
    """Chain hash of one full KV block: H(parent key, token ids, model fingerprint).

    The same key names the block in device memory and in every tier below it, so a prefix found in
    any tier is the same prefix. 32 bytes (sha256).
    """
    h = hashlib.sha256()
    h.update(b"kvstrata-block-v1")
    h.update(parent if parent is not None else b"\0" * BLOCK_KEY_BYTES)
    h.update(fingerprint.encode())
    h.update(struct.pack(f"<{len(token_ids)}i", *token_ids))
    return h.digest()


def chain_keys(token_ids: Sequence[int], block_size: int, fingerprint: str) -> list[bytes]:
    """Keys of every *full* block of `token_ids`, in order."""
    keys: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start : start + block_size], fingerprint)
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Defaults are greedy decoding of up to 16 tokens.

    temperature == 0 means greedy. `seed` makes sampling reproducible, and the same seed gives the same
    output whether the request runs alone or in a batch (each request owns its generator).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: off; N >= 0: chosen token's logprob plus the top-N
    n: int = 1
    # Constrained decoding: {"type": "json_object"} | {"type": "json_schema", "schema": {...}} |
    # {"type": "regex", "pattern": "..."} | {"type": "grammar", "grammar": "<EBNF>"}; see engine/structured.py
    structured: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if 0.0 < self.temperature < 1e-5:  # as vLLM: a vanishing temperature is greedy (and avoids inf / NaN)
            object.__setattr__(self, "temperature", 0.0)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise KvstrataError(f"invalid sampling parameters: {msg}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= self.temperature <= 100.0):
            bad(f"temperature must be in [0, 100], got {self.temperature}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not (0.01 <= self.repetition_penalty <= 100.0):
            bad(f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.n < 1:
            bad(f"n must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            bad("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """Greedy with nothing that changes the argmax: eligible for the batched fast path."""
        return self.greedy and not self.has_penalties and self.structured is None

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class CompletionOutput:
    """What one request has produced so far (or in total, once `finished`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in device memory or any tier, not computed
    cached_prompt_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    computed_prompt_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    def decode_tokens_per_s(self, num_generated: int) -> float | None:
        if self.first_token_time is None or self.finished_time is None or num_generated < 2:
            return None
        dt = self.finished_time - self.first_token_time
        return (num_generated - 1) / dt if dt > 0 else None


@dataclass
class RequestOutput:
    """Returned by the engine for each request after each step (streaming) or once at the end."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        return self.outputs[0].text


def dtype_name(dtype) -> str:
    """A dtype's plain name ("float16") from the name itself, a torch dtype or a numpy dtype."""
    return str(dtype).removeprefix("torch.")

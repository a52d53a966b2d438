"""Token ids from hash ids: equal ids give equal tokens, so every server sees the trace's sharing.

The replay rule of the trace folder's README: each hash id maps to a deterministic block of token ids drawn
from a PRNG seeded by the id (and its scope), skipping the special tokens at the bottom of the vocabulary;
a request is its blocks concatenated, cut or padded to its input length. Scaling multiplies every token
count and the block size by one factor (1/16 fits the Claude Code traces, whose prompts reach 128k tokens,
into the default model's 8k context: a 64-token block becomes 4 tokens), so the fraction of a prompt shared
with the previous one is kept. The few tokens past a request's last whole block (a traced prompt is
``64 * len(hash_ids) + r`` tokens, r < 64) are the request's own, seeded by its session and index.

Prompts go to servers as token ids (``/v1/completions`` with a list of ints, which kvstrata and llama-server
both take as-is, no BOS added), so no tokenizer can break the sharing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.agent_replay.traces import Request, Session

FIRST_ID = 100  # ids below this are left out (special and control tokens live at the bottom of the vocabulary)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    max_tokens: int  # output tokens asked for (ignore_eos: the server generates exactly this many)
    capped: bool  # prompt or output was shortened to fit the context


class PromptBuilder:
    """Builds request prompts for one model: `vocab` token ids, `context` tokens of prompt + output."""

    def __init__(self, vocab: int, token_scale: float, context: int = 8192, seed: int = 0):
        if not 0 < token_scale <= 1:
            raise ValueError(f"token_scale must be in (0, 1], got {token_scale}")
        if vocab <= FIRST_ID + 1:
            raise ValueError(f"vocab {vocab} too small")
        self.vocab, self.scale, self.context, self.seed = vocab, token_scale, context, seed
        self._blocks: dict[tuple[str, int, int], list[int]] = {}

    def scaled(self, n: int) -> int:
        return max(1, round(n * self.scale))

    def block_len(self, session: Session) -> int:
        return max(1, round(session.block_tokens * self.scale))

    def _draw(self, key: str, n: int) -> list[int]:
        rng = random.Random(f"{self.seed}\0{key}")  # str seeds hash with sha512: the same on every run and machine
        return [rng.randrange(FIRST_ID, self.vocab) for _ in range(n)]

    def block(self, namespace: str, hash_id: int, n: int) -> list[int]:
        key = (namespace, hash_id, n)
        if key not in self._blocks:
            self._blocks[key] = self._draw(f"{namespace}\0{hash_id}", n)
        return self._blocks[key]

    def build(self, session: Session, index: int, req: Request | None = None) -> Prompt:
        req = req or session.requests[index]
        bl = self.block_len(session)
        want = self.scaled(req.input_tokens)
        ids: list[int] = []
        for h in req.hash_ids:
            if len(ids) >= want:
                break
            ids += self.block(session.namespace, h, bl)
        if len(ids) < want:
            ids += self._draw(f"{session.id}\0tail\0{index}", want - len(ids))
        ids = ids[:want]
        out = self.scaled(req.output_tokens)
        capped = False
        if len(ids) + out > self.context:
            capped = True
            out = max(1, self.context - len(ids))
            ids = ids[: self.context - out]
        return Prompt(ids=ids, max_tokens=out, capped=capped)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

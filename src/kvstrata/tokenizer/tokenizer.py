"""Tokenizer wrapper: a `tokenizers.Tokenizer` plus special tokens and the chat template.

The chat template is rendered with jinja2 in a sandbox, with the same globals and filters Hugging Face
`apply_chat_template` provides, so templates written for HF render identically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

import tokenizers

from kvstrata.core import ContextLengthError, KvstrataError

# Used when a model ships no chat template (ChatML, as SmolLM and Qwen use).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False
    _template_cache: dict[str, Any] = field(default_factory=dict, repr=False)
    _max_token_chars: int = field(default=0, repr=False)

    def check_fits(self, text: str, context: int) -> None:
        """ContextLengthError, before tokenizing, for a text that cannot fit in `context` tokens.

        No token stands for more characters than the vocabulary's longest entry (byte-level and
        sentencepiece entries spell at least the characters they decode to); with a factor of 2 for
        normalizers that fold characters, a longer text needs more tokens than the context has. This keeps
        a megabytes-long message from costing gigabytes in the tokenizer before the length check says no."""
        if not self._max_token_chars:
            self._max_token_chars = max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)
        most = 2 * self._max_token_chars * context + 1024
        if len(text) > most:
            raise ContextLengthError(f"the prompt is {len(text)} characters; the model's context of {context} "
                                     f"tokens holds far fewer (at most about {most}); shorten the prompt")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token is not None:
            bos = self.backend.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        template = self.chat_template or CHATML_TEMPLATE
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise KvstrataError(f"each chat message needs a 'role' (and 'content'); got {m!r}")
        compiled = self._template_cache.get(template)
        if compiled is None:
            compiled = _jinja_env().from_string(template)
            self._template_cache[template] = compiled
        try:
            return compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except Exception as e:  # jinja errors and the template's own raise_exception
            raise KvstrataError(f"chat template failed to render these messages: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kw), add_special_tokens=False)


def _jinja_env():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def splice_tokens(tok: "Tokenizer", stored: list[int], text: str) -> tuple[int, list[int]]:
    """(keep, new ids): the longest prefix of `stored` whose text begins `text`, and the ids of the rest.

    `stored[:keep] + new_ids` decodes to `text`. keep == len(stored) whenever the template renders the
    history as the stored tokens decode (the usual case); else a binary search finds where they part.
    """
    if not stored:
        return 0, tok.encode(text, add_special_tokens=False)
    s = tok.decode(stored, skip_special_tokens=False)
    keep = len(stored)
    if not text.startswith(s):
        lo, hi = 0, len(stored)
        while lo < hi:  # invariant: stored[:lo] decodes to a prefix of text
            mid = (lo + hi + 1) // 2
            if text.startswith(tok.decode(stored[:mid], skip_special_tokens=False)):
                lo = mid
            else:
                hi = mid - 1
        keep = lo
        s = tok.decode(stored[:keep], skip_special_tokens=False)
    rest = text[len(s):]
    return keep, (tok.encode(rest, add_special_tokens=False) if rest else [])


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

    Decodes a short window (from `prefix_offset`) each step, as vLLM and TGI do, so the cost per token
    stays constant; text that ends in U+FFFD (an incomplete UTF-8 sequence) is held back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-6:])  # a little left context so leading spaces decode right
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

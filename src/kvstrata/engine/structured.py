"""Constrained decoding: JSON, JSON Schema, regex, grammar and forced tool calls, via llguidance.

The engine calls `build_processor(spec, tokenizer, vocab_size)` once per sequence whose
`SamplingParams.structured` is set; the sampler then calls, every step, `mask(logits)` before the draw
and `accept(token)` after it, and the engine ends the sequence (finish_reason stop) once
`is_terminated()` says the grammar can take nothing more.

The spec dict (docs/structured.md has the full reference):

    {"type": "json_object"}                                   any JSON object
    {"type": "json_schema", "schema": {...}, "strict": bool}  JSON matching the schema
    {"type": "regex", "pattern": "..."}                       text matching the whole regex
    {"type": "grammar", "grammar": "..."}                     Lark (llguidance dialect) or GBNF text
    {"type": "tool_call", "functions": [{"name", "parameters"}, ...], "max_calls": int}
                                                              <tool_call>{"name": ..., "arguments": ...}</tool_call>
                                                              (built by tokenizer.tools.forced_tool_call_spec)

A grammar llguidance cannot enforce is refused up front where it can tell (the grammar does not
compile, or the parser gives up on its first mask: KvstrataError, HTTP 400). Where the parser only
gives up later (a schema whose required recursion never ends, a pattern that explodes), the matcher
can only end the sequence; `check_output` replays a finished output through a fresh matcher and
says why it is not a complete match, so such an output is reported as a failure
(ConstraintFailedError), never as a clean stop.

JSON is generated compactly with ", " and ": " separators and no other whitespace, and every number has
a bounded length (tokenizer/json_bounds.py), so a model (even a random one) cannot pad its output with
endless blanks or run a number on until max_tokens. The token-level view of the vocabulary
(`llguidance.LLTokenizer`, ~0.7 s to build for a 49k vocabulary) is cached per tokenizer object, and
compiled grammars are cached per (tokenizer, spec): each sequence gets a cheap deep copy.
"""

from __future__ import annotations

import abc
import json
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from kvstrata.core import KvstrataError
from kvstrata.tokenizer.json_bounds import bounded_json_object
from kvstrata.tokenizer.tools import check_grammar, schema_with_options, tool_call_lark

log = logging.getLogger(__name__)

SPEC_TYPES = ("json_object", "json_schema", "regex", "grammar", "tool_call")
_GRAMMAR_CACHE_SIZE = 64


class ConstraintFailedError(KvstrataError):
    """A constrained output ended without completing its grammar: llguidance gave up on it (a schema or
    pattern too complex to enforce) and the sequence could only stop."""


def _limits():
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)  # errors say what, without a parser-state dump


class LogitsProcessor(abc.ABC):
    """Per-sequence constraint on the next token. One object per sequence; not shared, not thread-safe.

    Call order: `mask(logits)`, then `accept(token)` with the token chosen, then `is_terminated()`; once
    a step, or once for each row a step verifies with speculative drafts (engine/speculative.py). The
    engine never calls `mask` after `is_terminated()` returned True.
    """

    @abc.abstractmethod
    def mask(self, logits):
        """logits (V,) fp32, a numpy array (the native step's) or a torch tensor -> a new (V,) row of the
        same kind with every disallowed token at -inf; the input is not modified. V may exceed the tokenizer's vocabulary: rows beyond it (padding) are always masked.
        EOS is allowed exactly when the text so far is a complete match."""

    @abc.abstractmethod
    def accept(self, token_id: int) -> None:
        """Advances the constraint by the token that was chosen."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """True once nothing but EOS can follow (or EOS was accepted): the sequence is complete."""

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order from the current state, may come (speculative drafts are cut
        there); 0 where a processor cannot tell without moving, so it gets no drafts."""
        return 0

    def forced_tokens(self) -> list[int]:
        """Tokens that must come next whatever the model says; none where a processor cannot tell."""
        return []


class GrammarProcessor(LogitsProcessor):
    """An llguidance `LLMatcher` plus a reusable bitmask buffer."""

    def __init__(self, matcher, n_tok: int, description: str, eos_ids: tuple[int, ...] = ()) -> None:
        self.matcher = matcher
        self.n_tok = n_tok  # tokenizer vocabulary size; ids >= n_tok are padding rows
        self.eos_ids = eos_ids
        self.description = description
        self._bitmask = np.zeros((n_tok + 31) // 32, dtype=np.int32)  # (W,) one bit per token
        self._error_logged = False

    def allowed(self, V: int) -> torch.Tensor:
        """(V,) bool: which token ids may come next (ids >= the tokenizer's vocabulary never)."""
        import torch

        return torch.from_numpy(self._allowed(V))

    def _allowed(self, V: int) -> np.ndarray:
        bm = self._bitmask
        self.matcher.unsafe_compute_mask_ptr(bm.ctypes.data, bm.nbytes)
        # little-endian words, bit j of word w = token 32 w + j  ->  (W * 32,) 0/1 bytes
        bits = np.unpackbits(bm.view(np.uint8), bitorder="little").view(np.bool_)
        if V <= self.n_tok:
            return bits[:V]
        out = np.zeros(V, dtype=np.bool_)  # padding rows past the tokenizer stay disallowed
        out[: self.n_tok] = bits[: self.n_tok]
        return out

    def mask(self, logits):
        allowed = self._allowed(logits.shape[-1])
        if not allowed.any():  # only in the matcher's error state: end the sequence with EOS
            self._log_error("no token is allowed")
            allowed = np.zeros_like(allowed)
            allowed[[t for t in self.eos_ids if t < allowed.shape[0]] or slice(None)] = True
        if isinstance(logits, np.ndarray):
            return np.where(allowed, logits, logits.dtype.type("-inf"))
        import torch

        if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
            # numpy, single-threaded: a 49k-element torch op is split over the intra-op thread pool,
            # which stalls for a scheduler slice (tens of ms) whenever the cores are busy elsewhere
            return torch.from_numpy(np.where(allowed, logits.numpy(), np.float32("-inf")))
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            self._log_error(f"token {token_id} was not allowed")

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())  # also True in the error state

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, taken in order from the current state, the grammar allows (the state
        does not move): speculative drafts are cut there."""
        return int(self.matcher.validate_tokens([int(t) for t in tokens])) if tokens else 0

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces from the current state (a forced tool call's `{"name": "`), as
        llguidance tokenizes the forced bytes; the best drafts there are."""
        return [int(t) for t in self.matcher.compute_ff_tokens()]

    @property
    def is_complete(self) -> bool:
        """The text so far is a full match (EOS would be allowed)."""
        return bool(self.matcher.is_accepting())

    def _log_error(self, what: str) -> None:
        if not self._error_logged:
            self._error_logged = True
            log.error("structured output (%s): %s; matcher error: %s", self.description, what,
                      self.matcher.get_error() or "none")


# -- caches ---------------------------------------------------------------------------------------
_lock = threading.Lock()
_ll_tokenizers: dict[int, Any] = {}  # id(Tokenizer) -> llguidance.LLTokenizer
_grammars: OrderedDict[tuple[int, str], Any] = OrderedDict()  # (id(Tokenizer), spec json) -> LLMatcher


def _forget(key: int) -> None:
    with _lock:
        _ll_tokenizers.pop(key, None)
        for k in [k for k in _grammars if k[0] == key]:
            del _grammars[k]


def ll_tokenizer(tokenizer):
    """The llguidance token-level view of `tokenizer.backend`, built once per tokenizer object."""
    import llguidance

    key = id(tokenizer)
    with _lock:
        hit = _ll_tokenizers.get(key)
    if hit is not None:
        return hit
    eos = list(tokenizer.eos_token_ids)
    if not eos and tokenizer.eos_token:
        tid = tokenizer.token_to_id(tokenizer.eos_token)
        eos = [tid] if tid is not None else []
    if not eos:
        log.warning("the tokenizer names no EOS token: constrained outputs end when the grammar is complete")
    llt = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=eos or None)
    with _lock:
        if key not in _ll_tokenizers:
            _ll_tokenizers[key] = llt
            weakref.finalize(tokenizer, _forget, key)
        return _ll_tokenizers[key]


# -- specs to grammars ----------------------------------------------------------------------------
def _need(spec: dict, key: str, kind: type, what: str):
    v = spec.get(key)
    if not isinstance(v, kind):
        raise KvstrataError(f"structured output of type {spec['type']!r} needs {key!r}: {what}; got {v!r}")
    return v


def grammar_text(spec: dict) -> str:
    """The llguidance grammar (a JSON string) for a structured spec; KvstrataError if the spec is malformed.

    The grammar is not yet checked for validity; `check_grammar` does that.
    """
    import llguidance

    if not isinstance(spec, dict) or spec.get("type") not in SPEC_TYPES:
        got = spec.get("type") if isinstance(spec, dict) else spec
        raise KvstrataError(f"structured output type must be one of {', '.join(SPEC_TYPES)}; got {got!r}")
    t = spec["type"]
    if t == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(schema_with_options(bounded_json_object(), True))
    if t == "json_schema":
        schema = spec.get("schema")
        if schema is None and isinstance(spec.get("json_schema"), dict):  # OpenAI's response_format layout
            spec = {**spec, **spec["json_schema"]}
            schema = spec.get("schema")
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise KvstrataError(f"structured output of type 'json_schema' needs 'schema': a JSON Schema object; "
                                f"got {schema!r}")
        strict = spec.get("strict") or False  # OpenAI clients send null for "not strict"
        if not isinstance(strict, bool):
            raise KvstrataError(f"'strict' must be true or false; got {strict!r}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema_with_options(schema, strict))
        except (ValueError, TypeError) as e:
            raise KvstrataError(f"invalid JSON schema: {e}") from None
    if t == "regex":  # \d \w \s mean ASCII, as in JSON Schema (the Rust regex default is Unicode)
        pattern = llguidance.regex_to_lark(_need(spec, "pattern", str, "a regular expression"), "dws")
        return llguidance.LLMatcher.grammar_from_lark(f"start: /{pattern}/")
    if t == "grammar":
        text = _need(spec, "grammar", str, "Lark or GBNF grammar text")
        try:
            return llguidance.grammar_from("grammar", text)
        except ValueError as e:
            raise KvstrataError(f"invalid grammar: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(tool_call_lark(spec))


def _what(spec: dict) -> str:
    return {"json_object": "JSON object", "json_schema": "JSON schema", "regex": "regex",
            "grammar": "grammar", "tool_call": "tool-call grammar"}[spec["type"]]


def build_processor(spec: dict, tokenizer, vocab_size: int) -> GrammarProcessor:
    """One processor per sequence. KvstrataError (the server's HTTP 400) for an invalid spec.

    vocab_size is the model's logits width; `mask` reads the width from each row it gets, so it is
    informational (rows past the tokenizer's vocabulary are always masked).
    """
    import llguidance

    grammar = grammar_text(spec)
    key = (id(tokenizer), json.dumps(spec, sort_keys=True, default=str))
    with _lock:
        template = _grammars.get(key)
        if template is not None:
            _grammars.move_to_end(key)
    if template is None:
        check_grammar(grammar, _what(spec))
        template = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0, limits=_limits())
        if template.is_error():
            raise KvstrataError(f"invalid {_what(spec)}: {template.get_error()}")
        probe = GrammarProcessor(template.deep_copy(), tokenizer.vocab_size, spec["type"])
        probe._allowed(tokenizer.vocab_size)  # the first mask: where the parser gives up at once, say so now
        if probe.matcher.is_error():
            raise KvstrataError(f"this {_what(spec)} cannot be enforced (llguidance: {probe.matcher.get_error()}); "
                                "simplify it")
        with _lock:
            _grammars[key] = template
            while len(_grammars) > _GRAMMAR_CACHE_SIZE:
                _grammars.popitem(last=False)
    llt = ll_tokenizer(tokenizer)
    return GrammarProcessor(template.deep_copy(), tokenizer.vocab_size, spec["type"], tuple(llt.eos_tokens))


def check_output(spec: dict, tokenizer, token_ids: list[int], eos_ids) -> str | None:
    """Why `token_ids`, a constrained output that stopped on EOS or on its grammar, is not a complete match
    of `spec` (replayed through a fresh matcher), or None when it is."""
    toks = list(token_ids)
    proc = build_processor(spec, tokenizer, tokenizer.vocab_size)
    if toks and (toks[-1] in eos_ids or toks[-1] in proc.eos_ids):
        toks.pop()
    m = proc.matcher
    if m.consume_tokens([int(t) for t in toks]) and not m.is_error() and m.is_accepting():
        return None
    # a failure: replay as the engine ran it, a mask before each token, to find where and why it gave up
    proc = build_processor(spec, tokenizer, tokenizer.vocab_size)
    m = proc.matcher
    for t in toks + [None]:
        proc._allowed(tokenizer.vocab_size)
        if m.is_error() or t is None or not m.consume_token(int(t)) or m.is_error():
            break
    if m.is_error():
        return f"the parser gave up: {m.get_error()}"
    return "the output ends before the grammar is complete"

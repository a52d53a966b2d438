"""Build a `tokenizers.Tokenizer` from a GGUF file's metadata.

The conversion (vocabulary, merges, pre-tokenizer regex, special tokens) is transformers' own GGUF
converter, so tokenization matches the reference exactly; the result is cached as tokenizer.json under
$KVSTRATA_HOME/tokenizers keyed by the checkpoint id, so later starts skip transformers entirely.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import tokenizers

from kvstrata.core import KvstrataError
from kvstrata.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def tokenizer_from_gguf(path: str, reader, source_id: str, cfg) -> Tokenizer:
    from kvstrata.loader import kvstrata_home

    from kvstrata.loader.gguf_loader import _field

    cache = kvstrata_home() / "tokenizers" / f"{source_id[:32]}.json"
    meta_cache = cache.with_suffix(".meta.json")
    backend = None
    if cache.is_file() and meta_cache.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(cache))
            meta = json.loads(meta_cache.read_text())
        except Exception:  # a damaged cache is rebuilt, never trusted
            backend = None
    if backend is None:
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                convert_gguf_tokenizer,
                get_gguf_tokenizer,
            )
        except ImportError as e:
            raise KvstrataError(f"building the tokenizer of {path} needs transformers>=5: {e}") from None
        arch, tok_dict, tok_cfg = get_gguf_tokenizer(path)
        backend, _ = convert_gguf_tokenizer(arch, tok_dict)
        meta = {
            "bos_token": tok_cfg.get("bos_token"),
            "eos_token": tok_cfg.get("eos_token"),
            "add_bos_token": bool(tok_cfg.get("add_bos_token", False)),
        }
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            backend.save(str(tmp))
            os.replace(tmp, cache)
            meta_cache.write_text(json.dumps(meta))
        except OSError as e:
            log.warning("could not cache tokenizer at %s: %s", cache, e)
    template = _field(reader, "tokenizer.chat_template")
    eos_ids = tuple(cfg.eos_token_ids)
    return Tokenizer(
        backend=backend,
        chat_template=template,
        bos_token=meta.get("bos_token"),
        eos_token=meta.get("eos_token"),
        eos_token_ids=eos_ids,
        add_bos_token=meta.get("add_bos_token", False),
    )


def tokenizer_from_hf_dir(path: str | Path, eos_ids: tuple[int, ...]) -> Tokenizer:
    d = Path(path)
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise KvstrataError(f"{d}: tokenizer.json is missing; save the tokenizer with the checkpoint")
    try:
        backend = tokenizers.Tokenizer.from_file(str(tj))
    except Exception as e:
        raise KvstrataError(f"{tj}: unreadable tokenizer ({e})") from None
    cfg = {}
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = d / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()

    def tok_str(v):
        return v.get("content") if isinstance(v, dict) else v

    eos = tok_str(cfg.get("eos_token"))
    ids = set(eos_ids)
    if eos is not None and backend.token_to_id(eos) is not None:
        ids.add(backend.token_to_id(eos))
    return Tokenizer(
        backend=backend,
        chat_template=template,
        bos_token=tok_str(cfg.get("bos_token")),
        eos_token=eos,
        eos_token_ids=tuple(sorted(ids)),
        add_bos_token=bool(cfg.get("add_bos_token", False)) and backend.post_processor is None,
    )

"""Build a `tokenizers.Tokenizer` from a GGUF file's metadata.

The conversion (vocabulary, merges, pre-tokenizer regex, special tokens) is transformers' own GGUF
converter, so tokenization matches the reference exactly. It runs once per vocabulary: the result is
cached as tokenizer.json (plus its special-token settings) under the cache directory the loader names,
keyed by the sha256 of the file's whole metadata section, the bytes it is derived from; later starts
load that file (tens of milliseconds) and never import transformers. A damaged cache entry is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import tokenizers

from kvstrata.core import KvstrataError
from kvstrata.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_CACHE_FORMAT = "v2"


def tokenizer_from_gguf(path: str, metadata: Mapping[str, Any], metadata_digest: str, cache_dir: Path,
                        eos_ids: tuple[int, ...]) -> Tokenizer:
    """`metadata`: the file's key-value metadata (loader/gguf_reader.py); `metadata_digest`: a hash of
    its bytes, the cache key; `path` is read again (by transformers) only when the cache has no entry."""
    cache = Path(cache_dir) / f"{_CACHE_FORMAT}-{metadata_digest[:40]}.json"
    meta_cache = cache.with_suffix(".meta.json")
    backend, meta = _read_cache(cache, meta_cache)
    if backend is None:
        backend, meta = _convert(path)
        _write_cache(cache, meta_cache, backend, meta)
    return Tokenizer(
        backend=backend,
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=meta.get("bos_token"),
        eos_token=meta.get("eos_token"),
        eos_token_ids=tuple(eos_ids),
        add_bos_token=meta.get("add_bos_token", False),
    )


def _read_cache(cache: Path, meta_cache: Path) -> tuple[tokenizers.Tokenizer | None, dict]:
    if not (cache.is_file() and meta_cache.is_file()):
        return None, {}
    try:
        meta = json.loads(meta_cache.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        return tokenizers.Tokenizer.from_file(str(cache)), meta
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        log.warning("rebuilding the cached tokenizer %s: %s", cache, e)
        return None, {}


def _convert(path: str) -> tuple[tokenizers.Tokenizer, dict]:
    """transformers' conversion, in a child interpreter that writes the result to a temporary directory:
    importing transformers adds ~235 MiB to a process for good, and a first start converts while it builds
    the int8 layout, so in the engine's own process the two would add up (a first `kvstrata serve` peaked
    at 0.95 GiB with it, against its 1 GiB bound)."""
    log.info("converting the tokenizer of %s (once; cached)", path)
    src = str(Path(__file__).resolve().parents[2])  # (the directory kvstrata is imported from)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="kvstrata-tokenizer-") as d:
        out = Path(d) / "tokenizer.json"
        r = subprocess.run([sys.executable, "-c", _CHILD, path, str(out)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            raise KvstrataError(f"building the tokenizer of {path} failed: {lines[-1] if lines else r.returncode}")
        return tokenizers.Tokenizer.from_file(str(out)), json.loads(out.with_suffix(".meta.json").read_text())


_CHILD = ("import sys; from kvstrata.core import KvstrataError; from kvstrata.tokenizer.gguf_tokenizer import _convert_to\n"
          "try:\n    _convert_to(sys.argv[1], sys.argv[2])\n"
          "except KvstrataError as e:\n    sys.exit(f'KvstrataError: {e}')")


def _convert_to(path: str, out: str) -> None:
    """(In the child) converts with transformers and writes tokenizer.json and its settings to `out`."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as e:
        raise KvstrataError(f"building the tokenizer of {path} needs transformers>=5: {e}") from None
    arch, tok_dict, tok_cfg = get_gguf_tokenizer(path)
    backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    meta = {
        "bos_token": tok_cfg.get("bos_token"),
        "eos_token": tok_cfg.get("eos_token"),
        "add_bos_token": bool(tok_cfg.get("add_bos_token", False)),
    }
    backend.save(out)
    Path(out).with_suffix(".meta.json").write_text(json.dumps(meta))


def _write_cache(cache: Path, meta_cache: Path, backend: tokenizers.Tokenizer, meta: dict) -> None:
    """tokenizer.json, then its settings, each written aside and renamed: a reader sees both or neither."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        for target, write in ((cache, lambda p: backend.save(str(p))), (meta_cache, lambda p: p.write_text(json.dumps(meta)))):
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            write(tmp)
            os.replace(tmp, target)
    except OSError as e:
        log.warning("could not cache the tokenizer at %s: %s", cache, e)


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

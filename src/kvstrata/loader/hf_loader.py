"""Hugging Face checkpoints: config.json + model.safetensors (or sharded with an index) + tokenizer.json."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from kvstrata.core import KvstrataError
from kvstrata.model.config import ModelConfig


def _our_name(hf: str) -> str | None:
    name = hf.removeprefix("model.").replace("self_attn.", "").replace("mlp.", "")
    if name.startswith("rotary_emb") or name.endswith("rotary_emb.inv_freq"):
        return None
    return name


def _shards(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [d / f for f in files]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise KvstrataError(f"{index} names shards that are missing: {', '.join(missing)}")
        return shards
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(d.glob("*.safetensors"))
    if not found:
        raise KvstrataError(f"{d}: no model.safetensors or *.safetensors found (PyTorch .bin is not supported)")
    return found


def hf_config(d: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (config.json, plus generation_config.json's EOS ids)."""
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise KvstrataError(f"{d}: config.json is missing; a Hugging Face checkpoint directory needs one")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise KvstrataError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = ModelConfig.from_hf(raw, str(cfg_path))
    gen = d / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        extra = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        cfg = _with_eos(cfg, extra)
    return cfg


def load_hf(path: str, dtype):
    """Opens the checkpoint: its config, names and identity now (a few rows of each tensor read for the
    identity), the weights themselves as they are asked for (`LoadedModel.iter_weights`: one tensor at a
    time, so the int8 build holds one layer's float copies, engine/layout.py)."""
    from kvstrata.core import dtype_name

    from kvstrata.loader import LoadedModel, file_identity
    from kvstrata.tokenizer.gguf_tokenizer import tokenizer_from_hf_dir

    dtype = getattr(torch, dtype_name(dtype))
    d = Path(path)
    cfg = hf_config(d)
    cfg_path = d / "config.json"
    shards = _shards(d)
    h = hashlib.sha256(b"hf")
    h.update(cfg_path.read_bytes())
    names: set[str] = set()
    for shard, f, key, name in _tensors(shards, hashed=h):
        names.add(name)
    expected = {"embed_tokens.weight", "norm.weight"} | {f"layers.{i}.q_proj.weight" for i in range(cfg.num_layers)}
    missing = sorted(expected - names)
    if missing:
        raise KvstrataError(f"{d}: checkpoint lacks tensors {missing[:5]}; is it a complete {cfg.architecture} model?")
    tok = tokenizer_from_hf_dir(d, cfg.eos_token_ids)

    def stream():
        from safetensors import safe_open

        for shard, _, key, name in list(_tensors(shards)):
            try:  # (a map of its own per tensor: the pages read go when it closes, not at the end)
                with safe_open(str(shard), framework="pt") as f:
                    t = f.get_tensor(key)
            except Exception as e:
                raise KvstrataError(f"{shard}: unreadable safetensors file (truncated or corrupt?): {e}") from None
            yield name, t.to(dtype)

    sid = h.hexdigest()
    # the files as they are now (paths, sizes, mtimes) with the sampled values: what the int8 layout cache
    # is keyed by, as a GGUF file's identity (engine/layout.py)
    identity = hashlib.sha256("|".join(file_identity(str(p), sid) for p in (cfg_path, *shards)).encode()).hexdigest()
    return LoadedModel(cfg, lambda: dict(stream()), tok, sid, str(d), None, "none", identity=identity, stream=stream)


def _tensors(shards: list[Path], hashed=None):
    """(shard, open file, checkpoint key, our name) of every tensor the model takes, shard by shard. With
    `hashed`, each shard's name and size and each tensor's key, shape, dtype and first and last 64 values
    go into it (the identity: only those rows of a tensor are read)."""
    from safetensors import safe_open

    for shard in shards:
        if hashed is not None:
            hashed.update(f"{shard.name}:{os.path.getsize(shard)}".encode())
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    name = _our_name(key)
                    if name is None:
                        continue
                    if hashed is not None:
                        _hash_tensor(hashed, f.get_slice(key), key)
                    yield shard, f, key, name
        except KvstrataError:
            raise
        except Exception as e:
            raise KvstrataError(f"{shard}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _hash_tensor(h, sl, key: str) -> None:
    """key, shape, dtype and the first and last 64 values of a tensor (flattened), read as whole rows of
    its first dimension: the bytes earlier versions hashed from the whole tensor, so KV blocks cached
    under a checkpoint's identity keep their keys."""
    shape = list(sl.get_shape())
    if not shape:  # a scalar: read whole
        t = sl[...]
        rows_head = rows_tail = t.reshape(-1)
    else:
        per_row = 1
        for n in shape[1:]:
            per_row *= n
        r = min(shape[0], -(-64 // max(per_row, 1)))
        rows_head = sl[0:r].reshape(-1)
        rows_tail = sl[shape[0] - r: shape[0]].reshape(-1)
        t = rows_head
    h.update(f"{key}:{shape}:{t.dtype}".encode())
    h.update(rows_head[:64].float().numpy().tobytes() + rows_tail[-64:].float().numpy().tobytes())


def _with_eos(cfg: ModelConfig, extra: tuple[int, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, eos_token_ids=tuple(sorted(set(cfg.eos_token_ids) | {int(e) for e in extra})))

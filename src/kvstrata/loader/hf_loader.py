"""Hugging Face checkpoints: config.json + model.safetensors (or sharded with an index) + tokenizer.json."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

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
    """Opens the checkpoint: its config, names and identity now, from each shard's header and the first and
    last 64 values of each tensor (read with numpy: a start from the layout cache imports no torch), the
    weights themselves as they are asked for (`LoadedModel.iter_weights`: one tensor at a time, so the
    int8 build holds one layer's float copies, engine/layout.py)."""
    from kvstrata.loader import LoadedModel, file_identity
    from kvstrata.tokenizer.gguf_tokenizer import tokenizer_from_hf_dir

    d = Path(path)
    cfg = hf_config(d)
    cfg_path = d / "config.json"
    shards = _shards(d)
    h = hashlib.sha256(b"hf")
    h.update(cfg_path.read_bytes())
    entries: list[tuple[Path, str, str]] = []  # (shard, checkpoint key, our name)
    for shard in shards:
        h.update(f"{shard.name}:{os.path.getsize(shard)}".encode())
        header, start = _header(shard)
        with open(shard, "rb") as f:
            for key in sorted(header):  # (the order safetensors' keys() gives)
                name = _our_name(key)
                if name is not None:
                    _hash_tensor(h, f, shard, key, header[key], start)
                    entries.append((shard, key, name))
    names = {name for _, _, name in entries}
    expected = {"embed_tokens.weight", "norm.weight"} | {f"layers.{i}.q_proj.weight" for i in range(cfg.num_layers)}
    missing = sorted(expected - names)
    if missing:
        raise KvstrataError(f"{d}: checkpoint lacks tensors {missing[:5]}; is it a complete {cfg.architecture} model?")
    tok = tokenizer_from_hf_dir(d, cfg.eos_token_ids)

    def stream():
        import torch
        from safetensors import safe_open

        from kvstrata.core import dtype_name

        to = getattr(torch, dtype_name(dtype))
        for shard, key, name in entries:
            try:  # (a map of its own per tensor: the pages read go when it closes, not at the end)
                with safe_open(str(shard), framework="pt") as f:
                    t = f.get_tensor(key)
            except Exception as e:
                raise KvstrataError(f"{shard}: unreadable safetensors file (truncated or corrupt?): {e}") from None
            yield name, t.to(to)

    sid = h.hexdigest()
    # the files as they are now (paths, sizes, mtimes) with the sampled values: what the int8 layout cache
    # is keyed by, as a GGUF file's identity (engine/layout.py)
    identity = hashlib.sha256("|".join(file_identity(str(p), sid) for p in (cfg_path, *shards)).encode()).hexdigest()
    return LoadedModel(cfg, stream, tok, sid, str(d), None, "none", identity=identity)


# safetensors dtypes: (torch's name, as the identity names it; numpy's little-endian type, None for bf16)
_DTYPES = {"F64": ("torch.float64", "<f8"), "F32": ("torch.float32", "<f4"), "F16": ("torch.float16", "<f2"),
           "BF16": ("torch.bfloat16", None), "I64": ("torch.int64", "<i8"), "I32": ("torch.int32", "<i4"),
           "I16": ("torch.int16", "<i2"), "I8": ("torch.int8", "i1"), "U8": ("torch.uint8", "u1"),
           "BOOL": ("torch.bool", "?")}


def _header(shard: Path) -> tuple[dict, int]:
    """The tensors of a safetensors file (name -> dtype, shape, data_offsets) and where its data starts,
    checked against the file's size (a truncated or padded file is refused, as safetensors refuses it)."""
    size = os.path.getsize(shard)
    try:
        with open(shard, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + n + end != size:
            raise ValueError(f"its tensors end at byte {8 + n + end} of {size}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise KvstrataError(f"{shard}: unreadable safetensors file (truncated or corrupt?): {e}") from None
    return header, 8 + n


def _hash_tensor(h, f, shard: Path, key: str, info: dict, start: int) -> None:
    """key, shape, dtype and the first and last 64 values (flattened, as float32) of a tensor: the bytes
    earlier versions hashed from the whole tensor in torch, so KV blocks cached under a checkpoint's
    identity keep their keys; only those values are read (from `f`, the shard open)."""
    dt, shape, (b0, b1) = info["dtype"], list(info["shape"]), info["data_offsets"]
    if dt not in _DTYPES:  # (float8 and the like: through safetensors and torch)
        return _hash_tensor_torch(h, shard, key)
    tname, np_type = _DTYPES[dt]
    item = 2 if np_type is None else np.dtype(np_type).itemsize
    count = min(64, (b1 - b0) // item)
    f.seek(start + b0)
    head = f.read(count * item)
    f.seek(start + b1 - count * item)
    tail = f.read(count * item)

    def as_f32(raw: bytes) -> bytes:
        if np_type is None:  # bf16: the high half of a float32
            return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).tobytes()
        return np.frombuffer(raw, np_type).astype(np.float32).tobytes()

    h.update(f"{key}:{shape}:{tname}".encode())
    h.update(as_f32(head) + as_f32(tail))


def _hash_tensor_torch(h, shard: Path, key: str) -> None:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        t = f.get_tensor(key)
    flat = t.reshape(-1)
    h.update(f"{key}:{list(t.shape)}:{t.dtype}".encode())
    h.update(flat[:64].float().numpy().tobytes() + flat[-64:].float().numpy().tobytes())


def _with_eos(cfg: ModelConfig, extra: tuple[int, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, eos_token_ids=tuple(sorted(set(cfg.eos_token_ids) | {int(e) for e in extra})))

"""GGUF checkpoints through the `gguf` package: metadata -> ModelConfig, tensors dequantized to torch.

llama.cpp's converter permutes the rows of Llama's Q and K projections so that RoPE rotates adjacent
pairs (GPT-J style); our model (like HF) rotates halves, so the permutation is undone here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

import numpy as np
import torch

from kvstrata.core import KvstrataError
from kvstrata.model.config import GGUF_ARCHITECTURES, SUPPORTED, ModelConfig

log = logging.getLogger(__name__)

_NAME_MAP = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _open(path: str):
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise KvstrataError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None
    size = os.path.getsize(path)
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise KvstrataError(f"{path}: truncated GGUF file ({size} bytes, tensors need {end}); download it again")
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise KvstrataError(f"{path}: unsupported architecture {arch!r}; supported: {SUPPORTED}")

    def a(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    rope_scaling = None
    if a("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_layers=int(a("block_count")),
        num_heads=heads,
        num_kv_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("attention.key_length", hidden // heads)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        max_position_embeddings=int(a("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=rope_scaling,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=str(_field(reader, "general.name", "")),
    )


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` on (out, in) or (out,) tensors."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t, path: str) -> np.ndarray:
    import gguf

    try:
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise KvstrataError(
            f"{path}: tensor {t.name} uses quantization {t.tensor_type.name}, which the gguf package cannot "
            "dequantize; re-quantize the file to Q8_0, Q4_K or F16"
        ) from None


def source_id(reader, path: str) -> str:
    """Identity of the checkpoint: tensor layout plus sampled bytes of every tensor (cheap for any size)."""
    h = hashlib.sha256(b"gguf")
    h.update(str(os.path.getsize(path)).encode())
    for t in reader.tensors:
        h.update(f"{t.name}:{list(t.shape)}:{t.tensor_type.name}".encode())
        raw = t.data.reshape(-1).view(np.uint8) if t.data.dtype != np.uint8 else t.data.reshape(-1)
        h.update(raw[:256].tobytes())
        h.update(raw[-256:].tobytes())
    return h.hexdigest()


def load_gguf(path: str, dtype: torch.dtype):
    from kvstrata.loader import LoadedModel
    from kvstrata.tokenizer.gguf_tokenizer import tokenizer_from_gguf

    reader = _open(path)
    cfg = gguf_config(reader, path)
    unpermute = cfg.architecture in ("llama", "mistral")
    weights: dict[str, torch.Tensor] = {}
    rope_freqs = None
    qtypes = set()
    for t in reader.tensors:
        qtypes.add(t.tensor_type.name)
        deq = _dequantize(t, path)
        arr = torch.from_numpy(deq if deq.flags.writeable and deq.flags.c_contiguous else np.array(deq))
        if t.name == "rope_freqs.weight":
            rope_freqs = arr.float()
            continue
        m = _BLK.match(t.name)
        if m:
            layer, kind, suffix = m.groups()
            if kind not in _NAME_MAP:
                raise KvstrataError(f"{path}: unexpected tensor {t.name} for architecture {cfg.architecture}")
            if unpermute and kind == "attn_q":
                arr = _unpermute(arr, cfg.num_heads)
            elif unpermute and kind == "attn_k":
                arr = _unpermute(arr, cfg.num_kv_heads)
            name = f"layers.{layer}.{_NAME_MAP[kind]}.{suffix}"
        elif t.name in _TOP_MAP:
            name = _TOP_MAP[t.name]
        else:
            raise KvstrataError(f"{path}: unexpected tensor {t.name}")
        weights[name] = arr.to(dtype)
    sid = source_id(reader, path)
    tok = tokenizer_from_gguf(path, reader, sid, cfg)
    quant = ",".join(sorted(qtypes - {"F32"})) or "F32"
    return LoadedModel(cfg, weights, tok, sid, path, rope_freqs, quant)


def dump_metadata(path: str) -> str:
    reader = _open(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    out = {k: str(f.contents())[:200] for k, f in reader.fields.items() if k not in skip}
    return json.dumps(out, indent=1)

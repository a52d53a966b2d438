"""GGUF checkpoints: metadata -> ModelConfig, tensors dequantized to torch (on first use; opening a file
imports no torch).

The header and metadata come from the fast reader (loader/gguf_reader.py); the `gguf` package only
dequantizes tensor data. llama.cpp's converter permutes the rows of Llama's Q and K projections so that
RoPE rotates adjacent pairs (GPT-J style); our model (like HF) rotates halves, so the permutation is
undone here.
"""

from __future__ import annotations

from typing import Any

import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvstrata.core import KvstrataError, dtype_name
from kvstrata.loader.gguf_reader import GGUFFile, read_gguf
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


def gguf_config(g: GGUFFile, path: str) -> ModelConfig:
    arch = g.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise KvstrataError(f"{path}: unsupported architecture {arch!r}; supported: {SUPPORTED}")

    def a(key, default=None):
        return g.get(f"{arch}.{key}", default)

    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    tensor_names = {t.name for t in g.tensors}
    vocab = a("vocab_size") or len(g.get("tokenizer.ggml.tokens", ()))
    eos = g.get("tokenizer.ggml.eos_token_id")
    bos = g.get("tokenizer.ggml.bos_token_id")
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
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=str(g.get("general.name", "")),
    )


def _unpermute(w, n_head: int):
    """Inverse of llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` on (out, in) or (out,) tensors."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(g: GGUFFile, t, path: str):
    import torch

    deq = _dequantize_array(g.tensor_array(t), t, path)
    return torch.from_numpy(deq if deq.flags.writeable and deq.flags.c_contiguous else np.array(deq))


# tensor types `gguf.quants.dequantize` handles (a test dequantizes each): a file holding only these needs
# no trial dequantization, and so no import of the gguf package, when it is opened
DEQUANTIZABLE = frozenset({
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4",
})


def _dequantize_array(arr: np.ndarray, t, path: str) -> np.ndarray:
    if t.type_name == "F32":
        return arr  # (already a float32 view)
    import gguf

    try:
        return gguf.quants.dequantize(arr, gguf.GGMLQuantizationType(t.ggml_type))
    except NotImplementedError:
        raise KvstrataError(
            f"{path}: tensor {t.name} uses quantization {t.type_name}, which the gguf package cannot "
            "dequantize; re-quantize the file to Q8_0, Q4_K or F16"
        ) from None


def _check_dequantizable(g: GGUFFile, path: str) -> None:
    """Fails now, with the clear error, on a tensor type the gguf package cannot dequantize: one row of the
    first tensor of each type not known to be dequantizable is tried (the weights themselves are read
    later, or never)."""
    firsts: dict[int, Any] = {}
    for t in g.tensors:
        if t.type_name not in DEQUANTIZABLE:
            firsts.setdefault(t.ggml_type, t)
    for t in firsts.values():
        arr = g.tensor_array(t)
        _dequantize_array(arr.reshape(-1, arr.shape[-1])[:1], t, path)


def source_id(g: GGUFFile) -> str:
    """Identity of the checkpoint: tensor layout plus sampled bytes of every tensor (cheap for any size).
    The string hashed per tensor is kept byte for byte as earlier versions built it (shape as a list of
    numpy uint64), so KV blocks cached under them keep their keys."""
    h = hashlib.sha256(b"gguf")
    h.update(str(g.size).encode())
    for t in g.tensors:
        h.update(f"{t.name}:{[np.uint64(d) for d in t.shape]}:{t.type_name}".encode())
        raw = g.tensor_bytes(t)
        h.update(raw[:256].tobytes())
        h.update(raw[-256:].tobytes())
    return h.hexdigest()


def iter_weights(g: GGUFFile, cfg: ModelConfig, dtype, path: str):
    """Every weight dequantized to `dtype` (a name or a torch dtype) as a torch tensor under our parameter
    name (Q/K permutation undone), one (name, tensor) at a time in the file's order (llama.cpp writes a
    block's tensors together), so a caller building from them holds one tensor's float copy at a time."""
    import torch

    dtype = getattr(torch, dtype_name(dtype))
    unpermute = cfg.architecture in ("llama", "mistral")
    for t in g.tensors:
        if t.name == "rope_freqs.weight":
            continue
        m = _BLK.match(t.name)
        if m:
            layer, kind, suffix = m.groups()
            if kind not in _NAME_MAP:
                raise KvstrataError(f"{path}: unexpected tensor {t.name} for architecture {cfg.architecture}")
            name = f"layers.{layer}.{_NAME_MAP[kind]}.{suffix}"
        elif t.name in _TOP_MAP:
            name, kind = _TOP_MAP[t.name], None
        else:
            raise KvstrataError(f"{path}: unexpected tensor {t.name}")
        arr = _dequantize(g, t, path)
        if unpermute and kind == "attn_q":
            arr = _unpermute(arr, cfg.num_heads)
        elif unpermute and kind == "attn_k":
            arr = _unpermute(arr, cfg.num_kv_heads)
        yield name, arr.to(dtype)


def load_gguf(path: str, dtype):
    from kvstrata.core import kvstrata_home
    from kvstrata.loader import LoadedModel, file_identity
    from kvstrata.tokenizer.gguf_tokenizer import tokenizer_from_gguf

    g = read_gguf(path)
    cfg = gguf_config(g, path)
    for t in g.tensors:  # unknown names fail now, not after the layout cache was consulted
        if t.name != "rope_freqs.weight" and t.name not in _TOP_MAP and not _BLK.match(t.name):
            raise KvstrataError(f"{path}: unexpected tensor {t.name}")
    _check_dequantizable(g, path)
    sid = source_id(g)
    start, end = g.metadata_span
    digest = hashlib.sha256(g.raw_bytes(start, end)).hexdigest()
    # Built on its own thread, so a first start's conversion (seconds of Python) can overlap with
    # building the int8 weights in torch ops, which release the GIL. A cached start gains little:
    # tokenizers' from_file holds the GIL for its ~0.12 s (measured with a thread spinning beside it), so
    # the engine's thread waits for it in Thread.start.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstrata-tokenizer")
    tok = pool.submit(tokenizer_from_gguf, path, g.metadata, digest, kvstrata_home() / "tokenizers", cfg.eos_token_ids)
    pool.shutdown(wait=False)
    rope = next((t for t in g.tensors if t.name == "rope_freqs.weight"), None)
    rope_freqs = (np.array(_dequantize_array(g.tensor_array(rope), rope, path), dtype=np.float32)
                  if rope is not None else None)
    quant = ",".join(sorted({t.type_name for t in g.tensors} - {"F32"})) or "F32"
    return LoadedModel(cfg, lambda: iter_weights(g, cfg, dtype, path), tok, sid, path, rope_freqs, quant,
                       identity=file_identity(path, sid))

"""Test helper: write a HF checkpoint as a llama.cpp-style GGUF (Q/K permuted, weights quantized)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32") -> dict[str, np.ndarray]:
    """Returns the dequantized weights as written (HF names, HF row order) for building a reference."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [a["content"] for a in tok["added_tokens"] if a["id"] >= len(vocab)]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    merges = tok["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(cfg["eos_token_id"])
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qt = gguf.GGMLQuantizationType[qtype]
    written: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for name, t in sd.items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module>.<sub>.weight
            mod = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{NAMES[mod]}.{parts[-1]}"
        stored = a
        if gname.endswith("attn_q.weight"):
            stored = permute(a, nh)
        elif gname.endswith("attn_k.weight"):
            stored = permute(a, nkv)
        if a.ndim == 2 and qtype in ("Q4_K", "Q6_K"):
            data = random_kquant(stored.shape, qtype, rng)  # gguf-py has no K-quant quantizer
            deq = gguf.quants.dequantize(data, qt)
            w.add_tensor(gname, data, raw_dtype=qt)
        elif a.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(np.ascontiguousarray(stored), qt)
            deq = gguf.quants.dequantize(data, qt)
            w.add_tensor(gname, data, raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(stored, dtype=np.float32))
            deq = stored
        # the reference gets the dequantized values in HF row order
        if gname.endswith("attn_q.weight"):
            deq = _unpermute(deq, nh)
        elif gname.endswith("attn_k.weight"):
            deq = _unpermute(deq, nkv)
        written[name] = np.asarray(deq, dtype=np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def random_kquant(shape: tuple[int, int], qtype: str, rng) -> np.ndarray:
    """Valid K-quant bytes with random codes and small fp16 scales (block layouts from ggml-common.h)."""
    rows, cols = shape
    nb = cols // 256
    if qtype == "Q4_K":  # d, dmin (fp16), scales[12], qs[128]
        blk = rng.integers(0, 256, size=(rows, nb, 144), dtype=np.uint8)
        blk[..., 0:2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
        blk[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    else:  # Q6_K: ql[128], qh[64], scales[16] (int8), d (fp16)
        blk = rng.integers(0, 256, size=(rows, nb, 210), dtype=np.uint8)
        blk[..., 192:208] = rng.integers(-8, 8, size=(rows, nb, 16)).astype(np.int8).view(np.uint8)
        blk[..., 208:210] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
    return blk.reshape(rows, -1)


def _unpermute(w: np.ndarray, n: int) -> np.ndarray:
    # written independently of the loader: invert by applying the forward permutation's index map
    idx = permute(np.arange(w.shape[0]), n)
    out = np.empty_like(w)
    out[idx] = w
    return out


def reference_from(hf_dir: Path, weights: dict[str, np.ndarray]):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    return ref

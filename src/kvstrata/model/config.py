"""The normalized description of a Llama-family decoder, from a HF config.json or GGUF metadata.

Both loaders produce a `ModelConfig`; the model, the KV pool and the fingerprint read only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvstrata.core import KvstrataError

# HF `architectures[0]` -> our family name. All are the same decoder with small switches.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
SUPPORTED = "Llama 2/3 (incl. llama3 RoPE scaling), Mistral, Qwen2, SmolLM (HF: " + ", ".join(
    HF_ARCHITECTURES
) + "; GGUF: " + ", ".join(GGUF_ARCHITECTURES) + ")"


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict ("llama3", "linear")
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 bytes of K and V for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(cfg.get("model_type", ""))
        if arch is None:
            raise KvstrataError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; supported: {SUPPORTED}"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None
            rope_scaling = cfg.get("rope_scaling")
            rope_theta = cfg.get("rope_theta")
            rp = cfg.get("rope_parameters")  # transformers >= 5 nests RoPE settings here
            if isinstance(rp, dict):
                rope_theta = rope_theta or rp.get("rope_theta")
                if rp.get("rope_type", "default") != "default":
                    rope_scaling = rp
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta or 10000.0),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                rope_scaling=_normalize_rope_scaling(rope_scaling),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                name=cfg.get("_name_or_path", ""),
            )
        except KeyError as e:
            raise KvstrataError(f"{source}: missing required field {e.args[0]!r}") from None


def _normalize_rope_scaling(rs: dict[str, Any] | None) -> dict[str, Any] | None:
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise KvstrataError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")
    return {**rs, "rope_type": kind}

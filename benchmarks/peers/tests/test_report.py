from benchmarks.peers.report import concurrency_table, markdown, plots, single_stream_table, tau_table


def _load(c, tps):
    return {"concurrency": c, "requests": 4, "ok": 4, "tokens_per_s": tps, "ttft_ms": {"p50": 10, "p90": 20, "p99": 30},
            "itl_ms": {"p50": 1, "p90": 2, "p99": 3}, "server_command": f"llama-server -np {c}"}


def _tau(tps):
    return {"sessions": 2, "ok_turns": 9, "wall_s": 10.0, "tokens_per_s": tps, "prompt_tokens_per_s": 100.0,
            "cache_hit_rate": 0.5, "jct_s": {"mean": 5.0, "p50": 5.0, "p90": 6.0},
            "turn_ttft_ms": {"p50": 1, "p90": 2, "p99": 3}, "server_command": "llama-server --cache-ram 8192"}


RES = {"model": "m.gguf", "single_stream": {
    "prefill": [{"tokens": 512, "tps": 300.0, "command": "llama-bench -p 512", "raw": {"samples_ts": [290.0, 310.0]}}],
    "decode": [{"depth": 512, "tps": 50.0, "command": "llama-bench -d 512"}]},
    "transformers": {"prefill": [{"tokens": 512, "tps": 150.0}], "decode": [{"depth": 512, "tps": 10.0}]},
    "concurrency": [_load(8, 40.0)], "tau": _tau(20.0)}
ENGINE = {"name": "kvstrata", "single_stream": {"prefill": [{"tokens": 512, "tps": 600.0}]},
          "concurrency": [_load(8, 10.0)], "tau": _tau(30.0)}


def test_single_stream_ratios():
    t = single_stream_table(RES, ENGINE)
    assert "| prefill 512 tokens | 300.0 (best 310.0) | 150.0 | 2.00× | 600.0 | 2.00× |" in t
    assert "| decode at 512 context | 50.0 (best 50.0) | 10.0 | 5.00× | – | – |" in t


def test_concurrency_and_tau_rows():
    c = concurrency_table(RES, ENGINE)
    assert "| 8 | kvstrata | 4 / 4 | 10.0 |" in c and c.rstrip().endswith("0.25× |")
    t = tau_table(RES, ENGINE)
    assert "| kvstrata | 2 / 9 | 10.0 | 30.0 | 100.0 | 50% |" in t


def test_markdown_lists_commands_and_plots(tmp_path):
    paths = plots(RES, tmp_path, ENGINE)
    assert [p.name for p in paths] == ["peers_single_stream.png", "peers_concurrency.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    md = markdown(RES | {"plots": [str(p) for p in paths]}, ENGINE)
    for cmd in ("llama-bench -p 512", "llama-bench -d 512", "llama-server -np 8", "llama-server --cache-ram 8192"):
        assert cmd in md
    assert "![peers_concurrency](peers_concurrency.png)" in md

from benchmarks.peers.goals import engine_view, goals
from benchmarks.peers.report import concurrency_table, markdown, plots, single_stream_table, tau_table


def _load(c, tps, ok=4, ttft=10):
    return {"concurrency": c, "requests": 4, "ok": ok, "tokens_per_s": tps, "errors": [],
            "ttft_ms": {"p50": ttft, "p90": 2 * ttft, "p99": 3 * ttft},
            "itl_ms": {"p50": 1, "p90": 2, "p99": 3}, "server_command": f"llama-server -np {c}"}


def _tau(tps, wall=10.0, ok_turns=9):
    return {"sessions": 2, "turns": 9, "ok_turns": ok_turns, "wall_s": wall, "tokens_per_s": tps,
            "prompt_tokens_per_s": 100.0, "cache_hit_rate": 0.5, "jct_s": {"mean": 5.0, "p50": 5.0, "p90": 6.0},
            "turn_ttft_ms": {"p50": 1, "p90": 2, "p99": 3}, "server_command": "llama-server --cache-ram 8192"}


def _res():
    """A synthetic run: llama.cpp, transformers and kvstrata parts, as run_peers stores them."""
    kc = [_load(8, 10.0) | {"server_command": "kvstrata serve --max-num-seqs 8",
                            "server_metrics": {'kvstrata_engine_counter{name="preemptions"}': 0.0}},
          _load(32, 99.0) | {"server_command": "kvstrata serve --max-num-seqs 32"}]
    return {"model": "m.gguf", "workloads": {"decode_n_gen": 128}, "single_stream": {
        "prefill": [{"tokens": 512, "tps": 300.0, "command": "llama-bench -p 512", "raw": {"samples_ts": [290.0, 310.0]}},
                    {"tokens": 2048, "tps": 100.0, "command": "llama-bench -p 2048", "raw": {"samples_ts": [100.0]}}],
        "decode": [{"depth": 512, "tps": 50.0, "command": "llama-bench -d 512"}]},
        "transformers": {"prefill": [{"tokens": 512, "tps": 150.0}, {"tokens": 2048, "tps": 200.0}],
                         "decode": [{"depth": 512, "tps": 10.0}]},
        "concurrency": [_load(8, 40.0), _load(32, 33.0)], "tau": _tau(20.0, wall=100.0),
        "kvstrata_single_stream": {
            "prefill": [{"tokens": 512, "tps": 620.0, "samples_ts": [580.0, 620.0]},
                        {"tokens": 2048, "tps": 250.0, "samples_ts": [250.0]},
                        {"tokens": 8192, "tokens_measured": 8191, "tps": 90.0, "samples_ts": [90.0]}],
            "decode": [{"depth": 512, "tps": 40.0, "samples_ts": [40.0, 39.0, 38.0]}],
            "max_model_len": 8192, "method": "in-process kvstrata.LLM(...)"},
        "kvstrata_concurrency": kc, "kvstrata_tau": _tau(30.0, wall=40.0) | {"server_command": "kvstrata serve --kv-host-bytes 8589934592"}}


def test_single_stream_has_kvstrata_column_and_ratios_of_best_repetitions():
    t = single_stream_table(_res())
    # kvstrata best 620 (mean 600) / llama.cpp best 310 = 2.00; / transformers 150 = 4.13; llama best / transformers
    assert "| prefill 512 tokens | 300.0 (310.0) | 150.0 | 620.0 (600.0) | 2.00× | 4.13× | 2.07× |" in t
    assert "| decode at 512 context | 50.0 (50.0) | 10.0 | 40.0 (39.0) | 0.80× | 4.00× | 5.00× |" in t
    assert "| prefill 8,192 tokens | – | – | 90.0 (90.0) | – | – | – |" in t  # a row only kvstrata has
    assert "measured on 8,191 tokens" in t


def test_concurrency_rows_and_ratios():
    c = concurrency_table(_res())
    assert "| 8 | kvstrata | 4 / 4 | 10.0 | 0.25× | 10 / 20 / 30 | 1.00× / 1.00× / 1.00× |" in c
    assert "| 32 | kvstrata | 4 / 4 | 99.0 | 3.00× |" in c and "preemptions 0" in c
    assert "| 32 | llama.cpp | 4 / 4 | 33.0 |  |" in c


def test_tau_rows_with_ratio_row():
    t = tau_table(_res())
    assert "| kvstrata | 2 / 9 of 9 | 40.0 | 30.0 | 100.0 | 50% |" in t
    assert "| kvstrata / llama.cpp (cache on) | | 0.40× | 1.50× | 1.00× | 1.00× |" in t


def test_goals_computed_from_the_same_run():
    g = {x["goal"].split(" ≥")[0]: x for x in goals(_res())}
    assert g["single-stream decode at 512 context"]["status"] == "not reached"  # 40 vs 50
    assert g["single-stream decode at 512 context"]["ratio"] == 0.8
    assert g["prefill 2,048 tokens"]["status"] in ("reached", "not reached")
    rows = {x["goal"]: x for x in goals(_res())}
    tf = next(v for k, v in rows.items() if "transformers" in k)
    ll = next(v for k, v in rows.items() if k.startswith("prefill") and "llama.cpp" in k)
    assert (tf["ratio"], tf["status"]) == (1.25, "reached") and (ll["ratio"], ll["status"]) == (2.5, "reached")
    agg = next(v for k, v in rows.items() if "32 streams" in k)
    assert (agg["ratio"], agg["status"]) == (3.0, "reached")
    tau = next(v for k, v in rows.items() if "tau" in k)
    assert (tau["ratio"], tau["status"]) == (2.5, "reached")  # 100 s / 40 s


def test_goals_failed_requests_and_missing_parts():
    res = _res()
    res["kvstrata_concurrency"][1]["ok"] = 3
    res["kvstrata_tau"]["ok_turns"] = 8
    del res["transformers"]
    rows = {x["goal"]: x for x in goals(res)}
    agg = next(v for k, v in rows.items() if "32 streams" in k)
    assert agg["status"] == "not reached" and "1 of 4 requests failed" in agg["detail"]
    tau = next(v for k, v in rows.items() if "tau" in k)
    assert tau["status"] == "not reached" and "1 of 9 turns failed" in tau["detail"]
    assert next(v for k, v in rows.items() if "transformers" in k)["status"] == "not measured"
    assert all(x["status"] == "not measured" for x in goals({}))
    assert engine_view({}) is None


def test_markdown_lists_goals_commands_and_plots(tmp_path):
    res = _res()
    paths = plots(res, tmp_path)
    assert [p.name for p in paths] == ["peers_single_stream.png", "peers_concurrency.png", "peers_tau.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    md = markdown(res | {"plots": [str(p) for p in paths], "part_runs": {"kvstrata_tau": {"quick": True}}})
    for cmd in ("llama-bench -p 512", "llama-bench -d 512", "llama-server -np 8", "llama-server --cache-ram 8192",
                "kvstrata serve --max-num-seqs 32", "kvstrata serve --kv-host-bytes", "in-process kvstrata.LLM"):
        assert cmd in md
    assert "![peers_tau](peers_tau.png)" in md and "## Goals" in md and "**not reached**" in md
    assert "Smoke-test settings (`--quick`) in: kvstrata_tau" in md


def test_markdown_without_kvstrata_still_renders():
    res = {k: v for k, v in _res().items() if not k.startswith("kvstrata")}
    md = markdown(res)
    assert "| prefill 512 tokens | 300.0 (310.0) | 150.0 | 2.07× |" in md
    assert "not measured" in md


def test_decode_against_the_memory_bandwidth_roofline():
    from benchmarks.peers.report import roofline_table

    res = _res()
    assert "no memory-bandwidth ceiling" in roofline_table(res)
    res["ceilings"] = {"memory_bw_GBps": 40.0}
    res["single_stream"]["decode"][0]["bytes_per_token"] = 100_000_000  # roofline 400 tok/s; llama 50 -> 12%
    res["kvstrata_single_stream"]["decode"][0]["bytes_per_token"] = 50_000_000  # roofline 800; kvstrata 40 -> 5%
    t = roofline_table(res)  # rows without samples beside them: only the run's ceiling
    assert "| llama.cpp | 512 | 100.0 | 50.0 | 5.0 | – | – | 12% |" in t
    assert "| kvstrata | 512 | 50.0 | 40.0 | 2.0 | – | – | 5% |" in t
    g = next(x for x in goals(res) if "roofline" in x["goal"])
    assert g["ratio"] == 0.05 and g["status"] == "not reached"
    res["kvstrata_single_stream"]["decode"][0]["samples_ts"] = [700.0]  # 700 / 800 = 87.5% >= 85%
    assert next(x for x in goals(res) if "roofline" in x["goal"])["status"] == "reached"


def test_decode_roofline_against_the_bandwidth_sampled_beside_each_repetition():
    """Repetition i lies between samples i and i + 1 and is set against the higher of the two; the best
    repetition's share is the goal's ratio, and the share of the run's highest sample is shown too."""
    from benchmarks.peers.goals import roofline_share
    from benchmarks.peers.report import roofline_table

    res = _res()
    res["ceilings"] = {"memory_bw_GBps": 80.0}
    k = res["kvstrata_single_stream"]["decode"][0]
    k["bytes_per_token"] = 100_000_000
    k["samples_ts"] = [300.0, 360.0, 330.0]  # reads 30 / 36 / 33 GB/s
    k["ceilings_GBps"] = [40.0, 50.0, 80.0, 45.0]  # beside: 50, 80, 80 -> 60 %, 45 %, 41 %
    sh = roofline_share(k, 80.0)
    assert sh["beside"] == 0.6 and sh["beside_GBps"] == 50.0 and sh["beside_read_GBps"] == 30.0
    assert sh["run"] == 0.45  # the best repetition (36 GB/s) against 80
    g = next(x for x in goals(res) if "roofline" in x["goal"])
    assert g["ratio"] == 0.6 and g["status"] == "not reached" and "45% of the run's highest sample" in g["detail"]
    assert "| kvstrata | 512 | 100.0 | 360.0 | 36.0 | 50.0 | 60% | 45% |" in roofline_table(res)
    k["ceilings_GBps"] = [40.0, 42.0, 41.0, 45.0]  # 36/42 = 86 % >= 85 %, but 36/80 = 45 % of the run's highest
    assert next(x for x in goals(res) if "roofline" in x["goal"])["status"] == "reached beside, not against the run's highest"
    res["ceilings"]["memory_bw_GBps"] = 42.0  # 36/42 = 86 %: reached both ways
    assert next(x for x in goals(res) if "roofline" in x["goal"])["status"] == "reached"
    k["ceilings_GBps"] = [40.0, 42.0]  # not one sample more than repetitions: the run's ceiling only
    assert roofline_share(k, 80.0)["beside"] is None

"""`kvstrata plan` through the real CLI entry point."""

from __future__ import annotations

import json


from kvstrata.cli.main import main
from kvstrata.planner.calibration import MachineProfile

FIELDS = {"hardware", "devices", "fits", "ttft_s", "tokens_per_s_per_user", "tokens_per_s_aggregate", "usd_per_million_tokens"}


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_list(capsys):
    data = _json(capsys, ["plan", "list", "--json"])
    assert {"cerebras-wse3", "h100-sxm", "groq-lpu"} <= set(data["hardware"])
    assert {"llama-3.1-405b", "deepseek-v3", "gpt-oss-120b", "smollm2-135m"} <= set(data["models"])
    assert {"answer", "agentic", "mooncake"} <= set(data["workloads"])
    assert 6200 < data["essay"]["bandwidth_ratio"] < 6300
    assert main(["plan", "list"]) == 0 and "WSE-3 / H100" in capsys.readouterr().out


def test_plan_json_one_object_per_hardware_with_two_deployments(capsys):
    out = _json(capsys, ["plan", "--model", "llama-3.1-70b", "--hardware", "cerebras-wse3,h100-sxm,epyc-9554",
                         "--workload", "agentic", "--json"])
    assert [o["hardware"] for o in out] == ["cerebras-wse3", "h100-sxm", "epyc-9554"]
    for o in out:
        assert FIELDS <= set(o) and o["fits"] and o["devices"] >= 1
        # agentic work is bought by the task: the cheapest per finished task comes first
        assert [d["role"] for d in o["deployments"]] == ["cheapest", "fastest"] and o["role"] == "cheapest"
        cheap, fast = o["deployments"]
        assert fast["tokens_per_s_per_user"] >= cheap["tokens_per_s_per_user"]
        if cheap["usd_per_task"] is not None:
            assert cheap["usd_per_task"] <= fast["usd_per_task"]
    assert out[0]["tokens_per_s_per_user"] > out[1]["tokens_per_s_per_user"] > out[2]["tokens_per_s_per_user"]


def test_answer_shows_the_fastest_deployment_first(capsys):
    """The issue's example: 70B on H100 is served on a whole 8-GPU server in FP8, not on the 2 GPUs that fit."""
    [o] = _json(capsys, ["plan", "--model", "llama-3.1-70b", "--hardware", "h100", "--json"])
    fast, cheap = o["deployments"]
    assert (fast["role"], cheap["role"]) == ("fastest", "cheapest") and o["role"] == "fastest"
    assert fast["devices"] == 8 and fast["weight_dtype"] == "fp8" and fast["spec"]
    assert fast["tokens_per_s_per_user"] > 3 * cheap["tokens_per_s_per_user"]
    assert "HGX H100" in fast["limit"]
    [o] = _json(capsys, ["plan", "--model", "llama-3.1-70b", "--hardware", "h100", "--limit", "2", "--json"])
    assert all(d["devices"] <= 2 for d in o["deployments"])
    assert main(["plan", "--model", "llama-3.1-70b", "--hardware", "h100"]) == 0
    assert "fastest" in capsys.readouterr().out


def test_plan_table_and_not_fitting(capsys):
    assert main(["plan", "--model", "llama-3.1-405b", "--hardware", "h100", "--devices", "2"]) == 0
    out = capsys.readouterr().out
    assert "NO:" in out and "weights need" in out
    out = _json(capsys, ["plan", "--model", "llama-3.1-405b", "--hardware", "h100", "--devices", "2", "--json"])
    assert out[0]["fits"] is False and out[0]["tokens_per_s_per_user"] is None


def test_compare_and_validate(capsys):
    out = _json(capsys, ["plan", "compare", "--model", "llama-3.1-8b", "--json"])
    assert len(out) >= 12
    assert main(["plan", "compare", "--model", "llama-3.1-8b", "--hardware", "h100,b200"]) == 0
    assert "b200" in capsys.readouterr().out
    v = _json(capsys, ["plan", "validate", "--json"])
    assert len(v["rows"]) >= 30 and v["summary"]["median_abs_rel_error"] <= 0.20


def test_user_errors_exit_2(capsys, tmp_path):
    assert main(["plan", "--model", "llama-3.1-8b", "--hardware", "h900"]) == 2
    assert "unknown hardware" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b"]) == 2
    assert main(["plan", "--model", str(tmp_path / "none.json"), "--hardware", "h100"]) == 2
    assert main(["plan", "--hardware", "this"]) == 2  # no calibration profile yet
    assert "calibrate" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--hardware", "h100", "--spec-tokens", "3"]) == 2


def test_calibrate_then_plan_this_machine(capsys, tmp_path):
    out = tmp_path / "cal.json"
    assert main(["plan", "calibrate", "--quick", "--out", str(out), "--disk-dir", str(tmp_path)]) == 0
    assert "saved" in capsys.readouterr().out and out.is_file()
    res = _json(capsys, ["plan", "--hardware", "this", "--profile", str(out), "--json"])
    assert res[0]["model"] == "smollm2-135m" and res[0]["fits"] and res[0]["weight_dtype"] == "int8"
    prof = MachineProfile.from_dict(json.loads(out.read_text()))
    assert prof.checksum_GBps > 0
    # decode of the int8 default path is bounded by the measured memory bandwidth over the int8 weights
    for d in res[0]["deployments"]:
        weights = 134_515_008 * (1 if d["weight_dtype"] == "int8" else 4)
        assert d["tokens_per_s_per_user"] <= prof.memory_bw_GBps * 1e9 / weights
    # with a results folder, the engine's measured figures are set beside the planner's
    results = tmp_path / "results"
    results.mkdir()
    (results / "engine.json").write_text(json.dumps({"ceilings": {"memory_bw_GBps": 40.0, "matmul_fp32_GFLOPs": 200.0},
                                                     "int8": {"decode_b1": 250.0}, "fp32": {"prefill_512": 600.0}}))
    assert main(["plan", "--hardware", "this", "--profile", str(out), "--results", str(results)]) == 0
    text = capsys.readouterr().out
    assert "decode, batch 1, int8 weights" in text and "tier_ttft.json missing" in text


def test_cluster_table_json_and_plot(capsys, tmp_path):
    out = _json(capsys, ["plan", "cluster", "--model", "llama-3.1-8b", "--sessions", "500", "--hardware",
                         "cerebras-wse3,h100,epyc-9554", "--workload", "answer,claude-code", "--json"])
    assert [(c["workload"], c["hardware"]) for c in out] == [(w, h) for w in ("answer", "claude-code")
                                                              for h in ("cerebras-wse3", "h100-sxm", "epyc-9554")]
    for c in out:
        if c["fits"]:
            assert c["replicas"] * c["sessions_per_replica"] >= 500 and c["ssd_GB"] > 0
    assert main(["plan", "cluster", "--model", "llama-3.1-8b", "--sessions", "100", "--hardware", "h100",
                 "--workload", "claude-code", "--out-dir", str(tmp_path)]) == 0
    assert "| claude-code | h100-sxm |" in capsys.readouterr().out
    assert (tmp_path / "cluster_llama-3.1-8b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| claude-code | h100-sxm |" in (tmp_path / "cluster_llama-3.1-8b.md").read_text()


def test_plot_writes_png_and_svg(capsys, tmp_path):
    assert main(["plan", "plot", "--model", "llama-3.1-8b", "--hardware", "cerebras-wse3,h100", "--workload", "agentic",
                 "--out-dir", str(tmp_path)]) == 0
    for stem in ("context_sweep", "cost_vs_concurrency", "placement"):
        png, svg = tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in svg.read_bytes()[:2000]


def test_user_catalog_via_cli(capsys, tmp_path):
    hw = {"hardware": {"my-gpu": {"memory": {"capacity_GB": 24, "bandwidth_GBps": 1000}, "compute_TFLOPs": {"bf16": 165},
                                  "sources": {"memory": "spec", "compute": "spec"}}}}
    p = tmp_path / "hw.json"
    p.write_text(json.dumps(hw))
    out = _json(capsys, ["plan", "--model", "llama-3.1-8b", "--hardware", "my-gpu", "--catalog", str(p), "--json"])
    assert out[0]["fits"] and out[0]["devices"] == 1

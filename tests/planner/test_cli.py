"""`kvstrata plan` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

from kvstrata.cli.main import main
from kvstrata.planner.calibration import MachineProfile, save_profile

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


def test_plan_json_one_object_per_hardware(capsys):
    out = _json(capsys, ["plan", "--model", "llama-3.1-70b", "--hardware", "cerebras-wse3,h100-sxm,epyc-9554",
                         "--workload", "agentic", "--json"])
    assert [o["hardware"] for o in out] == ["cerebras-wse3", "h100-sxm", "epyc-9554"]
    for o in out:
        assert FIELDS <= set(o) and o["fits"] and o["devices"] >= 1
    assert out[0]["tokens_per_s_per_user"] > out[1]["tokens_per_s_per_user"] > out[2]["tokens_per_s_per_user"]


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
    assert len(v["rows"]) >= 10 and v["summary"]["max_factor"] < 3


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
    assert res[0]["model"] == "smollm2-135m" and res[0]["fits"]
    prof = MachineProfile.from_dict(json.loads(out.read_text()))
    # decode of the fp32 default model is bounded by the measured memory bandwidth
    weights = 134_515_008 * 4
    assert res[0]["tokens_per_s_per_user"] <= prof.memory_bw_GBps * 1e9 / weights


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

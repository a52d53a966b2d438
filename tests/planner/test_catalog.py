"""The hardware catalog: sources, the essay's ratios, user entries."""

from __future__ import annotations

import json

import pytest

from kvstrata.core import KvstrataError
from kvstrata.planner.catalog import essay_ratios, load_catalog, resolve_hardware

REQUIRED = ["cerebras-wse3", "h100-sxm", "h200", "b200", "gb200-nvl72", "mi300x", "mi355x", "tpu-v5e", "tpu-v6e",
            "tpu-v7", "groq-lpu", "sambanova-sn40l", "epyc-9554", "grace"]


def test_essay_ratios_from_catalog():
    cat, _ = load_catalog()
    r = essay_ratios(cat)
    # the essay: 21 PB/s against 3.35 TB/s is "about 6,000 times" (6,268.7); 44 GB against 80 GB is 0.55
    assert r["bandwidth_ratio"] == pytest.approx(21e15 / 3.35e12, rel=1e-6)
    assert 6200 < r["bandwidth_ratio"] < 6300
    assert r["capacity_ratio"] == pytest.approx(0.55)


def test_every_entry_sources_its_figures():
    cat, tiers = load_catalog()
    assert set(REQUIRED) <= set(cat)
    for name, hw in cat.items():
        assert hw.sources.get("memory") and hw.sources.get("compute"), name
        assert hw.sources.get("price") or hw.usd_per_hour is None, name
        if hw.per_layer_latency_us:
            assert hw.sources.get("per_layer_latency_us") or hw.kind in ("gpu", "tpu", "cpu"), name
    for needed in ("ddr5_12ch", "cxl_expander", "nvme_gen5", "eth_100g", "eth_400g", "ib_ndr"):
        assert tiers[needed]["source"] and tiers[needed]["bandwidth_GBps"] > 0


def test_user_catalog_adds_and_replaces(tmp_path):
    user = {"hardware": {"my-box": {"title": "my box", "memory": {"capacity_GB": 24, "bandwidth_GBps": 1000},
                                    "compute_TFLOPs": {"bf16": 165}, "price": {"usd_per_hour": 0.5},
                                    "sources": {"memory": "my measurement", "compute": "spec"}}}}
    p = tmp_path / "hw.json"
    p.write_text(json.dumps(user))
    cat, _ = load_catalog([p])
    [box] = resolve_hardware("my-box", cat)
    assert box.capacity_GB == 24 and box.usd_per_hour == 0.5
    assert len(resolve_hardware("all", cat)) == len(cat)


def test_catalog_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hardware": {"x": {"memory": {"capacity_GB": 1}}}}))
    with pytest.raises(KvstrataError, match="'x' is malformed"):
        load_catalog([bad])
    with pytest.raises(KvstrataError, match="does not exist"):
        load_catalog([tmp_path / "nope.json"])
    cat, _ = load_catalog()
    with pytest.raises(KvstrataError, match="unknown hardware"):
        resolve_hardware("h900", cat)
    with pytest.raises(KvstrataError, match="calibrate"):
        resolve_hardware("this", cat)


def test_purchase_price_amortised():
    cat, _ = load_catalog()
    assert cat["cerebras-wse3"].usd_per_hour == pytest.approx(1_360_000 / (3 * 365 * 24))
    assert "purchase" in cat["cerebras-wse3"].price_basis
    assert cat["sambanova-sn40l"].usd_per_hour is None and cat["sambanova-sn40l"].price_basis == "not published"


def test_every_row_has_a_sourced_price_or_says_it_has_none():
    cat, _ = load_catalog()
    for name, hw in cat.items():
        note = hw.sources.get("price", "")
        assert note, name
        if hw.usd_per_hour is None or "UNVERIFIED" in note or "ESTIMATE" in note:
            continue
        # a price taken as published names where: a price list, a pricing page, a filing
        assert any(w in note for w in ("pricing", "price list", "Lambda", "Google Cloud")), (name, note)
    for name, hw in cat.items():
        if hw.usd_per_hour is None:
            assert "UNVERIFIED" in hw.sources["price"] or "not published" in hw.sources["price"], name


def test_efficiency_classes_and_deployments():
    cat, _ = load_catalog()
    h100, wse = cat["h100-sxm"], cat["cerebras-wse3"]
    assert h100.efficiency_class == "nvidia-gpu" and cat["b200"].memory_efficiency == h100.memory_efficiency
    assert cat["b200"].compute_efficiency_for("nvfp4") != cat["b200"].compute_efficiency_for("fp8")
    for name, hw in cat.items():
        assert hw.max_devices >= 1 and hw.deployment_limit, name
        assert set(hw.deployment.get("dtypes", [hw.default_weight_dtype])) <= set(
            ["bf16", "fp16", "fp8", "nvfp4", "fp4", "int8", "q4_k_m", "q8_0"]), name
    assert h100.max_devices == 8 and wse.max_devices == 64 and cat["gb200-nvl72"].max_devices == 72

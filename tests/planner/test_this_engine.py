"""`kvstrata plan --hardware this` against the engine's own latest benchmark results, within 15%.

Reads whatever benchmarks/results/ holds now (other runs regenerate those files); a figure whose file
or machine ceilings are missing is reported as skipped, with the reason, never guessed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstrata.planner.modelspec import resolve_model
from kvstrata.planner.this_engine import checks, load_results, markdown

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
BOUND = 0.15


@pytest.fixture(scope="module")
def model():
    return resolve_model("default")  # the engine's default model, read from its GGUF


def _rows(model, restore: bool):
    results = load_results(RESULTS)
    if not results:
        pytest.skip(f"no engine.json or tier_ttft.json under {RESULTS.name}/ (make bench writes them)")
    rows, skipped = checks(results, model)
    rows = [c for c in rows if c.figure.startswith("restore") == restore]
    if not rows:
        pytest.skip("no figure could be compared: " + "; ".join(skipped))
    return rows, markdown(rows, skipped)


def test_planner_predicts_the_engines_measured_compute(model):
    rows, report = _rows(model, restore=False)
    bad = [c for c in rows if abs(c.error) > BOUND]
    assert not bad, f"beyond {BOUND:.0%}:\n{report}"
    assert any(c.figure.startswith("decode") for c in rows) and any(c.figure.startswith("prefill") for c in rows), report


@pytest.mark.xfail(strict=True, reason="known gap: the planner prices a restore as the KV bytes at the tier's "
                   "read + checksum + copy rate, and misses the engine's per-block cost; on the int8 / fp16 path "
                   "the host restore took 73 ms against 30 ms predicted (tier_ttft.json of 2026-12-04, CRC-32), "
                   "18 ms against 10 ms once blocks were read in place and checked with XXH3 (2026-12-05); disk "
                   "and Redis reads pay a page fault per 4 KiB of fresh buffer. Strict: when the two agree again "
                   "this fails, and the marker goes")
def test_planner_predicts_the_engines_measured_restores(model):
    rows, report = _rows(model, restore=True)
    bad = [c for c in rows if abs(c.error) > BOUND]
    assert not bad, f"beyond {BOUND:.0%}:\n{report}"


def test_restores_are_predicted_from_rates_measured_beside_them(model):
    from kvstrata.planner.catalog import restore_GBps

    res = {"tokens": 4096, "new_tokens": 32, "kv_bytes_per_value": 4, "device_s": 0.1, "host_s": 0.15,
           "disk_s": 0.3, "remote_s": 0.5,
           "ceilings": {"host_copy_GBps": 20.0, "crc32_GBps": 5.0, "disk_read_GBps": 2.0}}
    rows, skipped = checks({"tier_ttft": res}, model)
    by = {c.figure.split(" from ")[1].split(" ")[0]: c for c in rows}
    nbytes = model.kv_bytes(4064, 4)
    assert by["host"].predicted == pytest.approx(nbytes / 1e9 * (1 / 20 + 1 / 5))
    assert by["disk"].predicted == pytest.approx(nbytes / (restore_GBps(2.0, 20.0, 5.0) * 1e9))
    assert by["host"].measured == pytest.approx(0.05)
    assert any("remote" in s for s in skipped) and any("engine.json missing" in s for s in skipped)

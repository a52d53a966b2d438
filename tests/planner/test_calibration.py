"""Calibration: real measurements on this machine, real files, a real Redis server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvstrata.core import KvstrataError
from kvstrata.planner.calibration import MachineProfile, calibrate, load_profile, save_profile
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    with RedisServer() as server:
        server.start()
        return calibrate(quick=True, disk_dir=tmp_path_factory.mktemp("disk"), redis_url=server.url)


def test_quick_calibration_measures_everything(profile):
    assert profile.memory_bw_GBps > 0.1 and profile.host_copy_GBps > 0.1
    assert profile.matmul_fp32_GFLOPs > 0.1 and profile.matmul_backend == "torch"
    assert profile.disk_read_GBps > 0 and profile.disk_write_GBps > 0
    assert profile.redis_rtt_ms is not None and 0 < profile.redis_rtt_ms < 1000
    assert profile.quick and profile.cpu_count >= 1 and profile.total_memory_bytes > 1e9


def test_save_load_round_trip(profile, tmp_path, monkeypatch):
    p = save_profile(profile, tmp_path / "sub" / "cal.json")
    assert load_profile(p) == profile
    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path / "home"))
    assert load_profile() is None  # nothing saved there yet
    default = save_profile(profile)
    assert default == tmp_path / "home" / "calibration.json" and load_profile() == profile


def test_damaged_profiles_raise(tmp_path, profile):
    p = tmp_path / "cal.json"
    p.write_text("{oops")
    with pytest.raises(KvstrataError, match="damaged"):
        load_profile(p)
    d = profile.to_dict()
    del d["memory_bw_GBps"]
    p.write_text(json.dumps(d))
    with pytest.raises(KvstrataError, match="memory_bw_GBps"):
        load_profile(p)
    d = {**profile.to_dict(), "future_field": 1}  # newer profiles still load
    p.write_text(json.dumps(d))
    assert isinstance(load_profile(p), MachineProfile)


def test_unreachable_redis_is_a_user_error(tmp_path):
    from tests.support.redis_server import free_port

    with pytest.raises(KvstrataError, match="cannot reach Redis"):
        calibrate(quick=True, disk_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")


def test_planner_imports_no_torch():
    code = ("import sys, kvstrata.cli.plan, kvstrata.planner.perf, kvstrata.planner.cost, kvstrata.planner.validation, "
            "kvstrata.planner.calibration, kvstrata.planner.plots, kvstrata.planner.workloads;"
            "from kvstrata.planner.modelspec import resolve_model; resolve_model('default');"
            "assert 'torch' not in sys.modules, 'torch imported'; assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": "src", "PATH": ""}, cwd=".")

"""The chaos suite's short form (tests/chaos/run.py; the long form is `make chaos`): the real server as a
process on the tiny model, SQLite + disk tier + host tier + a real Redis; SIGKILLs in the middle of
session turns and a running job, a store outage, a Redis outage, corrupt and missing tier files, and
clients that cancel at random points; then a 64-client soak. Every output is checked against a
never-disturbed reference run of the same workload."""

from __future__ import annotations

from tests.chaos.run import MUST_BE_ZERO, ChaosConfig, markdown, run_chaos


def test_chaos_short(tiny_llama, own_redis, tmp_path):
    rep = run_chaos(ChaosConfig(str(tiny_llama), tmp_path), own_redis)
    print(markdown(rep))
    c = rep["counts"]
    assert {k: c[k] for k in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), (rep["notes"], rep["log_tail"])
    assert rep["faults"].get("kill", 0) >= 2 and rep["faults"].get("store_outage") and rep["faults"].get("redis_outage")
    assert c["turns"] > 20 and c["job_tasks"] == 4 and c["cancelled_by_client"] > 0
    res = rep["resources"]
    assert res["fds"]["last"] <= res["fds"]["first"] + 32, res
    assert res["threads"]["last"] <= res["threads"]["first"] + 16, res
    assert res["rss_mib"]["last"] <= res["rss_mib"]["first"] + 300, res

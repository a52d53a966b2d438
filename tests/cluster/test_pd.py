"""Prefill/decode disaggregation on a local Ray Serve cluster (one prefill and one decode replica of the
tiny random model): output identical to a co-located server through both handovers; the cost model's
choices counted."""

from __future__ import annotations

import httpx
import pytest

from tests.cluster.conftest import wait_replicas

pytestmark = pytest.mark.slow

PROMPT = ("Agents call tools and wait; the cache keeps their context warm. " * 12).strip()


@pytest.fixture(scope="module")
def pd(ray_cluster, tiny_llama):
    from kvstrata.cluster.launch import ClusterOptions
    from kvstrata.config import EngineConfig

    cfg = EngineConfig(model=str(tiny_llama), kv_device_bytes="4M", kv_host_bytes="4M", num_threads=1)
    d = ray_cluster(ClusterOptions(prefill_replicas=1, decode_replicas=1, replica_cpus=0.5), cfg)
    wait_replicas(2)
    return d


@pytest.fixture(scope="module")
def colocated(tiny_llama, tmp_path_factory):
    from kvstrata.sessions import open_store
    from tests.server.harness import make_engine, serve

    aengine = make_engine(str(tiny_llama), kv_device_bytes="4M", num_threads=1)
    store = open_store(str(tmp_path_factory.mktemp("colocated") / "s.db"))
    with serve(aengine, store, names=("tiny",)) as srv:
        yield srv
    aengine.shutdown()
    store.close()


def complete(url: str, prompt: str, prefill: str | None = None) -> dict:
    headers = {"X-Kvstrata-Prefill": prefill} if prefill else {}
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=120,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def pd_decisions(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("kvstrata_cluster_prefill_decisions_total{"):
            label, value = line.split("{action=")[1].split("} ")
            out[label.strip('"')] = float(value)
    return out


@pytest.mark.parametrize("transport", ["shared-tier", "object-store"])
def test_disaggregated_output_matches_colocated(pd, colocated, transport):
    prompt = f"{transport}: {PROMPT}"
    got = complete(pd.url, prompt, prefill=transport)
    want = complete(colocated.url, prompt)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    u = got["usage"]  # the handed-over blocks were placed in the decode replica's pool before it ran
    assert u["prompt_tokens_details"]["cached_tokens"] >= 0.8 * u["prompt_tokens"], u  # it computed (almost) none
    assert pd_decisions(pd.url).get(transport, 0) >= 1
    assert f'kvstrata_cluster_prefill_handover_seconds_count{{transport="{transport}"}}' in httpx.get(
        pd.url + "/metrics", timeout=30).text


def test_short_prompts_and_held_prefixes_prefill_locally(pd, colocated):
    before = pd_decisions(pd.url).get("local", 0)
    got = complete(pd.url, "Hi")
    assert got["choices"][0]["text"] == complete(colocated.url, "Hi")["choices"][0]["text"]
    complete(pd.url, PROMPT, prefill="local")  # now the decode replica holds it ...
    again = complete(pd.url, PROMPT)  # ... so the cost model keeps it there
    assert again["usage"]["prompt_tokens_details"]["cached_tokens_by_tier"].get("device", 0) > 0
    assert pd_decisions(pd.url)["local"] >= before + 3

"""What one client may send: bounded metrics labels, body and metadata sizes, lease lengths, text that is
Unicode, API keys compared in constant time (issue 19, defects 4, 5 and 8)."""

from __future__ import annotations

import hmac
import json

import httpx
import pytest

from kvstrata.server.limits import ServerLimits
from tests.server.harness import serve
from tests.server.test_errors import assert_openai_error

KEY = {"Authorization": "Bearer k-alice"}


@pytest.fixture
def keyed(tiny_engine, tmp_path):
    from kvstrata.sessions import open_store

    store = open_store(tmp_path / "s.db")
    limits = ServerLimits(max_body_bytes=1 << 20, max_metadata_bytes=1000, max_lease_s=3600)
    with serve(tiny_engine, store, api_keys=["k-alice"], limits=limits) as srv:
        yield srv
    store.close()


def _labels(srv) -> set[str]:
    text = httpx.get(srv.url + "/metrics", headers=KEY).text
    return {line.split('route="')[1].split('"')[0] for line in text.splitlines()
            if line.startswith("kvstrata_http_requests_total{")}


def test_unmatched_paths_never_become_metric_labels(keyed):
    """Without a key, 300 distinct long paths (and odd methods): the label set stays the route templates."""
    with httpx.Client() as c:
        for i in range(300):
            r = c.request("GET" if i % 3 else "PROPFIND", keyed.url + f"/probe/{i}/" + "x" * 200)
            assert r.status_code in (401, 404, 405)
        c.post(keyed.url + "/v1/nothing/here", headers=KEY)
    labels = _labels(keyed)
    assert not any("probe" in x or "nothing" in x for x in labels), labels
    assert "unmatched" in labels and len(labels) < 10
    text = httpx.get(keyed.url + "/metrics", headers=KEY).text
    assert 'method="PROPFIND"' not in text and 'method="other"' in text


def test_a_body_over_the_limit_is_413_while_it_is_read(keyed):
    msgs = [{"role": "user", "content": "x" * (2 << 20)}]
    r = httpx.post(keyed.url + "/v1/chat/completions", json={"model": "tiny", "messages": msgs}, headers=KEY)
    err = assert_openai_error(r, 413, "request_too_large")
    assert "1048576 bytes" in err["message"] and "--max-body-bytes" in err["message"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'

    r = httpx.post(keyed.url + "/v1/chat/completions", content=chunks(),
                   headers={**KEY, "Content-Type": "application/json"})
    assert_openai_error(r, 413, "request_too_large")
    ok = httpx.post(keyed.url + "/v1/chat/completions", headers=KEY,
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_metadata_over_the_limit_is_400_and_nothing_is_stored(keyed):
    big = {"blob": "m" * 2000}
    r = httpx.post(keyed.url + "/v1/sessions", json={"metadata": big}, headers=KEY)
    err = assert_openai_error(r, 400, "invalid_request")
    assert err["param"] == "metadata" and "--max-metadata-bytes" in err["message"]
    assert httpx.get(keyed.url + "/v1/sessions", headers=KEY).json()["data"] == []
    s = httpx.post(keyed.url + "/v1/sessions", json={"metadata": {"small": 1}}, headers=KEY).json()
    assert_openai_error(httpx.post(keyed.url + f"/v1/sessions/{s['id']}/fork", json={"metadata": big}, headers=KEY), 400)
    r = httpx.post(keyed.url + "/v1/responses", json={"model": "tiny", "input": "hi", "metadata": big}, headers=KEY)
    assert_openai_error(r, 400, "invalid_request")


def test_lease_is_bounded(keyed):
    s = httpx.post(keyed.url + "/v1/sessions", json={}, headers=KEY).json()
    r = httpx.post(keyed.url + f"/v1/sessions/{s['id']}/park", json={"tier": "disk", "lease_s": 1e9}, headers=KEY)
    err = assert_openai_error(r, 400, "invalid_request")
    assert err["param"] == "lease_s" and "--max-lease-s" in err["message"]
    assert httpx.get(keyed.url + f"/v1/sessions/{s['id']}", headers=KEY).json()["state"] == "active"


LONE = '"a\\ud800b"'  # JSON text with a lone surrogate escape


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]}'),
    ("/v1/sessions", '{"messages": [{"role": "user", "content": %s}]}'),
    ("/v1/sessions", '{"metadata": {%s: 1}}'),
    ("/v1/responses", '{"model": "tiny", "max_output_tokens": 2, "input": %s}'),
    ("/v1/completions", '{"model": "tiny", "max_tokens": 2, "prompt": [%s]}'),
])
def test_lone_surrogates_are_400_not_500(keyed, path, body):
    r = httpx.post(keyed.url + path, content=(body % LONE).encode(), headers={**KEY, "Content-Type": "application/json"})
    err = assert_openai_error(r, 400, "invalid_request")
    assert "surrogate" in err["message"]
    raw = '{"messages": [{"role": "user", "content": "a'.encode() + b"\xed\xa0\x80" + b'"}]}'  # a raw surrogate
    assert "UTF-8" in assert_openai_error(
        httpx.post(keyed.url + path, content=raw, headers={**KEY, "Content-Type": "application/json"}), 400)["message"]
    pair = '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud83d\\ude80"}]}'
    ok = httpx.post(keyed.url + "/v1/chat/completions", content=pair.encode(),
                    headers={**KEY, "Content-Type": "application/json"})
    assert ok.status_code == 200  # a surrogate pair is a character
    assert httpx.get(keyed.url + "/health").json()["status"] == "ok"


def test_api_keys_are_compared_in_constant_time(keyed, monkeypatch):
    """Every configured key's hash is compared with hmac.compare_digest, for a right and a wrong key
    alike (a dictionary lookup returns sooner the sooner it misses), and the keys are not kept."""
    st = keyed.state
    assert "k-alice" not in json.dumps(st.api_keys)
    st.api_keys = st.api_keys + tuple(f"{i:064x}" for i in range(5))
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(a) or real(a, b))
    assert st.owner_for_key("k-alice") == st.api_keys[0]
    assert calls == list(st.api_keys)
    calls.clear()
    with pytest.raises(Exception, match="incorrect API key"):
        st.owner_for_key("k-mallory")
    assert calls == list(st.api_keys)


def test_limit_flags(tmp_path):
    import argparse

    from kvstrata.config import add_config_args, config_from_args
    from kvstrata.core import KvstrataError

    p = argparse.ArgumentParser()
    add_config_args(p, ServerLimits, "limits")
    lim = config_from_args(ServerLimits, p.parse_args(["--max-body-bytes", "2M", "--max-job-agents", "8",
                                                       "--max-lease-s", "60"]))
    assert (lim.max_body_bytes, lim.max_job_agents, lim.max_lease_s) == (2 << 20, 8, 60.0)
    assert config_from_args(ServerLimits, p.parse_args([])) == ServerLimits()
    with pytest.raises(KvstrataError, match="max-job-tasks"):
        config_from_args(ServerLimits, p.parse_args(["--max-job-tasks", "0"]))
    conf = tmp_path / "kvstrata.toml"  # one file for every section; a key no section knows is refused
    conf.write_text('max-job-agents = 4\nport = 9001\nmax_num_seqs = 8\n')
    from kvstrata.config import ServerConfig, add_engine_args, engine_config_from_args

    p2 = argparse.ArgumentParser()
    add_config_args(p2, ServerConfig, "server")
    add_config_args(p2, ServerLimits, "limits")
    add_engine_args(p2)
    a = p2.parse_args(["--config", str(conf), "--port", "9002"])
    assert config_from_args(ServerLimits, a).max_job_agents == 4 and engine_config_from_args(a).max_num_seqs == 8
    assert config_from_args(ServerConfig, a).port == 9002  # a flag wins over the file
    conf.write_text("max_jobs = 4\n")
    with pytest.raises(KvstrataError, match="unknown keys.*max_jobs"):
        config_from_args(ServerLimits, p2.parse_args(["--config", str(conf)]))


def test_a_message_far_longer_than_the_context_is_refused_before_tokenizing(keyed, monkeypatch):
    """A 0.9 MB message (under the body limit) on a 1,024-token model: 400 context_length_exceeded from
    its length alone; tokenizing it first cost 2 GB of RSS for 7.5 MB."""
    from kvstrata.tokenizer.tokenizer import Tokenizer

    seen = []
    real = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, *a, **kw: seen.append(len(text)) or
                        real(self, text, *a, **kw))
    long = "hello world " * 75_000
    for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": long}]}),
                       ("/v1/completions", {"model": "tiny", "prompt": long}),
                       ("/v1/responses", {"model": "tiny", "input": long})):
        err = assert_openai_error(httpx.post(keyed.url + path, json=body, headers=KEY, timeout=60), 400,
                                  "context_length_exceeded")
        assert "characters" in err["message"]
    assert not [n for n in seen if n > 100_000], seen

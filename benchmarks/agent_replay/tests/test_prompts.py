import pytest

from benchmarks.agent_replay import traces
from benchmarks.agent_replay.prompts import FIRST_ID, PromptBuilder, common_prefix
from benchmarks.agent_replay.traces import Request, Session

VOCAB = 49152


def _session(sid: str, ns: str, reqs: list[tuple[list[int], int, int]], block: int = 64) -> Session:
    return Session(id=sid, namespace=ns, block_tokens=block,
                   requests=tuple(Request(hash_ids=tuple(h), input_tokens=n, output_tokens=o, think_s=0.0)
                                  for h, n, o in reqs))


def test_equal_ids_give_equal_tokens_and_different_ids_differ():
    b = PromptBuilder(VOCAB, 1 / 16)
    a = _session("x/a", "x", [([1, 2, 3, 4], 4 * 64, 10)])
    c = _session("x/c", "x", [([1, 2, 9, 4], 4 * 64, 10)])
    other = _session("y/a", "y", [([1, 2, 3, 4], 4 * 64, 10)])  # same ids, another file's scope
    pa, pc, po = b.build(a, 0).ids, b.build(c, 0).ids, b.build(other, 0).ids
    assert len(pa) == len(pc) == 16
    assert pa[:8] == pc[:8] and pa[8:12] != pc[8:12] and pa[12:] == pc[12:]  # block 4 is equal, at the same place
    assert common_prefix(pa, po) < 4
    assert all(FIRST_ID <= t < VOCAB for t in pa + pc + po)
    assert PromptBuilder(VOCAB, 1 / 16).build(a, 0).ids == pa  # a fresh builder draws the same tokens
    assert PromptBuilder(VOCAB, 1 / 16, seed=1).build(a, 0).ids != pa


def test_lengths_scale_with_the_tail_and_outputs():
    b = PromptBuilder(VOCAB, 1 / 16)
    # 3 whole blocks (192 tokens) + 40 more: 232 / 16 = 14.5 -> 14 tokens, 12 from blocks and 2 of the request's own
    s = _session("x/a", "x", [([1, 2, 3], 232, 100), ([1, 2, 3, 5], 300, 7)])
    p0, p1 = b.build(s, 0), b.build(s, 1)
    assert (len(p0.ids), p0.max_tokens) == (14, 6) and (len(p1.ids), p1.max_tokens) == (19, 1)
    assert common_prefix(p0.ids, p1.ids) >= 12
    assert b.block_len(s) == 4 and PromptBuilder(VOCAB, 1.0).block_len(s) == 64
    with pytest.raises(ValueError):
        PromptBuilder(VOCAB, 0)


def test_prompt_and_output_are_cut_to_the_context():
    b = PromptBuilder(VOCAB, 1.0, context=100)
    p = b.build(_session("x/a", "x", [([1, 2], 128, 50)]), 0)
    assert len(p.ids) + p.max_tokens == 100 and p.max_tokens == 1 and p.capped
    q = b.build(_session("x/b", "x", [([1], 64, 30)]), 0)
    assert (len(q.ids), q.max_tokens, q.capped) == (64, 30, False)
    r = b.build(_session("x/c", "x", [([1], 64, 50)]), 0)
    assert (len(r.ids), r.max_tokens, r.capped) == (64, 36, True)


def _share(sessions, builder) -> tuple[float, float]:
    """Tokens each prompt shares with the previous prompt of its session: scaled, and at full scale from the ids."""
    got = full = tot_s = tot_f = 0
    for s in sessions:
        prev = None
        for i, r in enumerate(s.requests):
            p = builder.build(s, i).ids
            if prev is not None:
                got += common_prefix(prev[1], p)
                tot_s += len(p)
                full += s.block_tokens * common_prefix(prev[0], list(r.hash_ids))
                tot_f += r.input_tokens
            prev = (list(r.hash_ids), p)
    return got / tot_s, full / tot_f


def test_scaling_keeps_the_sharing_of_real_sessions():
    try:
        sessions = traces.load("claude-code", 12, max_requests=30)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    scaled, full = _share(sessions, PromptBuilder(VOCAB, 1 / 16))
    assert full > 0.8  # the traces' own claim: most of each prompt is the previous one
    assert scaled == pytest.approx(full, abs=0.01)

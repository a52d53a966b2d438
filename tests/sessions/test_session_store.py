"""The SessionStore contract, run against SQLite and PostgreSQL alike (the `store` fixture)."""

from __future__ import annotations

import hashlib

import pytest

from kvstrata.core import KvstrataError, RequestClass, chain_keys
from kvstrata.sessions import (
    ANY_OWNER,
    InvalidTransition,
    ResponseNotFound,
    SessionNotFound,
    SessionState,
    VersionConflict,
    hash_api_key,
)

ALICE, BOB = hash_api_key("sk-alice"), hash_api_key("sk-bob")

# An agent turn as the OpenAI chat API writes it: an assistant tool call and its result.
TOOL_TURN = [
    {"role": "user", "content": "What is the weather in Zürich? ☀"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21.5, \"sky\": \"clear\"}"},
]  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def keys_for(token_ids, block_size=4):
    return chain_keys(token_ids, block_size, "test-model")


def test_create_and_get_roundtrip(store):
    tokens = list(range(100, 117))
    s = store.create_session(
        owner=ALICE, messages=TOOL_TURN, token_ids=tokens, block_keys=keys_for(tokens),
        system_prompt="You are terse.", tools=TOOLS, request_class=RequestClass.BATCH,
        metadata={"agent": "weather", "n": 3},
    )  # fmt: skip
    assert s.id.startswith("sess_") and len(s.id) >= 30
    got = store.get_session(s.id, owner=ALICE)
    assert got.messages == TOOL_TURN
    assert got.token_ids == tokens and got.num_tokens == 17
    assert got.block_keys == keys_for(tokens) and got.num_blocks == 4
    assert (got.system_prompt, got.tools, got.metadata) == ("You are terse.", TOOLS, {"agent": "weather", "n": 3})
    assert got.request_class == RequestClass.BATCH and got.state == SessionState.ACTIVE
    assert got.version == 1 and got.parent_id is None and got.owner == ALICE
    info = store.get_session_info(s.id, owner=ALICE)
    assert (info.num_messages, info.num_tokens, info.version) == (3, 17, 1)
    got.messages.append({"role": "user", "content": "mutating a copy"})
    assert store.get_session(s.id, owner=ALICE).num_messages == 3


def test_ids_are_unguessable_and_distinct(store):
    ids = {store.create_session(owner=None).id for _ in range(20)}
    assert len(ids) == 20


def test_unknown_session_raises_not_found(store):
    with pytest.raises(SessionNotFound) as e:
        store.get_session("sess_nope", owner=ANY_OWNER)
    assert isinstance(e.value, KvstrataError) and "sess_nope" in str(e.value)
    for call in (
        lambda: store.get_session_info("sess_nope", owner=None),
        lambda: store.append("sess_nope", owner=None, expected_version=1),
        lambda: store.set_state("sess_nope", SessionState.CLOSED, owner=None),
        lambda: store.fork_session("sess_nope", owner=None),
        lambda: store.delete_session("sess_nope", owner=None),
        lambda: store.put_response("sess_nope", owner=None, turn=0, output=[]),
        lambda: store.record_tool_call_start("sess_nope", "c", "f", {}),
    ):
        with pytest.raises(SessionNotFound):
            call()


def test_owner_mismatch_behaves_as_not_found(store):
    s = store.create_session(owner=ALICE, messages=TOOL_TURN[:1])
    calls = {
        "get": lambda o: store.get_session(s.id, owner=o),
        "info": lambda o: store.get_session_info(s.id, owner=o),
        "append": lambda o: store.append(s.id, owner=o, expected_version=1, messages=TOOL_TURN[1:]),
        "state": lambda o: store.set_state(s.id, SessionState.PARKED, owner=o),
        "lease": lambda o: store.set_lease(s.id, owner=o, lease_expires_at=5.0),
        "meta": lambda o: store.update_metadata(s.id, {"x": 1}, owner=o),
        "fork": lambda o: store.fork_session(s.id, owner=o),
        "response": lambda o: store.put_response(s.id, owner=o, turn=0, output=[]),
        "delete": lambda o: store.delete_session(s.id, owner=o),
    }
    for name, call in calls.items():
        for other in (BOB, None):
            with pytest.raises(SessionNotFound) as e:
                call(other)
            # the same message as for an id that never existed: existence does not leak
            assert str(e.value) == str(SessionNotFound(s.id)), name
    assert store.list_sessions(owner=BOB).items == []
    with pytest.raises(SessionNotFound):
        store.list_sessions(owner=BOB, after=s.id)
    got = store.get_session(s.id, owner=ALICE)  # nothing above changed it
    assert got.version == 1 and got.messages == TOOL_TURN[:1] and got.state == SessionState.ACTIVE


def test_append_is_versioned(store):
    s = store.create_session(owner=None, messages=TOOL_TURN[:1], token_ids=[1, 2, 3])
    info = store.append(s.id, owner=None, expected_version=1, messages=TOOL_TURN[1:2], token_ids=[4, 5],
                        block_keys=keys_for([1, 2, 3, 4]), new_state=SessionState.WAITING_ON_TOOL)  # fmt: skip
    assert (info.version, info.num_messages, info.num_tokens, info.state) == (2, 2, 5, SessionState.WAITING_ON_TOOL)
    with pytest.raises(VersionConflict) as e:  # a writer that read version 1 is now stale
        store.append(s.id, owner=None, expected_version=1, messages=TOOL_TURN[2:], token_ids=[9])
    assert (e.value.expected, e.value.actual) == (1, 2)
    got = store.get_session(s.id, owner=None)
    assert got.messages == TOOL_TURN[:2] and got.token_ids == [1, 2, 3, 4, 5] and got.version == 2
    store.append(s.id, owner=None, expected_version=2, messages=TOOL_TURN[2:], token_ids=[6],
                 new_state=SessionState.ACTIVE)  # fmt: skip
    got = store.get_session(s.id, owner=None)
    assert got.messages == TOOL_TURN and got.token_ids == [1, 2, 3, 4, 5, 6] and got.version == 3
    assert got.block_keys == keys_for([1, 2, 3, 4])


def test_append_cuts_diverging_tokens_and_keys(store):
    first = list(range(10))
    s = store.create_session(owner=None, token_ids=first, block_keys=keys_for(first))  # 2 blocks of 4
    rerendered = first[:6] + [60, 61, 62, 63]  # the template rendered the tail differently
    store.append(s.id, owner=None, expected_version=1, token_ids=rerendered[6:], keep_tokens=6,
                 block_keys=keys_for(rerendered)[1:], keep_blocks=1)  # fmt: skip
    got = store.get_session(s.id, owner=None)
    assert got.token_ids == rerendered and got.block_keys == keys_for(rerendered)
    with pytest.raises(KvstrataError, match="exceed"):
        store.append(s.id, owner=None, expected_version=2, keep_tokens=11)
    assert store.get_session_info(s.id, owner=None).version == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(messages=[{"content": "no role"}]), "role"),
        (dict(messages={"role": "user"}), "list"),
        (dict(token_ids=[1, -2]), "token ids"),
        (dict(token_ids=[2**31]), "token ids"),
        (dict(token_ids=["7"]), "token ids"),
        (dict(block_keys=[b"short"]), "32 bytes"),
        (dict(messages=[{"role": "user", "content": float("nan")}]), "JSON"),
        (dict(keep_tokens=-1), "keep_tokens"),
        (dict(new_state="sleeping"), "new_state"),
    ],
)
def test_append_rejects_bad_input_and_changes_nothing(store, bad, match):
    s = store.create_session(owner=None, messages=TOOL_TURN[:1], token_ids=[1])
    with pytest.raises(KvstrataError, match=match):
        store.append(s.id, owner=None, expected_version=1, **bad)
    got = store.get_session(s.id, owner=None)
    assert (got.version, got.messages, got.token_ids) == (1, TOOL_TURN[:1], [1])


def test_state_machine(store):
    s = store.create_session(owner=None)
    v = store.park(s.id, owner=None, tier="disk", lease_expires_at=1000.0).version
    info = store.get_session_info(s.id, owner=None)
    assert (info.state, info.parked_tier, info.lease_expires_at, v) == (SessionState.PARKED, "disk", 1000.0, 2)
    info = store.set_state(s.id, SessionState.ACTIVE, owner=None, parked_tier=None, expected_version=2)
    assert (info.state, info.parked_tier, info.lease_expires_at) == (SessionState.ACTIVE, None, 1000.0)
    with pytest.raises(VersionConflict):
        store.set_state(s.id, SessionState.PARKED, owner=None, expected_version=2)
    info = store.set_state(s.id, SessionState.CLOSED, owner=None)
    assert (info.state, info.lease_expires_at, info.parked_tier) == (SessionState.CLOSED, None, None)
    # closed is terminal: no generation (append), no state change, no lease
    with pytest.raises(InvalidTransition, match="closed"):
        store.append(s.id, owner=None, expected_version=info.version, messages=TOOL_TURN[:1])
    for st in SessionState:
        with pytest.raises(InvalidTransition):
            store.set_state(s.id, st, owner=None)
    with pytest.raises(InvalidTransition):
        store.set_lease(s.id, owner=None, lease_expires_at=5.0)
    assert store.get_session(s.id, owner=None).messages == []
    with pytest.raises(KvstrataError, match="state must be one of"):
        store.set_state(s.id, "sleeping", owner=None)


def test_lease_and_expiry_query(store):
    a = store.create_session(owner=ALICE)
    b = store.create_session(owner=BOB)
    c = store.create_session(owner=None)
    d = store.create_session(owner=None)
    store.park(a.id, owner=ALICE, tier="host", lease_expires_at=100.0)
    store.set_lease(b.id, owner=BOB, lease_expires_at=50.0)
    store.set_lease(c.id, owner=None, lease_expires_at=200.0)
    store.set_lease(d.id, owner=None, lease_expires_at=10.0)
    store.set_state(d.id, SessionState.CLOSED, owner=None)  # closed: never reported
    assert [s.id for s in store.sessions_expired_leases(100.0)] == [b.id, a.id]  # earliest first, all owners
    assert [s.id for s in store.sessions_expired_leases(99.9)] == [b.id]
    assert [s.id for s in store.sessions_expired_leases(1e9, limit=1)] == [b.id]
    store.set_lease(b.id, owner=BOB, lease_expires_at=None)
    assert [s.id for s in store.sessions_expired_leases(1e9)] == [a.id, c.id]


def test_list_paginates_filters_and_separates_owners(store):
    mine = [store.create_session(owner=ALICE, metadata={"i": i}).id for i in range(7)]
    theirs = [store.create_session(owner=BOB).id for _ in range(2)]
    anon = store.create_session(owner=None).id
    store.set_state(mine[2], SessionState.PARKED, owner=ALICE)
    store.set_state(mine[5], SessionState.PARKED, owner=ALICE)
    seen, after = [], None
    while True:
        page = store.list_sessions(owner=ALICE, limit=3, after=after)
        seen += [s.id for s in page.items]
        if not page.has_more:
            break
        after = page.next_after
    assert seen == mine
    desc = store.list_sessions(owner=ALICE, limit=100, order="desc").items
    assert [s.id for s in desc] == mine[::-1]
    assert [s.id for s in store.list_sessions(owner=ALICE, state=SessionState.PARKED).items] == [mine[2], mine[5]]
    assert [s.id for s in store.list_sessions(owner=BOB).items] == theirs
    assert [s.id for s in store.list_sessions(owner=None).items] == [anon]
    assert len(store.list_sessions(owner=ANY_OWNER, limit=100).items) == 10
    for bad in (dict(limit=0), dict(limit=1001), dict(order="up")):
        with pytest.raises(KvstrataError):
            store.list_sessions(owner=ALICE, **bad)


def test_fork_copies_history_and_leaves_source(store):
    tokens = list(range(12))
    src = store.create_session(owner=ALICE, messages=TOOL_TURN[:2], token_ids=tokens, block_keys=keys_for(tokens),
                               system_prompt="sys", tools=TOOLS, metadata={"a": 1})  # fmt: skip
    store.park(src.id, owner=ALICE, tier="disk", lease_expires_at=99.0)
    f = store.fork_session(src.id, owner=ALICE, metadata={"b": 2})
    assert f.id != src.id and f.parent_id == src.id and f.version == 1 and f.state == SessionState.ACTIVE
    got = store.get_session(f.id, owner=ALICE)
    assert got.messages == TOOL_TURN[:2] and got.token_ids == tokens and got.block_keys == keys_for(tokens)
    assert (got.system_prompt, got.tools, got.metadata) == ("sys", TOOLS, {"a": 1, "b": 2})
    assert (got.lease_expires_at, got.parked_tier, got.owner) == (None, None, ALICE)
    assert got.messages == f.messages
    store.append(f.id, owner=ALICE, expected_version=1, messages=TOOL_TURN[2:], token_ids=[99])
    src_now = store.get_session(src.id, owner=ALICE)
    assert src_now.messages == TOOL_TURN[:2] and src_now.token_ids == tokens and src_now.version == 2
    store.delete_session(src.id, owner=ALICE)
    assert store.get_session(f.id, owner=ALICE).messages == TOOL_TURN  # forks outlive their parent


def test_metadata_merge(store):
    s = store.create_session(owner=None, metadata={"keep": 1, "drop": 2})
    info = store.update_metadata(s.id, {"drop": None, "new": [1, 2]}, owner=None, expected_version=1)
    assert info.metadata == {"keep": 1, "new": [1, 2]} and info.version == 2
    assert store.get_session(s.id, owner=None).metadata == {"keep": 1, "new": [1, 2]}
    with pytest.raises(VersionConflict):
        store.update_metadata(s.id, {"x": 1}, owner=None, expected_version=1)


def test_responses_continue_a_session(store):
    s = store.create_session(owner=ALICE, messages=TOOL_TURN[:1])
    output = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}]
    usage = {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15}
    r = store.put_response(s.id, owner=ALICE, turn=0, output=output, usage=usage)
    assert r.id.startswith("resp_")
    got = store.get_response(r.id, owner=ALICE)
    assert (got.session_id, got.turn, got.output, got.usage) == (s.id, 0, output, usage)
    with pytest.raises(ResponseNotFound) as e:
        store.get_response(r.id, owner=BOB)
    assert str(e.value) == str(ResponseNotFound(r.id))
    with pytest.raises(ResponseNotFound):
        store.get_response("resp_unknown", owner=ALICE)
    store.delete_session(s.id, owner=ALICE)
    with pytest.raises(ResponseNotFound):  # deleted with its session
        store.get_response(r.id, owner=ALICE)


def test_delete_cascades(store):
    s = store.create_session(owner=None, messages=TOOL_TURN)
    store.record_tool_call_start(s.id, "call_1", "get_weather", {"city": "Zürich"})
    store.delete_session(s.id, owner=None)
    with pytest.raises(SessionNotFound):
        store.get_session(s.id, owner=None)
    assert store.get_tool_call(s.id, "call_1") is None
    s2 = store.create_session(owner=None)  # the store still works and lists only the live one
    assert [x.id for x in store.list_sessions(owner=None).items] == [s2.id]


def test_create_rejects_bad_input(store):
    for bad in (dict(owner=ANY_OWNER), dict(owner=5), dict(owner=None, request_class="urgent"),
                dict(owner=None, metadata=[1]), dict(owner=None, tools={1, 2}),
                dict(owner=None, block_keys=[hashlib.sha256().digest()[:31]])):  # fmt: skip
        with pytest.raises(KvstrataError):
            store.create_session(**bad)
    assert store.list_sessions(owner=ANY_OWNER).items == []

"""What the ingress hands a replica (`ForwardRequest`) and what the router reads of it (`RouteHints`),
and how the ingress computes the hints from a request.

A request's affinity keys name what it continues: `/v1/sessions/{id}/...`, `previous_response_id`,
`conversation`, `prompt_cache_key`, an `X-Session-Id` header, `/v1/jobs/{id}`. The ingress remembers
which replica served each key last (`AffinityTable`, also fed with the session / response / job ids
found at the start of each reply), and for a request with a prompt it knows before the replica
renders it (chat and completions; a session's stored token ids) it asks the KV index how many
leading tokens each replica holds in device memory.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kvstrata.core import chain_keys


@dataclass
class RouteHints:
    affinity: str | None = None  # replica id that holds (served last) the request's session
    affinity_key: str | None = None
    prefix: dict[str, int] = field(default_factory=dict)  # replica id -> prompt tokens in its device pool
    prompt_tokens: int = 0


@dataclass
class ForwardRequest:
    """One HTTP request as the ingress received it, for a replica's in-process app."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    route: RouteHints = field(default_factory=RouteHints)
    prefill_ids: list[int] | None = None  # a prompt a prefill replica put in the shared tier (cluster/pd.py)


_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)(?:/([a-z]+))?/?$")
_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)")
_REPLY_IDS = re.compile(rb'"(session_id|id)"\s*:\s*"((?:sess|resp|job)_[A-Za-z0-9_-]+)"')
_KIND = {b"sess": "session", b"resp": "response", b"job": "job"}


def affinity_keys(path: str, headers: dict[str, str], body: dict[str, Any] | None) -> list[str]:
    """The request's affinity keys, most specific first."""
    keys = []
    m = _SESSION_PATH.match(path)
    if m:
        keys.append("session:" + m.group(1))
    m = _JOB_PATH.match(path)
    if m:
        keys.append("job:" + m.group(1))
    b = body or {}
    if isinstance(b.get("previous_response_id"), str):
        keys.append("response:" + b["previous_response_id"])
    conv = b.get("conversation")
    conv = conv.get("id") if isinstance(conv, dict) else conv
    if isinstance(conv, str):
        keys.append("conversation:" + conv)
    if isinstance(b.get("prompt_cache_key"), str):
        keys.append("prompt_cache_key:" + b["prompt_cache_key"])
    if headers.get("x-session-id"):
        keys.append("header:" + headers["x-session-id"])
    return keys


def reply_keys(first_chunk: bytes) -> list[str]:
    """Affinity keys named at the start of a reply: its session, response or job ids."""
    out = []
    for _, ident in _REPLY_IDS.findall(first_chunk[:65536]):
        kind = _KIND[ident.split(b"_", 1)[0]]
        out.append(f"{kind}:{ident.decode()}")
    return out


class AffinityTable:
    """key -> the replica that served it last (an LRU of `capacity` keys; per ingress)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._d: OrderedDict[str, str] = OrderedDict()
        self.capacity = capacity

    def get(self, keys: Sequence[str]) -> tuple[str | None, str | None]:
        for k in keys:
            r = self._d.get(k)
            if r is not None:
                self._d.move_to_end(k)
                return r, k
        return None, None

    def put(self, keys: Sequence[str], replica: str) -> None:
        for k in keys:
            self._d[k] = replica
            self._d.move_to_end(k)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)


def json_body(headers: dict[str, str], body: bytes) -> dict[str, Any] | None:
    if not body or "json" not in headers.get("content-type", "application/json"):
        return None
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the replica answers it with a 400
    return d if isinstance(d, dict) else None


def prompt_ids(path: str, body: dict[str, Any] | None, tokenizer, session_ids: Callable[[str], list[int] | None],
               keys: Sequence[str]) -> list[int]:
    """The prompt's token ids as far as the ingress can know them without the replica: a chat or
    completion prompt rendered as the server renders it, a session's stored ids. [] when unknown or
    malformed (the replica reports the error)."""
    from kvstrata.server import chat_format as cf

    b = body or {}
    try:
        if path == "/v1/chat/completions" and isinstance(b.get("messages"), list):
            tools, choice = cf.check_tools(b.get("tools"), b.get("tool_choice"))
            text = cf.render(tokenizer, cf.messages_to_dicts(b["messages"]), tools, choice)
            return tokenizer.encode(text, add_special_tokens=False)
        if path == "/v1/completions":
            p = b.get("prompt")
            if isinstance(p, list) and p and isinstance(p[0], (str, list)):
                p = p[0]
            if isinstance(p, str):
                return tokenizer.encode(p)
            if isinstance(p, list) and all(isinstance(t, int) for t in p):
                return list(p)
            return []
    except Exception:  # noqa: BLE001 - a request the replica will reject; route it anywhere
        return []
    for k in keys:
        if k.startswith("session:"):
            return session_ids(k.split(":", 1)[1]) or []
    return []


def prefix_hint(index, ids: Sequence[int], block_size: int, fingerprint: str) -> dict[str, int]:
    """Per replica, the prompt tokens its device pool holds (leading whole blocks)."""
    keys = chain_keys(ids, block_size, fingerprint)
    return {r: n * block_size for r, n in index.match(keys).items()} if keys else {}

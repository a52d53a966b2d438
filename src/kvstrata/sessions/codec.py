"""How session fields are laid out in the database: token ids and block keys as packed bytes, JSON
as compact text. Validation of what callers hand in lives here too, so both backends reject the same
input with the same message."""

from __future__ import annotations

import json
import math
import sys
from array import array
from typing import Any, Sequence, overload

from kvstrata.core import BLOCK_KEY_BYTES, KvstrataError

_MAX_TOKEN = 2**31 - 1
TOKEN_BYTES = 4  # int32 little-endian per token id


def encode_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids -> int32 little-endian bytes (4 per id). Rejects anything outside 0..2**31-1."""
    try:
        a = array("i", token_ids)  # OverflowError beyond int32; TypeError for non-ints
    except (OverflowError, TypeError) as e:
        raise KvstrataError(f"token ids must be integers in 0..{_MAX_TOKEN}: {e}") from None
    assert a.itemsize == TOKEN_BYTES
    if len(a) and min(a) < 0:
        raise KvstrataError(f"token ids must be integers in 0..{_MAX_TOKEN}, got {min(a)}")
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def decode_tokens(data: bytes) -> list[int]:
    a = array("i")
    a.frombytes(bytes(data))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def encode_keys(keys: Sequence[bytes]) -> bytes:
    """Block keys -> their concatenation (32 bytes each)."""
    out = bytearray()
    for i, k in enumerate(keys):
        if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != BLOCK_KEY_BYTES:
            raise KvstrataError(
                f"block key {i} must be {BLOCK_KEY_BYTES} bytes (kvstrata.core.block_key), got {k!r:.60}"
            )
        out += k
    return bytes(out)


def decode_keys(data: bytes) -> list[bytes]:
    data = bytes(data)
    assert len(data) % BLOCK_KEY_BYTES == 0, "corrupt block key column"
    return [data[i : i + BLOCK_KEY_BYTES] for i in range(0, len(data), BLOCK_KEY_BYTES)]


def dumps(value: Any, what: str) -> str:
    """JSON text of `value`; NaN / Infinity are refused (PostgreSQL and most clients reject them)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise KvstrataError(f"{what} must be JSON-serialisable (no NaN or Infinity): {e}") from None


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def check_messages(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Each message must be a dict with a string `role`; returns their JSON texts."""
    if isinstance(messages, (str, bytes, dict)):
        raise KvstrataError("messages must be a list of message dicts, not a single value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise KvstrataError(
                f"message {i} must be a dict with a string 'role' (OpenAI chat format), got {m!r:.80}"
            )
        out.append(dumps(m, f"message {i}"))
    return out


@overload
def check_time(value: float, what: str) -> float: ...
@overload
def check_time(value: None, what: str) -> None: ...
def check_time(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KvstrataError(f"{what} must be a finite number of unix seconds or None, got {value!r}")
    return float(value)


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise KvstrataError(f"limit must be an integer in 1..1000, got {limit!r}")
    return limit


def check_count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KvstrataError(f"{what} must be an integer >= 0, got {value!r}")
    return value


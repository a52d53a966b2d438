"""Prefill/decode disaggregation: where a prompt is prefilled and how its KV reaches the decode replica.

    ingress: decode replica chosen (router) -> choose(): local, or remote with a transport
    remote:  a prefill replica computes the prompt's KV (one greedy token, discarded), then
             shared-tier:  waits until write-behind has put every full block in the shared Redis tier;
                           the decode replica's prefix match loads them from there, each verified
             object-store: returns the prompt's full blocks encoded (the tier codec, raw); Ray moves
                           them through its object store straight to the decode replica, which verifies
                           and imports them into its pool before running the request (`import_blocks`)
    decode:  the decode replica reads (shared tier) or decodes (object store) and verifies the blocks off
             its engine thread, copies them into its pool a few blocks per engine call, between decode
             steps (so the streams decoding there are not stalled by one large copy), then runs the
             request as any other; its prefix match finds the blocks

`choose` asks the cost model (sched/placement.py `prefill_choice`): prefilling N uncached tokens
locally costs their prefill FLOPs at this machine's compute rate, on the decode replica's step loop
(where it stalls every stream decoding there); a handover costs the bytes over the transport's
bandwidth plus a fixed round trip. Short prompts and prompts whose prefix the decode replica already
holds have few uncached tokens and stay local.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from kvstrata.core import chain_keys

log = logging.getLogger(__name__)

TRANSPORTS = ("shared-tier", "object-store")


def export_blocks(e, ids: Sequence[int]) -> list[tuple[bytes, list[int], bytes]]:
    """(Engine thread, prefill replica.) The full blocks of `ids` its pool holds, in chain order, encoded
    with the tier codec (raw: header, token ids, CRCs), stopping at the first one it lacks."""
    from kvstrata.tiers import codec

    bs, out = e.pool.block_size, []
    for i, key in enumerate(chain_keys(ids, bs, e.fingerprint)):
        b = e.pool.key_to_block.get(key)
        if b is None:
            break
        toks = list(ids[i * bs : (i + 1) * bs])
        out.append((key, toks, codec.encode(e.pool.block_payload(b), key=key, token_ids=toks,
                                            fingerprint=e.fingerprint, codec="raw")))
    return out


Handed = tuple[bytes | None, bytes, list[int], Any]  # (parent key, key, token ids, verified payload)


def decode_blocks(fingerprint: str, blocks: Sequence[tuple[bytes, list[int], bytes]]) -> list[Handed]:
    """(Any thread, decode replica.) Verify handed-over blocks (fingerprint, key, token ids, CRCs) and
    decode them, in chain order, stopping at the first bad one (the rest of the prompt is computed)."""
    from kvstrata.tiers import codec

    out, parent = [], None
    for key, toks, blob in blocks:
        try:
            out.append((parent, key, list(toks), codec.decode(blob, fingerprint, key, toks)))
        except codec.CorruptBlockError as err:
            log.warning("handed-over block rejected (%s); the rest of the prompt is computed", err.reason)
            break
        parent = key
    return out


def fetch_blocks(stack, fingerprint: str, ids: Sequence[int], block_size: int, held) -> list[Handed]:
    """(Any thread, decode replica.) The prompt's full blocks from the tier stack (each load verified),
    in chain order, stopping at the first miss; blocks `held` (a container of keys: the pool) get a
    None payload instead of being read."""
    out, parent = [], None
    for i, key in enumerate(chain_keys(ids, block_size, fingerprint)):
        toks = list(ids[i * block_size : (i + 1) * block_size])
        payload = None if key in held else stack.load(key, toks)
        if payload is None and key not in held:
            break
        out.append((parent, key, toks, payload))
        parent = key
    return out


def place_blocks(e, blocks: Sequence[Handed], listeners: Sequence[Any] = ()) -> int:
    """(Engine thread, decode replica.) Copy verified blocks into the pool as cached blocks (the request's
    prefix match takes them); blocks the pool already holds are skipped. Returns the tokens placed."""
    n = 0
    for parent, key, toks, payload in blocks:
        if payload is None or key in e.pool.key_to_block:
            continue
        if e.pool.num_available == 0:
            break
        b = e.pool.allocate()
        e.pool.load_payload(b, payload)
        e.pool.register(b, key, toks)
        e.pool.release(b)  # cached, unreferenced
        n += len(toks)
        for listener in listeners:
            listener.stored([key], parent, toks)
    return n


def import_blocks(e, blocks: Sequence[tuple[bytes, list[int], bytes]], listeners: Sequence[Any] = ()) -> int:
    """decode_blocks then place_blocks, all on the calling (engine) thread; tokens placed."""
    return place_blocks(e, decode_blocks(e.fingerprint, blocks), listeners)

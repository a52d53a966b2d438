"""Prefill/decode disaggregation: where a prompt is prefilled and how its KV reaches the decode replica.

    ingress: decode replica chosen (router) -> choose(): local, or remote with a transport
    remote:  a prefill replica computes the prompt's KV (one greedy token, discarded), then
             shared-tier:  waits until write-behind has put every full block in the shared Redis tier;
                           the decode replica's prefix match loads them from there, each verified
             object-store: returns the prompt's full blocks encoded (the tier codec, raw); Ray moves
                           them through its object store straight to the decode replica, which verifies
                           and imports them into its pool before running the request (`import_blocks`)
    decode:  the decode replica runs the request as any other; its prefix match finds the blocks

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
        out.append((key, toks, codec.encode(e.pool.block_payload(b).cpu(), key=key, token_ids=toks,
                                            fingerprint=e.fingerprint, codec="raw")))
    return out


def import_blocks(e, blocks: Sequence[tuple[bytes, list[int], bytes]], listeners: Sequence[Any] = ()) -> int:
    """(Engine thread, decode replica.) Verify each handed-over block (fingerprint, key, token ids, CRCs)
    and load it into the pool as a cached block; stops at the first bad or unplaceable one (the rest is
    computed). Returns the tokens imported."""
    from kvstrata.tiers import codec

    n, parent = 0, None
    for key, toks, blob in blocks:
        if key not in e.pool.key_to_block:
            if e.pool.num_available == 0:
                break
            try:
                payload = codec.decode(blob, e.fingerprint, key, toks)
            except codec.CorruptBlockError as err:
                log.warning("handed-over block rejected (%s); the rest of the prompt is computed", err.reason)
                break
            b = e.pool.allocate()
            e.pool.load_payload(b, payload)
            e.pool.register(b, key, toks)
            e.pool.release(b)  # cached, unreferenced: the request's prefix match takes it
            n += len(toks)
            for listener in listeners:
                listener.stored([key], parent, toks)
        parent = key
    return n

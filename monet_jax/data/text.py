"""The embedded default corpus, so the default run needs no downloads, and a byte-level packing helper.

The byte tokenizer lives in :mod:`monet_jax.data.tokenizer`; it is re-exported here for older callers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monet_jax.data.tokenizer import BOS, BYTE_VOCAB, EOS, OFFSET, PAD, decode, encode

__all__ = ["BOS", "BYTE_VOCAB", "EOS", "OFFSET", "PAD", "decode", "embedded_corpus", "encode", "pack"]

PACKAGE = Path(__file__).resolve().parent.parent


def embedded_documents() -> list[tuple[str, str]]:
    """``(key, text)`` of every document of the embedded corpus: English prose shipped with the package (a line,
    keyed by its text) and the package's own Python source (a file, keyed by its path in the package). The keys
    choose the held-out documents, so a file added, removed or edited leaves every other document's split alone
    (:func:`monet_jax.data.pipeline.split_indices`)."""
    prose = (PACKAGE / "data" / "corpus" / "prose.txt").read_text().split("\n")
    code = [(p.relative_to(PACKAGE).as_posix(), p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]
    return [(k, d) for k, d in [(f"prose:{line}", line) for line in prose] + code if d.strip()]


def embedded_corpus() -> list[str]:
    """The embedded corpus's documents (:func:`embedded_documents` without their keys)."""
    return [d for _, d in embedded_documents()]


def pack(documents: list[str]) -> np.ndarray:
    """One token stream: bos, document bytes, eos, for every document."""
    parts = [np.concatenate([[BOS], encode(d), [EOS]]).astype(np.int32) for d in documents]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

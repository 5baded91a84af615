"""The embedded default corpus, so the default run needs no downloads, plus the legacy window sampler.

The byte tokenizer lives in :mod:`monet_jax.data.tokenizer`; it is re-exported here for older callers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monet_jax.data.tokenizer import BOS, BYTE_VOCAB, EOS, OFFSET, PAD, decode, encode

__all__ = ["BOS", "BYTE_VOCAB", "EOS", "OFFSET", "PAD", "WindowSampler", "decode", "embedded_corpus", "encode",
           "pack", "read_documents"]

PACKAGE = Path(__file__).resolve().parent.parent


def embedded_corpus() -> list[str]:
    """English prose shipped with the package plus the package's own Python source."""
    prose = (PACKAGE / "data" / "corpus" / "prose.txt").read_text().split("\n")
    code = [p.read_text() for p in sorted(PACKAGE.rglob("*.py"))]
    return [d for d in prose + code if d.strip()]


def read_documents(path: str | Path) -> list[str]:
    """A text file (one document per blank-line-separated block) or a directory of .txt/.py files."""
    path = Path(path)
    if path.is_dir():
        docs = [p.read_text(errors="replace") for p in sorted(path.rglob("*")) if p.suffix in (".txt", ".py", ".md")]
    elif path.is_file():
        docs = path.read_text(errors="replace").split("\n\n")
    else:
        raise ValueError(f"data path not found: {path}")
    return [d for d in docs if d.strip()]


def pack(documents: list[str]) -> np.ndarray:
    """One token stream: bos, document bytes, eos, for every document."""
    parts = [np.concatenate([[BOS], encode(d), [EOS]]).astype(np.int32) for d in documents]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class WindowSampler:
    """Seeded random windows of ``seq_len + 1`` tokens from a packed stream."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"dataset too short: {len(tokens)} tokens for seq_len {seq_len}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> np.ndarray:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        return np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts])

    def sequential(self, max_batches: int):
        """Non-overlapping windows in order (for validation)."""
        n = (len(self.tokens) - 1) // self.seq_len
        rows = [self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1] for i in range(n)]
        rows = [r for r in rows if len(r) == self.seq_len + 1]
        for i in range(0, min(len(rows), max_batches * self.batch_size), self.batch_size):
            yield np.stack(rows[i:i + self.batch_size])

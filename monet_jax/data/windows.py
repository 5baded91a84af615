"""Documents to fixed-shape token rows for evaluation and expert statistics: every row holds one
document's window, so attention never crosses documents and every statistic can be traced back to
(document, position)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Rows:
    """One batch: ``ids`` / ``valid`` ``[rows, seq_len]``; ``doc`` and ``start`` say where each row comes from."""

    ids: np.ndarray    # int32, pad_id where not valid
    valid: np.ndarray  # bool, a real token
    doc: np.ndarray    # int64 [rows], -1 for filler rows of the last batch
    start: np.ndarray  # int64 [rows], offset of the row's first token in its document's token list

    @property
    def targets(self) -> np.ndarray:
        """bool ``[rows, seq_len]``: positions whose token is predicted from the row's earlier tokens."""
        t = self.valid.copy()
        t[:, 0] = False
        return t


def document_tokens(tokenizer, documents, max_tokens: int | None = None) -> list[np.ndarray]:
    """``bos + encode(text)`` per document (prompt/response pairs are joined), up to ``max_tokens`` in all."""
    out, total = [], 0
    for doc in documents:
        text = doc if isinstance(doc, str) else "".join(doc)
        ids = np.array([tokenizer.bos_id, *map(int, tokenizer.encode(text))], np.int32)
        if max_tokens is not None:
            ids = ids[: max(max_tokens - total, 0)]
        if ids.size > 1:
            out.append(ids)
            total += ids.size
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def rows(docs: list[np.ndarray], seq_len: int, batch_size: int, pad_id: int = 0) -> Iterator[Rows]:
    """Windows of ``seq_len`` tokens with a stride of ``seq_len - 1``, so every token but a document's
    first is predicted exactly once, with as much of its own document before it as fits."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    spans = [(d, s) for d, toks in enumerate(docs) for s in range(0, max(toks.size - 1, 1), seq_len - 1)]
    for b in range(0, len(spans), batch_size):
        ids = np.full((batch_size, seq_len), pad_id, np.int32)
        valid = np.zeros((batch_size, seq_len), bool)
        doc = np.full(batch_size, -1, np.int64)
        start = np.zeros(batch_size, np.int64)
        for r, (d, s) in enumerate(spans[b:b + batch_size]):
            window = docs[d][s:s + seq_len]
            ids[r, :window.size], valid[r, :window.size], doc[r], start[r] = window, True, d, s
        yield Rows(ids, valid, doc, start)


def count_batches(docs: list[np.ndarray], seq_len: int, batch_size: int) -> int:
    n = sum(len(range(0, max(t.size - 1, 1), seq_len - 1)) for t in docs)
    return -(-n // batch_size)

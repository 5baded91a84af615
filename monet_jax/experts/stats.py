"""Corpus statistics of composed experts, streamed batch by batch.

The score of composed expert ``(i, j)`` on a token is ``s_ij = sum_h g1_hi g2_hj``. Sums over tokens of
``s``, of ``s**2`` and of ``y * s`` are products of ``[tokens*H, E]`` matrices, so a batch costs a few
``E x E`` matmuls and the statistics one ``[E, E]`` table per group: no ``[tokens, E*E]`` array exists.
Frequencies (tokens on which ``s_ij > 0``) come from each token's active pairs, found with ``top_k``
on the sparse routing probabilities.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from monet_jax.data.windows import count_batches, document_tokens, rows
from monet_jax.model.pure import PureModel


def router_probs(model, ids_bt, valid_bt):
    """Per routing group ``(g1, g2)`` ``[b, t, H, E]`` of the inference-mode model."""
    return model(ids_bt, attention_mask=valid_bt.astype(jnp.int32), output_router_probs=True).router_probs


@jax.jit
def max_active(g_bthe):
    return jnp.max(jnp.sum(g_bthe > 0, axis=-1))


@jax.jit
def _mass(g1_bthi, g2_bthj, w_bt):
    """``sum_t w_t s_tij``: one ``[tokens*H, E]^T [tokens*H, E]`` product."""
    e = g1_bthi.shape[-1]
    a = (g1_bthi * w_bt[..., None, None]).reshape(-1, e)
    return a.T @ g2_bthj.reshape(-1, e)


@jax.jit
def _square_mass(g1_bthi, g2_bthj, w_bt):
    """``sum_t w_t s_tij**2 = sum_{h,h'} (g1_h g1_h')^T (g2_h g2_h')``."""
    e = g1_bthi.shape[-1]
    p1 = (g1_bthi[..., :, None, :] * g1_bthi[..., None, :, :] * w_bt[..., None, None, None]).reshape(-1, e)
    return p1.T @ (g2_bthj[..., :, None, :] * g2_bthj[..., None, :, :]).reshape(-1, e)


@partial(jax.jit, static_argnames="k")
def _frequency(g1_bthi, g2_bthj, valid_bt, k: int):
    """Tokens on which each ``(i, j)`` is active (``k`` >= the most experts active in any head)."""
    e = g1_bthi.shape[-1]
    v1, i1 = jax.lax.top_k(g1_bthi, k)
    v2, i2 = jax.lax.top_k(g2_bthj, k)
    ids = i1[..., :, None] * e + i2[..., None, :]  # [b, t, H, k, k]
    ids = jnp.where((v1[..., :, None] > 0) & (v2[..., None, :] > 0), ids, e * e).reshape(-1, ids[0, 0].size)
    ids = jnp.sort(ids, axis=-1)  # a pair active in several heads counts once per token
    first = jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=-1)
    keep = first & (ids < e * e) & valid_bt.reshape(-1, 1)
    return jnp.zeros(e * e + 1, jnp.int32).at[ids.reshape(-1)].add(keep.reshape(-1).astype(jnp.int32))[:-1]


@jax.jit
def expert_scores(g1_bthi, g2_bthj, i_n, j_n):
    """``[b, t, n]`` scores of the experts ``(i_n, j_n)``."""
    return jnp.einsum("bthn,bthn->btn", g1_bthi[..., i_n], g2_bthj[..., j_n])


def _pow2_at_least(n: int, cap: int) -> int:
    return min(cap, 1 << max(int(n) - 1, 0).bit_length())


@dataclass
class ExpertStats:
    """Sums over a corpus, per routing group ``g`` and composed expert ``i * E + j``."""

    experts: int
    tokens: int = 0
    mass: np.ndarray | None = None        # float64 [G, E*E]: sum of s
    frequency: np.ndarray | None = None   # int64 [G, E*E]: tokens with s > 0
    square: np.ndarray | None = None      # float64 [G, E*E]: sum of s**2 (with scores only)
    weighted: np.ndarray | None = None    # float64 [G, E*E]: sum of y * s (with scores only)
    y_sum: float = 0.0
    y_square: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        """Mean routing score per token."""
        return self.mass / max(self.tokens, 1)

    def pearson(self) -> np.ndarray:
        """Correlation over tokens of each expert's score with the token scores ``y`` (0 where either is constant)."""
        n = self.tokens
        cov = n * self.weighted - self.mass * self.y_sum
        var_s = np.maximum(n * self.square - self.mass**2, 0.0)
        var_y = max(n * self.y_square - self.y_sum**2, 0.0)
        den = np.sqrt(var_s * var_y)
        return np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)

    def save(self, path: str | Path) -> Path:
        arrays = {k: getattr(self, k) for k in ("mass", "frequency", "square", "weighted")
                  if getattr(self, k) is not None}
        np.savez_compressed(path, experts=self.experts, tokens=self.tokens, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ExpertStats:
        try:
            with np.load(path) as f:
                return cls(int(f["experts"]), int(f["tokens"]), f["mass"], f["frequency"],
                           f["square"] if "square" in f else None, f["weighted"] if "weighted" in f else None)
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"expert statistics {path}: not readable ({e})") from None


def corpus_stats(model, tokenizer, documents, *, seq_len: int = 128, batch_size: int = 8,
                 max_tokens: int | None = None, token_scores=None, desc: str = "experts") -> ExpertStats:
    """Stream ``documents`` through the model and sum each composed expert's routing score.

    ``token_scores``: optional per-document scores (a number for every token of the document, or a list
    with one number per token including the leading bos); then the sums for Pearson correlation are kept.
    """
    if not model.config.is_moe:
        raise ValueError("the dense baseline has no experts to inspect")
    probs_of = PureModel(model).jit(router_probs)
    e = model.config.moe_experts
    docs = document_tokens(tokenizer, documents, max_tokens)
    if not docs:
        raise ValueError("no tokens to compute expert statistics on")
    y_docs = None if token_scores is None else [_per_token(s, d.size) for s, d in zip(token_scores, docs, strict=False)]
    st = ExpertStats(e, meta={"documents": len(docs)})
    for batch in tqdm(rows(docs, seq_len, batch_size, tokenizer.pad_id), total=count_batches(docs, seq_len, batch_size),
                      desc=desc, unit="batch", leave=False):
        # each token is counted once: a window's first token is the previous window's last
        count = batch.valid & ~((batch.start > 0)[:, None] & (np.arange(seq_len) == 0)[None])
        probs = probs_of(jnp.asarray(batch.ids), jnp.asarray(batch.valid))
        w = jnp.asarray(count, jnp.float32)
        k = _pow2_at_least(max(int(max_active(g)) for pair in probs for g in pair), e)
        y = None
        if y_docs is not None:
            y = np.zeros(batch.ids.shape, np.float64)
            for r, (d, s) in enumerate(zip(batch.doc, batch.start, strict=True)):
                if d >= 0:
                    vals = y_docs[d][s:s + seq_len]
                    y[r, :vals.size] = vals
            y *= count
            st.y_sum += float(y.sum())
            st.y_square += float((y**2).sum())
        mass, freq, sq, wt = [], [], [], []
        for g1, g2 in probs:
            mass.append(np.asarray(_mass(g1, g2, w), np.float64).ravel())
            freq.append(np.asarray(_frequency(g1, g2, jnp.asarray(count), k), np.int64))
            if y is not None:
                sq.append(np.asarray(_square_mass(g1, g2, w), np.float64).ravel())
                wt.append(np.asarray(_mass(g1, g2, jnp.asarray(y, jnp.float32)), np.float64).ravel())
        st.tokens += int(count.sum())
        for name, vals in (("mass", mass), ("frequency", freq), ("square", sq), ("weighted", wt)):
            if vals:
                cur = getattr(st, name)
                setattr(st, name, np.stack(vals) if cur is None else cur + np.stack(vals))
    return st


def _per_token(score, n: int) -> np.ndarray:
    vals = np.broadcast_to(np.asarray(score, np.float64), (n,)) if np.ndim(score) == 0 else np.asarray(score, float)
    if vals.size != n:
        raise ValueError(f"a document has {n} tokens (with bos) but {vals.size} token scores")
    return vals


@dataclass(order=True)
class Context:
    score: float
    doc: int
    position: int


def top_contexts(model, tokenizer, documents, experts: list[tuple[int, int]], *, top: int = 5, seq_len: int = 128,
                 batch_size: int = 8, max_tokens: int | None = None):
    """The ``top`` highest-scoring tokens of each ``(group, expert id)`` over the corpus, best first, and
    the documents' token lists the contexts point into."""
    probs_of = PureModel(model).jit(router_probs)
    e = model.config.moe_experts
    docs = document_tokens(tokenizer, documents, max_tokens)
    heaps: dict[tuple[int, int], list[Context]] = {x: [] for x in experts}
    by_group: dict[int, list[int]] = {}
    for g, x in experts:
        by_group.setdefault(g, []).append(x)
    for batch in tqdm(rows(docs, seq_len, batch_size, tokenizer.pad_id), total=count_batches(docs, seq_len, batch_size),
                      desc="contexts", unit="batch", leave=False):
        probs = probs_of(jnp.asarray(batch.ids), jnp.asarray(batch.valid))
        count = batch.valid & ~((batch.start > 0)[:, None] & (np.arange(seq_len) == 0)[None])
        count[:, 0] = False  # a document's bos carries no content
        for g, ids in by_group.items():
            ids_n = np.asarray(ids)
            s = np.asarray(expert_scores(*probs[g], jnp.asarray(ids_n // e), jnp.asarray(ids_n % e)))
            s = np.where(count[..., None], s, -np.inf)
            for n, x in enumerate(ids):
                flat = s[..., n].ravel()
                best = np.argpartition(-flat, min(top, flat.size - 1))[:top]
                for f in best:
                    if flat[f] > 0:
                        r, t = divmod(int(f), seq_len)
                        item = Context(float(flat[f]), int(batch.doc[r]), int(batch.start[r]) + t)
                        heap = heaps[(g, x)]
                        (heapq.heappush if len(heap) < top else heapq.heappushpop)(heap, item)
    return {x: sorted(h, reverse=True) for x, h in heaps.items()}, docs


def describe_context(tokenizer, doc_tokens: np.ndarray, position: int, width: int = 24) -> tuple[str, str, str]:
    """(text before, the token, text after) around ``position`` of a document's token list."""
    before = tokenizer.decode(doc_tokens[max(position - width, 1):position].tolist())
    after = tokenizer.decode(doc_tokens[position + 1:position + 1 + width // 2].tolist())
    return before, tokenizer.decode([int(doc_tokens[position])]), after

"""Corpus statistics of composed experts, streamed batch by batch.

The score of composed expert ``(i, j)`` on a token is ``s_ij = sum_h g1_hi g2_hj``. Sums over tokens of
``s``, of ``s**2`` and of ``y * s`` are products of ``[tokens*H, E]`` matrices, so a batch costs a few
``E x E`` matmuls and the statistics one ``[E, E]`` table per group: no ``[tokens, E*E]`` array exists.
Frequencies (tokens on which ``s_ij > 0``) come from each token's active pairs, found with ``top_k``
on the sparse routing probabilities.
"""

from __future__ import annotations

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


def _frequency(g1_bthi, g2_bthj, valid_bt, k: int):
    """Tokens on which each ``(i, j)`` is active (``k`` >= the most experts active in any head): from each
    token's ``H * k * k`` active pairs, or, when that list would be longer than the ``E * E`` table (a
    well-trained router with many experts passing its threshold), from each token's table."""
    h, e = g1_bthi.shape[-2:]
    if h * k * k * max(1, (h * k * k).bit_length()) > 4 * e * e:
        return _frequency_table(g1_bthi, g2_bthj, valid_bt)
    return _frequency_pairs(g1_bthi, g2_bthj, valid_bt, k)


@partial(jax.jit, static_argnames="chunk")
def _frequency_table(g1_bthi, g2_bthj, valid_bt, chunk: int | None = None):
    """Sum over tokens of ``1[s_ij > 0]``, where ``s_tij > 0`` iff some head has both ``i`` and ``j`` active:
    a ``[H, E]^T [H, E]`` product of indicators per token, in chunks of tokens that bound the ``[n, E, E]``."""
    h, e = g1_bthi.shape[-2:]
    a = (g1_bthi > 0).reshape(-1, h, e).astype(jnp.float32)
    b = (g2_bthj > 0).reshape(-1, h, e).astype(jnp.float32) * valid_bt.reshape(-1, 1, 1)
    n = max(1, min(a.shape[0], chunk or (1 << 22) // (e * e)))
    pad = -a.shape[0] % n
    a, b = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))).reshape(-1, n, h, e) for x in (a, b))

    def chunk(total, ab):
        hits = jnp.einsum("nhi,nhj->nij", *ab) > 0
        return total + jnp.sum(hits, axis=0, dtype=jnp.int32), None

    total, _ = jax.lax.scan(chunk, jnp.zeros((e, e), jnp.int32), (a, b))
    return total.reshape(-1)


@partial(jax.jit, static_argnames="k")
def _frequency_pairs(g1_bthi, g2_bthj, valid_bt, k: int):
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
    """``[b, t, n]`` scores of the experts ``(i_n, j_n)``: a sum over the few heads, unrolled (XLA's CPU
    einsum of this shape, a dot with batch dimensions b, t, n, was 5x slower for 1,024 experts)."""
    a_bthn, b_bthn = jnp.take(g1_bthi, i_n, axis=-1), jnp.take(g2_bthj, j_n, axis=-1)
    return sum(a_bthn[:, :, h] * b_bthn[:, :, h] for h in range(a_bthn.shape[2]))


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


def routed_batches(model, docs: list[np.ndarray], *, seq_len: int, batch_size: int, pad_id: int, desc: str):
    """Yield ``(rows, count, probs)`` per batch of evaluation windows: ``count`` marks each token once (a window's
    first token is the previous window's last) and ``probs`` is each routing group's ``(g1, g2)``."""
    probs_of = PureModel(model).jit(router_probs)
    for batch in tqdm(rows(docs, seq_len, batch_size, pad_id), total=count_batches(docs, seq_len, batch_size),
                      desc=desc, unit="batch", leave=False):
        count = batch.valid & ~((batch.start > 0)[:, None] & (np.arange(seq_len) == 0)[None])
        yield batch, count, probs_of(jnp.asarray(batch.ids), jnp.asarray(batch.valid))


def corpus_stats(model, tokenizer, documents, *, seq_len: int = 128, batch_size: int = 8,
                 max_tokens: int | None = None, token_scores=None, desc: str = "experts") -> ExpertStats:
    """Stream ``documents`` through the model and sum each composed expert's routing score.

    ``token_scores``: optional per-document scores (a number for every token of the document, or a list
    with one number per token including the leading bos); then the sums for Pearson correlation are kept.
    """
    docs = document_tokens(tokenizer, documents, max_tokens)
    return token_stats(model, docs, pad_id=tokenizer.pad_id, seq_len=seq_len, batch_size=batch_size,
                       token_scores=token_scores, desc=desc)


def token_stats(model, docs: list[np.ndarray], *, pad_id: int, seq_len: int = 128, batch_size: int = 8,
                token_scores=None, desc: str = "experts", squares: bool = False, on_batch=None) -> ExpertStats:
    """:func:`corpus_stats` of documents already tokenized (``data.windows.document_tokens``). ``squares``: keep
    the sums of ``s**2`` without token scores; ``on_batch(batch, count, probs)``: called for every batch, so a
    caller that needs more than the sums reads the routing in the same pass."""
    if not model.config.is_moe:
        raise ValueError("the dense baseline has no experts to inspect")
    e = model.config.moe_experts
    if not docs:
        raise ValueError("no tokens to compute expert statistics on")
    y_docs = None if token_scores is None else [_per_token(s, d.size) for s, d in zip(token_scores, docs, strict=False)]
    st = ExpertStats(e, meta={"documents": len(docs)})
    for batch, count, probs in routed_batches(model, docs, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id,
                                              desc=desc):
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
        if on_batch is not None:
            on_batch(batch, count, probs)
        mass, freq, sq, wt = [], [], [], []
        for g1, g2 in probs:
            mass.append(np.asarray(_mass(g1, g2, w), np.float64).ravel())
            freq.append(np.asarray(_frequency(g1, g2, jnp.asarray(count), k), np.int64))
            if y is not None or squares:
                sq.append(np.asarray(_square_mass(g1, g2, w), np.float64).ravel())
            if y is not None:
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


@partial(jax.jit, static_argnames=("k", "width"))
def _batch_top(s_btn, count_bt, valid_bt, k: int, width: int):
    """Each expert's ``k`` best counted positions with a positive score in a batch: scores ``[n, k]``, flat
    positions ``b * t`` ``[n, k]``, and the scores of the ``width`` tokens each side in the same window
    ``[n, k, 2 * width + 1]`` (NaN outside the window)."""
    b, t, n = s_btn.shape
    ranked = jnp.where(count_bt[..., None] & (s_btn > 0), s_btn, -jnp.inf).reshape(b * t, n).T
    vals_nk, flat_nk = jax.lax.top_k(ranked, k)
    padded = jnp.pad(jnp.where(valid_bt[..., None], s_btn, jnp.nan), ((0, 0), (width, width), (0, 0)),
                     constant_values=jnp.nan)
    cols = flat_nk[..., None] % t + jnp.arange(2 * width + 1)
    near = padded[flat_nk[..., None] // t, cols, jnp.arange(n)[:, None, None]]
    return vals_nk, flat_nk, near


class TopContexts:
    """The ``top`` best-scoring tokens of ``n`` experts so far, as fixed-size arrays (best first): a bounded
    replacement for per-expert heaps, merged batch by batch with one vectorized sort."""

    def __init__(self, n: int, top: int, width: int = 0):
        self.top, self.width = top, width
        self.score = np.full((n, top), -np.inf, np.float32)
        self.doc = np.full((n, top), -1, np.int64)
        self.position = np.zeros((n, top), np.int64)
        self.near = np.full((n, top, 2 * width + 1), np.nan, np.float32)

    def add(self, s_btn, count_bt: np.ndarray, batch) -> None:
        """Merge a batch's scores ``[b, t, n]`` (positions not in ``count_bt`` are never chosen)."""
        t = count_bt.shape[1]
        k = min(self.top, count_bt.size)
        vals, flat, near = map(np.asarray, _batch_top(s_btn, jnp.asarray(count_bt), jnp.asarray(batch.valid),
                                                        k, self.width))
        r, c = np.divmod(flat, t)
        score = np.concatenate([self.score, vals], axis=1)
        order = np.argsort(-score, axis=1, kind="stable")[:, :self.top]
        take = lambda old, new: np.take_along_axis(np.concatenate([old, new], axis=1), order, axis=1)
        self.doc = take(self.doc, np.where(np.isfinite(vals), batch.doc[r], -1))
        self.position = take(self.position, batch.start[r] + c)
        self.near = np.take_along_axis(np.concatenate([self.near, near], axis=1), order[..., None], axis=1)
        self.score = np.take_along_axis(score, order, axis=1)

    def contexts(self, n: int) -> list[Context]:
        """Expert ``n``'s contexts, best first."""
        keep = np.flatnonzero(self.doc[n] >= 0)
        return [Context(float(self.score[n, f]), int(self.doc[n, f]), int(self.position[n, f])) for f in keep]


def top_contexts(model, tokenizer, documents, experts: list[tuple[int, int]], *, top: int = 5, seq_len: int = 128,
                 batch_size: int = 8, max_tokens: int | None = None):
    """The ``top`` highest-scoring tokens of each ``(group, expert id)`` over the corpus, best first, and
    the documents' token lists the contexts point into."""
    e = model.config.moe_experts
    docs = document_tokens(tokenizer, documents, max_tokens)
    by_group: dict[int, list[int]] = {}
    for g, x in experts:
        by_group.setdefault(g, []).append(x)
    found = {g: TopContexts(len(ids), top) for g, ids in by_group.items()}
    for batch, count, probs in routed_batches(model, docs, seq_len=seq_len, batch_size=batch_size,
                                              pad_id=tokenizer.pad_id, desc="contexts"):
        count[:, 0] = False  # a document's bos carries no content
        for g, ids in by_group.items():
            ids_n = np.asarray(ids)
            found[g].add(expert_scores(*probs[g], jnp.asarray(ids_n // e), jnp.asarray(ids_n % e)), count, batch)
    return {(g, x): found[g].contexts(n) for g, ids in by_group.items() for n, x in enumerate(ids)}, docs


def describe_context(tokenizer, doc_tokens: np.ndarray, position: int, width: int = 24) -> tuple[str, str, str]:
    """(text before, the token, text after) around ``position`` of a document's token list."""
    before = tokenizer.decode(doc_tokens[max(position - width, 1):position].tolist())
    after = tokenizer.decode(doc_tokens[position + 1:position + 1 + width // 2].tolist())
    return before, tokenizer.decode([int(doc_tokens[position])]), after

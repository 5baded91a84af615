"""The expert atlas: what a static site of a checkpoint's composed experts needs, gathered in two passes.

Pass one is :func:`monet_jax.experts.stats.token_stats` itself, so the site's mass and frequency are exactly
those of ``eval.py experts stats``. It picks the experts kept per group (the most mass). Pass two streams
the same windows again and keeps, for the kept experts only, bounded arrays: each expert's best contexts
(:class:`~monet_jax.experts.stats.TopContexts`, with the scores of the tokens around them) and a
``[tokens indexed, experts kept]`` table of summed scores per vocabulary token, from which come an
expert's top tokens and a token's top experts. Nothing of size ``tokens x E*E`` is formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from monet_jax.data.tokenizer import BYTE_VOCAB, OFFSET, ByteTokenizer
from monet_jax.data.windows import document_tokens
from monet_jax.experts.mask import ExpertMask
from monet_jax.experts.stats import ExpertStats, TopContexts, expert_scores, routed_batches, token_stats


@dataclass(frozen=True)
class AtlasOptions:
    """What bounds the site's size: experts per group, contexts per expert, tokens of context each side,
    vocabulary tokens indexed, and experts listed per indexed token and group."""

    experts: int = 1024
    contexts: int = 12
    context_tokens: int = 12
    tokens: int = 4096
    token_experts: int = 8

    def __post_init__(self):
        for name, low in (("experts", 1), ("contexts", 1), ("context_tokens", 0), ("tokens", 1),
                          ("token_experts", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")


@dataclass
class GroupAtlas:
    """One routing group's kept experts (``ids`` by mass, best first) and what pass two found for them."""

    ids: np.ndarray            # int64 [n]
    contexts: TopContexts      # [n, contexts] best tokens, with the scores of their neighbours
    token_sums: np.ndarray     # float64 [tokens indexed, n]: summed score on each indexed token


@dataclass
class Atlas:
    stats: ExpertStats             # pass one: mass and frequency of every composed expert
    groups: list[GroupAtlas]
    token_ids: np.ndarray          # int64 [tokens indexed], the corpus's most frequent tokens, most frequent first
    token_counts: np.ndarray       # int64 [tokens indexed], occurrences (a document's bos left out)
    docs: list[np.ndarray]         # each document's token ids, which contexts point into
    options: AtlasOptions


def kept_experts(stats: ExpertStats, n: int) -> list[np.ndarray]:
    """Per group, the ``n`` experts with the most mass (ties by id, as ``experts stats`` lists them);
    experts never active are left out."""
    out = []
    for mass in stats.mass:
        order = np.argsort(-mass, kind="stable")[:n]
        out.append(order[mass[order] > 0].astype(np.int64))
    return out


def frequent_tokens(docs: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most frequent tokens (ties by id) and their counts, each document's leading bos left out."""
    counts = np.bincount(np.concatenate([d[1:] for d in docs]).astype(np.int64))
    order = np.argsort(-counts, kind="stable")[:n]
    order = order[counts[order] > 0]
    return order.astype(np.int64), counts[order].astype(np.int64)


@partial(jax.jit, donate_argnums=0)
def _add_token_sums(sums_vn, s_btn, slot_bt):
    """Scatter-add each token's scores into its slot's row (the last row collects tokens not indexed)."""
    return sums_vn.at[slot_bt.reshape(-1)].add(s_btn.reshape(-1, s_btn.shape[-1]))


def collect(model, tokenizer, documents, options: AtlasOptions, *, seq_len: int = 128, batch_size: int = 8,
            max_tokens: int | None = None) -> Atlas:
    """Both passes over ``documents`` (strings), windowed as every ``experts`` command windows them."""
    if not model.config.is_moe:
        raise ValueError("the dense baseline has no experts to inspect")
    docs = document_tokens(tokenizer, documents, max_tokens)
    stats = token_stats(model, docs, pad_id=tokenizer.pad_id, seq_len=seq_len, batch_size=batch_size,
                        desc="experts")
    kept = kept_experts(stats, options.experts)
    token_ids, token_counts = frequent_tokens(docs, options.tokens)
    slot_of = np.full(max(model.config.vocab_size, int(token_ids.max()) + 1), token_ids.size, np.int32)
    slot_of[token_ids] = np.arange(token_ids.size)
    e = model.config.moe_experts
    found = [TopContexts(ids.size, options.contexts, options.context_tokens) for ids in kept]
    sums = [jnp.zeros((token_ids.size + 1, ids.size), jnp.float32) for ids in kept]
    pairs = [(jnp.asarray(ids // e), jnp.asarray(ids % e)) for ids in kept]
    for batch, count, probs in routed_batches(model, docs, seq_len=seq_len, batch_size=batch_size,
                                              pad_id=tokenizer.pad_id, desc="atlas"):
        count[:, 0] = False  # a document's bos carries no content
        slot = jnp.asarray(np.where(count, slot_of[batch.ids], token_ids.size))
        for g, (i_n, j_n) in enumerate(pairs):
            if kept[g].size:
                s_btn = expert_scores(*probs[g], i_n, j_n)
                found[g].add(s_btn, count, batch)
                sums[g] = _add_token_sums(sums[g], s_btn, slot)
    groups = [GroupAtlas(ids, ctx, np.asarray(s, np.float64)[:-1]) for ids, ctx, s in zip(kept, found, sums,
                                                                                             strict=True)]
    return Atlas(stats, groups, token_ids, token_counts, docs, options)


def expert_domains(masks: dict[str, ExpertMask], model) -> dict[str, ExpertMask]:
    """``masks`` checked against the model: the same ``E`` and number of routing groups."""
    groups = len(model.model.routing_groups())
    for name, mask in masks.items():
        if mask.experts != model.config.moe_experts or len(mask.groups) != groups:
            raise ValueError(f"mask {name!r} is for {len(mask.groups)} routing groups of {mask.experts} experts, "
                             f"the model has {groups} of {model.config.moe_experts}")
    return masks


def token_pieces(tokenizer, ids) -> list[str]:
    """Per token, the text it adds when ``ids`` are decoded in order, so the pieces join into the decoded
    text: a character split over several tokens (a UTF-8 byte sequence) shows with its last token."""
    pieces, done = [], ""
    ids = [int(i) for i in ids]
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        if k < len(ids):
            text = text.rstrip("\ufffd")  # an unfinished character waits for its last token
        if text.startswith(done):
            pieces.append(text[len(done):])
            done = text
        else:  # a decoder that rewrites earlier text (rare): the token on its own
            pieces.append(tokenizer.decode([ids[k - 1]]))
            done = text
    return pieces


def token_label(tokenizer, token: int) -> str:
    """A token's own text, or ``<0xNN>`` / ``<id N>`` where it is no whole character."""
    text = tokenizer.decode([int(token)])
    if text and "\ufffd" not in text:
        return text
    if isinstance(tokenizer, ByteTokenizer) and OFFSET <= token < BYTE_VOCAB:
        return f"<0x{token - OFFSET:02X}>"
    return f"<id {token}>"

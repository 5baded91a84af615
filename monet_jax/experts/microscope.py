"""Per-token routing: which composed experts ``(i, j)`` each token uses in each routing group.

Composed expert ``(i, j)`` of a group gets the score ``s_ij = sum_h g1_hi * g2_hj``; its id is
``i * E + j`` (the paper's "Group g / Expert idx"). Routing probabilities are sparse (about ``moe_topk``
experts per head and side), so the active set is the union over heads of ``supp(g1_h) x supp(g2_h)``
and is found from the nonzeros, without forming an ``E x E`` table per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monet_jax.experts.stats import router_probs
from monet_jax.model.pure import PureModel


@dataclass(frozen=True)
class TokenRouting:
    """Active composed experts of one token in one routing group, highest score first."""

    expert_ids: np.ndarray  # int64 [n], i * E + j
    scores: np.ndarray      # float32 [n], sum over heads of g1_hi * g2_hj


def composed_scores(g1_he: np.ndarray, g2_he: np.ndarray) -> TokenRouting:
    experts = g1_he.shape[1]
    acc: dict[int, float] = {}
    for h in range(g1_he.shape[0]):
        i_idx, j_idx = np.flatnonzero(g1_he[h]), np.flatnonzero(g2_he[h])
        if not len(i_idx) or not len(j_idx):
            continue
        ids = (i_idx[:, None] * experts + j_idx[None, :]).ravel()
        vals = (g1_he[h, i_idx][:, None] * g2_he[h, j_idx][None, :]).ravel()
        for k, v in zip(ids.tolist(), vals.tolist(), strict=True):
            acc[k] = acc.get(k, 0.0) + v
    ids = np.fromiter(acc.keys(), np.int64, len(acc))
    scores = np.fromiter(acc.values(), np.float32, len(acc))
    order = np.lexsort((ids, -scores))
    return TokenRouting(ids[order], scores[order])


def token_routing(model, ids_t: np.ndarray, deleted: list[set[int]] | None = None) -> list[list[TokenRouting]]:
    """``[token][group]`` routing of one token sequence (inference mode, BatchNorm running statistics);
    ``deleted``: per group, expert ids left out of the lists (those an applied mask removed)."""
    if not model.config.is_moe:
        raise ValueError("the dense baseline has no experts to inspect")
    n = len(ids_t)
    t = max(8, 1 << (n - 1).bit_length())  # padded to a power of two: texts of similar lengths share a compile
    ids_bt = np.zeros((1, t), np.int32)
    ids_bt[0, :n] = ids_t
    probs = PureModel(model).jit(router_probs)(ids_bt, np.arange(t)[None] < n)
    groups = [(np.asarray(g1)[0, :n], np.asarray(g2)[0, :n]) for g1, g2 in probs]
    out = [[composed_scores(g1[t], g2[t]) for g1, g2 in groups] for t in range(len(ids_t))]
    if deleted is not None:
        for per_group in out:
            for g, r in enumerate(per_group):
                keep = ~np.isin(r.expert_ids, np.fromiter(deleted[g], np.int64, len(deleted[g])))
                per_group[g] = TokenRouting(r.expert_ids[keep], r.scores[keep])
    return out

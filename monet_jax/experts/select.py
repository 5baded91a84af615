"""Expert selection rules of the paper, turned into deletion masks."""

from __future__ import annotations

import numpy as np

from monet_jax.experts.mask import ExpertMask


def domain_experts(means: dict[str, np.ndarray], *, ratio: float = 2.0, min_mean: float = 0.0) -> dict[str, ExpertMask]:
    """An expert belongs to domain ``d`` when its mean routing score there is at least ``ratio`` times its
    score in the second-highest domain (and above ``min_mean``). ``means[d]``: ``[G, E*E]`` per-token means."""
    if len(means) < 2:
        raise ValueError("domain selection needs at least two domains")
    names = list(means)
    stack = np.stack([np.asarray(means[n], np.float64) for n in names])  # [D, G, E*E]
    experts = int(round(stack.shape[-1] ** 0.5))
    out = {}
    for d, name in enumerate(names):
        others = np.delete(stack, d, axis=0).max(axis=0)
        keep = (stack[d] >= ratio * others) & (stack[d] > min_mean)
        out[name] = ExpertMask(experts, [np.flatnonzero(k) for k in keep],
                               {"rule": "domain", "domain": name, "domains": names, "ratio": ratio,
                                "min_mean": min_mean})
    return out


def correlated_experts(r: np.ndarray, threshold: float, meta: dict | None = None) -> ExpertMask:
    """Experts whose Pearson correlation ``r`` (``[G, E*E]``) with a token score exceeds ``threshold``."""
    experts = int(round(r.shape[-1] ** 0.5))
    return ExpertMask(experts, [np.flatnonzero(g > threshold) for g in r],
                      {"rule": "pearson", "threshold": threshold, **(meta or {})})

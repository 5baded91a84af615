"""Sparse experts for decoding and small batches: read only the weights of the experts in use.

``g1``/``g2`` are exactly zero outside the experts that pass the router's threshold (about ``moe_topk``
per head), so a call's result depends only on the experts that some token and head selects: the union,
at most ``tokens * H * moe_topk`` of ``E`` per half (1/8 of them for one token at the published sizes).
This path gathers those experts' rows of ``u`` (columns of its ``[d, E*m]`` kernel), of ``v`` and of the
biases, once per call (not once per token and head), and runs the dense layer on them: the bytes read
per decoding step are the selected experts' weights, not all ``E``.

The union's size is known only on the device, so the gathered width is chosen at run time among a few
compiled sizes (``E/8``, ``E/4``, ``E/2``; ``lax.switch``), and a union larger than all of them runs the
dense layer: the result is always the dense layer's, whatever the routing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Which side's experts index each weight, and how: (side, axis holding E * chunk).
HD_SIDES = {"u": (1, 1), "u_bias": (1, 0), "v": (2, 0), "b": (2, 0)}
VD_SIDES = {"u1": (1, 1), "u1_bias": (1, 0), "u2": (2, 1), "u2_bias": (2, 0), "v11": (1, 0), "v12": (1, 0),
            "v21": (2, 0), "v22": (2, 0), "b1": (1, 0), "b2": (2, 0)}


def widths(experts: int) -> tuple[int, ...]:
    """The gathered widths tried, smallest first: 1/8, 1/4 and 1/2 of the experts."""
    return tuple(sorted({max(1, experts // f) for f in (8, 4, 2)} - {experts}))


def in_use(g_bthe):
    """bool ``[E]``: experts with a nonzero probability for some token and head."""
    return jnp.any(g_bthe > 0, axis=tuple(range(g_bthe.ndim - 1)))


def _take(a, idx_u, axis: int, experts: int):
    """The slices of experts ``idx_u`` along ``axis`` of ``a`` (that axis holds ``E * chunk`` values)."""
    shape = a.shape
    split = a.reshape(*shape[:axis], experts, shape[axis] // experts, *shape[axis + 1:])
    return jnp.take(split, idx_u, axis=axis).reshape(*shape[:axis], -1, *shape[axis + 1:])


def gathered(layer: Callable, x, w: dict, g1_bthi, g2_bthj, sides: dict[str, tuple[int, int]]):
    """``layer(x, w, g1, g2)`` (the dense layer) computed on the experts in use only; ``sides`` says
    which router half indexes each weight of ``w`` (``HD_SIDES``, ``VD_SIDES``)."""
    e = g1_bthi.shape[-1]
    use = (in_use(g1_bthi), in_use(g2_bthj))
    need = jnp.maximum(use[0].sum(), use[1].sum())

    def narrow(width: int):
        def run(x, w, g1, g2):
            idx, keep = [], []
            for u in use:
                idx.append(jnp.nonzero(u, size=width, fill_value=0)[0])
                keep.append(jnp.arange(width) < u.sum())  # slots past the union repeat expert 0: weight them 0
            sub = {k: _take(a, idx[sides[k][0] - 1], sides[k][1], e) for k, a in w.items()}
            g1, g2 = (jnp.where(k_, jnp.take(g, i, axis=-1), 0) for g, i, k_ in zip((g1, g2), idx, keep, strict=True))
            return layer(x, sub, g1, g2)
        return run

    sizes = widths(e)
    branches = [narrow(s) for s in sizes] + [layer]
    choice = jnp.sum(jnp.asarray(sizes, jnp.int32) < need) if sizes else jnp.int32(0)
    return jax.lax.switch(choice, branches, x, w, g1_bthi, g2_bthj)

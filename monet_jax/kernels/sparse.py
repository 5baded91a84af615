"""Sparse experts for decoding and small batches: read only the weights of the experts in use.

``g1``/``g2`` are exactly zero outside the experts that pass the router's threshold (about ``moe_topk``
per head), so a layer's output depends only on the experts some token and head of the call routes to: the
union, at most ``tokens * H * moe_topk`` of ``E`` per side. ``u`` is needed for the ``g1`` side's experts
(VD: ``u1`` for ``g1``, ``u2`` for ``g2``) and ``v``/``b`` for the side each output half mixes over, so this
path gathers those experts' weights once per call and runs the whole layer over them alone: the mixing,
the ``relu2`` units and the ``v`` projections at the width of the union instead of ``E``. The width is
static: the smallest of a few tiers that holds both unions (``lax.cond``), and a union wider than the
largest tier runs the dense layer, so the result is always the dense layer's.

Counting bytes: an expert of ``v`` is ``m`` consecutive rows of its ``[E*m, d]`` kernel, so gathering it
reads just its bytes. An expert of ``u`` is ``m`` strided columns of the ``[d, E*m]`` kernel, which a CPU
gathers at the cost of the dense product; given ``u``'s rows (``u.T``, ``[E*m, d]``: ``{name}_rows`` in the
weights, which :class:`monet_jax.model.pure.PureModel` adds for decoding) the gather reads only the experts
in use, else ``u`` runs dense and its output is narrowed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIERS = (0.5, 0.75, 1.0)  # gathered widths tried, as fractions of the largest (tokens * H * sparse_k)


def tiers(width: int, experts: int) -> list[int]:
    """The static widths tried, smallest first (multiples of 8 below ``experts``)."""
    out = sorted({min(experts, max(8, -(-int(width * f) // 8) * 8)) for f in TIERS})
    return [w for w in out if w < experts]


def _experts(w: dict) -> int:
    return (w["b1"] if "b1" in w else w["b"]).shape[0]


def _union(g_bthe, width: int):
    """The experts some token and head routes to, as ``width`` indices (slots past the union repeat
    expert 0) and the routing weights at those indices (zero in the padding slots)."""
    use = jnp.any(g_bthe != 0, axis=(0, 1, 2))
    idx = jnp.nonzero(use, size=width, fill_value=0)[0]
    keep = jnp.arange(width) < use.sum()
    return idx, jnp.where(keep, jnp.take(g_bthe, idx, axis=3), 0)


def _up(x_btd, w: dict, name: str, idx, cd):
    """``relu2(x @ u + b)`` of the experts ``idx`` only: ``[b, t, w, m]``."""
    b, t, d = x_btd.shape
    bias, e = w[f"{name}_bias"], _experts(w)
    m = bias.shape[0] // e
    bias_w = bias.reshape(e, m)[idx].astype(cd)
    rows = w.get(f"{name}_rows")
    if rows is not None:
        k = rows.reshape(e, m, d)[idx].reshape(-1, d).astype(cd)
        y = jax.lax.dot_general(x_btd.astype(cd), k, (((2,), (1,)), ((), ()))).reshape(b, t, -1, m)
    else:
        y = jnp.einsum("btd,dn->btn", x_btd.astype(cd), w[name].astype(cd)).reshape(b, t, e, m)[:, :, idx]
    return jnp.square(jax.nn.relu(y + bias_w))


def _down(a_btwm: list, kernels: list, s_btw, bias_ed, idx, cd):
    """``sum_k a_k @ kernel_k[idx] + s @ bias[idx]``: the ``v`` projections of the experts ``idx``."""
    e = bias_ed.shape[0]
    out = jnp.einsum("btw,wd->btd", s_btw, bias_ed[idx].astype(cd))
    for a, k in zip(a_btwm, kernels, strict=True):
        k_wmd = k.reshape(e, -1, k.shape[-1])[idx].astype(cd)
        out = out + jnp.einsum("btn,nd->btd", a.reshape(*a.shape[:2], -1), k_wmd.reshape(-1, k.shape[-1]))
    return out


def vd_narrow(x_btd, w: dict, g1_bthi, g2_bthj, width: int, cd):
    """The VD layer over the ``width`` experts of each side's union (exact when both unions fit)."""
    idx1, g1 = _union(g1_bthi.astype(cd), width)
    idx2, g2 = _union(g2_bthj.astype(cd), width)
    x1, x2 = _up(x_btd, w, "u1", idx1, cd), _up(x_btd, w, "u2", idx2, cd)
    s1, s2 = g1.sum(axis=2), g2.sum(axis=2)
    cross12 = jnp.einsum("bthm,bthi->btim", jnp.einsum("bthj,btjm->bthm", g2, x2), g1)
    cross21 = jnp.einsum("bthm,bthj->btjm", jnp.einsum("bthi,btim->bthm", g1, x1), g2)
    top = _down([x1 * s1[..., None], cross12], [w["v11"], w["v12"]], s1, w["b1"], idx1, cd)
    bottom = _down([cross21, x2 * s2[..., None]], [w["v21"], w["v22"]], s2, w["b2"], idx2, cd)
    return jnp.concatenate([top, bottom], axis=-1)


def hd_narrow(x_btd, w: dict, g1_bthi, g2_bthj, width: int, cd):
    """The HD layer over the ``width`` experts of each side's union (exact when both unions fit)."""
    idx1, g1 = _union(g1_bthi.astype(cd), width)
    idx2, g2 = _union(g2_bthj.astype(cd), width)
    z = jnp.einsum("bthm,bthj->btjm", jnp.einsum("btim,bthi->bthm", _up(x_btd, w, "u", idx1, cd), g1), g2)
    return _down([z], [w["v"]], g2.sum(axis=2), w["b"], idx2, cd)


def layer(narrow, dense, x_btd, w: dict, g1_bthi, g2_bthj, width: int, cd):
    """``narrow`` at the smallest tier of ``width`` that holds both unions, else ``dense(x, w, g1, g2)``."""
    used = jnp.maximum(*(jnp.any(g != 0, axis=(0, 1, 2)).sum() for g in (g1_bthi, g2_bthj)))
    run = dense
    for tier in reversed(tiers(width, _experts(w))):  # nest: the smallest tier is tried first
        run = _tier(narrow, tier, cd, run, used)
    return run(x_btd, w, g1_bthi, g2_bthj)


def _tier(narrow, tier: int, cd, wider, used):
    def run(x_btd, w, g1, g2):
        return jax.lax.cond(used <= tier, lambda *a: narrow(*a, tier, cd), wider, x_btd, w, g1, g2)
    return run

"""Sparse experts for decoding and small batches: gather only the weights of active experts.

``g1``/``g2`` are exactly zero outside the experts that pass the router's threshold (about
``moe_topk`` per head), so summing over each token's and head's ``k`` largest probabilities
(``lax.top_k``) is the dense layer exactly, as long as no token/head has more than ``k`` active experts.
That is checked at run time: if any has, the call takes the dense path instead (``lax.cond``), so the
result is always exact. Each token reads ``2 * H * k`` expert slices of ``u`` and ``v`` (``d * m`` each)
instead of all ``E``: a win while ``tokens * H * k < E`` (decoding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monet_jax.kernels.reference import hd_layer_reference, relu2, vd_layer_reference


def active_fits(g1_nhi, g2_nhj, k: int):
    """True when every token and head has at most ``k`` experts with nonzero probability."""
    count = jnp.maximum(jnp.sum(g1_nhi > 0, axis=-1).max(), jnp.sum(g2_nhj > 0, axis=-1).max())
    return count <= k


def _select(g_nhe, k):
    w_nhk, idx_nhk = jax.lax.top_k(g_nhe, k)
    return w_nhk, idx_nhk


def _up(x_nd, w_de, bias_e, idx_nhk, e: int, cd):
    """``relu2`` of the ``u`` slices of the selected experts: ``[n, H, k, m]``."""
    d = w_de.shape[0]
    u_nhkdm = jnp.moveaxis(w_de.reshape(d, e, -1)[:, idx_nhk], 0, 3).astype(cd)
    b_nhkm = bias_e.reshape(e, -1)[idx_nhk].astype(cd)
    return relu2(jnp.einsum("nd,nhkdm->nhkm", x_nd.astype(cd), u_nhkdm) + b_nhkm)


def _down(a_nh_m, w_ed, idx_nhk, e: int, cd, spec: str):
    """Selected ``v`` slices applied to ``a`` (``spec``: ``nhm`` for a head mixture, ``nhkm`` per expert)."""
    v_nhkmd = w_ed.reshape(e, -1, w_ed.shape[-1])[idx_nhk].astype(cd)
    return jnp.einsum(f"{spec},nhkmd->nhkd", a_nh_m, v_nhkmd)


def hd_sparse(x_nd, w, g1_nhi, g2_nhj, *, k: int, compute_dtype):
    """The HD layer summed over each token's top-``k`` experts per head; ``w`` as ``reference.hd_layer_reference``."""
    e, cd = w["b"].shape[0], compute_dtype
    g1, g2 = g1_nhi.astype(cd), g2_nhj.astype(cd)

    def sparse(x_nd, w, g1, g2):
        w1, i1 = _select(g1, k)
        w2, i2 = _select(g2, k)
        y_nhm = jnp.einsum("nhk,nhkm->nhm", w1, _up(x_nd, w["u"], w["u_bias"], i1, e, cd))
        out_nhkd = _down(y_nhm, w["v"], i2, e, cd, "nhm") + w["b"][i2].astype(cd)
        return jnp.einsum("nhk,nhkd->nd", w2, out_nhkd)

    def dense(x_nd, w, g1, g2):
        return hd_layer_reference(x_nd.astype(cd), jax.tree.map(lambda a: a.astype(cd), w), g1, g2)

    return jax.lax.cond(active_fits(g1_nhi, g2_nhj, k), sparse, dense, x_nd, w, g1, g2)


def vd_sparse(x_nd, w, g1_nhi, g2_nhj, *, k: int, compute_dtype):
    """The VD layer summed over each token's top-``k`` experts per head; ``w`` as ``reference.vd_layer_reference``.

    Expert ``(i, j)`` adds ``g1_hi g2_hj [V11_i x1_i + V12_i x2_j + b1_i ; V21_j x1_i + V22_j x2_j + b2_j]``;
    summed over ``j`` (resp. ``i``) the cross terms need only the head mixtures ``y2_h`` (resp. ``y1_h``)."""
    e, cd = w["b1"].shape[0], compute_dtype
    g1, g2 = g1_nhi.astype(cd), g2_nhj.astype(cd)

    def sparse(x_nd, w, g1, g2):
        w1, i1 = _select(g1, k)
        w2, i2 = _select(g2, k)
        x1_nhkm = _up(x_nd, w["u1"], w["u1_bias"], i1, e, cd)
        x2_nhkm = _up(x_nd, w["u2"], w["u2_bias"], i2, e, cd)
        y1_nhm = jnp.einsum("nhk,nhkm->nhm", w1, x1_nhkm)
        y2_nhm = jnp.einsum("nhk,nhkm->nhm", w2, x2_nhkm)
        top = (_down(x1_nhkm, w["v11"], i1, e, cd, "nhkm") + _down(y2_nhm, w["v12"], i1, e, cd, "nhm")
               + w["b1"][i1].astype(cd))
        bot = (_down(y1_nhm, w["v21"], i2, e, cd, "nhm") + _down(x2_nhkm, w["v22"], i2, e, cd, "nhkm")
               + w["b2"][i2].astype(cd))
        return jnp.concatenate([jnp.einsum("nhk,nhkd->nd", w1, top), jnp.einsum("nhk,nhkd->nd", w2, bot)], axis=-1)

    def dense(x_nd, w, g1, g2):
        return vd_layer_reference(x_nd.astype(cd), jax.tree.map(lambda a: a.astype(cd), w), g1, g2)

    return jax.lax.cond(active_fits(g1_nhi, g2_nhj, k), sparse, dense, x_nd, w, g1, g2)

"""Pure-jnp references for every kernel, written from the math of DESIGN section 1 (not from the kernels).

Shapes: ``n`` tokens (flattened ``b*t``), ``h`` routing heads, ``e``/``i``/``j`` experts, ``m`` expert
hidden units (``m/2`` per half for VD), ``d`` model width. ``p`` is the output of an ``u`` projection
(bias included) before ``relu2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def relu2(x):
    return jnp.square(jax.nn.relu(x))


def router_reference(z_nhe, mean_h, var_h, sigma: float, eps: float = 1e-5):
    """BatchNorm-space top-k approximation and masked softmax of the raw logits, plus the aux-loss sums.

    Returns ``g`` ``[n,h,e]``, ``sum_n g`` ``[h,e]`` (uniformity loss) and ``sum_n (1 - max_e g)`` ``[h]``
    (ambiguity loss)."""
    n_nhe = (z_nhe - mean_h[:, None]) * jax.lax.rsqrt(var_h[:, None] + eps)
    thr = jnp.minimum(jnp.max(n_nhe, axis=-1, keepdims=True), sigma)
    g = jax.nn.softmax(jnp.where(n_nhe >= thr, z_nhe, -1e10), axis=-1)
    return g, g.sum(axis=0), jnp.sum(1.0 - jnp.max(g, axis=-1), axis=0)


def aux_from_sums(col_he, amb_h, tokens: int, eps: float = 1e-10):
    """Uniformity and ambiguity loss of one half of a router from the kernel's token sums."""
    return -jnp.mean(jnp.log(col_he / tokens + eps)), jnp.sum(amb_h) / (tokens * amb_h.shape[0])


def hd_mix_reference(p_nim, g1_nhi, g2_nhj):
    """HD: ``z_jm = sum_h g2_hj sum_i g1_hi relu2(p)_im``, the input of the ``v`` projection."""
    x = relu2(p_nim)
    return jnp.einsum("nhm,nhj->njm", jnp.einsum("nim,nhi->nhm", x, g1_nhi), g2_nhj)


def vd_mix_reference(p1_nim, p2_njm, g1_nhi, g2_nhj):
    """VD: the inputs of ``[v11; v12]`` (top) and ``[v21; v22]`` (bottom), each ``[n, 2, E, m/2]``:
    straight flow ``x1 * sum_h g1`` / cross flow ``sum_h g1_hi g2_hj x2_j`` (and mirrored)."""
    x1, x2 = relu2(p1_nim), relu2(p2_njm)
    a11 = jnp.einsum("nim,nhi->nim", x1, g1_nhi)
    a12 = jnp.einsum("njm,nhj,nhi->nim", x2, g2_nhj, g1_nhi)
    a21 = jnp.einsum("nim,nhi,nhj->njm", x1, g1_nhi, g2_nhj)
    a22 = jnp.einsum("njm,nhj->njm", x2, g2_nhj)
    return jnp.stack([a11, a12], axis=1), jnp.stack([a21, a22], axis=1)


def hd_layer_reference(x_nd, w, g1_nhi, g2_nhj):
    """The whole HD layer from DESIGN's einsums; ``w``: ``u`` [d,E*m], ``u_bias`` [E*m], ``v`` [E*m,d], ``b`` [E,d]."""
    e = w["b"].shape[0]
    p = (x_nd @ w["u"] + w["u_bias"]).reshape(x_nd.shape[0], e, -1)
    z = hd_mix_reference(p, g1_nhi, g2_nhj)
    return z.reshape(x_nd.shape[0], -1) @ w["v"] + jnp.einsum("nhj,jd->nd", g2_nhj, w["b"])


def vd_layer_reference(x_nd, w, g1_nhi, g2_nhj):
    """The whole VD layer from DESIGN's einsums; ``w`` holds ``u1``/``u2`` (+ ``_bias``), ``v11`` ... ``v22``,
    ``b1``, ``b2``."""
    n, e = x_nd.shape[0], w["b1"].shape[0]
    p1 = (x_nd @ w["u1"] + w["u1_bias"]).reshape(n, e, -1)
    p2 = (x_nd @ w["u2"] + w["u2_bias"]).reshape(n, e, -1)
    top, bot = vd_mix_reference(p1, p2, g1_nhi, g2_nhj)
    top_d = top[:, 0].reshape(n, -1) @ w["v11"] + top[:, 1].reshape(n, -1) @ w["v12"]
    bot_d = bot[:, 0].reshape(n, -1) @ w["v21"] + bot[:, 1].reshape(n, -1) @ w["v22"]
    top_d = top_d + jnp.einsum("nhi,id->nd", g1_nhi, w["b1"])
    bot_d = bot_d + jnp.einsum("nhj,jd->nd", g2_nhj, w["b2"])
    return jnp.concatenate([top_d, bot_d], axis=-1)

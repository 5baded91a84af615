"""Layer-level entry points the model calls for ``moe_impl=pallas`` (arrays in, arrays out).

The ``u``/``v`` projections stay XLA matmuls computed like :class:`~monet_jax.model.layers.Dense`; the
kernels replace what lies between them. Under an active mesh each kernel runs per batch shard.
"""

from __future__ import annotations

import jax.numpy as jnp

from monet_jax.kernels import dispatch
from monet_jax.kernels.mixing import hd_mix, vd_mix
from monet_jax.kernels.router import fused_router


def router_probs(z_bthe, mean_h, var_h, sigma: float, eps: float):
    """``g`` ``[b, t, H, E]`` float32 from raw logits and the (global) BatchNorm statistics."""
    def run(z, mean, var):
        return fused_router(z.reshape(-1, *z.shape[2:]), mean, var, sigma, eps).reshape(z.shape)

    return dispatch.partitioned(run, (True, False, False), (True,))(z_bthe.astype(jnp.float32), mean_h, var_h)


def _dense(x, w, bias, cd):
    y = jnp.einsum("...i,io->...o", x.astype(cd), w.astype(cd))
    return y if bias is None else y + bias.astype(y.dtype)


def _tokens(a):
    return a.reshape(-1, *a.shape[2:])


def horizontal(x_btd, w: dict, g1_bthi, g2_bthj, *, compute_dtype):
    """HD layer; ``w``: ``u`` [d, E*m], ``u_bias`` [E*m], ``v`` [E*m, d], ``b`` [E, d]."""
    b, t, d = x_btd.shape
    e, cd = w["b"].shape[0], compute_dtype
    p_btim = _dense(x_btd, w["u"], w["u_bias"], cd).reshape(b, t, e, -1)
    mix = dispatch.partitioned(lambda p, g1, g2: hd_mix(_tokens(p), _tokens(g1), _tokens(g2)).reshape(p.shape),
                               (True,) * 3, (True,))
    z_btjm = mix(p_btim, g1_bthi, g2_bthj)
    s2_btj = g2_bthj.astype(cd).sum(axis=2)
    return _dense(z_btjm.reshape(b, t, -1), w["v"], None, cd) + jnp.einsum("btj,jd->btd", s2_btj, w["b"].astype(cd))


def vertical(x_btd, w: dict, g1_bthi, g2_bthj, *, compute_dtype):
    """VD layer; ``w``: ``u1``/``u2`` [d, E*m/2] (+ ``_bias``), ``v11`` ... ``v22`` [E*m/2, d/2],
    ``b1``/``b2`` [E, d/2]."""
    b, t, d = x_btd.shape
    e, cd = w["b1"].shape[0], compute_dtype
    p1 = _dense(x_btd, w["u1"], w["u1_bias"], cd).reshape(b, t, e, -1)
    p2 = _dense(x_btd, w["u2"], w["u2_bias"], cd).reshape(b, t, e, -1)

    def run(p1, p2, g1, g2):
        top, bot = vd_mix(_tokens(p1), _tokens(p2), _tokens(g1), _tokens(g2))
        return top.reshape(*p1.shape[:2], *top.shape[1:]), bot.reshape(*p1.shape[:2], *bot.shape[1:])

    top_btkim, bot_btkjm = dispatch.partitioned(run, (True,) * 4, (True, True))(p1, p2, g1_bthi, g2_bthj)
    m = p1.shape[-1]

    def half(a_btkem, first, second):  # one matmul over both flows: [v_first; v_second] stacked
        w_kemd = jnp.stack([w[first], w[second]]).reshape(2, e, m, -1).astype(cd)
        return jnp.einsum("btkem,kemd->btd", a_btkem, w_kemd)

    top = half(top_btkim, "v11", "v12") + jnp.einsum("bti,id->btd", g1_bthi.astype(cd).sum(axis=2), w["b1"].astype(cd))
    bot = half(bot_btkjm, "v21", "v22") + jnp.einsum("btj,jd->btd", g2_bthj.astype(cd).sum(axis=2), w["b2"].astype(cd))
    return jnp.concatenate([top, bot], axis=-1)

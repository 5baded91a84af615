"""Fused expert mixing: ``relu2`` of the ``u`` output and the ``g1``/``g2`` contractions, per token block.

What is fused is the memory-bound part of the layer: from the ``u`` projection's output ``p`` (an XLA
matmul) and the routing probabilities, the kernel writes exactly the inputs of the ``v`` projections
(XLA matmuls too), so neither ``relu2(p)`` nor the per-head mixtures ``[n, H, m]`` ever reach memory.
For VD the straight and cross flows of each output half are written side by side (``[n, 2, E, m/2]``)
so each half is one matmul against its stacked ``[v11; v12]`` / ``[v21; v22]``.

Inside a block everything is float32 and every contraction is a broadcast-multiply-reduce over
``[n, H, E, m]`` (the ``H``/``m`` sizes are far below a matrix unit's tile). The backward kernels
recompute ``relu2(p)`` and the head mixtures from the inputs instead of saving them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monet_jax.kernels import dispatch
from monet_jax.kernels.common import token_call

f32 = jnp.float32


_HI = jax.lax.Precision.HIGHEST


def _mix(g_nhe, x_nem):
    """``y_hm = sum_e g_he x_em``."""
    return jnp.einsum("nhe,nem->nhm", g_nhe, x_nem, precision=_HI, preferred_element_type=f32)


def _spread(g_nhe, y_nhm):
    """``x_em = sum_h g_he y_hm``."""
    return jnp.einsum("neh,nhm->nem", jnp.swapaxes(g_nhe, 1, 2), y_nhm, precision=_HI, preferred_element_type=f32)


def _inner(y_nhm, x_nem):
    """``g_he = sum_m y_hm x_em``."""
    return jnp.einsum("nhm,nem->nhe", y_nhm, x_nem, precision=_HI, preferred_element_type=f32)


def _heads_sum(g_nhe, m: int):
    """``sum_h g_he`` broadcast over ``m``, as a contraction: Mosaic cannot move the expert axis from
    lanes to sublanes (no sublane gather on v4), a matmul against ones does it for free."""
    return _spread(g_nhe, jnp.ones((g_nhe.shape[0], g_nhe.shape[1], m), f32))


def _units_sum(a_nem, h: int):
    """``sum_m a_em`` broadcast over heads ``[n, H, E]`` (the same trick)."""
    return _inner(jnp.ones((a_nem.shape[0], h, a_nem.shape[2]), f32), a_nem)


def _act(p_ref):
    r = jnp.maximum(p_ref[...].astype(f32), 0.0)
    return r * r, r


# -- HD -------------------------------------------------------------------------------------------------
def _hd_fwd_kernel(p_ref, g1_ref, g2_ref, z_ref):
    x, _ = _act(p_ref)
    z_ref[...] = _spread(g2_ref[...].astype(f32), _mix(g1_ref[...].astype(f32), x)).astype(z_ref.dtype)


def _hd_bwd_kernel(p_ref, g1_ref, g2_ref, dz_ref, dp_ref, dg1_ref, dg2_ref):
    x, r = _act(p_ref)
    g1, g2, dz = g1_ref[...].astype(f32), g2_ref[...].astype(f32), dz_ref[...].astype(f32)
    y = _mix(g1, x)
    dy = _mix(g2, dz)
    dg2_ref[...] = _inner(y, dz).astype(dg2_ref.dtype)
    dg1_ref[...] = _inner(dy, x).astype(dg1_ref.dtype)
    dp_ref[...] = (_spread(g1, dy) * 2.0 * r).astype(dp_ref.dtype)


HD_ARRAYS, VD_ARRAYS = 6, 14  # the most [E, m] blocks one kernel holds (the backward passes)


def _block(n, h, e, m, arrays: int):
    """Tokens per block from the VMEM footprint (``dispatch.mixing_vmem_per_token``)."""
    return dispatch.block_tokens(n, dispatch.mixing_vmem_per_token(h, e, m, arrays), budget=8 << 20)


@jax.custom_vjp
def hd_mix(p_nim, g1_nhi, g2_nhj):
    """HD: ``z_jm = sum_h g2_hj sum_i g1_hi relu2(p)_im`` ``[n, E, m]`` in ``p``'s dtype, the input of ``v``.
    Reference: ``reference.hd_mix_reference``."""
    n, e, m = p_nim.shape
    block = _block(n, g1_nhi.shape[1], e, m, 4)
    return token_call(_hd_fwd_kernel, (p_nim, g1_nhi, g2_nhj), (True,) * 3, [((e, m), p_nim.dtype, "tokens")],
                      block=block, name="monet_hd_mix_fwd")[0]


def _hd_fwd(p, g1, g2):
    return hd_mix(p, g1, g2), (p, g1, g2)


def _hd_bwd(res, dz):
    p, g1, g2 = res
    n, e, m = p.shape
    h = g1.shape[1]
    block = _block(n, h, e, m, HD_ARRAYS)
    return tuple(token_call(_hd_bwd_kernel, (p, g1, g2, dz), (True,) * 4,
                            [((e, m), p.dtype, "tokens"), ((h, e), g1.dtype, "tokens"), ((h, e), g2.dtype, "tokens")],
                            block=block, name="monet_hd_mix_bwd"))


hd_mix.defvjp(_hd_fwd, _hd_bwd)


# -- VD -------------------------------------------------------------------------------------------------
def _vd_fwd_kernel(p1_ref, p2_ref, g1_ref, g2_ref, top_ref, bot_ref):
    x1, _ = _act(p1_ref)
    x2, _ = _act(p2_ref)
    g1, g2 = g1_ref[...].astype(f32), g2_ref[...].astype(f32)
    dt = top_ref.dtype
    m = x1.shape[-1]
    top_ref[:, 0] = (x1 * _heads_sum(g1, m)).astype(dt)                  # straight: x1_i sum_h g1_hi
    top_ref[:, 1] = _spread(g1, _mix(g2, x2)).astype(dt)              # cross: sum_h g1_hi sum_j g2_hj x2_j
    bot_ref[:, 0] = _spread(g2, _mix(g1, x1)).astype(dt)
    bot_ref[:, 1] = (x2 * _heads_sum(g2, m)).astype(dt)


def _vd_bwd_kernel(p1_ref, p2_ref, g1_ref, g2_ref, dtop_ref, dbot_ref, dp1_ref, dp2_ref, dg1_ref, dg2_ref):
    x1, r1 = _act(p1_ref)
    x2, r2 = _act(p2_ref)
    g1, g2 = g1_ref[...].astype(f32), g2_ref[...].astype(f32)
    d11, d12 = dtop_ref[:, 0].astype(f32), dtop_ref[:, 1].astype(f32)
    d21, d22 = dbot_ref[:, 0].astype(f32), dbot_ref[:, 1].astype(f32)
    y1, y2 = _mix(g1, x1), _mix(g2, x2)
    dy1, dy2 = _mix(g2, d21), _mix(g1, d12)  # through the cross flows' spreads
    # d/dg: straight flows give sum_m d * x for every head; cross flows give both of their factors.
    h, m = g1.shape[1], x1.shape[-1]
    dg1 = _units_sum(d11 * x1, h) + _inner(y2, d12) + _inner(dy1, x1)
    dg2 = _units_sum(d22 * x2, h) + _inner(y1, d21) + _inner(dy2, x2)
    dx1 = d11 * _heads_sum(g1, m) + _spread(g1, dy1)
    dx2 = d22 * _heads_sum(g2, m) + _spread(g2, dy2)
    dp1_ref[...] = (dx1 * 2.0 * r1).astype(dp1_ref.dtype)
    dp2_ref[...] = (dx2 * 2.0 * r2).astype(dp2_ref.dtype)
    dg1_ref[...] = dg1.astype(dg1_ref.dtype)
    dg2_ref[...] = dg2.astype(dg2_ref.dtype)


@jax.custom_vjp
def vd_mix(p1_nim, p2_njm, g1_nhi, g2_nhj):
    """VD: ``(top, bottom)``, each ``[n, 2, E, m/2]`` in ``p``'s dtype: the inputs of ``[v11; v12]`` and
    ``[v21; v22]`` (straight flow first for top, cross flow first for bottom, as the weights are
    stacked). Reference: ``reference.vd_mix_reference``."""
    n, e, m = p1_nim.shape
    block = _block(n, g1_nhi.shape[1], e, m, 8)
    out = ((2, e, m), p1_nim.dtype, "tokens")
    return tuple(token_call(_vd_fwd_kernel, (p1_nim, p2_njm, g1_nhi, g2_nhj), (True,) * 4, [out, out],
                            block=block, name="monet_vd_mix_fwd"))


def _vd_fwd(p1, p2, g1, g2):
    return vd_mix(p1, p2, g1, g2), (p1, p2, g1, g2)


def _vd_bwd(res, cot):
    p1, p2, g1, g2 = res
    dtop, dbot = cot
    n, e, m = p1.shape
    h = g1.shape[1]
    block = _block(n, h, e, m, VD_ARRAYS)
    return tuple(token_call(
        _vd_bwd_kernel, (p1, p2, g1, g2, dtop, dbot), (True,) * 6,
        [((e, m), p1.dtype, "tokens"), ((e, m), p2.dtype, "tokens"), ((h, e), g1.dtype, "tokens"),
         ((h, e), g2.dtype, "tokens")], block=block, name="monet_vd_mix_bwd"))


vd_mix.defvjp(_vd_fwd, _vd_bwd)

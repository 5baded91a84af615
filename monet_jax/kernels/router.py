"""Fused router kernel: threshold, masked softmax and aux-loss token sums in one pass per token block.

The per-head BatchNorm statistics (a reduction over the global batch that XLA partitions, and the
running-statistics update) stay outside in :class:`~monet_jax.model.router.HeadBatchNorm`; the kernel
gets ``mean_h`` and ``var_h``. The threshold test is done on ``(z - mean_h) * rsqrt(var_h + eps)`` with
the very operations of the reference rather than on raw logits against ``mean_h + sigma * std_h``: both
are the same test in exact arithmetic (BatchNorm is monotone per head), but only the former is
bit-identical under rounding (ties at ``max_e`` and values at ``sigma``), and it costs one
multiply-add per element.

Gradients reach only the logits through the softmax: the mask is boolean, so the statistics get none.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch
from monet_jax.kernels.common import token_call


def _fwd_kernel(z_ref, mean_ref, rstd_ref, g_ref, *aux_refs, sigma: float, n_valid: int, block: int):
    z = z_ref[...].astype(jnp.float32)
    nrm = (z - mean_ref[...][None]) * rstd_ref[...][None]
    thr = jnp.minimum(jnp.max(nrm, axis=-1, keepdims=True), sigma)
    zm = jnp.where(nrm >= thr, z, -1e10)
    e = jnp.exp(zm - jnp.max(zm, axis=-1, keepdims=True))
    s = jnp.sum(e, axis=-1, keepdims=True)
    g = e / s
    g_ref[...] = g
    if aux_refs:
        col_ref, amb_ref = aux_refs
        row = pl.program_id(0) * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        valid = row < n_valid  # padded rows add nothing to the sums
        col_ref[...] = jnp.sum(jnp.where(valid, g, 0.0), axis=0, keepdims=True)
        amb_ref[...] = jnp.sum(jnp.where(valid, 1.0 - 1.0 / s, 0.0), axis=0, keepdims=True)  # max_e g = 1/s


def _bwd_kernel(g_ref, dg_ref, dcol_ref, damb_ref, dz_ref):
    g = g_ref[...]
    dg = dg_ref[...] + dcol_ref[...][None]
    tie = (g == jnp.max(g, axis=-1, keepdims=True)).astype(jnp.float32)
    dg = dg - damb_ref[...][None] * tie / jnp.sum(tie, axis=-1, keepdims=True)  # max splits over ties, as jnp.max
    dz_ref[...] = g * (dg - jnp.sum(g * dg, axis=-1, keepdims=True))


def _block(n: int, h: int, e: int) -> int:
    return dispatch.block_tokens(n, 6 * h * e * 4)


def _forward(z_nhe, mean_h, var_h, sigma, eps, with_aux):
    n, h, e = z_nhe.shape
    mean_he = jnp.broadcast_to(mean_h[:, None], (h, e)).astype(jnp.float32)
    rstd_he = jnp.broadcast_to(jax.lax.rsqrt(var_h[:, None] + eps), (h, e)).astype(jnp.float32)
    block = _block(n, h, e)
    outs = [((h, e), jnp.float32, "tokens")]
    if with_aux:
        outs += [((h, e), jnp.float32, "blocks"), ((h, 1), jnp.float32, "blocks")]
    kernel = partial(_fwd_kernel, sigma=float(sigma), n_valid=n, block=block)
    res = token_call(kernel, (z_nhe, mean_he, rstd_he), (True, False, False), outs, block=block,
                     name="monet_router_fwd")
    if not with_aux:
        return res[0]
    return res[0], res[1].sum(axis=0), res[2].sum(axis=(0, 2))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def fused_router(z_nhe, mean_h, var_h, sigma: float, eps: float = 1e-5, with_aux: bool = False):
    """Routing probabilities ``g`` ``[n, H, E]`` (float32) of raw logits ``z``; with ``with_aux`` also
    ``sum_n g`` ``[H, E]`` and ``sum_n (1 - max_e g)`` ``[H]``. Reference: ``reference.router_reference``."""
    return _forward(z_nhe, mean_h, var_h, sigma, eps, with_aux)


def _vjp_fwd(z_nhe, mean_h, var_h, sigma, eps, with_aux):
    out = _forward(z_nhe, mean_h, var_h, sigma, eps, with_aux)
    g = out[0] if with_aux else out
    return out, (g, mean_h, var_h)


def _vjp_bwd(sigma, eps, with_aux, res, cot):
    g, mean_h, var_h = res
    n, h, e = g.shape
    if with_aux:
        dg, dcol, damb = cot
    else:
        dg, dcol, damb = cot, jnp.zeros((h, e), jnp.float32), jnp.zeros((h,), jnp.float32)
    block = _block(n, h, e)
    (dz,) = token_call(_bwd_kernel, (g, dg.astype(jnp.float32), dcol.astype(jnp.float32),
                                     damb.astype(jnp.float32)[:, None]),
                       (True, True, False, False), [((h, e), jnp.float32, "tokens")], block=block,
                       name="monet_router_bwd")
    return dz, jnp.zeros_like(mean_h), jnp.zeros_like(var_h)


fused_router.defvjp(_vjp_fwd, _vjp_bwd)

"""Fused router kernel: threshold, masked softmax and aux-loss token sums in one pass per token block.

The per-head BatchNorm statistics (a reduction over the global batch that XLA partitions, and the
running-statistics update) stay outside in :class:`~monet_jax.model.router.HeadBatchNorm`; the kernel
gets ``mean_h`` and ``var_h``. The threshold test is done on ``(z - mean_h) * rsqrt(var_h + eps)`` with
the very operations of the reference rather than on raw logits against ``mean_h + sigma * std_h``: both
are the same test in exact arithmetic (BatchNorm is monotone per head), but only the former is
bit-identical under rounding (ties at ``max_e`` and values at ``sigma``), and it costs one
multiply-add per element.

Logits ``z`` are ``[b, H, E, t]`` (the router projection written with tokens on the 128 lanes, as the mixing
kernels read them), so ``g`` leaves the kernel in the mixing layout and dtype: no ``[t, H, E]`` float32
probabilities, no transpose and no cast pass between the router and the expert layers. The maximum and
the softmax run over the sublane (expert) axis; the aux-loss sums stay lane-partial (one ``[H, E]`` slab of
128 lanes per batch row, accumulated over the token blocks) so no cross-lane reduction runs per block.

On a GPU (Triton) the grid's programs run in parallel, so nothing accumulates across them: each program (one
head, :data:`GPU_TOKENS` tokens, the whole expert axis, whose size Triton wants a power of two: other sizes are
padded with logits no threshold passes) writes its block's token sums, and XLA adds them up.

Gradients reach only the logits through the softmax: the mask is boolean, so the statistics get none.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from monet_jax.kernels import dispatch

VMEM_BUDGET = 6 << 20  # bytes per grid step: double-buffered blocks and float32 temporaries
GPU_TOKENS = 16  # tokens per GPU program: a [E, 16] float32 tile per value (8,192 elements at E = 512)
GPU_WARPS = 8


def _probs(z, mean, rstd, sigma: float):
    """``(g, s)`` of a ``[h, E, t]`` block: the reference's operations over the expert axis 1 (``s``: the
    softmax denominator, so ``max_e g = 1 / s``)."""
    nrm = (z - mean) * rstd
    thr = jnp.minimum(jnp.max(nrm, axis=1, keepdims=True), sigma)
    zm = jnp.where(nrm >= thr, z, -1e10)
    e = jnp.exp(zm - jnp.max(zm, axis=1, keepdims=True))
    s = jnp.sum(e, axis=1, keepdims=True)
    return e / s, s


def _fwd_kernel(z_ref, mean_ref, rstd_ref, g_ref, col_ref, amb_ref, *, sigma: float, n_valid: int, gpu: bool):
    ti, tb = pl.program_id(2), z_ref.shape[-1]
    g, s = _probs(z_ref[...].astype(jnp.float32), mean_ref[...], rstd_ref[...], sigma)
    g_ref[...] = g.astype(g_ref.dtype)
    valid = ti * tb + jax.lax.broadcasted_iota(jnp.int32, s.shape, 2) < n_valid  # padded tokens add nothing
    if gpu:  # this block's token sums, one column per token block
        col_ref[...] = jnp.sum(jnp.where(valid, g, 0.0), axis=2, keepdims=True)
        amb_ref[...] = jnp.sum(jnp.where(valid, 1.0 - 1.0 / s, 0.0), axis=2, keepdims=True)
        return

    @pl.when(ti == 0)
    def _():
        col_ref[...] = jnp.zeros(col_ref.shape, col_ref.dtype)
        amb_ref[...] = jnp.zeros(amb_ref.shape, amb_ref.dtype)

    col_ref[...] += jnp.where(valid, g, 0.0)
    amb_ref[...] += jnp.where(valid, 1.0 - 1.0 / s, 0.0)  # max_e g = 1/s


def _bwd_kernel(z_ref, mean_ref, rstd_ref, dg_ref, dcol_ref, damb_ref, dz_ref, *, sigma: float):
    g, _ = _probs(z_ref[...].astype(jnp.float32), mean_ref[...], rstd_ref[...], sigma)  # as forward
    dg = dg_ref[...].astype(jnp.float32) + dcol_ref[...]
    tie = (g == jnp.max(g, axis=1, keepdims=True)).astype(jnp.float32)
    dg = dg - damb_ref[...] * tie / jnp.sum(tie, axis=1, keepdims=True)
    dz_ref[...] = (g * (dg - jnp.sum(g * dg, axis=1, keepdims=True))).astype(dz_ref.dtype)


def _gpu() -> bool:
    return dispatch.target_platform() == "gpu"


def _blocks(h: int, e: int, t: int) -> tuple[int, int]:
    """(heads per block, token block): 128-lane token blocks (the whole sequence when shorter) and the most
    heads dividing ``H`` whose blocks and temporaries fit the budget (a dozen float32 ``[E, t]`` per head). On a
    GPU one head and :data:`GPU_TOKENS` tokens (a power of two)."""
    if _gpu():
        return 1, 1 << min(max(0, (t - 1).bit_length()), GPU_TOKENS.bit_length() - 1)
    tb = t if t <= 128 else 128
    fits = [k for k in range(1, h + 1) if h % k == 0 and k * e * tb * 4 * 12 <= VMEM_BUDGET]
    return (max(fits) if fits else 1), tb


def _call(kernel, args, kinds, outs, *, dims, name: str):
    """Run ``kernel`` over a ``(batch, head block, token block)`` grid; ``dims`` = ``(b, H, E, t)``. ``kinds``:
    per argument ``bhet`` (``[b, H, E, t]``) or ``h`` (``[H, x, y]``, blocked over heads only); ``outs``:
    ``(shape, dtype, kind)`` with kind ``bhet`` or ``acc`` (``[b, H, x, tb]``, accumulated over the token
    blocks; on a GPU ``[b, H, x, token blocks]``, one column per block: the last axis of an ``acc`` shape is set
    here)."""
    b, h, e, t = dims
    hb, tb = _blocks(h, e, t)
    tpad = -(-t // tb) * tb
    acc = (lambda shape: (None, hb, shape[2], 1), lambda bi, hi, ti: (bi, hi, 0, ti)) if _gpu() else \
        (lambda shape: (None, hb, *shape[2:]), lambda bi, hi, ti: (bi, hi, 0, 0))
    blocks = {"bhet": (lambda shape: (None, hb, e, tb), lambda bi, hi, ti: (bi, hi, 0, ti)), "acc": acc,
              "h": (lambda shape: (hb, *shape[1:]), lambda bi, hi, ti: (hi, 0, 0))}
    spec = lambda shape, kind: pl.BlockSpec(blocks[kind][0](shape), blocks[kind][1])  # noqa: E731
    tokens = ("bhet",)
    padded = [jnp.pad(a, [(0, 0)] * 3 + [(0, tpad - t)]) if k in tokens and tpad != t else a
              for a, k in zip(args, kinds, strict=True)]
    acc_width = tpad // tb if _gpu() else tb
    out_shape = [jax.ShapeDtypeStruct((*shape[:-1], tpad if kind in tokens else acc_width), dt)
                 for shape, dt, kind in outs]
    semantics = ("parallel", "parallel", "arbitrary")  # the token axis accumulates the aux sums
    results = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(b, h // hb, tpad // tb),
        in_specs=[spec(a.shape, k) for a, k in zip(padded, kinds, strict=True)],
        out_specs=[spec(s.shape, k) for s, (_, _, k) in zip(out_shape, outs, strict=True)],
        interpret=dispatch.interpret_mode(), name=name,
        compiler_params=dispatch.compiler_params(dispatch.target_platform(), semantics, num_warps=GPU_WARPS))(*padded)
    return [r[..., :t] if kind in tokens and tpad != t else r for r, (_, _, kind) in zip(results, outs, strict=True)]


def _stats(mean_h, var_h, eps):
    h = mean_h.shape[0]
    return (mean_h.reshape(h, 1, 1).astype(jnp.float32),
            jax.lax.rsqrt(var_h.reshape(h, 1, 1).astype(jnp.float32) + eps))


def _pad_experts(a, value: float):
    """On a GPU, ``[b, H, E, t]`` padded along ``E`` to a power of two (Triton's tiles) with ``value``."""
    e = a.shape[2]
    if not _gpu() or e & (e - 1) == 0:
        return a
    return jnp.pad(a, [(0, 0), (0, 0), (0, (1 << e.bit_length()) - e), (0, 0)], constant_values=value)


NO_LOGIT = -1e30  # a padded expert's logit: below any threshold, so its probability is exactly zero


def _forward(z_bhet, mean_h, var_h, sigma, eps, dtype):
    b, h, e, t = z_bhet.shape
    z = _pad_experts(z_bhet, NO_LOGIT)
    mean, rstd = _stats(mean_h, var_h, eps)
    ep = z.shape[2]
    outs = [((b, h, ep, t), dtype, "bhet"), ((b, h, ep, 0), jnp.float32, "acc"), ((b, h, 1, 0), jnp.float32, "acc")]
    g, col, amb = _call(partial(_fwd_kernel, sigma=float(sigma), n_valid=t, gpu=_gpu()), (z, mean, rstd),
                        ("bhet", "h", "h"), outs, dims=(b, h, ep, t), name="monet_router_fwd")
    return g[:, :, :e], col.sum(axis=(0, 3))[:, :e], amb.sum(axis=(0, 2, 3))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def fused_router(z_bhet, mean_h, var_h, sigma: float, eps: float, dtype):
    """``g`` ``[b, H, E, t]`` (the mixing layout) in ``dtype`` from raw logits ``z`` ``[b, H, E, t]`` (any float
    dtype; float32 inside),
    with ``sum_bt g`` ``[H, E]`` and ``sum_bt (1 - max_e g)`` ``[H]`` (float32). The backward recomputes ``g``
    from ``z`` (the same operations, so the same mask) instead of saving it.
    Reference: ``reference.router_reference`` on ``z`` transposed to ``[b*t, H, E]``."""
    return _forward(z_bhet, mean_h, var_h, sigma, eps, dtype)


def _vjp_fwd(z_bhet, mean_h, var_h, sigma, eps, dtype):
    return _forward(z_bhet, mean_h, var_h, sigma, eps, dtype), (z_bhet, mean_h, var_h)


def _vjp_bwd(sigma, eps, dtype, res, cot):
    z, mean_h, var_h = res
    dg, dcol, damb = cot
    b, h, e, t = z.shape
    mean, rstd = _stats(mean_h, var_h, eps)
    dcol = _pad_experts(dcol.astype(jnp.float32)[None, :, :, None], 0.0)[0]
    damb = damb.astype(jnp.float32).reshape(h, 1, 1)
    args = (_pad_experts(z, NO_LOGIT), mean, rstd, _pad_experts(dg, 0.0), dcol, damb)
    ep = args[0].shape[2]
    (dz,) = _call(partial(_bwd_kernel, sigma=float(sigma)), args, ("bhet", "h", "h", "bhet", "h", "h"),
                  [((b, h, ep, t), z.dtype, "bhet")], dims=(b, h, ep, t), name="monet_router_bwd")
    return dz[:, :, :e], jnp.zeros_like(mean_h), jnp.zeros_like(var_h)


fused_router.defvjp(_vjp_fwd, _vjp_bwd)

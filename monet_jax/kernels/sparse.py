"""Sparse experts for decoding and small batches: read only the ``v`` rows of the experts in use.

``g1``/``g2`` are exactly zero outside the experts that pass the router's threshold (about ``moe_topk``
per head), so the inputs of the ``v`` projections (and the expert biases' weights) are zero outside the
experts some token and head of the call uses: the union, at most ``tokens * H * moe_topk`` of ``E`` per
half. This path gathers those experts' rows of ``v`` and ``b`` once per call, at a static width, and
projects only them; a union wider than that runs the dense projection (``lax.cond``), so the result is
always exact.

Counting bytes: a ``v`` expert is ``m`` consecutive rows of its ``[E*m, d]`` kernel, so gathering it reads
just its bytes. ``u`` is left dense: an expert's ``m`` columns of the ``[d, E*m]`` kernel are strided, and
gathering them on a CPU read about as many cache lines (and took as long) as the dense matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def project_experts(a_bte_m: list, kernels: list, s_bte, bias_ed, compute_dtype, width: int | None = None):
    """``sum_k a_k @ kernel_k + s @ bias``: the ``v`` side of a Monet layer, with ``a_k`` ``[b, t, E, m]``
    and ``s`` ``[b, t, E]`` zero outside the experts with ``s != 0`` (``s = sum_h g``), ``kernel_k``
    ``[E*m, d]`` and ``bias`` ``[E, d]``. With ``width``: the experts in use only, when at most ``width``."""
    cd = compute_dtype
    e = s_bte.shape[-1]
    use = jnp.any(s_bte != 0, axis=(0, 1))

    def narrow(a_bte_m, kernels, s_bte, bias_ed):
        idx = jnp.nonzero(use, size=width, fill_value=0)[0]
        keep = jnp.arange(width) < use.sum()  # slots past the union repeat expert 0: weight them 0
        out = jnp.einsum("btw,wd->btd", jnp.where(keep, s_bte[..., idx], 0), bias_ed[idx].astype(cd))
        for a, k in zip(a_bte_m, kernels, strict=True):
            a_btwm = jnp.where(keep[:, None], jnp.take(a, idx, axis=2), 0)
            out = out + jnp.einsum("btwm,wmd->btd", a_btwm, k.reshape(e, -1, k.shape[-1])[idx].astype(cd))
        return out

    def dense(a_bte_m, kernels, s_bte, bias_ed):
        out = jnp.einsum("bte,ed->btd", s_bte, bias_ed.astype(cd))
        for a, k in zip(a_bte_m, kernels, strict=True):
            out = out + jnp.einsum("...i,io->...o", a.reshape(*a.shape[:2], -1), k.astype(cd))
        return out

    if width is None or width >= e:
        return dense(a_bte_m, kernels, s_bte, bias_ed)
    return jax.lax.cond(use.sum() <= width, narrow, dense, a_bte_m, kernels, s_bte, bias_ed)

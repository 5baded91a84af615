"""Monet's product-key router: two projections, BatchNorm top-k approximation, masked softmax.

The projections accumulate in float32 and round the logits once to the compute dtype, as the upstream model's
projection in the model dtype followed by ``.float()`` does (DESIGN section 1); everything after them runs in
float32. So the logits cross memory in the compute dtype (bfloat16 in training: half the bytes of the float32
logits, read by the BatchNorm statistics and the fused kernel, forward and backward).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from monet_jax.config import MonetConfig
from monet_jax.kernels import dispatch
from monet_jax.kernels import ops as kernel_ops
from monet_jax.kernels.lanes import probs_to_lanes
from monet_jax.kernels.reference import aux_from_sums
from monet_jax.model.layers import Dense
from monet_jax.sharding import constrain


class HeadBatchNorm(nnx.Module):
    """PyTorch ``BatchNorm1d(H, affine=False)`` over ``[b, t, H, E]``: statistics per head ``h``,
    pooled over tokens and experts. Training mode normalizes with the biased batch variance and
    updates the running variance with the unbiased one; inference uses the running statistics."""

    def __init__(self, heads: int, *, momentum: float = 0.1, eps: float = 1e-5):
        self.running_mean = nnx.BatchStat(jnp.zeros((heads,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((heads,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.momentum, self.eps = momentum, eps
        self.use_running_average = True

    def statistics(self, z, axes=(0, 1, 3)):
        """(mean, biased variance) per head over ``axes`` (all but the head axis: ``[b, t, H, E]`` by default,
        ``(0, 2, 3)`` for ``[b, H, E, t]``); under ``jit`` with a sharded batch these are global."""
        z = z.astype(jnp.float32)
        mean_h = jnp.mean(z, axis=axes)
        shape = [1] * z.ndim
        shape[next(a for a in range(z.ndim) if a not in axes)] = -1
        var_h = jnp.mean(jnp.square(z - mean_h.reshape(shape)), axis=axes)
        return mean_h, var_h

    def __call__(self, z_bthe):
        return self.normalize(z_bthe, *self.moments(z_bthe))

    def normalize(self, z_bthe, mean_h, var_h):
        """``z`` ``[b, t, H, E]`` in BatchNorm space with the given per-head statistics."""
        return (z_bthe - mean_h[:, None]) * jax.lax.rsqrt(var_h[:, None] + self.eps)

    def moments(self, z, axes=(0, 1, 3)):
        """The (mean, variance) per head that normalize ``z``: running ones in inference; in training the
        batch ones (over ``axes``, as :meth:`statistics`), updating the running statistics (the fused router
        kernel takes these)."""
        if self.use_running_average:
            mean_h, var_h = self.running_mean[...], self.running_var[...]
        else:
            mean_h, var_h = self.statistics(z, axes)
            n = math.prod(z.shape[a] for a in axes)
            m = self.momentum
            unbiased_h = var_h * (n / max(n - 1, 1))
            self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean_h)
            self.running_var[...] = (1 - m) * self.running_var[...] + m * jax.lax.stop_gradient(unbiased_h)
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return mean_h, var_h


def sparse_softmax(z_bthe, n_bthe, sigma: float):
    """Softmax of the raw logits over experts whose normalized logit reaches
    ``min(max_e n, sigma)``; the rest get exactly zero (at least one expert always passes)."""
    threshold = jnp.minimum(jnp.max(n_bthe, axis=-1, keepdims=True), sigma)
    return jax.nn.softmax(jnp.where(n_bthe >= threshold, z_bthe, -1e10), axis=-1)


def project_lanes(x_btd, kernel_dk, heads: int, dtype):
    """The router's logits ``x @ w`` as ``[b, H, E, t]`` (the layout of the fused router kernel), accumulated in
    float32 and rounded to ``dtype``.

    Written as a product batched over rows, ``w^T`` broadcast to ``[b, H, E, d]`` times ``x^T`` ``[b, d, t]``:
    its natural output is then the kernel's layout. XLA fuses the broadcast into the product and turns its
    transpose (the weight gradient) into one contraction over rows and tokens; the plain ``btd,dhe->bhet``
    made XLA write ``[b, E, H, t]`` and transpose the float32 logits (TPU v4, the router of Monet-HD 1.4B
    forward and backward on 8 x 2048 tokens: 18% fewer bytes this way)."""
    b, d = x_btd.shape[0], x_btd.shape[-1]
    w_hed = kernel_dk.astype(dtype).T.reshape(heads, -1, d)
    x_bdt = jnp.swapaxes(x_btd.astype(dtype), 1, 2)
    return jnp.einsum("bhed,bdt->bhet", jnp.broadcast_to(w_hed, (b, *w_hed.shape)), x_bdt,
                      preferred_element_type=jnp.float32).astype(dtype)


class Router(nnx.Module):
    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        self.heads, self.experts, self.sigma = cfg.moe_heads, cfg.moe_experts, cfg.router_sigma
        kw = dict(use_bias=False, std=cfg.initializer_range, param_dtype=param_dtype,
                  compute_dtype=compute_dtype, rngs=rngs)
        self.w1 = Dense(cfg.hidden_size, self.heads * self.experts, axes=("embed", "router"), **kw)
        self.w2 = Dense(cfg.hidden_size, self.heads * self.experts, axes=("embed", "router"), **kw)
        self.norm1 = HeadBatchNorm(self.heads)
        self.norm2 = HeadBatchNorm(self.heads)
        self.moe_impl, self.sparse_k = cfg.moe_impl, dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, cfg.moe_experts)
        self.aux_probs = "routed"  # what the uniformity loss's token sums add up (training only: see route)

    def __call__(self, x_btd):
        """Returns ``(g1, g2)``, each ``[b, t, H, E]`` float32."""
        return self.route(x_btd)[:2]

    def route(self, x_btd, lanes_dtype=None):
        """``(g1, g2, sums, g1_lanes, g2_lanes)``: the routing probabilities; for the aux losses, ``sums`` = per
        half the token sums ``sum_bt g`` ``[H, E]`` and ``sum_bt (1 - max_e g)`` ``[H]``; and with
        ``lanes_dtype``, ``g`` again in the mixing layout ``[b, H, E, t]`` of :mod:`monet_jax.kernels.lanes`
        in that dtype (else None).

        On ``pallas`` the router runs in the mixing layout: the projection writes ``z`` as ``[b, H, E, t]``
        and the fused kernel returns ``g`` there, in the mixing dtype, with the token sums (so
        the training step never reads ``g`` again for them). ``g1``/``g2`` ``[b, t, H, E]`` are then computed
        from the same logits and statistics by the XLA formula, only where a caller uses them (the training
        step does not).

        A third sum ``[H, E]`` is what the uniformity loss reads: ``sum_bt g`` again, or with
        ``aux_probs = "dense"`` the sum of ``softmax(z)`` over all ``E`` experts. An expert below the
        threshold on every token has ``g = 0``, so no gradient through ``g``, and once unused it never comes
        back; the dense probabilities give every expert the uniformity loss's gradient. ``g`` and the
        layer's output do not change."""
        b, t, _ = x_btd.shape
        fused = dispatch.choose(self.moe_impl, b * t, self.heads, self.experts, self.sparse_k) == "pallas"
        probs, sums, lanes = [], [], []
        for w, norm in ((self.w1, self.norm1), (self.w2, self.norm2)):
            if fused:
                g, s, g_lanes = self._route_lanes(x_btd, w, norm, lanes_dtype or jnp.float32)
            else:
                g, s = self._route(x_btd, w, norm)
                g_lanes = probs_to_lanes(g, lanes_dtype) if lanes_dtype is not None else None
            probs.append(g)
            sums.append(s)
            lanes.append(g_lanes if lanes_dtype is not None else None)  # fused without a dtype: not asked for
        return probs[0], probs[1], tuple(sums), lanes[0], lanes[1]

    def _route(self, x_btd, w, norm):
        b, t, _ = x_btd.shape
        z = w(x_btd, out_dtype=jnp.float32).astype(w.compute_dtype).astype(jnp.float32)
        z_bthe = z.reshape(b, t, self.heads, self.experts)
        z_bthe = constrain(z_bthe, ("batch", "seq", None, "experts"))
        g = sparse_softmax(z_bthe, norm(z_bthe), self.sigma)
        col, amb = jnp.sum(g, axis=(0, 1)), jnp.sum(1.0 - jnp.max(g, axis=-1), axis=(0, 1))
        dense = jnp.sum(jax.nn.softmax(z_bthe, axis=-1), axis=(0, 1)) if self.aux_probs == "dense" else col
        return g, (col, amb, dense)

    def _route_lanes(self, x_btd, w, norm, dtype):
        """One half on the fused kernel, in the mixing layout."""
        z_bhet = project_lanes(x_btd, w.kernel[...], self.heads, w.compute_dtype)
        z_bhet = constrain(z_bhet, ("batch", None, "experts", "seq"))
        mean_h, var_h = norm.moments(z_bhet, axes=(0, 2, 3))  # batch statistics here: global, running update
        # The statistics only set the boolean mask, so no gradient reaches them: stopped here, the backward pass
        # does not differentiate their reductions with zero cotangents (a pass over z per half and group, which
        # XLA cannot fold: 0 * z is not 0 for every float).
        mean_h, var_h = jax.lax.stop_gradient(mean_h), jax.lax.stop_gradient(var_h)
        g_lanes, col, amb = kernel_ops.router_probs(z_bhet, mean_h, var_h, self.sigma, norm.eps, dtype)
        z_bthe = jnp.transpose(z_bhet, (0, 3, 1, 2)).astype(jnp.float32)
        g = sparse_softmax(z_bthe, norm.normalize(z_bthe, mean_h, var_h), self.sigma)
        dense = col
        if self.aux_probs == "dense":
            dense = jnp.sum(jax.nn.softmax(z_bhet.astype(jnp.float32), axis=2), axis=(0, 3))
        return g, (col, amb, dense), g_lanes


def router_aux(sums, tokens: int):
    """``(unif, amb, usage, routed_unif)`` of one router from :meth:`Router.route`'s sums, averaged over its
    two halves: the uniformity loss (over the sums ``aux_probs`` chose) and ambiguity loss (DESIGN section 1),
    the fraction of experts any of the ``tokens`` routed to, and the paper's uniformity over ``g`` (a health
    measure whatever the loss reads)."""
    unif = sum(aux_from_sums(unif_he, amb_h, tokens)[0] for _, amb_h, unif_he in sums) / 2
    routed, amb = (sum(x) / 2 for x in zip(*(aux_from_sums(col, amb_h, tokens) for col, amb_h, _ in sums)))
    usage = sum(jnp.mean(col_he > 0) for col_he, _, _ in sums) / 2  # g >= 0: a sum > 0 iff some token used it
    return unif, amb, usage, routed


def aux_losses(g1_bthe, g2_bthe):
    """Uniformity and ambiguity losses of one router from its probabilities (the reference of the sums)."""
    cols = [jnp.sum(g, axis=(0, 1)) for g in (g1_bthe, g2_bthe)]
    sums = [(c, jnp.sum(1.0 - jnp.max(g, axis=-1), axis=(0, 1)), c) for c, g in zip(cols, (g1_bthe, g2_bthe))]
    return router_aux(sums, g1_bthe.shape[0] * g1_bthe.shape[1])[:2]

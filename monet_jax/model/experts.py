"""Monet expert layers (vertical and horizontal decomposition) and the dense MLP baseline.

Both decompositions mix ``E * E`` composed experts without materializing any ``[.., E, E]`` tensor:
they are a dense MLP of width ``E * m`` whose hidden units are reweighted by ``g1`` / ``g2``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from monet_jax.config import MonetConfig
from monet_jax.kernels import dispatch, lanes, sparse
from monet_jax.kernels import ops as kernel_ops
from monet_jax.model.layers import Dense, param, project, relu2
from monet_jax.sharding import constrain

EXPERT_ACT = ("batch", "seq", "experts", None)  # [b, t, E, m]: experts split like tensor-parallel hidden units
LANES_ACT = ("batch", None, "experts", "seq")  # [b, m, E, t]: the lane-dense layout (kernels.lanes)


class ExpertDeletion(nnx.Variable):
    """A layer's ``[E, E]`` 0/1 matrix of deleted composed experts ``(i, j)``: never trained, never saved."""


def deleted_weight(ga_btha, gb_bthb, d_ab):
    """``sum_h gb_hb sum_a D_ab ga_ha``: the routing weight of the deleted experts ``(a, b)`` per slot ``b``
    (the other side with ``D.T`` and the roles of ``g1``, ``g2`` swapped)."""
    return jnp.einsum("bthj,bthj->btj", gb_bthb, jnp.einsum("ij,bthi->bthj", d_ab, ga_btha))


def deleted_units(xa_btam, ga_btha, gb_bthb, d_ab):
    """``sum_h gb_hb sum_a D_ab ga_ha x_am``: the deleted experts' units ``x_a`` gathered at slot ``b``.
    Goes through ``[b, t, H, E, m]`` (H times the expert activations), never a ``[.., E, E]`` per token."""
    y_bthim = ga_btha[..., None] * xa_btam[:, :, None]
    return jnp.einsum("bthj,bthjm->btjm", gb_bthb, jnp.einsum("ij,bthim->bthjm", d_ab, y_bthim))


class VerticalExperts(nnx.Module):
    """VD: expert ``(i, j)`` = left half ``i`` and right half ``j`` of the hidden units, each feeding
    both the top and bottom halves of the output (straight and cross flows)."""

    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, e, m = cfg.hidden_size, cfg.moe_experts, cfg.moe_dim // 2
        self.experts, self.half_dim, self.compute_dtype = e, m, compute_dtype
        kw = dict(std=cfg.initializer_range, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        up, down = dict(axes=("embed", "expert_mlp"), use_bias=True), dict(axes=("expert_mlp", "embed"), use_bias=False)
        self.u1 = Dense(d, e * m, **up, **kw)
        self.u2 = Dense(d, e * m, **up, **kw)
        self.v11 = Dense(e * m, d // 2, **down, **kw)
        self.v12 = Dense(e * m, d // 2, **down, **kw)
        self.v21 = Dense(e * m, d // 2, **down, **kw)
        self.v22 = Dense(e * m, d // 2, **down, **kw)
        self.b1 = param(jnp.zeros((e, d // 2), param_dtype), ("experts", "embed"))
        self.b2 = param(jnp.zeros((e, d // 2), param_dtype), ("experts", "embed"))
        self.moe_impl, self.sparse_k = cfg.moe_impl, dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, e)

    def __call__(self, x_btd, g1_bthi, g2_bthj, deleted=None, lanes_probs=None, carry=False):
        """``deleted``: optional ``[E, E]`` 0/1 matrix; those composed experts contribute nothing.
        ``lanes_probs``: the routing group's ``(g1, g2)`` ``[b, H, E, t]`` in the mixing layout and dtype (made
        once per group). ``carry``: return ``(out, lanes_probs)`` with the ``lanes_probs`` the group's next layer
        takes (on the Pallas path passed through the kernels, which then sum the group's gradients of ``g``:
        ``ops.vd_experts_carry``)."""
        impl = _impl(self, x_btd, g1_bthi, deleted)
        if impl in ("xla", "pallas"):
            g = lanes_probs or _to_lanes(g1_bthi, g2_bthj, self.compute_dtype)
            out, g = self._lanes(impl, x_btd, *g)
            return (out, g) if carry else out
        w = _weights(self, "u1", "u2", "v11", "v12", "v21", "v22", "b1", "b2")
        out = vd_layer(x_btd, w, g1_bthi, g2_bthj, deleted, compute_dtype=self.compute_dtype,
                       width=_sparse_width(self, x_btd, g1_bthi, impl))
        return (out, lanes_probs) if carry else out

    def _lanes(self, impl: str, x_btd, g1, g2):
        """The layer in the lane-dense layout of :mod:`monet_jax.kernels.lanes` (``impl``: xla or pallas)."""
        cd, e = self.compute_dtype, self.experts
        p1 = constrain(lanes.up(x_btd, self.u1.kernel[...], self.u1.bias[...], e, cd), LANES_ACT)
        p2 = constrain(lanes.up(x_btd, self.u2.kernel[...], self.u2.bias[...], e, cd), LANES_ACT)
        w_top, w_bot = self._v("v11", "v12"), self._v("v21", "v22")
        b1, b2 = self.b1[...].astype(cd), self.b2[...].astype(cd)
        if impl == "pallas":
            out, g1, g2 = kernel_ops.vd_experts_carry(p1, p2, g1, g2, w_top, w_bot, b1, b2)
            return out, (g1, g2)
        return lanes.vd_experts(p1, p2, g1, g2, w_top, w_bot, b1, b2), (g1, g2)

    def _v(self, first: str, second: str):
        """Two ``v`` halves stacked ``[2, E, m, d/2]`` in the compute dtype (the weights of one output half)."""
        w = jnp.stack([getattr(self, first).kernel[...], getattr(self, second).kernel[...]])
        return w.reshape(2, self.experts, self.half_dim, -1).astype(self.compute_dtype)


def vd_layer(x_btd, w: dict, g1_bthi, g2_bthj, deleted=None, *, compute_dtype, width=None):
    """The VD layer on the XLA path; ``w`` as ``kernels.ops.vertical``; ``width``: the sparse path's
    most experts gathered per side (:mod:`monet_jax.kernels.sparse`). Expert ``(i, j)`` outputs
    ``[V11_i x1_i + V12_i x2_j + b1_i, V21_j x1_i + V22_j x2_j + b2_j]``."""
    if width is not None and deleted is None:
        dense = partial(vd_layer, compute_dtype=compute_dtype)
        return sparse.layer(sparse.vd_narrow, dense, x_btd, w, g1_bthi, g2_bthj, width, compute_dtype)
    b, t, _ = x_btd.shape
    cd, e = compute_dtype, w["b1"].shape[0]
    g1, g2 = g1_bthi.astype(cd), g2_bthj.astype(cd)
    x1_btim = constrain(relu2(project(x_btd, w["u1"], w["u1_bias"], cd)).reshape(b, t, e, -1), EXPERT_ACT)
    x2_btjm = constrain(relu2(project(x_btd, w["u2"], w["u2_bias"], cd)).reshape(b, t, e, -1), EXPERT_ACT)
    s1_bti, s2_btj = g1.sum(axis=2), g2.sum(axis=2)
    # Cross flows contract one side over its experts first, then spread over the other side.
    y2_bthm = jnp.einsum("bthj,btjm->bthm", g2, x2_btjm)
    y1_bthm = jnp.einsum("bthi,btim->bthm", g1, x1_btim)
    cross12_btim = jnp.einsum("bthm,bthi->btim", y2_bthm, g1)
    cross21_btjm = jnp.einsum("bthm,bthj->btjm", y1_bthm, g2)
    if deleted is not None:  # subtract the deleted experts' share of each flow
        d_ij = deleted.astype(cd)
        s1_bti = s1_bti - deleted_weight(g2, g1, d_ij.T)
        s2_btj = s2_btj - deleted_weight(g1, g2, d_ij)
        cross12_btim = cross12_btim - deleted_units(x2_btjm, g2, g1, d_ij.T)
        cross21_btjm = cross21_btjm - deleted_units(x1_btim, g1, g2, d_ij)
    top = project_experts([x1_btim * s1_bti[..., None], cross12_btim], [w["v11"], w["v12"]], s1_bti, w["b1"], cd)
    bottom = project_experts([cross21_btjm, x2_btjm * s2_btj[..., None]], [w["v21"], w["v22"]], s2_btj, w["b2"], cd)
    return jnp.concatenate([top, bottom], axis=-1)


def project_experts(a_bte_m: list, kernels: list, s_bte, bias_ed, cd):
    """``sum_k a_k @ kernel_k + s @ bias``: the ``v`` side of a layer, ``a_k`` ``[b, t, E, m]``, ``s`` ``[b, t, E]``,
    ``kernel_k`` ``[E*m, d]``, ``bias`` ``[E, d]``."""
    out = jnp.einsum("bte,ed->btd", s_bte, bias_ed.astype(cd))
    for a, k in zip(a_bte_m, kernels, strict=True):
        out = out + jnp.einsum("...i,io->...o", a.reshape(*a.shape[:2], -1), k.astype(cd))
    return out


class HorizontalExperts(nnx.Module):
    """HD: expert ``(i, j)`` = bottom layer ``i`` (``u``) followed by top layer ``j`` (``v``, ``b``)."""

    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, e, m = cfg.hidden_size, cfg.moe_experts, cfg.moe_dim
        self.experts, self.dim, self.compute_dtype = e, m, compute_dtype
        kw = dict(std=cfg.initializer_range, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.u = Dense(d, e * m, axes=("embed", "expert_mlp"), use_bias=True, **kw)
        self.v = Dense(e * m, d, axes=("expert_mlp", "embed"), use_bias=False, **kw)
        self.b = param(jnp.zeros((e, d), param_dtype), ("experts", "embed"))
        self.moe_impl, self.sparse_k = cfg.moe_impl, dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, e)

    def __call__(self, x_btd, g1_bthi, g2_bthj, deleted=None, lanes_probs=None, carry=False):
        """``deleted``: optional ``[E, E]`` 0/1 matrix; those composed experts contribute nothing.
        ``lanes_probs``: the routing group's ``(g1, g2)`` ``[b, H, E, t]`` in the mixing layout and dtype (made
        once per group). ``carry``: return ``(out, lanes_probs)`` as :class:`VerticalExperts` does
        (``ops.hd_experts_carry``)."""
        cd = self.compute_dtype
        impl = _impl(self, x_btd, g1_bthi, deleted)
        if impl in ("xla", "pallas"):
            g1, g2 = lanes_probs or _to_lanes(g1_bthi, g2_bthj, cd)
            p = constrain(lanes.up(x_btd, self.u.kernel[...], self.u.bias[...], self.experts, cd), LANES_ACT)
            w = self.v.kernel[...].reshape(self.experts, self.dim, -1).astype(cd)
            bias = self.b[...].astype(cd)
            if impl == "pallas":
                out, g1, g2 = kernel_ops.hd_experts_carry(p, g1, g2, w, bias)
            else:
                out = lanes.hd_experts(p, g1, g2, w, bias)
            return (out, (g1, g2)) if carry else out
        out = hd_layer(x_btd, _weights(self, "u", "v", "b"), g1_bthi, g2_bthj, deleted, compute_dtype=cd,
                       width=_sparse_width(self, x_btd, g1_bthi, impl))
        return (out, lanes_probs) if carry else out


def hd_layer(x_btd, w: dict, g1_bthi, g2_bthj, deleted=None, *, compute_dtype, width=None):
    """The HD layer on the XLA path; ``w`` as ``kernels.ops.horizontal``; ``width`` as in ``vd_layer``."""
    if width is not None and deleted is None:
        dense = partial(hd_layer, compute_dtype=compute_dtype)
        return sparse.layer(sparse.hd_narrow, dense, x_btd, w, g1_bthi, g2_bthj, width, compute_dtype)
    b, t, _ = x_btd.shape
    cd, e = compute_dtype, w["b"].shape[0]
    g1, g2 = g1_bthi.astype(cd), g2_bthj.astype(cd)
    x_btim = constrain(relu2(project(x_btd, w["u"], w["u_bias"], cd)).reshape(b, t, e, -1), EXPERT_ACT)
    y_bthm = jnp.einsum("btim,bthi->bthm", x_btim, g1)
    z_btjm = constrain(jnp.einsum("bthm,bthj->btjm", y_bthm, g2), EXPERT_ACT)
    s2_btj = g2.sum(axis=2)
    if deleted is not None:
        d_ij = deleted.astype(cd)
        z_btjm = z_btjm - deleted_units(x_btim, g1, g2, d_ij)
        s2_btj = s2_btj - deleted_weight(g1, g2, d_ij)
    return project_experts([z_btjm], [w["v"]], s2_btj, w["b"], cd)


class DenseMLP(nnx.Module):
    """The dense baseline: LLaMA SwiGLU (``hidden_act: silu``) or a relu2 MLP of ``intermediate_size``."""

    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, std=cfg.initializer_range, param_dtype=param_dtype,
                  compute_dtype=compute_dtype, rngs=rngs)
        self.gated = cfg.hidden_act == "silu"
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), **kw) if self.gated else None
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x_btd):
        if self.gated:
            return self.down_proj(jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd))
        return self.down_proj(relu2(self.up_proj(x_btd)))


def _impl(layer, x_btd, g_bthe, deleted) -> str:
    """This call's path: ``xla`` / ``pallas`` (the lane-dense layer), ``sparse`` (only the ``v`` rows of the
    experts in use), or ``einsum`` (the ``[b, t, E, m]`` einsums of DESIGN section 1: expert deletion masks,
    and ``xla`` off TPU, where the lane-dense layout, made for the TPU's 128 lanes, measured slower on a CPU,
    most of all when decoding one token per row)."""
    if deleted is not None:
        if layer.moe_impl != "xla":
            dispatch.warn_once(f"moe_impl={layer.moe_impl}: expert deletion masks run on the XLA einsum path")
        return "einsum"
    b, t, _ = x_btd.shape
    impl = dispatch.choose(layer.moe_impl, b * t, g_bthe.shape[2], layer.experts, layer.sparse_k)
    return "einsum" if impl == "xla" and dispatch.target_platform() != "tpu" else impl


def _sparse_width(layer, x_btd, g_bthe, impl: str) -> int | None:
    """The most experts per side the sparse path gathers (None: the dense layer)."""
    b, t, _ = x_btd.shape
    return b * t * g_bthe.shape[2] * layer.sparse_k if impl == "sparse" else None


def _to_lanes(g1_bthi, g2_bthj, dtype):
    return lanes.probs_to_lanes(g1_bthi, dtype), lanes.probs_to_lanes(g2_bthj, dtype)


def _weights(layer, *names) -> dict:
    """A layer's weights as arrays for ``kernels.ops``: ``{name}`` kernels and ``{name}_bias`` biases."""
    w = {}
    for name in names:
        v = getattr(layer, name)
        if isinstance(v, Dense):
            w[name] = v.kernel[...]
            if v.bias is not None:
                w[f"{name}_bias"] = v.bias[...]
            rows = getattr(layer, f"{name}_rows", None)  # an inference copy of the kernel as [out, in]
            if rows is not None:
                w[f"{name}_rows"] = rows[...]
        else:
            w[name] = v[...]
    return w


def make_experts(cfg: MonetConfig, **kw):
    return {"vertical": VerticalExperts, "horizontal": HorizontalExperts}[cfg.moe_decompose](cfg, **kw)

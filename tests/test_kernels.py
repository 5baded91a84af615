"""Pallas kernels (interpret mode on CPU) and the sparse path against references written from the math."""

import dataclasses
import logging
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM, sharding, versions
from monet_jax.config import ConfigError, MonetConfig
from monet_jax.kernels import dispatch, lanes, mixing, mixing_gpu
from monet_jax.kernels import ops as kernel_ops
from monet_jax.kernels.reference import (
    aux_from_sums,
    hd_layer_reference,
    hd_mix_reference,
    router_reference,
    vd_layer_reference,
    vd_mix_reference,
)
from monet_jax.kernels.router import fused_router
from monet_jax.model.router import aux_losses, project_lanes, router_aux
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
BF16_TOL = 2e-2  # bfloat16 outputs/gradients vs a float32 reference on the same inputs, relative to the max


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Every test runs the kernels in interpret mode, with 8-token blocks so 37 tokens make 5 blocks."""
    monkeypatch.setattr(dispatch, "BLOCK_CAP", 8)
    with dispatch.force_interpret():
        yield


def close(got, want, tol=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


def routing(key, n, h, e, sigma=1.0):
    """Sparse routing probabilities (exact zeros) from random logits, as the router makes them."""
    z = jax.random.normal(key, (n, h, e)) * 1.5
    return router_reference(z, z.mean((0, 2)), z.var((0, 2)), sigma)[0]


def cotangent(tree, seed=7):
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(tree))))
    return jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), tree)


def value_and_vjp(fn, args, ct):
    """Outputs and ``jax.vjp`` cotangents of ``fn`` in one jitted call (interpret mode is slow eagerly)."""
    @jax.jit
    def go(args, ct):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(ct)

    return go(args, ct)


def check_vjp(fn, ref, args, tol=1e-5):
    ct = cotangent(jax.eval_shape(ref, *args))
    out, grads = value_and_vjp(fn, args, ct)
    want, want_grads = value_and_vjp(ref, args, ct)
    close(out, want, tol)
    close(grads, want_grads, tol)


# -- router -----------------------------------------------------------------------------------------
def lanes_router(b: int, sigma: float, dtype=jnp.float32):
    """The fused router (mixing layout ``[b, H, E, t]``) called with the reference's ``[n, H, E]`` logits."""
    def run(z_nhe, mean, var):
        n, h, e = z_nhe.shape
        z_bhet = z_nhe.reshape(b, n // b, h, e).transpose(0, 2, 3, 1)
        g, col, amb = fused_router(z_bhet, mean, var, sigma, 1e-5, dtype)
        return g.transpose(0, 3, 1, 2).reshape(n, h, e), col, amb

    return run


@pytest.fixture
def gpu_form(monkeypatch):
    """The kernels in their GPU (Triton) form, interpreted, with 8-token blocks, at most 16 experts per program
    (48 experts: three slices) and 8 sums per token (so the sums and outputs split into several roles)."""
    monkeypatch.setattr(mixing_gpu, "TOKENS", 8)
    monkeypatch.setattr(mixing_gpu, "EXPERTS", 16)
    monkeypatch.setattr(mixing_gpu, "SUMS", 8)
    with dispatch.lowering_for("gpu"):
        yield


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("shape, b", [((37, 3, 20), 1), ((5, 1, 7), 1), ((2 * 150, 2, 24), 2)])
def test_router_outputs_aux_sums_and_gradients(request, shape, b, platform):
    """Outputs, token sums and gradients equal the reference (150 tokens per row: two 128-lane blocks, the
    second partial). GPU form: 16-token blocks, each writing its own token sums, and experts padded to a power
    of two (20, 7 and 24 here)."""
    if platform == "gpu":
        request.getfixturevalue("gpu_form")
    z = jax.random.normal(jax.random.key(0), shape) * 2 + 0.3
    mean, var = z.mean((0, 2)), z.var((0, 2))
    router = lanes_router(b, 1.2)
    check_vjp(lambda z: router(z, mean, var), lambda z: router_reference(z, mean, var, 1.2, 1e-5), (z,))
    g, col, amb = router(z, mean, var)
    assert (np.asarray(g) == 0).any() and ((np.asarray(g) > 0).sum(-1) > 1).any()  # sparse, not one-hot
    # The token sums give the model's aux losses (averaged over the two halves there).
    unif, amb_loss = aux_from_sums(col, amb, shape[0])
    want_unif, want_amb = aux_losses(g[None], g[None])
    close((unif, amb_loss), (want_unif, want_amb))


def test_router_writes_the_mixing_dtype():
    """``g`` leaves the kernel in the mixing dtype: the float32 probabilities rounded once."""
    z = jax.random.normal(jax.random.key(3), (2 * 19, 2, 32)) * 2
    mean, var = z.mean((0, 2)), z.var((0, 2))
    g16, col16, _ = lanes_router(2, 1.2, jnp.bfloat16)(z, mean, var)
    g32, col32, _ = lanes_router(2, 1.2)(z, mean, var)
    assert g16.dtype == jnp.bfloat16 and col16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(g16), np.asarray(g32.astype(jnp.bfloat16)))
    close(col16, col32)  # the sums from the float32 values


def test_router_gradient_reaches_only_the_logits():
    """The reference with statistics computed from z has the same gradient as the kernel with them
    fixed: the statistics only enter through the boolean mask."""
    z = jax.random.normal(jax.random.key(1), (37, 3, 20))
    mean, var = z.mean((0, 2)), z.var((0, 2))
    router = lanes_router(1, 1.2)

    def ref_with_stats(z):
        return router_reference(z, z.mean((0, 2)), z.var((0, 2)), 1.2)

    check_vjp(lambda z: router(z, mean, var), ref_with_stats, (z,))
    _, vjp = jax.vjp(lambda m, v: router(z, m, v), mean, var)
    assert all(not np.asarray(c).any() for c in vjp((jnp.ones(z.shape), jnp.ones((3, 20)), jnp.ones(3))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_router_projection_writes_the_mixing_layout(dtype):
    """``project_lanes`` (a product batched over rows with ``w`` broadcast) is ``x @ w`` reshaped to
    ``[b, t, H, E]`` and moved to ``[b, H, E, t]``, written here from NumPy in float64 on the same
    ``dtype``-rounded inputs; so are its gradients in ``x`` and ``w`` (float32 accumulation: 1e-5 in float32;
    the bfloat16 gradients are rounded once, as the plain product's are). The logits come out in ``dtype``:
    the float32 sum rounded once, as upstream's projection in the model dtype."""
    b, t, d, h, e = 3, 37, 24, 2, 20
    x = jax.random.normal(jax.random.key(0), (b, t, d)).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (d, h * e)) * 0.3
    ct = jax.random.normal(jax.random.key(2), (b, h, e, t))
    ct = ct.astype(dtype)
    z, vjp = jax.vjp(lambda x, w: project_lanes(x, w, h, dtype), x, w)
    dx, dw = vjp(ct)
    xs, ws, cts = (np.asarray(a, np.float64) for a in (x, w.astype(dtype), ct))
    want = (xs @ ws).reshape(b, t, h, e).transpose(0, 2, 3, 1)
    ct_btk = cts.transpose(0, 3, 1, 2).reshape(b, t, h * e)
    assert z.dtype == dtype and z.shape == (b, h, e, t)
    tol = 1e-5 if dtype == jnp.float32 else BF16_TOL
    # float32 accumulation of exact products, then one rounding to dtype (half a bfloat16 ulp: 2**-8 relative)
    rtol = 1e-5 if dtype == jnp.float32 else 2.0**-8 + 1e-5
    np.testing.assert_allclose(np.asarray(z, np.float64), want, rtol=rtol, atol=1e-6)
    close(dx, ct_btk @ ws.T, tol)
    close(dw, np.einsum("btd,btk->dk", xs, ct_btk), tol)


@pytest.mark.parametrize("stacked", [False, True])
def test_expert_projections_in_the_mixing_layout(stacked):
    """``lanes.up`` / ``lanes.down`` (products batched over rows, with their own backward products) are
    ``x @ u + bias`` moved to ``[b, m, E, t]`` and the contraction of ``[b, (k,) m, E, t]`` with ``[(k,) E, m, d]``,
    written here from NumPy in float64; so are the gradients of every input (37 tokens, 5 experts of 3)."""
    b, t, d, e, m, k = 2, 37, 24, 5, 3, 2
    keys = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(keys[0], (b, t, d))
    u = jax.random.normal(keys[1], (d, e * m)) * 0.3
    bias = jax.random.normal(keys[2], (e * m,))
    a = jax.random.normal(keys[3], (b, k, m, e, t) if stacked else (b, m, e, t))
    v = jax.random.normal(keys[4], (k, e, m, d) if stacked else (e, m, d)) * 0.3
    ct_up, ct_down = jax.random.normal(keys[5], (b, m, e, t)), jax.random.normal(keys[6], (b, t, d))

    p, up_vjp = jax.vjp(lambda x, u, bias: lanes.up(x, u, bias, e, jnp.float32), x, u, bias)
    out, down_vjp = jax.vjp(lanes.down, a, v)
    xs, us, bs, as_, vs, cu, cd = (np.asarray(z, np.float64) for z in (x, u, bias, a, v, ct_up, ct_down))
    close(p, (xs @ us + bs).reshape(b, t, e, m).transpose(0, 3, 2, 1))
    cu_btk = cu.transpose(0, 3, 2, 1).reshape(b, t, e * m)
    close(up_vjp(ct_up), (cu_btk @ us.T, np.einsum("btd,btk->dk", xs, cu_btk), cu_btk.sum((0, 1))))
    a_k = as_ if stacked else as_[:, None]
    v_k = vs if stacked else vs[None]
    a_btK = a_k.transpose(0, 4, 1, 3, 2).reshape(b, t, -1)  # (k, E, m) flattened, as v_k's rows
    v_Kd = v_k.reshape(-1, d)
    close(out, a_btK @ v_Kd)
    da = (cd @ v_Kd.T).reshape(b, t, -1, e, m).transpose(0, 2, 4, 3, 1)
    dv = np.einsum("btK,btd->Kd", a_btK, cd).reshape(v_k.shape)
    close(down_vjp(ct_down), (da if stacked else da[:, 0], dv if stacked else dv[0]))
    # The products write the layout themselves: no transpose of an activation-sized array either way.
    jaxpr = jax.make_jaxpr(lambda x, u, bias, a, v: (jax.vjp(lambda *w: lanes.up(*w, e, jnp.float32), x, u, bias)[1](
        ct_up), jax.vjp(lanes.down, a, v)[1](ct_down)))(x, u, bias, a, v)
    moved = [q for q in jaxpr.jaxpr.eqns if q.primitive.name == "transpose" and q.outvars[0].aval.size >= b * t * e * m]
    assert not moved, moved


def test_router_tied_heads():
    """Head 0: every expert has the same logit (zero router weights): all pass, g = 1/E, and the
    ambiguity gradient splits over the tie. Head 1: two experts tie at the maximum."""
    e = 12
    z = jax.random.normal(jax.random.key(2), (21, 2, e))
    z = z.at[:, 0].set(0.0).at[:, 1, 3].set(z[:, 1].max(-1) + 1).at[:, 1, 5].set(z[:, 1].max(-1) + 1)
    mean, var = z.mean((0, 2)), z.var((0, 2))
    mean, var = mean.at[0].set(0.0), var.at[0].set(0.0)  # what BatchNorm sees for a constant head
    router = lanes_router(1, 2.0)
    g, _, _ = router(z, mean, var)
    np.testing.assert_array_equal(np.asarray(g[:, 0]), np.full((21, e), 1 / e, np.float32))
    assert np.all(np.asarray(g[:, 1, 3]) == np.asarray(g[:, 1, 5]))
    check_vjp(lambda z: router(z, mean, var),
              lambda z: router_reference(z, mean, var, 2.0, 1e-5), (z,))


# -- mixing -----------------------------------------------------------------------------------------
# (b, t, H, E, m): t off the token blocks (8 here) and E off the expert chunks (16 here), E = 12 unchunked,
# and the published shapes of one layer (E 512, H 8; VD m/2 = 8, HD m = 16) on a few tokens.
MIX_SHAPES = [(2, 19, 3, 48, 3), (1, 3, 1, 12, 6), (1, 5, 8, 512, 8)]


# The Pallas mixing as one layer calls it: the carrying op, with the layer's v products and expert biases (VD:
# the two output halves of [v11; v12] and [v21; v22]), its passed-on g unused.
PALLAS_MIX = {True: lambda *a: kernel_ops.vd_experts_carry(*a)[0],
              False: lambda *a: kernel_ops.hd_experts_carry(*a)[0]}
N_W = {True: 4, False: 2}  # the weights the carrying ops take after p and g
V_OUT = 6  # the v products' output width in these tests


def v_weights(shape, vd: bool, seed: int = 11, dtype=jnp.float32):
    """Random ``v`` weights and expert biases: VD ``[2, E, m, d]`` per output half (two) and ``[E, d]`` (two); HD
    ``[E, m, d]`` and ``[E, d]``."""
    e, m = shape[3:]
    shapes = [(2, e, m, V_OUT)] * 2 + [(e, V_OUT)] * 2 if vd else [(e, m, V_OUT), (e, V_OUT)]
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return tuple(jax.random.normal(k, s).astype(dtype) for k, s in zip(keys, shapes, strict=True))


def with_v(ref, vd: bool):
    """A reference mixing (``[n, (k,) E, m]`` outputs) followed by the ``v`` products (HD: and the biases weighted
    by ``sum_h g2``), ``[n, d]`` each: what the carrying ops return, from the mixing references and einsums."""
    def run(*args):
        outs = ref(*args[:-N_W[vd]])
        if vd:
            g, (w_top, w_bot, b1, b2) = args[2:4], args[4:]
            return jnp.concatenate([jnp.einsum("nkem,kemd->nd", a, w) + jnp.einsum("nhe,ed->nd", gi, bias)
                                    for a, w, gi, bias in zip(outs, (w_top, w_bot), g, (b1, b2), strict=True)], -1)
        g2, (w, bias) = args[-3], args[-2:]
        return jnp.einsum("nem,emd->nd", outs, w) + jnp.einsum("nhe,ed->nd", g2, bias)

    return run


@pytest.fixture
def small_blocks(monkeypatch):
    """8-token blocks and 16-expert chunks, so small shapes cross several partial blocks and chunks."""
    monkeypatch.setattr(mixing, "LANE_BLOCK", 8)
    monkeypatch.setattr(mixing, "VMEM_BUDGET", 1 << 14)


def lanes_fn(fn, b: int, t: int, n_w: int = 0):
    """``fn`` on the lane-dense layout, called with the references' ``[n, E, m]`` / ``[n, H, E]`` arrays (and
    ``n_w`` weights after them, passed as they are); ``[b, t, d]`` outputs come back as ``[n, d]``."""
    to_p = lambda a: a.reshape(b, t, *a.shape[1:]).transpose(0, 3, 2, 1)  # noqa: E731  [n,E,m] -> [b,m,E,t]
    to_g = lambda a: a.reshape(b, t, *a.shape[1:]).transpose(0, 2, 3, 1)  # noqa: E731  [n,H,E] -> [b,H,E,t]

    def from_lanes(a):  # [b, (k,) m, E, t] -> [n, (k,) E, m]
        if a.ndim == 3:  # a v product [b, t, d]
            return a.reshape(b * t, -1)
        a = jnp.moveaxis(a, -1, 1)  # [b, t, (k,) m, E]
        return jnp.swapaxes(a, -1, -2).reshape(b * t, *a.shape[2:-2], a.shape[-1], a.shape[-2])

    def run(*args):
        n_p = len(args) - 2 - n_w
        out = fn(*(to_p(a) for a in args[:n_p]), *(to_g(g) for g in args[n_p:n_p + 2]), *args[n_p + 2:])
        return jax.tree.map(from_lanes, out)

    return run


def mixing_args(shape, vd: bool, tied: bool = False, seed: int = 3, dtype=jnp.float32):
    b, t, h, e, m = shape
    k = jax.random.split(jax.random.key(seed), 4)
    ps = [jax.random.normal(k[i], (b * t, e, m)).astype(dtype) for i in range(1 + vd)]
    gs = [routing(k[2 + i], b * t, 1 if tied else h, e) for i in range(2)]
    if tied:  # every head routes alike
        gs = [jnp.repeat(g, h, axis=1) for g in gs]
    return (*ps, *gs)


@pytest.mark.parametrize("shape, impl", [  # the GPU form at the published shapes: slow to interpret (the lowering
    pytest.param(s, i, marks=[pytest.mark.slow] if i == "pallas-gpu" and s[3] == 512 else [])  # test covers it)
    for s in MIX_SHAPES for i in ("pallas", "pallas-gpu", "xla")])
@pytest.mark.parametrize("vd", [True, False])
def test_mixing_matches_reference(request, small_blocks, vd, shape, impl):
    """Outputs and gradients of the Pallas kernels (interpreted; with the layer's ``v`` products, whose weights
    get gradients too), in their TPU and GPU forms, and of the XLA mixing equal the references."""
    if impl == "pallas-gpu":
        request.getfixturevalue("gpu_form")
    b, t, h, e, m = shape
    if not vd and e == 512:
        shape = (b, t, h, e, 2 * m)  # HD's units are the whole moe_dim (16 at 1.4B)
    ref = vd_mix_reference if vd else hd_mix_reference
    args = mixing_args(shape, vd)
    if impl != "xla":
        args, ref = (*args, *v_weights(shape, vd)), with_v(ref, vd)
        fn = lanes_fn(PALLAS_MIX[vd], shape[0], shape[1], N_W[vd])
        # per pass one call on a TPU (the inputs cross memory once), a summing and an emitting one on a GPU; the
        # forward again in the backward, m-major
        names = re.findall(r"name=(monet_\w+)", str(jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1](ref(*a)))(*args)))
        calls = (lambda n: [f"{n}_sums", n]) if impl == "pallas-gpu" else (lambda n: [n])
        kind = "vd" if vd else "hd"
        assert names == calls(f"monet_{kind}_mix") * 2 + calls(f"monet_{kind}_mix_bwd")
    else:
        fn = lanes_fn(lanes.vd_mix_lanes if vd else lanes.hd_mix_lanes, shape[0], shape[1])
    check_vjp(fn, ref, args)


@pytest.mark.parametrize("shape", [MIX_SHAPES[0], MIX_SHAPES[2]])
@pytest.mark.parametrize("vd", [True, False])
def test_mixing_in_two_calls_matches_reference(small_blocks, monkeypatch, vd, shape):
    """Where the one-pass VMEM copies do not fit (forced here), the reduce and emit calls give the same."""
    monkeypatch.setattr(mixing, "VMEM_LIMIT", 0)
    if not vd and shape[3] == 512:
        shape = (*shape[:4], 2 * shape[4])
    fn = lanes_fn(PALLAS_MIX[vd], shape[0], shape[1], N_W[vd])
    args = (*mixing_args(shape, vd), *v_weights(shape, vd))
    names = re.findall(r"name=(monet_\w+)", str(jax.make_jaxpr(fn)(*args)))
    assert names == [f"monet_{'vd' if vd else 'hd'}_mix_reduce", f"monet_{'vd' if vd else 'hd'}_mix_emit"]
    check_vjp(fn, with_v(vd_mix_reference if vd else hd_mix_reference, vd), args)


def to_lanes_layout(args, b: int, t: int):
    """Reference-layout mixing arguments (``[n, E, m]`` activations, ``[n, H, E]`` routing) as the kernels'."""
    n_p = len(args) - 2
    return (*(a.reshape(b, t, *a.shape[1:]).transpose(0, 3, 2, 1) for a in args[:n_p]),
            *(g.reshape(b, t, *g.shape[1:]).transpose(0, 2, 3, 1) for g in args[n_p:]))


@pytest.mark.parametrize("g_used,form", [(True, "one call"), (False, "one call"), (True, "two calls"), (True, "gpu")])
@pytest.mark.parametrize("vd", [True, False])
def test_mixing_carry_sums_the_groups_gradients_of_g(request, small_blocks, monkeypatch, vd, g_used, form):
    """The carrying kernels pass ``g`` on unchanged for the group's next layer and add the gradients of ``g``
    that come back through it (and of ``sum_h g``) inside the backward kernel: the gradients of the XLA
    mixing with ``g`` used again. With the passed-on ``g`` unused (a group's last layer) nothing is added.
    Also where the reduce and emit phases are two calls (inputs too large for VMEM: forced here), and in the
    kernels' GPU form."""
    if form == "two calls":
        monkeypatch.setattr(mixing, "VMEM_LIMIT", 0)
    if form == "gpu":
        request.getfixturevalue("gpu_form")
    b, t = MIX_SHAPES[0][:2]
    args = (*to_lanes_layout(mixing_args(MIX_SHAPES[0], vd), b, t), *v_weights(MIX_SHAPES[0], vd))
    fn = kernel_ops.vd_experts_carry if vd else kernel_ops.hd_experts_carry
    ref = lambda *a: (*plain_experts(vd, *a), *a[1 + vd:3 + vd])  # noqa: E731  (out(s), g1, g2)
    keep = slice(None) if g_used else slice(0, 1)
    check_vjp(lambda *a: fn(*a)[keep], lambda *a: ref(*a)[keep], args)
    out = fn(*args)
    for passed, g in zip(out[1:], args[1 + vd:3 + vd], strict=True):
        np.testing.assert_array_equal(np.asarray(passed), np.asarray(g))


def plain_experts(vd: bool, *args) -> tuple:
    """The XLA mixing, ``v`` products and expert biases of a layer in the lanes layout, as the carrying ops
    return them."""
    if vd:
        p1, p2, g1, g2, w_top, w_bottom, b1, b2 = args
        halves = zip(lanes.vd_mix_lanes(p1, p2, g1, g2), (w_top, w_bottom), (g1, g2), (b1, b2), strict=True)
        return (jnp.concatenate([lanes.down_product(a, w) + lanes.bias_product(g.sum(axis=1), bias)
                                 for a, w, g, bias in halves], axis=-1),)
    p, g1, g2, w, bias = args
    return (lanes.down_product(lanes.hd_mix_lanes(p, g1, g2), w) + lanes.bias_product(g2.sum(axis=1), bias),)


@pytest.mark.parametrize("vd", [True, False])
def test_a_routing_group_sums_its_gradients_of_g_in_the_kernels(small_blocks, vd):
    """Two layers sharing ``g`` through the carrying kernels: the backward pass has no separate add of
    ``[b, H, E, t]`` gradients (the second layer's arrive in the first one's kernel), and the gradients equal
    those of the XLA mixing. (The second layer's activations are constants here, so no add of ``p``'s
    gradients, of the same shape at these sizes, can stand in for one of ``g``'s.)"""
    b, t = MIX_SHAPES[0][:2]
    args = to_lanes_layout(mixing_args(MIX_SHAPES[0], vd), b, t)
    n_p, w = len(args) - 2, v_weights(MIX_SHAPES[0], vd)
    carry = lambda *a: (kernel_ops.vd_experts_carry if vd else kernel_ops.hd_experts_carry)(*a, *w)  # noqa: E731
    plain = lambda *a: plain_experts(vd, *a, *w)  # noqa: E731

    def group(fn, passes: bool):
        def loss(*a):
            ps, g = a[:n_p], a[n_p:]
            first = fn(*ps, *g)
            second = fn(*(jax.lax.stop_gradient(jnp.sin(p)) for p in ps), *(first[-2:] if passes else g))
            return sum(jnp.sum(jnp.cos(o)) for o in jax.tree.leaves((first[:-2] if passes else first,
                                                                      second[:-2] if passes else second)))
        return loss

    got = jax.jit(jax.grad(group(carry, True), argnums=tuple(range(len(args)))))(*args)
    want = jax.jit(jax.grad(group(plain, False), argnums=tuple(range(len(args)))))(*args)
    close(got, want)
    jaxpr = str(jax.make_jaxpr(jax.grad(group(carry, True), argnums=tuple(range(len(args)))))(*args))
    g_shape = "f32[" + ",".join(map(str, args[-1].shape)) + "]"
    adds = [line for line in jaxpr.splitlines() if "add_any" in line and g_shape in line]
    assert not adds, adds


@pytest.mark.parametrize("vd", [True, False])
def test_mixing_tied_heads(small_blocks, vd):
    """All heads routing alike: the sums over heads and the head mixtures still match the reference."""
    shape = (1, 11, 4, 32, 3)
    fn = lanes_fn(PALLAS_MIX[vd], 1, 11, N_W[vd])
    args = (*mixing_args(shape, vd, tied=True), *v_weights(shape, vd))
    check_vjp(fn, with_v(vd_mix_reference if vd else hd_mix_reference, vd), args)


def test_gpu_mixing_splits_sums_into_roles_and_counts_its_bytes(gpu_form):
    """The GPU form keeps at most ``SUMS`` sums a token per program: VD at ``H = 3``, ``m = 3`` and 8 sums takes
    unit chunks of 2 (roles ``{0, 1}`` and ``{2}`` per side) and one head per ``dg`` role; what each call reads
    and writes a token (``mixing_gpu.TRAFFIC``) is counted here from the math: every role's rows of ``E``
    experts, bfloat16."""
    b, h, e, t, m = 1, 3, 48, 16, 3
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    p, g, d = bf(b, m, e, t), bf(b, h, e, t), bf(b, 2, m, e, t)
    jax.make_jaxpr(mixing_gpu.vd_forward)(p, p, g, g)
    jax.make_jaxpr(mixing_gpu.vd_backward)(p, p, g, g, d, d)
    names = {"monet_vd_mix_sums", "monet_vd_mix", "monet_vd_mix_bwd_sums", "monet_vd_mix_bwd"}
    assert names <= set(mixing_gpu.TRAFFIC)
    got = {n: mixing_gpu.TRAFFIC[n] for n in names}
    row, slices = 2 * e, 3  # a row of E bfloat16 experts; 48 experts in slices of 16
    # forward sums: per side two roles, each reading its units and all H rows of g
    assert got["monet_vd_mix_sums"] == {"reads": (2 + h + 1 + h) * 2 * row, "unique": (2 * m + 2 * h) * row,
                                        "writes": 2 * h * m * 4 * slices, "sums": 0}
    # forward emit: per side its units and g again, reading the other side's sums for its units; top and bottom
    # (2m rows each) and sum_h g1, sum_h g2
    assert got["monet_vd_mix"] == {"reads": (2 + h + 1 + h) * 2 * row, "unique": (2 * m + 2 * h) * row,
                                   "writes": (4 * m + 2) * row, "sums": 2 * h * m * 4 * slices}
    # backward sums: y1, y2, dy1 (g2, d21), dy2 (g1, d12), each in two unit chunks
    assert got["monet_vd_mix_bwd_sums"]["reads"] == 4 * (2 + h + 1 + h) * row
    assert got["monet_vd_mix_bwd_sums"]["unique"] == (2 * m + 2 * h + 2 * m) * row
    # backward emit: dp per unit chunk (d, g, p), dg per head (the side's d11 and d12 and p: 3m rows)
    assert got["monet_vd_mix_bwd"]["reads"] == 2 * ((2 + h + 2 + 1 + h + 1) + h * 3 * m) * row
    assert got["monet_vd_mix_bwd"]["writes"] == (2 * m + 2 * h) * row


@pytest.mark.parametrize("vd", [False, True])
def test_mixing_bfloat16(small_blocks, vd):
    """bfloat16 activations and routing (the compute dtype): within BF16_TOL of the float32 reference on
    the same inputs."""
    b, t, h, e, m = 2, 13, 2, 32, 4
    args = mixing_args((b, t, h, e, m), vd, seed=5, dtype=jnp.bfloat16)
    args = (*args[:-2], *(g.astype(jnp.bfloat16) for g in args[-2:]),
            *v_weights((b, t, h, e, m), vd, dtype=jnp.bfloat16))
    fn = lanes_fn(PALLAS_MIX[vd], b, t, N_W[vd])
    ref = with_v(vd_mix_reference if vd else hd_mix_reference, vd)
    ct = jax.tree.map(lambda c: c.astype(jnp.bfloat16), cotangent(jax.eval_shape(fn, *args)))
    out, grads = value_and_vjp(fn, args, ct)
    assert all(o.dtype == jnp.bfloat16 for o in jax.tree.leaves((out, grads)))
    ref32 = lambda *a: ref(*[x.astype(jnp.float32) for x in a])  # noqa: E731
    want, want_grads = value_and_vjp(ref32, args, jax.tree.map(lambda c: c.astype(jnp.float32), ct))
    close(out, want, BF16_TOL)
    close(grads, want_grads, BF16_TOL)


# -- layers and the whole model -----------------------------------------------------------------------
def _cfg(dec, **over):
    return MonetConfig.from_hf_dict(tiny_config(moe_decompose=dec, **over))


def _weights(layer):
    from monet_jax.model.experts import _weights as w

    names = ("u1", "u2", "v11", "v12", "v21", "v22", "b1", "b2") if hasattr(layer, "u1") else ("u", "v", "b")
    return w(layer, *names)


@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
@pytest.mark.parametrize("impl", ["pallas", "sparse"])
def test_layer_matches_reference_layer(dec, impl):
    """The expert layer (through its ``moe_impl`` dispatch) equals the whole-layer reference, with nonzero biases."""
    cfg = dataclasses.replace(_cfg(dec), moe_impl=impl)
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(1))
    layer = model.model.layers[0].moe
    for name in ("b1", "b2", "b") if dec == "vertical" else ("b",):
        if hasattr(layer, name):
            getattr(layer, name)[...] = jax.random.normal(jax.random.key(9), getattr(layer, name)[...].shape)
    k = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(k[0], (2, 11, cfg.hidden_size))
    g1, g2 = (routing(k[i], 22, cfg.moe_heads, cfg.moe_experts).reshape(2, 11, cfg.moe_heads, -1) for i in (1, 2))
    layer_ref = vd_layer_reference if dec == "vertical" else hd_layer_reference
    graphdef, params = nnx.split(layer)

    def ref(x, params, g1, g2):
        w = _weights(nnx.merge(graphdef, params))
        return layer_ref(x.reshape(22, -1), w, g1.reshape(22, 2, -1), g2.reshape(22, 2, -1)).reshape(2, 11, -1)

    check_vjp(lambda x, params, g1, g2: nnx.merge(graphdef, params)(x, g1, g2), ref, (x, params, g1, g2))


def _loss_and_grads(model, ids):
    def loss(model):
        out = model(ids, output_router_probs=True)
        ce = -jnp.mean(jax.nn.log_softmax(out.logits)[..., 0])
        aux = sum(sum(aux_losses(g1, g2)) for g1, g2 in out.router_probs)
        return ce + 0.1 * aux

    return nnx.value_and_grad(loss)(model)


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_model_pallas_equals_xla_in_training(request, dec, platform):
    """Training mode, moe_groups=2 (layers reusing a router): loss, every parameter gradient and the
    running BatchNorm statistics agree between moe_impl=pallas (the kernels' TPU or GPU form) and xla."""
    if platform == "gpu":
        request.getfixturevalue("gpu_form")
    cfg = _cfg(dec, moe_groups=2, num_hidden_layers=3)
    ids = np.random.default_rng(0).integers(0, 96, (2, 13)).astype(np.int32)
    results = []
    for impl in ("xla", "pallas"):
        model = MonetForCausalLM(dataclasses.replace(cfg, moe_impl=impl), rngs=nnx.Rngs(0))
        for layer in model.model.layers:  # router logits large enough to route to several experts
            if layer.router is not None:
                for w in (layer.router.w1, layer.router.w2):
                    w.kernel[...] = w.kernel[...] * 50
        model.train()
        loss, grads = _loss_and_grads(model, ids)
        results.append((loss, grads, nnx.state(model, nnx.BatchStat)))
    close(results[1][0], results[0][0])
    close(results[1][1], results[0][1])
    close(results[1][2], results[0][2])
    grads = results[0][1]
    assert np.abs(np.asarray(grads["model"]["layers"][0]["router"]["w1"]["kernel"][...])).max() > 0


def test_model_pallas_under_a_mesh():
    """Under a 2x2x2 CPU mesh the kernels run per batch shard (shard_map) and agree with XLA, and so do
    the aux losses the training step takes from the routers' token sums (summed over the shards)."""
    cfg = _cfg("vertical")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    ids = np.random.default_rng(1).integers(0, 96, (4, 9)).astype(np.int32)

    def run(m, i):
        out = m(i, output_router_probs=True)
        return out.logits, [router_aux(s, 36) for s in out.router_sums], [aux_losses(*p) for p in out.router_probs]

    outs = []
    for impl in ("xla", "pallas"):
        model = MonetForCausalLM(dataclasses.replace(cfg, moe_impl=impl), rngs=nnx.Rngs(0))
        with sharding.activate(mesh):
            outs.append(nnx.jit(run)(model, jax.device_put(ids, sharding.batch_sharding(mesh))))
    close(outs[1], outs[0])
    for _, from_sums, from_probs in outs:
        close([s[:2] for s in from_sums], from_probs)


# -- sparse path --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_sparse_equals_dense_on_parity_checkpoints(reference_checkpoint, dec):
    """moe_impl=sparse projects only the ``v`` rows of the experts some token and head uses, gathered at a
    width of ``tokens * H * moe_sparse_k``, or runs the dense projection when the union is wider: the
    logits are the dense path's either way."""
    directory, _ = reference_checkpoint(moe_decompose=dec)
    dense = MonetForCausalLM.from_pretrained(directory, moe_impl="xla")
    cfg = dense.config
    ids = np.random.default_rng(0).integers(0, 96, (1, 3)).astype(np.int32)
    out = dense(ids, output_router_probs=True)
    used = max(int(np.any(np.asarray(g) > 0, axis=(0, 1, 2)).sum()) for pair in out.router_probs for g in pair)
    per_k = ids.size * cfg.moe_heads  # the gathered width per unit of moe_sparse_k
    fits, short = -(-used // per_k), (used - 1) // per_k
    assert 1 < used < cfg.moe_experts and fits * per_k < cfg.moe_experts and short >= 1
    model = MonetForCausalLM.from_pretrained(directory, moe_impl="sparse")
    for k in (fits, short):  # the union fits the gathered width / the dense fallback
        for layer in model.model.layers:
            layer.moe.sparse_k = k
        close(model(ids).logits, out.logits)


@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_sparse_layer_loop_and_gather_equal_the_reference(dec):
    """The sparse layer reading expert rows in a loop over the union (CPU) and gathering them (accelerators):
    both equal the whole-layer reference where the union fits the width and where it does not (the dense
    fallback); the loop's gradient (the gather's, by a custom VJP) equals the reference's for the input,
    the weights (``u`` and its rows summed) and the routing weights the layer uses (those at zero do not
    reach the router, whose threshold zeroed them)."""
    from monet_jax.kernels import sparse
    from monet_jax.model.experts import hd_layer, vd_layer

    cfg = _cfg(dec)
    layer = MonetForCausalLM(cfg, rngs=nnx.Rngs(3)).model.layers[0].moe
    w = _weights(layer)
    for i, name in enumerate(("b1", "b2") if dec == "vertical" else ("b",)):
        w[name] = jax.random.normal(jax.random.key(20 + i), w[name].shape)
    ups = ("u1", "u2") if dec == "vertical" else ("u",)
    w.update({f"{u}_rows": w[u].T for u in ups})
    k = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k[0], (1, 2, cfg.hidden_size))
    g1, g2 = (routing(k[i], 2, cfg.moe_heads, cfg.moe_experts).reshape(1, 2, cfg.moe_heads, -1) for i in (1, 2))
    used = max(int(np.any(np.asarray(g) > 0, axis=(0, 1, 2)).sum()) for g in (g1, g2))
    assert 1 < used < cfg.moe_experts - 1
    narrow, dense = (sparse.vd_narrow, vd_layer) if dec == "vertical" else (sparse.hd_narrow, hd_layer)
    layer_ref = vd_layer_reference if dec == "vertical" else hd_layer_reference

    def ref(x, w, g1, g2):
        w = {n: w[n] for n in w if not n.endswith("_rows")}  # u's rows are a copy of u, read by the sparse path
        return layer_ref(x.reshape(2, -1), w, g1.reshape(2, cfg.moe_heads, -1),
                         g2.reshape(2, cfg.moe_heads, -1)).reshape(x.shape)

    ct = cotangent(jax.eval_shape(ref, x, w, g1, g2))
    want, want_grads = value_and_vjp(ref, (x, w, g1, g2), ct)
    for width in (used, used - 1):  # the union fits / the dense fallback
        got = {}
        for loop in (True, False):
            def run(x, w, g1, g2, loop=loop, width=width):
                return sparse.layer(narrow, partial(dense, compute_dtype=jnp.float32), x, w, g1, g2, width,
                                    jnp.float32, loop=loop)
            got[loop] = value_and_vjp(run, (x, w, g1, g2), ct)
            close(got[loop][0], want)
            gx, gw, gg1, gg2 = got[loop][1]
            close(gx, want_grads[0])
            close({n: gw[n] + (gw[f"{n}_rows"].T if n in ups else 0) for n in gw if not n.endswith("_rows")},
                  {n: want_grads[1][n] + (want_grads[1][f"{n}_rows"].T if n in ups else 0)
                   for n in want_grads[1] if not n.endswith("_rows")})
            for got_g, want_g, g in ((gg1, want_grads[2], g1), (gg2, want_grads[3], g2)):
                close(jnp.where(g != 0, got_g, 0), jnp.where(g != 0, want_g, 0))
        # Only the narrow layer reads u through its rows: the loop ran where the union fits, not past it.
        assert all(bool(jnp.any(got[True][1][1][f"{u}_rows"] != 0)) == (width == used) for u in ups)


@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_sparse_expert_rows_read_only_the_experts_in_use(reference_checkpoint, dec):
    """``PureModel(expert_rows=True)`` adds ``u.T`` copies to the split state (the model is left as it was); the
    sparse layer then reads those rows (on a CPU in a loop over the union, at its one width; elsewhere gathered
    at the smallest tier that holds the union), or runs the dense layer when the union is wider: the logits
    equal the dense path's either way."""
    from monet_jax.kernels import sparse
    from monet_jax.model.pure import ExpertRows, PureModel, decodes_sparse

    directory, _ = reference_checkpoint(moe_decompose=dec)
    dense = MonetForCausalLM.from_pretrained(directory, moe_impl="xla")
    model = MonetForCausalLM.from_pretrained(directory, moe_impl="sparse")
    cfg, names = model.config, ("u1", "u2") if dec == "vertical" else ("u",)
    assert decodes_sparse(cfg, 1) and not decodes_sparse(dataclasses.replace(cfg, moe_impl="xla"), 1)
    pure = PureModel(model, expert_rows=True)
    moe = model.model.layers[0].moe
    assert not any(hasattr(moe, f"{n}_rows") for n in names)  # the model itself is unchanged
    rows = nnx.merge(pure.graphdef, jax.tree.unflatten(pure.treedef, pure.leaves)).model.layers[0].moe
    for n in names:
        assert isinstance(getattr(rows, f"{n}_rows"), ExpertRows)
        want = np.asarray(getattr(moe, n).kernel[...]).T
        np.testing.assert_array_equal(np.asarray(getattr(rows, f"{n}_rows")[...]), want)
    seen = set()
    for tokens in (1, 3):
        ids = np.random.default_rng(0).integers(0, 96, (1, tokens)).astype(np.int32)
        out = dense(ids, output_router_probs=True)
        used = max(int(np.any(np.asarray(g) > 0, axis=(0, 1, 2)).sum()) for pair in out.router_probs for g in pair)
        widths = sparse.widths(tokens * cfg.moe_heads * moe.sparse_k, cfg.moe_experts, sparse.loops())
        seen.add("dense" if not widths or used > widths[-1] else "narrow")
        close(pure.jit(lambda m, x: m(x).logits)(ids), out.logits)
    assert seen == {"dense", "narrow"}


@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_sparse_decoding_with_the_cache(reference_checkpoint, dec):
    """Greedy decoding with the key/value cache: same tokens and logits with moe_impl=sparse."""
    from monet_jax.eval.generate import generate

    directory, _ = reference_checkpoint(moe_decompose=dec, seed=2)
    runs = []
    for impl in ("xla", "sparse"):
        model = MonetForCausalLM.from_pretrained(directory, moe_impl=impl)
        runs.append(generate(model, [[1, 5, 9, 3], [1, 7]], max_new_tokens=5, eos_id=None, return_logits=True))
    assert runs[0]["tokens"] == runs[1]["tokens"]
    close(runs[1]["logits"], runs[0]["logits"])


# -- dispatch and config --------------------------------------------------------------------------------
def test_dispatch_choices_and_logged_fallback(caplog, monkeypatch):
    with dispatch.force_interpret(False):
        assert dispatch.choose("auto", 1, 8, 512, 16) == "sparse"      # decoding: 1 * 8 * 16 < 512 rows
        assert dispatch.choose("auto", 4096, 8, 512, 16) == "xla"      # CPU, not interpreting
        dispatch._warned.clear()
        with caplog.at_level(logging.WARNING, logger="monet_jax.kernels.dispatch"):
            assert dispatch.choose("pallas", 4096, 8, 512, 16) == "xla"
            assert dispatch.choose("pallas", 4096, 8, 512, 16) == "xla"
        assert len([r for r in caplog.records if "moe_impl=pallas" in r.message]) == 1  # logged once
        with monkeypatch.context() as m:
            m.setattr(dispatch, "target_platform", lambda: "gpu")
            assert dispatch.choose("auto", 1, 8, 512, 16) == "xla"      # a GPU decodes faster dense
            assert dispatch.choose("sparse", 1, 8, 512, 16) == "sparse"  # unless asked
            assert dispatch.choose("pallas", 4096, 8, 512, 16) == "pallas"  # the kernels' Triton form
            assert dispatch.choose("auto", 4096, 8, 512, 16) == "xla"  # not measured faster there yet
            m.setattr(dispatch, "target_platform", lambda: "tpu")
            assert dispatch.choose("auto", 1, 8, 512, 16) == "sparse"
            assert dispatch.choose("auto", 4096, 8, 512, 16) == "pallas"
    assert dispatch.choose("pallas", 4096, 8, 512, 16) == "pallas"     # interpret mode (this fixture)
    assert dispatch.choose("auto", 4096, 8, 512, 16) == "pallas"
    assert dispatch.sparse_k(0, 8, 512) == 16 and dispatch.sparse_k(0, 3, 4) == 4 and dispatch.sparse_k(5, 3, 16) == 5


@pytest.mark.parametrize("size", ["850m", "1.4b", "4.1b"])
def test_mixing_blocks_fit_vmem_at_the_published_sizes(size):
    """Every mixing pass (VD and HD, forward and backward) at each published size: its expert chunk and token
    block stay within the budget, and with the one-pass copies within a TPU v4 core's 16 MiB of VMEM. At 850M
    and 1.4B every pass is one call; at 4.1B the VD backward's copies do not fit and it runs as two (the
    real check is the TPU compile of each size's training step, see BENCHMARKS.md)."""
    cfg = MonetConfig.from_yaml(ROOT / "configs" / f"monet-vd-{size}.yaml")
    e, h, t = cfg.moe_experts, cfg.moe_heads, 2048
    shape = lambda *lead: jax.ShapeDtypeStruct((1, *lead, e, t), jnp.bfloat16)  # noqa: E731
    bf = jnp.bfloat16
    for vd in (True, False):
        m = cfg.moe_dim // 2 if vd else cfg.moe_dim
        p, p2, g1, g2, dz, dz2 = shape(m), shape(m), shape(h), shape(h), shape(2, m) if vd else shape(m), shape(2, m)
        if vd:
            fwd = ((p, p2, g1, g2), (p, p2, g1, g2), 2, [((2, m), bf)] * 2)
            bwd = ((p, p2, g1, g2, dz, dz2), (p, p2, g1, g2, dz, dz2), 4, [((m,), bf)] * 2 + [((h,), bf)] * 2)
        else:
            fwd = ((p, g1), (g2,), 1, [((m,), bf)])
            bwd = ((p, g1, g2, dz), (p, g1, dz), 2, [((m,), bf), ((h,), bf), ((h,), bf)])
        for name, (r_args, e_args, n_sums, outs) in (("forward", fwd), ("backward", bwd)):
            inputs, _, _, both, ec, tb = mixing.plan(r_args, e_args, h, m, n_sums, outs)
            per = mixing.footprint(inputs, outs, reduce=False)
            one_pass = not (size == "4.1b" and vd and name == "backward")
            assert (ec is not None) == one_pass, (vd, name)
            if ec is None:  # the two calls' blocks
                ec, tb = mixing._sizes(e, t, per)
            else:
                assert (mixing._resident(inputs, both, h, m, n_sums) + ec * per) * tb <= mixing.VMEM_LIMIT < 16 << 20
            assert tb == 128 and e % ec == 0 and ec % 16 == 0
            assert ec * tb * per <= mixing.VMEM_BUDGET


def test_interpret_env_variable(monkeypatch):
    with dispatch.force_interpret(None):
        monkeypatch.setenv(dispatch.INTERPRET_ENV, "1")
        assert dispatch.interpret_mode()
        monkeypatch.setenv(dispatch.INTERPRET_ENV, "0")
        assert not dispatch.interpret_mode()


def test_moe_impl_is_a_policy_field():
    cfg = dataclasses.replace(_cfg("vertical"), moe_impl="sparse", moe_sparse_k=4)
    hf = cfg.to_hf_dict()
    assert "moe_impl" not in hf and "moe_sparse_k" not in hf
    assert MonetConfig.from_hf_dict(hf).architecture() == cfg.architecture()
    with pytest.raises(ConfigError, match="moe_impl"):
        dataclasses.replace(cfg, moe_impl="triton")
    with pytest.raises(ConfigError, match="moe_sparse_k"):
        dataclasses.replace(cfg, moe_sparse_k=-1)


# -- TPU ------------------------------------------------------------------------------------------------
TPU_SCRIPT = r"""
import dataclasses, os, sys
os.environ.update(JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="v4-16", TPU_WORKER_HOSTNAMES="localhost",
                  TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
import jax, jax.numpy as jnp
from jax.experimental import topologies
from flax import nnx
from monet_jax import MonetForCausalLM, sharding, versions
from monet_jax.config import MonetConfig

dec, t, attn = (sys.argv[1:] + ["64", "auto"])[:3]  # decomposition, tokens per row, attention_impl
cfg = dataclasses.replace(MonetConfig.from_yaml("configs/tiny-vd.yaml"), moe_decompose=dec, moe_impl="pallas",
                          attention_impl=attn, max_position_embeddings=max(64, int(t)))
topo = topologies.get_topology_desc(platform="tpu", topology_name="v4:2x2x2", chip_config_name="megacore")
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), topo.devices)
graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: MonetForCausalLM(cfg)), nnx.Param, ...)
place = lambda tree: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                                  sharding.state_shardings(tree, mesh))
ids = jax.ShapeDtypeStruct((8, int(t)), jnp.int32, sharding=sharding.batch_sharding(mesh))
loss = lambda p, r, i: nnx.merge(graphdef, p, r)(i).logits.mean()
with sharding.activate(mesh):
    text = jax.jit(jax.grad(loss)).lower(place(params), place(rest), ids).compile().as_text()
print("mosaic calls:", text.count("tpu_custom_call"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_pallas_kernels_aot_compile_for_tpu_v4(dec):
    """Forward and backward of the tiny model with moe_impl=pallas compile for a v4:2x2x2 slice, the
    kernels as Mosaic custom calls inside shard_map (router fwd/bwd and mixing fwd/bwd)."""
    pytest.importorskip("libtpu", reason="libtpu not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", dispatch.INTERPRET_ENV)}
    proc = subprocess.run([sys.executable, "-c", TPU_SCRIPT, dec], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("mosaic calls:")[1]) >= 4


# -- GPU ------------------------------------------------------------------------------------------------
def lowered_kernels(fn, *args) -> dict:
    """The Pallas kernels in ``fn``'s lowering for CUDA from this host (GPU form, not interpreted): their
    names and counts; every one must be a Triton call."""
    with dispatch.force_interpret(False), dispatch.cuda_lowering():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(\S+)\(", text)
    assert calls and set(calls) == {"__gpu$xla.gpu.triton"}, set(calls)
    names = re.findall(r'name = "(monet_\w+)"', text)
    return {n: names.count(n) for n in names}


@pytest.mark.parametrize("size", ["850m", "1.4b", pytest.param("4.1b", marks=pytest.mark.slow)])
def test_pallas_kernels_lower_for_gpu_at_the_published_sizes(size):
    """One layer's router and mixing (both decompositions, forward and backward, in bfloat16) at each published
    size lower to Triton, each mixing pass as a summing and an emitting call: every value a power-of-two
    ``[tokens]`` row whatever ``m`` and ``H`` are (VD's ``m/2`` and ``H``: 6 at 850M, 12 at 4.1B), no scratch
    memory, no accumulation across programs (the expert slices' partial sums are added outside). The compile
    to machine code is in tests/test_aot_gpu.py; the kernels' speed needs a GPU (BENCHMARKS.md)."""
    cfg = MonetConfig.from_yaml(ROOT / "configs" / f"monet-vd-{size}.yaml")
    b, t, e, h, m, d = 2, 256, cfg.moe_experts, cfg.moe_heads, cfg.moe_dim, 64
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    vd = (bf(b, m // 2, e, t), bf(b, m // 2, e, t), bf(b, h, e, t), bf(b, h, e, t),
          bf(2, e, m // 2, d), bf(2, e, m // 2, d), bf(e, d), bf(e, d))
    hd = (bf(b, m, e, t), bf(b, h, e, t), bf(b, h, e, t), bf(e, m, 2 * d), bf(e, 2 * d))
    for name, op, args in (("vd", kernel_ops.vd_experts_carry, vd), ("hd", kernel_ops.hd_experts_carry, hd)):
        def loss(*a, op=op):
            out, g1, g2 = op(*a)
            return jnp.sum(jnp.square(out.astype(jnp.float32))) + jnp.sum(jnp.sin(g1.astype(jnp.float32)))
        got = lowered_kernels(jax.grad(loss, argnums=tuple(range(len(args)))), *args)
        assert got == {f"monet_{name}_mix_sums": 2, f"monet_{name}_mix": 2, f"monet_{name}_mix_bwd_sums": 1,
                       f"monet_{name}_mix_bwd": 1}, got

    def route(z, mean, var):
        g, col, amb = fused_router(z, mean, var, 2.15, 1e-5, jnp.bfloat16)
        return jnp.sum(jnp.square(g.astype(jnp.float32))) + jnp.sum(jnp.log(col + 1)) + jnp.sum(amb)
    stats = jax.ShapeDtypeStruct((h,), jnp.float32)
    assert lowered_kernels(jax.grad(route), bf(b, h, e, t), stats, stats) == {"monet_router_fwd": 1,
                                                                              "monet_router_bwd": 1}


@pytest.mark.skipif(versions.parse(jax.__version__) >= (0, 11),
                    reason="jax 0.11+ builds a Triton kernel for the GPU the mesh's devices name, and a CPU host's "
                           "mesh names none: the whole step's kernels there come from the H100 compile "
                           "(tests/test_aot_gpu.py, with the CUDA plugin)")
@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_training_step_lowers_for_gpu_with_the_kernels(dec):
    """The whole training step (tiny model, 4 layers in 2 routing groups, ``moe_impl=pallas``) lowers for CUDA
    with every kernel in its Triton form: per group the router's two halves forward and backward, per layer the
    mixing forward, again in the backward, and its backward."""
    from monet_jax.train.config import TrainConfig
    from monet_jax.train.step import BATCH_KEYS, TrainState, _build, make_train_step

    cfg = TrainConfig.load(None, [f"model.moe_decompose={dec}", "model.moe_impl=pallas", "model.num_hidden_layers=4",
                                  "model.moe_groups=2", "data.batch_size=2", "data.seq_len=64"])
    with dispatch.lowering_for("gpu"):
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build(cfg)))
        ts = TrainState(graphdef, abstract, sharding.state_shardings(abstract, mesh), mesh)
        step = make_train_step(ts, cfg)
    batch = {k: jax.ShapeDtypeStruct((2, 64), jnp.float32 if k == "loss_mask" else jnp.int32) for k in BATCH_KEYS}
    with sharding.activate(mesh):
        got = lowered_kernels(step.jitted, ts.abstract(), batch)
    kind = "vd" if dec == "vertical" else "hd"
    assert got == {f"monet_{kind}_mix_sums": 8, f"monet_{kind}_mix": 8, f"monet_{kind}_mix_bwd_sums": 4,
                   f"monet_{kind}_mix_bwd": 4, "monet_router_fwd": 4,
                   "monet_router_bwd": 4}, got

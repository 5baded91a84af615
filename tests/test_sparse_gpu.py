"""The sparse path's GPU form: its Pallas kernels (interpret mode on CPU) against their references and the
whole layer against the dense one, and its lowering for CUDA from this host."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.kernels import dispatch, sparse, sparse_gpu
from monet_jax.kernels.reference import hd_layer_reference, vd_layer_reference
from monet_jax.model.experts import hd_layer, vd_layer
from monet_jax.model.pure import PureModel
from tests.conftest import tiny_config
from tests.test_kernels import BF16_TOL, ROOT, close, cotangent, lowered_kernels, routing, value_and_vjp

# Shapes that are neither powers of two nor multiples of any block: d, m, E, width, tokens.
D, M, E, WIDTH, T = 40, 3, 20, 12, 3


@pytest.fixture(autouse=True)
def gpu_interpret():
    """Every test builds the GPU form (``target_platform() == "gpu"``) and runs its kernels in interpret mode."""
    with dispatch.force_interpret(), dispatch.lowering_for("gpu"):
        yield


def _sparse_width(cfg, tokens: int) -> int:
    """The sparse path's width for ``tokens`` tokens (``tokens * H * k``)."""
    return tokens * cfg.moe_heads * dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, cfg.moe_experts)


def _slots(key, parts: int, ns: tuple[int, ...]):
    """Each part's ``WIDTH`` slots: ``n`` distinct experts, then expert 0 repeated (as ``jnp.nonzero`` pads)."""
    rows = []
    for p, n in enumerate(ns):
        used = np.sort(np.asarray(jax.random.permutation(jax.random.fold_in(key, p), E)[:n]))
        rows.append(np.concatenate([used, np.zeros(WIDTH - n, np.int64)]))
    return jnp.asarray(np.stack(rows), jnp.int32), jnp.asarray(ns, jnp.int32)


def _np(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def test_union_kernel_equals_nonzero():
    """Each side's experts in use in increasing order, then expert 0, their number, and whether all fit: as
    ``jnp.nonzero`` (the reference), for unions narrower than the width, wider (the first ``width`` of them), and
    empty."""
    k = jax.random.split(jax.random.key(2), 2)
    g1 = routing(k[0], T, 2, E, sigma=1.2).reshape(T, 2, E)
    g2 = routing(k[1], T, 2, E, sigma=0.3).reshape(T, 2, E)
    used = [int(np.any(np.asarray(g) != 0, axis=(0, 1)).sum()) for g in (g1, g2)]
    assert used[0] < WIDTH < used[1] < E
    for gs in ([g1, g2], [g1, jnp.zeros_like(g2)], [g2.astype(jnp.bfloat16)]):
        got = jax.jit(lambda *gs: sparse_gpu.union(gs, WIDTH))(*gs)
        want = sparse_gpu.union_reference(gs, WIDTH)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(want[1]), [used[1]])
    assert not bool(want[2]) and bool(sparse_gpu.union_reference([g1], WIDTH)[2])
    nz = np.nonzero(np.any(np.asarray(g1) != 0, axis=(0, 1)))[0]
    np.testing.assert_array_equal(np.asarray(sparse_gpu.union_reference([g1], WIDTH)[0][0]),
                                  np.concatenate([nz, np.zeros(WIDTH - len(nz), int)]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("budget", [4096, 256])
def test_up_kernel_equals_its_reference(monkeypatch, dtype, budget):
    """Two parts in one call (one reading ``u``'s expert rows, one its strided columns; the second reading side
    0's slots), ``n < width`` and ``n = 0``, expert 0 in the padding slots, ``d`` in one chunk or three
    (``budget``), the last one partial: the kernel equals its reference, and the reference equals the products
    written as loops (valid slots ``relu2(x u_e + a_e)``, padding slots ``relu2(a_e)``)."""
    monkeypatch.setattr(sparse_gpu, "BUDGET", budget)
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (T, D))
    rows = [jax.random.normal(k[1], (E * M, D)), jax.random.normal(k[2], (D, E * M))]
    biases = [jax.random.normal(k[3], (E * M,)), jax.random.normal(k[4], (E * M,))]
    kw = dict(compute_dtype=dtype, columns=(False, True))
    for ns, sides in (((7, 11), (0, 1)), ((WIDTH, 0), (1, 0))):
        idx, n = _slots(k[5], 2, ns)
        got = jax.jit(lambda *a, sides=sides: sparse_gpu.up(*a, M, sides=sides, **kw))(x, idx, n, rows, biases)
        want = sparse_gpu.up_reference(x, idx, n, rows, biases, M, sides=sides, **kw)
        assert got.shape == (2, T, WIDTH, M) and got.dtype == dtype
        close(got, want, 1e-5 if dtype == jnp.float32 else BF16_TOL)
        padded = jax.jit(lambda *a, sides=sides: sparse_gpu.up(*a, M, sides=sides, padded=True, **kw))
        close(padded(x, idx, n, rows, biases)[:, :T, :, :M], want, 1e-5 if dtype == jnp.float32 else BF16_TOL)
        if dtype != jnp.float32:
            continue
        for p, u in enumerate((_np(rows[0]), _np(rows[1]).T)):
            r = sides[p]
            for s in range(WIDTH):
                e = int(idx[r, s])
                y = _np(x) @ u[e * M:(e + 1) * M].T if s < ns[r] else np.zeros((T, M))
                pre = y + _np(biases[p])[e * M:(e + 1) * M]
                np.testing.assert_allclose(_np(want[p, :, s]), np.maximum(pre, 0) ** 2, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("budget", [4096, 64])
def test_mix_kernel_equals_its_reference(monkeypatch, dtype, budget):
    """VD's two cross flows and HD's mixture (parts ``(own side, source side)``), sides of different ``n`` with
    expert 0 in the padding slots, one slot chunk or several (``budget``), from an unpadded or padded ``x``: the
    kernel equals its reference, and the reference the sums written as loops."""
    monkeypatch.setattr(sparse_gpu, "BUDGET", budget)
    heads = 3
    k = jax.random.split(jax.random.key(3), 4)
    idx, n = _slots(k[0], 2, (9, 5))
    gs = [routing(k[i], T, heads, E, sigma=0.5).reshape(T, heads, E) for i in (1, 2)]
    x = jax.random.normal(k[3], (2, T, WIDTH, M))
    for parts in (((0, 1), (1, 0)), ((1, 0),)):
        for xin in (x, jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 1)), constant_values=jnp.nan)):
            run = jax.jit(lambda *a, parts=parts: sparse_gpu.mix(*a, parts, M, compute_dtype=dtype))
            got = run(idx, n, gs, xin)
            want = sparse_gpu.mix_reference(idx, n, gs, x, parts, M, compute_dtype=dtype)
            assert got[0].shape == (len(parts), T, WIDTH, M) and got[1].shape == (len(parts), T, WIDTH)
            close(got, want, 1e-5 if dtype == jnp.float32 else BF16_TOL)
        if dtype != jnp.float32:
            continue
        for p, (own, src) in enumerate(parts):
            g = [_np(gs[i])[:, :, np.asarray(idx[i])] * (np.arange(WIDTH) < int(n[i])) for i in range(2)]
            y = np.einsum("thj,tjm->thm", g[src], _np(x[src]) * (np.arange(WIDTH) < int(n[src]))[None, :, None])
            np.testing.assert_allclose(_np(want[0][p]), np.einsum("ths,thm->tsm", g[own], y), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(_np(want[1][p]), g[own].sum(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("programs, columns", [(256, 128), (6, 16)])
def test_down_kernel_equals_its_reference(monkeypatch, dtype, programs, columns):
    """Two parts of different terms in one call (VD's two output halves: straight flows scaled by the slot
    weights inside, cross flows not, each term a row of a stacked array; the second part reading side 0's slots),
    one slot per group or several (``programs``), one column block or two, the second past ``d_out``
    (``columns``), padded activations: the kernel equals its reference, and the reference the sum over the valid
    slots written as loops."""
    monkeypatch.setattr(sparse_gpu, "PROGRAMS", programs)
    monkeypatch.setattr(sparse_gpu, "COLUMNS", columns)
    d_out = D // 2
    k = iter(jax.random.split(jax.random.key(1), 12))
    idx, n = _slots(next(k), 2, (9, 5))
    a = [jax.random.normal(next(k), (2, T, WIDTH, M)), jax.random.normal(next(k), (1, T, WIDTH, M))]
    kernels = [[jax.random.normal(next(k), (E * M, d_out)) for _ in range(2)],
               [jax.random.normal(next(k), (E * M, d_out))]]
    biases = [jax.random.normal(next(k), (E, d_out)) for _ in range(2)]
    s = jax.random.normal(next(k), (2, T, WIDTH))
    terms, sides = (((0, 1, True), (1, 0, False)), ((0, 0, False),)), (1, 0)
    kw = dict(compute_dtype=dtype, sides=sides)
    want = sparse_gpu.down_reference(idx, n, s, a, kernels, biases, terms, **kw)
    pad = lambda v: jnp.pad(v, [(0, 0), (0, 1), (0, 2)] + [(0, 1)] * (v.ndim - 3), constant_values=jnp.nan)  # noqa: E731
    for args in ((s, a), (pad(s), [pad(v) for v in a])):
        run = jax.jit(lambda s, a: sparse_gpu.down(idx, n, s, a, kernels, biases, terms, tokens=T, **kw))
        got = run(*args)
        assert got.shape == (2, T, d_out) and got.dtype == dtype
        close(got, want, 1e-5 if dtype == jnp.float32 else BF16_TOL)
    if dtype != jnp.float32:
        return
    for p, r in enumerate(sides):
        loops = np.zeros((T, d_out))
        for slot in range(int(n[r])):
            e, sw = int(idx[r, slot]), _np(s[p, :, slot])
            loops += sw[:, None] * _np(biases[p])[e]
            for (arr, row, scaled), w in zip(terms[p], kernels[p], strict=True):
                x = _np(a[arr][row])[:, slot] * (sw[:, None] if scaled else 1)
                loops += x @ _np(w)[e * M:(e + 1) * M]
        np.testing.assert_allclose(_np(want[p]), loops, rtol=1e-5, atol=1e-4)


def _layer_weights(dec: str, key):
    """Random weights of one expert layer at the odd sizes (VD: ``m/2 = M``; HD: ``m = M``), nonzero biases."""
    names = ({"u1": (D, E * M), "u2": (D, E * M), "u1_bias": (E * M,), "u2_bias": (E * M,), "v11": (E * M, D // 2),
              "v12": (E * M, D // 2), "v21": (E * M, D // 2), "v22": (E * M, D // 2), "b1": (E, D // 2),
              "b2": (E, D // 2)} if dec == "vertical" else
             {"u": (D, E * M), "u_bias": (E * M,), "v": (E * M, D), "b": (E, D)})
    keys = jax.random.split(key, len(names))
    return {name: jax.random.normal(kk, shape) * (0.3 if name.startswith("u") else 1.0)
            for kk, (name, shape) in zip(keys, names.items(), strict=True)}


@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_gpu_sparse_layer_equals_the_dense_layer(dec):
    """The layer's GPU form (``lax.cond`` between the kernels at one width and the dense layer) equals the
    whole-layer reference and the dense layer where the union fits the width and where it does not, with ``u``'s
    expert rows (and without them, where the kernel reads ``u``'s columns), in float32 (and bfloat16 where the
    kernels run, as in decoding); its gradient (the gathering version's, by a custom VJP) equals the reference's
    for the input, the weights and the routing weights the layer uses."""
    heads = 2
    w = _layer_weights(dec, jax.random.key(5))
    ups = ("u1", "u2") if dec == "vertical" else ("u",)
    k = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(k[0], (1, T, D))
    g1, g2 = (routing(k[i], T, heads, E, sigma=1.2).reshape(1, T, heads, E) for i in (1, 2))
    used = max(int(np.any(np.asarray(g) > 0, axis=(0, 1, 2)).sum()) for g in (g1, g2))
    assert 1 < used < E - 1
    dense = vd_layer if dec == "vertical" else hd_layer
    layer_ref = vd_layer_reference if dec == "vertical" else hd_layer_reference

    def ref(x, w, g1, g2):
        w = {n: w[n] for n in w if not n.endswith("_rows")}
        return layer_ref(x.reshape(T, -1), w, g1.reshape(T, heads, -1), g2.reshape(T, heads, -1)).reshape(x.shape)

    dense_out = jax.jit(partial(dense, compute_dtype=jnp.float32))(x, w, g1, g2)
    dense_bf = jax.jit(partial(dense, compute_dtype=jnp.bfloat16))(x, w, g1, g2)
    # without the row copy (the kernel reads u's columns): the value where the kernels run
    close(jax.jit(partial(dense, compute_dtype=jnp.float32, width=used))(x, w, g1, g2), dense_out)
    wr = dict(w, **{f"{u}_rows": w[u].T for u in ups})  # as PureModel(expert_rows=True) adds them
    ct = cotangent(jax.eval_shape(ref, x, wr, g1, g2))
    want, want_grads = value_and_vjp(ref, (x, wr, g1, g2), ct)
    for width in (used, used - 1):  # the union fits / the dense fallback
        def run(x, w, g1, g2, width=width, cd=jnp.float32):
            return dense(x, w, g1, g2, compute_dtype=cd, width=width)

        got, grads = value_and_vjp(run, (x, wr, g1, g2), ct)
        close(got, want)
        close(got, dense_out)
        close(grads[0], want_grads[0])
        fold = lambda gw: {n: gw[n] + (gw[f"{n}_rows"].T if f"{n}_rows" in gw else 0)  # noqa: E731
                           for n in gw if not n.endswith("_rows")}
        close(fold(grads[1]), fold(want_grads[1]))
        for got_g, want_g, g in ((grads[2], want_grads[2], g1), (grads[3], want_grads[3], g2)):
            close(jnp.where(g != 0, got_g, 0), jnp.where(g != 0, want_g, 0))
        if width == used:  # bfloat16 where decoding takes the kernels
            got_bf = jax.jit(partial(dense, compute_dtype=jnp.bfloat16, width=width))(x, wr, g1, g2)
            close(got_bf, dense_bf, BF16_TOL)


def test_gpu_sparse_layer_takes_the_kernels_only_where_the_union_fits():
    """The narrow branch is the one taken where both unions fit the width, and only there; at a width of ``E``
    or more the layer is the dense one without a conditional."""
    w = _layer_weights("horizontal", jax.random.key(7))
    k = jax.random.split(jax.random.key(8), 3)
    x = jax.random.normal(k[0], (1, T, D))
    g1, g2 = (routing(k[i], T, 2, E, sigma=1.2).reshape(1, T, 2, E) for i in (1, 2))
    used = max(int(np.any(np.asarray(g) > 0, axis=(0, 1, 2)).sum()) for g in (g1, g2))

    def narrow(*a, **kw):
        return sparse.hd_narrow(*a, **kw) * 0 + 7.0  # marks the branch taken

    taken = {}
    for width in (used, used - 1, E):
        out = jax.jit(lambda *a, width=width: sparse.layer(narrow, lambda *b: hd_layer(*b, compute_dtype=jnp.float32),
                                                            *a, width, jnp.float32))(x, w, g1, g2)
        taken[width] = bool(jnp.all(out == 7.0))
    assert taken == {used: True, used - 1: False, E: False}


@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_gpu_sparse_model_equals_the_dense_model(dec):
    """A decoding call of the tiny model (one token, ``u``'s expert rows as :class:`PureModel` adds them) with
    ``moe_impl=sparse`` in its GPU form gives the dense model's logits."""
    cfg = MonetConfig.from_hf_dict(tiny_config(moe_decompose=dec, moe_experts=64))
    ids = np.array([[5]], np.int32)
    out = MonetForCausalLM(dataclasses.replace(cfg, moe_impl="xla"), rngs=nnx.Rngs(0))(ids, output_router_probs=True)
    used = max(int(np.any(np.asarray(g) > 0, axis=(0, 1, 2)).sum()) for pair in out.router_probs for g in pair)
    assert used <= _sparse_width(cfg, ids.size) < cfg.moe_experts  # every layer takes the kernels' branch
    model = MonetForCausalLM(dataclasses.replace(cfg, moe_impl="sparse"), rngs=nnx.Rngs(0))
    close(PureModel(model, expert_rows=True).jit(lambda m, x: m(x).logits)(ids), out.logits)


@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_gpu_sparse_layer_lowers_for_cuda_at_the_published_size(dec):
    """Decoding one token of the 1.4B layer (bfloat16, ``u``'s expert rows, the width ``tokens * H * k`` of
    ``moe_impl=sparse``) lowers for CUDA as four Triton calls (the union, ``up``, ``mix``, ``down``; VD's two sides
    and two output halves included), forward and through ``jax.grad`` (whose backward gathers)."""
    cfg = MonetConfig.from_yaml(ROOT / "configs" / f"monet-{'vd' if dec == 'vertical' else 'hd'}-1.4b.yaml")
    d, e, h = cfg.hidden_size, cfg.moe_experts, cfg.moe_heads
    m = cfg.moe_dim // 2 if dec == "vertical" else cfg.moe_dim
    width = h * dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, e)
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    if dec == "vertical":
        w = {"u1": bf(d, e * m), "u2": bf(d, e * m), "u1_bias": bf(e * m), "u2_bias": bf(e * m),
             **{v: bf(e * m, d // 2) for v in ("v11", "v12", "v21", "v22")}, "b1": bf(e, d // 2), "b2": bf(e, d // 2)}
    else:
        w = {"u": bf(d, e * m), "u_bias": bf(e * m), "v": bf(e * m, d), "b": bf(e, d)}
    w.update({f"{u}_rows": bf(e * m, d) for u in (("u1", "u2") if dec == "vertical" else ("u",))})
    g = jax.ShapeDtypeStruct((1, 1, h, e), jnp.float32)
    layer = vd_layer if dec == "vertical" else hd_layer

    def forward(x, w, g1, g2):
        return layer(x, w, g1, g2, compute_dtype=jnp.bfloat16, width=width)

    def loss(x, w, g1, g2):
        return jnp.sum(forward(x, w, g1, g2).astype(jnp.float32) ** 2)

    want = {f"monet_sparse_{k}": 1 for k in ("union", "up", "mix", "down")}
    assert lowered_kernels(forward, bf(1, 1, d), w, g, g) == want
    assert lowered_kernels(jax.grad(loss, argnums=(0, 1, 2, 3)), bf(1, 1, d), w, g, g) == want

"""The flash-attention path (the TPU kernel of JAX, interpret mode on CPU) against attention written here
from the model's definition: causal, within a packed document, never to a padding key."""

import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import ConfigError, MonetConfig
from monet_jax.kernels import attention, dispatch
from tests.conftest import tiny_config
from tests.test_kernels import ROOT, TPU_SCRIPT


@pytest.fixture(autouse=True)
def interpret():
    with dispatch.force_interpret():
        yield


def mask_of(attention_mask_bt, segment_ids_bt, t):
    """[b, q, k]: causal, same document, real key."""
    causal = np.tril(np.ones((t, t), bool))[None]
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return causal & same & attention_mask_bt.astype(bool)[:, None, :]


def softmax_attention(q, k, v, mask):
    """q [b, t, n, d], k/v [b, t, g, d] (query head i uses KV head i // (n / g)), all in float64; a query
    that sees no key gets zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    r = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - np.where(mask.any(-1)[:, None], s.max(-1), 0)[..., None])  # a query with no key: zeros
    p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnqk,bknd->bqnd", p, v)


def inputs(b, t, n, g, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, d), dtype)
    k = jax.random.normal(ks[1], (b, t, g, d), dtype)
    v = jax.random.normal(ks[2], (b, t, g, d), dtype)
    seg = np.zeros((b, t), np.int32)
    seg[:, t // 3:] = 1                      # two packed documents per row ...
    seg[-1, 2 * t // 3:] = 2                 # ... three in the last
    am = np.ones((b, t), np.int32)
    am[-1, :17] = 0                          # and left padding
    return q, k, v, seg, am


@pytest.mark.parametrize("b,t,n,g,d", [(1, 384, 3, 1, 32), pytest.param(2, 256, 4, 2, 64, marks=pytest.mark.slow),
                                       pytest.param(2, 384, 2, 2, 128, marks=pytest.mark.slow)])
def test_flash_matches_softmax_attention(b, t, n, g, d):
    """Outputs and gradients of every real query agree in float32 (384 tokens: three 128-token blocks,
    so blocks below, on and above the diagonal; grouped-query heads repeated for the kernel)."""
    q, k, v, seg, am = inputs(b, t, n, g, d)
    mask = mask_of(am, seg, t)
    ids = attention.segments(jnp.asarray(am), jnp.asarray(seg), b, t)
    out = np.asarray(attention.flash_attention(q, k, v, ids))
    real = am.astype(bool)
    want = softmax_attention(q, k, v, mask)
    np.testing.assert_allclose(out[real], want[real], atol=2e-5, rtol=1e-5)

    ct = jax.random.normal(jax.random.key(3), out.shape) * real[:, :, None, None]
    got = jax.grad(lambda q, k, v: (attention.flash_attention(q, k, v, ids) * ct).sum(), (0, 1, 2))(q, k, v)
    ref = jax.grad(lambda q, k, v: (attention.attention_reference(q, k, v, ids) * ct).sum(), (0, 1, 2))(q, k, v)
    # The reference's gradient, itself checked here against finite differences along a random direction.
    dirs = [jax.random.normal(jax.random.key(10 + i), a.shape) for i, a in enumerate((q, k, v))]
    f = lambda *a: float(np.sum(softmax_attention(*a, mask) * np.asarray(ct, np.float64)))  # noqa: E731
    eps = 1e-3
    fd = (f(*(np.asarray(a, np.float64) + eps * np.asarray(u) for a, u in zip((q, k, v), dirs, strict=True)))
          - f(*(np.asarray(a, np.float64) - eps * np.asarray(u) for a, u in zip((q, k, v), dirs, strict=True))))
    fd /= 2 * eps
    analytic = sum(float(jnp.vdot(gr, u)) for gr, u in zip(ref, dirs, strict=True))
    assert abs(analytic - fd) < 1e-3 * max(1.0, abs(fd))
    for a, w in zip(got, ref, strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(a), w, atol=1e-5 * max(1.0, np.abs(w).max()), rtol=1e-5)


def test_flash_bfloat16():
    """bfloat16 inputs: the output within 2% of the float32 attention on the same (rounded) inputs."""
    q, k, v, seg, am = inputs(2, 256, 2, 2, 64, jnp.bfloat16)
    ids = attention.segments(jnp.asarray(am), jnp.asarray(seg), 2, 256)
    out = attention.flash_attention(q, k, v, ids)
    assert out.dtype == jnp.bfloat16
    want = softmax_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                             mask_of(am, seg, 256))
    real = am.astype(bool)
    err = np.abs(np.asarray(out, np.float32)[real] - want[real]).max()
    assert err < 2e-2 * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.parametrize("dec", ["vertical", "horizontal"])
def test_model_flash_equals_xla_attention(dec):
    """The whole model with packed documents and padding: logits of real tokens and every parameter
    gradient agree between attention_impl=flash and xla."""
    b, t = 2, 128
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (b, t)).astype(np.int32)
    _, _, _, seg, am = inputs(b, t, 1, 1, 8)
    real = jnp.asarray(am, jnp.float32)[:, :, None]
    results = []
    for impl in ("xla", "flash"):
        cfg = MonetConfig.from_hf_dict(tiny_config(num_hidden_layers=1, moe_groups=1, max_position_embeddings=128,
                                                   moe_decompose=dec), attention_impl=impl)
        model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))

        def loss(m):
            logits = m(ids, attention_mask=am, segment_ids=seg).logits
            return (logits * real * jnp.cos(jnp.arange(logits.shape[-1]))).sum(), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        results.append((np.asarray(logits)[am.astype(bool)], jax.tree.map(np.asarray, nnx.to_pure_dict(grads))))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=1e-4)


def test_choice_and_logged_fallback(caplog):
    assert attention.choose("xla", 256, 64) == "xla"
    assert attention.choose("flash", 256, 64) == "flash"       # interpret mode
    with dispatch.force_interpret(False):
        assert attention.choose("auto", 256, 64) == "xla"      # CPU: the kernel lowers for TPU only
        with caplog.at_level(logging.WARNING):
            assert attention.choose("flash", 256, 64) == "xla"
        assert "lower for TPU and GPU only" in caplog.text
        with dispatch.lowering_for("gpu"):
            assert attention.choose("auto", 256, 64) == "flash"  # a GPU target: the Pallas Triton kernel
    with caplog.at_level(logging.WARNING):
        assert attention.choose("flash", 100, 64) == "xla"
    assert "do not tile" in caplog.text
    assert not attention.supported(256, 192) and attention.supported(256, 256)
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        MonetConfig(attention_impl="splash")
    cfg = MonetConfig.from_hf_dict(tiny_config(), attention_impl="xla")  # a policy field, never in config.json
    assert cfg.attention_impl == "xla" and "attention_impl" not in cfg.to_hf_dict()


@pytest.mark.slow
def test_flash_compiles_for_tpu_v4_in_the_model():
    """Forward and backward of the tiny model at 128 tokens per row for a v4:2x2x2 slice: the default
    (auto) adds the kernel's three Mosaic calls per layer (forward, dK/dV, dQ) to the expert kernels."""
    pytest.importorskip("libtpu", reason="libtpu not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", dispatch.INTERPRET_ENV)}
    calls = {}
    for impl in ("xla", "auto"):
        proc = subprocess.run([sys.executable, "-c", TPU_SCRIPT, "vertical", "128", impl], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        calls[impl] = int(proc.stdout.split("mosaic calls:")[1])
    layers = MonetConfig.from_yaml(ROOT / "configs" / "tiny-vd.yaml").num_hidden_layers
    assert calls["auto"] - calls["xla"] == 3 * layers


def test_flash_under_a_mesh():
    """Under a 2x2x2 CPU mesh the kernel runs per batch shard and the logits equal the XLA attention's."""
    from monet_jax import sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    ids = np.random.default_rng(1).integers(0, 96, (4, 128)).astype(np.int32)
    outs = []
    for impl in ("xla", "flash"):
        cfg = MonetConfig.from_hf_dict(tiny_config(num_hidden_layers=1, moe_groups=1, max_position_embeddings=128),
                                       attention_impl=impl)
        model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
        with sharding.activate(mesh):
            outs.append(nnx.jit(lambda m, i: m(i).logits)(model, jax.device_put(ids, sharding.batch_sharding(mesh))))
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), atol=1e-5, rtol=1e-5)


# -- GPU: the Pallas Triton kernel ------------------------------------------------------------------------


@pytest.mark.parametrize("b,t,n,g,d", [(1, 256, 4, 2, 32), pytest.param(2, 384, 2, 1, 64, marks=pytest.mark.slow)])
def test_gpu_flash_matches_softmax_attention(b, t, n, g, d):
    """The GPU kernel (interpret mode, its forward and Triton backward): outputs and gradients of every real
    query equal the reference's in float32, with packed documents, left padding and grouped-query heads."""
    q, k, v, seg, am = inputs(b, t, n, g, d)
    ids = attention.segments(jnp.asarray(am), jnp.asarray(seg), b, t)
    real = am.astype(bool)
    ct = jax.random.normal(jax.random.key(3), (b, t, n, d)) * real[:, :, None, None]
    with dispatch.lowering_for("gpu"):
        out, pullback = jax.vjp(lambda q, k, v: attention.flash_attention(q, k, v, ids), q, k, v)
        got = pullback(ct)
    want, ref_pullback = jax.vjp(lambda q, k, v: attention.attention_reference(q, k, v, ids), q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], softmax_attention(q, k, v, mask_of(am, seg, t))[real],
                               atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=2e-5, rtol=1e-5)
    for a, w in zip(got, ref_pullback(ct), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(a), w, atol=2e-5 * max(1.0, np.abs(w).max()), rtol=1e-4)


def test_gpu_flash_lowers_for_cuda_without_scores():
    """Forward and backward in bfloat16 lowered for CUDA from this host: three Triton calls (the forward, the
    backward's preprocessing, the fused dK/dV/dQ pass) and no ``[b, heads, t, t]`` tensor anywhere."""
    b, t, n, g, d = 2, 512, 4, 2, 64
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731

    def loss(q, k, v, seg):
        return attention.flash_attention(q, k, v, seg).astype(jnp.float32).sum()

    args = (bf(b, t, n, d), bf(b, t, g, d), bf(b, t, g, d), jax.ShapeDtypeStruct((b, t), jnp.int32))
    with dispatch.force_interpret(False), dispatch.cuda_lowering():
        text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(\S+)\(", text)
    assert calls == ["__gpu$xla.gpu.triton"] * 3, calls
    assert f"x{t}x{t}x" not in text and f"<{t}x{t}x" not in text

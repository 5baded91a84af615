"""Small building blocks shared by every layer: dense projections, embeddings, RMSNorm and RoPE.

Weights are stored as ``[in, out]`` kernels in ``param_dtype`` and cast to the compute dtype at use;
the converter transposes PyTorch's ``[out, in]`` on the way in and out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from monet_jax.sharding import constrain


def normal_init(std: float):
    return jax.nn.initializers.normal(stddev=std)


def param(value, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter with logical axis names (resolved to a mesh by ``monet_jax.sharding``); sharding is
    applied by the jitted initializer or loader, never eagerly at construction."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` with the kernel as ``[in, out]``."""

    def __init__(self, din: int, dout: int, *, axes: tuple[str, str], use_bias: bool, std: float, param_dtype,
                 compute_dtype, rngs: nnx.Rngs):
        self.kernel = param(normal_init(std)(rngs.params(), (din, dout), param_dtype), axes)
        self.bias = param(jnp.zeros((dout,), param_dtype), axes[1:]) if use_bias else None
        self.compute_dtype = compute_dtype

    def __call__(self, x, *, out_dtype=None):
        bias = None if self.bias is None else self.bias[...]
        return project(x, self.kernel[...], bias, self.compute_dtype, out_dtype)


def project(x, kernel_io, bias_o, compute_dtype, out_dtype=None):
    """``x @ kernel (+ bias)`` in the compute dtype (accumulating in ``out_dtype`` when given)."""
    y = jnp.einsum("...i,io->...o", x.astype(compute_dtype), kernel_io.astype(compute_dtype),
                   preferred_element_type=out_dtype)
    return y if bias_o is None else y + bias_o.astype(y.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, std: float, param_dtype, compute_dtype, rngs: nnx.Rngs):
        self.embedding = param(normal_init(std)(rngs.params(), (vocab, dim), param_dtype), ("vocab", "embed"))
        self.compute_dtype = compute_dtype

    def __call__(self, ids_bt):
        # Gather the table's embed (FSDP) shards first, as for any FSDP weight: looking rows up in a table whose
        # columns are split would leave the batch-sharded activations (and their gradient) to be resharded
        # column-wise, which XLA can only do by replicating them.
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, ids_bt, axis=0).astype(self.compute_dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: normalize in float32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def relu2(x):
    return jnp.square(jax.nn.relu(x))


def rope_tables(position_ids_bt, head_dim: int, theta: float, dtype):
    """cos/sin ``[b, t, head_dim]`` of the Hugging Face "rotate half" RoPE; frequencies in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids_bt.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_bthd, cos_btd, sin_btd):
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]

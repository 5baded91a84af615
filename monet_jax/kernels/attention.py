"""Causal self-attention through JAX's flash-attention kernels (``pallas.ops.tpu`` on TPU, the Pallas
Triton ``pallas.ops.gpu.attention.mha`` on GPUs), beside their pure-jnp reference.

The XLA attention materializes the ``[b, heads, t, t]`` float32 scores and their gradient: at 2048
tokens that is 3 GiB per 8 rows and 24 heads, several times over in a layer's backward, which is what
kept Monet-VD 4.1B over a v4 chip's 32 GiB. The kernel keeps each block of scores in VMEM (online
softmax), skips the blocks above the diagonal and returns only the output and per-row statistics.
Documents packed into one row and padding are expressed as segment ids: a query sees the earlier
keys of its own segment. On a GPU the Triton kernel (forward and backward, segment ids, causal block
skipping) keeps the scores in registers and shared memory the same way; it was chosen over cuDNN's
(``jax.nn.dot_product_attention``), which has no segment ids (a mask becomes a ``[b, 1, t, t]`` bias) and
needs the cuDNN library on the compiling host, and because it runs in interpret mode on a CPU, so the
tests check it against the reference.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from monet_jax.kernels import dispatch

LANES = 128  # the kernel's blocks are multiples of 128 tokens; head sizes over 128 must be too
GPU_BLOCK = 128  # query and key tokens per block of the GPU kernel's forward pass
GPU_BLOCK_BWD = 64  # per block of its backward (dK/dV and dQ): two [64, d] tiles of each operand live at once


def supported(t: int, head_dim: int) -> bool:
    """Whether the kernel takes ``t`` tokens of ``head_dim`` (otherwise the XLA attention runs)."""
    return t % LANES == 0 and (head_dim <= LANES or head_dim % LANES == 0)


def segments(attention_mask_bt, segment_ids_bt, b: int, t: int):
    """One int32 id per token such that "same id, key not after query" is the model's attention mask
    for every real (non-padding) query: ids of packed documents shifted by one, 0 for padding keys."""
    seg = jnp.ones((b, t), jnp.int32) if segment_ids_bt is None else segment_ids_bt.astype(jnp.int32) + 1
    if attention_mask_bt is not None:
        seg = jnp.where(attention_mask_bt.astype(bool), seg, 0)
    return seg


def _per_query_head(kv_btgd, n: int):
    """KV heads repeated to ``n`` query heads: query head ``i`` reads KV head ``i // (n / g)``."""
    return jnp.repeat(kv_btgd, n // kv_btgd.shape[2], axis=2)


def attention_reference(q_btnd, k_btgd, v_btgd, segments_bt):
    """Softmax attention in float32 (scores and probabilities), ``n`` query heads over ``g`` KV heads."""
    b, t, n, d = q_btnd.shape
    k_btnd, v_btnd = (_per_query_head(a, n).astype(jnp.float32) for a in (k_btgd, v_btgd))
    s = jnp.einsum("bqnd,bknd->bnqk", q_btnd.astype(jnp.float32), k_btnd) / jnp.sqrt(jnp.float32(d))
    mask = (segments_bt[:, :, None] == segments_bt[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(mask[:, None], s, -jnp.inf)
    return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(s, axis=-1), v_btnd).astype(q_btnd.dtype)


def block(t: int) -> int:
    """Query and key tokens per kernel block for rows of ``t`` tokens."""
    return next((blk for blk in (512, 256, 128) if t % blk == 0), t)


def reread_factor(t: int) -> float:
    """How many times the causal kernels fetch each block of the operands they stream along the inner
    grid axis (keys and values for the forward and dQ, queries and output gradients for dK/dV): query
    block i visits key blocks 0..i, so n blocks are fetched n (n + 1) / 2 times."""
    n = t // block(t)
    return (n + 1) / 2


def _flash_bnsd(q, k, v, seg):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    blk = block(q.shape[2])
    sizes = fa.BlockSizes(block_q=blk, block_k_major=blk, block_k=blk, block_b=1,
                          block_q_major_dkv=blk, block_k_major_dkv=blk, block_k_dkv=blk, block_q_dkv=blk,
                          block_k_major_dq=blk, block_k_dq=blk, block_q_dq=blk)
    return fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(q=seg, kv=seg), causal=True,
                              sm_scale=float(q.shape[-1]) ** -0.5, block_sizes=sizes)


def _interpret():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.force_tpu_interpret_mode()


@jax.custom_vjp
def _interpreted(q, k, v, seg):
    """``_flash_bnsd`` with its forward and backward kernels traced in TPU interpret mode (the kernel's
    own backward is traced when the gradient is, outside any context around the forward call)."""
    with _interpret():
        return _flash_bnsd(q, k, v, seg)


def _interpreted_fwd(q, k, v, seg):
    with _interpret():
        o, pullback = jax.vjp(lambda q, k, v: _flash_bnsd(q, k, v, seg), q, k, v)
    return o, (pullback, seg)


def _interpreted_bwd(res, do):
    pullback, seg = res
    with _interpret():
        dq, dk, dv = pullback(do)
    return dq, dk, dv, np.zeros(seg.shape, jax.dtypes.float0)


_interpreted.defvjp(_interpreted_fwd, _interpreted_bwd)


def _gpu_module():
    with warnings.catch_warnings():  # deprecated in jax 0.12 in favour of tokamax, still shipped and working
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    return gpu_attention


def _flash_gpu(q_btnd, k_btnd, v_btnd, seg_bt):
    """The Pallas Triton kernel, ``[b, t, n, d]`` in and out (its own layout); in interpret mode off a GPU."""
    mha = _gpu_module()
    t, d = q_btnd.shape[1], q_btnd.shape[-1]
    fwd, bwd = min(GPU_BLOCK, t), min(GPU_BLOCK_BWD, t)
    sizes = mha.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd,
                           block_kv_dq=bwd)
    with warnings.catch_warnings():  # jax 0.12 deprecates Pallas's Triton backend (still there, still working)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mha.mha(q_btnd, k_btnd, v_btnd, seg_bt, sm_scale=float(d) ** -0.5, causal=True, block_sizes=sizes,
                       interpret=dispatch.interpret_mode())


def flash_attention(q_btnd, k_btgd, v_btgd, segments_bt):
    """``attention_reference`` through the target's kernel (per batch shard under an active mesh); the output
    is ``[b, t, n, d]`` in the inputs' dtype. KV heads are repeated to the query heads (neither kernel has a
    grouped-query form)."""
    n = q_btnd.shape[2]
    k_btnd, v_btnd = _per_query_head(k_btgd, n), _per_query_head(v_btgd, n)

    def run(q, k, v, seg):
        if dispatch.target_platform() == "gpu":
            return _flash_gpu(q, k, v, seg).astype(q.dtype)
        kernel = _interpreted if dispatch.interpret_mode() else _flash_bnsd
        o = kernel(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), seg)
        return o.swapaxes(1, 2)

    return dispatch.partitioned(run, (True,) * 4, (True,))(q_btnd, k_btnd, v_btnd, segments_bt)


def choose(requested: str, t: int, head_dim: int) -> str:
    """Resolve ``attention_impl`` for ``t`` tokens to ``flash`` or ``xla``: ``auto`` takes the kernel on
    the target's TPU or GPU where its blocks tile the tokens; ``flash`` also in interpret mode (tests), else
    warns once and runs XLA."""
    if requested == "xla":
        return "xla"
    if requested not in ("flash", "auto"):
        raise ValueError(f"unknown attention_impl {requested!r}")
    if not supported(t, head_dim):
        if requested == "flash":
            dispatch.warn_once(f"attention_impl=flash: {t} tokens of head size {head_dim} do not tile the "
                               f"kernel's {LANES}-token blocks; using the XLA attention")
        return "xla"
    if dispatch.target_platform() in ("tpu", "gpu") or (requested == "flash" and dispatch.interpret_mode()):
        return "flash"
    if requested == "flash":
        dispatch.warn_once(f"attention_impl=flash: the kernels lower for TPU and GPU only, not "
                           f"{dispatch.target_platform()} (set {dispatch.INTERPRET_ENV}=1 to interpret); "
                           "using the XLA attention")
    return "xla"

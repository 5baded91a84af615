"""LLaMA causal self-attention with RoPE and grouped-query KV heads (no biases)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from monet_jax.config import MonetConfig
from monet_jax.kernels.attention import flash_attention
from monet_jax.model.layers import Dense, apply_rope
from monet_jax.sharding import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: MonetConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_size
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, hd
        kw = dict(use_bias=False, std=cfg.initializer_range, param_dtype=param_dtype,
                  compute_dtype=compute_dtype, rngs=rngs)
        self.q_proj = Dense(d, self.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, self.kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, self.kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(self.num_heads * hd, d, axes=("heads", "embed"), **kw)

    def __call__(self, x_btd, cos_btd, sin_btd, mask):
        """``mask``: ``[b, q, k]`` booleans, True where query ``q`` may attend to key ``k``; or ``[b, t]``
        segment ids (:func:`monet_jax.kernels.attention.segments`) for the flash kernel, which attends
        causally within equal ids."""
        q_btnd, k_btgd, v_btgd = self._qkv(x_btd, cos_btd, sin_btd)
        if mask.ndim == 2:
            b, t = q_btnd.shape[:2]
            out = checkpoint_name(flash_attention(q_btnd, k_btgd, v_btgd, mask).reshape(b, t, -1), "attention_out")
            return self.o_proj(out)
        return self._attend(q_btnd, k_btgd, v_btgd, mask)

    def cached(self, x_btd, cos_btd, sin_btd, mask_bts, kv, index):
        """Decoding: write this step's keys/values into the cache ``kv`` (each ``[b * kv_heads, S, d]``) at
        ``index`` and attend over the whole cache; ``mask_bts`` says which cache slots each query sees.

        The cache keeps each KV head's slots contiguous: the score and value products are then one plain
        matrix product per (row, KV head), where the ``[b, S, kv_heads, d]`` layout made XLA's CPU batched
        products several times slower (0.43 against 2.5-3.8 ms per layer at batch 8, 128 slots). Rows and
        KV heads share one leading axis because the products take them as one batch axis: with two, XLA
        (at batch 1) wrote each step's update twice, into the cache and into a flattened copy for the
        products, and copied the whole cache three times a step to do so."""
        q_btnd, k_btgd, v_btgd = self._qkv(x_btd, cos_btd, sin_btd)
        b, t, g, hd = k_btgd.shape

        def write(cache_nsd, new_btgd):
            new_nsd = new_btgd.swapaxes(1, 2).reshape(b * g, t, hd).astype(cache_nsd.dtype)
            return jax.lax.dynamic_update_slice_in_dim(cache_nsd, new_nsd, index, axis=1)

        k_nsd, v_nsd = write(kv[0], k_btgd), write(kv[1], v_btgd)
        return self._attend_cache(q_btnd, k_nsd, v_nsd, mask_bts), (k_nsd, v_nsd)

    def _qkv(self, x_btd, cos_btd, sin_btd):
        b, t, _ = x_btd.shape
        g, hd = self.kv_heads, self.head_dim
        q_btnd = apply_rope(self.q_proj(x_btd).reshape(b, t, self.num_heads, hd), cos_btd, sin_btd)
        k_btgd = apply_rope(self.k_proj(x_btd).reshape(b, t, g, hd), cos_btd, sin_btd)
        return q_btnd, k_btgd, self.v_proj(x_btd).reshape(b, t, g, hd)

    def _attend(self, q_btnd, k_bsgd, v_bsgd, mask_bts):
        b, t = q_btnd.shape[:2]
        g, r, hd = self.kv_heads, self.num_heads // self.kv_heads, self.head_dim
        # Query head n = g * r + i is served by KV head g.
        q_btgrd = constrain(q_btnd.reshape(b, t, g, r, hd), ("batch", "seq", "kv_heads", None, None))
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", q_btgrd, k_bsgd,
                            preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(hd))
        scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_bsgd.dtype)
        out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v_bsgd).reshape(b, t, g * r * hd)
        return self.o_proj(checkpoint_name(out, "attention_out"))  # kept by remat "dots"

    def _attend_cache(self, q_btnd, k_nsd, v_nsd, mask_bts):
        """``_attend`` over keys and values as ``[b * kv_heads, S, d]``: the queries of a KV head (its
        ``r`` heads times ``t`` tokens) as the rows of one matrix product per row and KV head."""
        b, t = q_btnd.shape[:2]
        g, r, hd = self.kv_heads, self.num_heads // self.kv_heads, self.head_dim
        q_nqd = q_btnd.reshape(b, t, g, r, hd).transpose(0, 2, 3, 1, 4).reshape(b * g, r * t, hd)
        scores = jnp.einsum("nqd,nkd->nqk", q_nqd, k_nsd,
                            preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(hd))
        mask_bqs = jnp.broadcast_to(mask_bts[:, None], (b, r, t, mask_bts.shape[-1])).reshape(b, 1, r * t, -1)
        scores = jnp.where(mask_bqs, scores.reshape(b, g, r * t, -1), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_nsd.dtype).reshape(b * g, r * t, -1)
        out = jnp.einsum("nqk,nkd->nqd", probs, v_nsd).reshape(b, g, r, t, hd)
        return self.o_proj(out.transpose(0, 3, 1, 2, 4).reshape(b, t, g * r * hd))


def attention_mask(attention_mask_bt, t: int, segment_ids_bt=None):
    """Causal mask combined with an optional key padding mask (1 = real token, 0 = padding) and, for
    packed rows, a document mask (tokens attend only within their segment; segment 0 is padding)."""
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if attention_mask_bt is not None:
        mask = mask & attention_mask_bt.astype(bool)[:, None, :]
    if segment_ids_bt is not None:
        mask = mask & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask

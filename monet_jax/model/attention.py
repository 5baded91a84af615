"""LLaMA causal self-attention with RoPE and grouped-query KV heads (no biases)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from monet_jax.config import MonetConfig
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

    def __call__(self, x_btd, cos_btd, sin_btd, mask_btt):
        """``mask_btt[b, q, k]`` is True where query ``q`` may attend to key ``k``."""
        q_btnd, k_btgd, v_btgd = self._qkv(x_btd, cos_btd, sin_btd)
        return self._attend(q_btnd, k_btgd, v_btgd, mask_btt)

    def cached(self, x_btd, cos_btd, sin_btd, mask_bts, kv, index):
        """Decoding: write this step's keys/values into the cache ``kv`` (each ``[b, S, kv_heads, d]``) at
        ``index`` and attend over the whole cache; ``mask_bts`` says which cache slots each query sees."""
        q_btnd, k_btgd, v_btgd = self._qkv(x_btd, cos_btd, sin_btd)
        k_bsgd = jax.lax.dynamic_update_slice_in_dim(kv[0], k_btgd.astype(kv[0].dtype), index, axis=1)
        v_bsgd = jax.lax.dynamic_update_slice_in_dim(kv[1], v_btgd.astype(kv[1].dtype), index, axis=1)
        return self._attend(q_btnd, k_bsgd, v_bsgd, mask_bts), (k_bsgd, v_bsgd)

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
        return self.o_proj(out)


def attention_mask(attention_mask_bt, t: int, segment_ids_bt=None):
    """Causal mask combined with an optional key padding mask (1 = real token, 0 = padding) and, for
    packed rows, a document mask (tokens attend only within their segment; segment 0 is padding)."""
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if attention_mask_bt is not None:
        mask = mask & attention_mask_bt.astype(bool)[:, None, :]
    if segment_ids_bt is not None:
        mask = mask & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask

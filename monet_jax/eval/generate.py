"""Batched text generation with a key/value cache: greedy, temperature, top-k and top-p sampling.

Prompts are left-padded to a common length so every row writes its new tokens to the same cache slot;
positions count only real tokens, and padded slots are masked out of attention.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = no top-k cut
    top_p: float = 1.0        # 1 = no nucleus cut


def sample(logits_bv, key, s: Sampling):
    """Next tokens from float32 logits ``[b, V]``."""
    if s.temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / s.temperature
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the mass before it is below top_p (the most likely one always stays).
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@nnx.jit
def _step(model, ids_bt, positions_bt, key_mask_bs, cache, index):
    logits, cache = model.cached(ids_bt, positions_bt, key_mask_bs, cache, index)
    return logits[:, -1], cache


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None, pad_id: int = 0,
             sampling: Sampling = Sampling(), seed: int = 0, return_logits: bool = False) -> dict:
    """Continue each prompt (token ids, bos included) by up to ``max_new_tokens``; a row stops after it
    samples ``eos_id``. Returns ``tokens`` (new ids per row, eos included), timings and optionally the
    logits each new token was drawn from."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    b, p_len = len(prompts), max(len(p) for p in prompts)
    total = p_len + max_new_tokens
    ids = np.full((b, p_len), pad_id, np.int32)
    key_mask = np.zeros((b, total), bool)
    for i, p in enumerate(prompts):
        ids[i, p_len - len(p):] = p
        key_mask[i, p_len - len(p):p_len] = True
    positions = np.maximum(np.cumsum(key_mask[:, :p_len], axis=1) - 1, 0).astype(np.int32)
    cache = model.init_cache(b, total)
    key = jax.random.key(seed)

    t0 = time.perf_counter()
    logits, cache = _step(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(key_mask), cache, 0)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0
    next_pos = positions[:, -1] + 1
    out = np.zeros((b, max_new_tokens), np.int32)
    done = np.zeros(b, bool)
    history = []
    t0 = time.perf_counter()
    steps = 0
    for n in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = np.asarray(sample(logits, sub, sampling))
        if return_logits:
            history.append(np.asarray(logits))
        tok = np.where(done, pad_id, tok)
        out[:, n] = tok
        steps = n + 1
        if eos_id is not None:
            done |= tok == eos_id
        if done.all() or n == max_new_tokens - 1:
            break
        key_mask[:, p_len + n] = True
        logits, cache = _step(model, jnp.asarray(tok[:, None]), jnp.asarray(next_pos[:, None]),
                              jnp.asarray(key_mask), cache, p_len + n)
        next_pos = next_pos + 1
        if n == 0:  # the first decoding step compiles; time the ones after it
            jax.block_until_ready(logits)
            t0 = time.perf_counter()
    jax.block_until_ready(logits)
    decode_s = time.perf_counter() - t0
    tokens = []
    for row in out[:, :steps]:
        stop = np.flatnonzero(row == eos_id) if eos_id is not None else []
        tokens.append(row[:stop[0] + 1].tolist() if len(stop) else row.tolist())
    result = {"tokens": tokens, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
              "decode_tokens_per_second": b * (steps - 2) / decode_s if steps > 2 and decode_s > 0 else None}
    if return_logits:
        result["logits"] = np.stack(history, axis=1)
    return result

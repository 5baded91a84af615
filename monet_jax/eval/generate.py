"""Batched text generation on the device: greedy, temperature, top-k and top-p sampling.

One compiled call fills the key/value cache with the prompts and draws the first token; a second runs
the rest of the generation as one ``lax.while_loop`` (sampling and eos stopping inside it, the cache
donated and updated in place), optionally in chunks of tokens for streaming. Prompts are left-padded to
a power-of-two length and the cache and batch are rounded to powers of two, so new prompt lengths reuse
a few compiled shapes. Positions count only real tokens; padded slots are masked out of attention.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from monet_jax.model.pure import PureModel, decodes_sparse

if TYPE_CHECKING:
    from monet_jax.model.transformer import MonetForCausalLM


@dataclass(frozen=True)
class Sampling:
    """How ``generate`` draws each token. Frozen and hashable: it is a static argument of the compiled
    decoding loop, so each distinct setting compiles once.

    Attributes:
        temperature: Divides the logits; 0 (the default) takes the most likely token (greedy).
        top_k: Sample among the ``top_k`` likeliest tokens; 0 keeps all.
        top_p: Nucleus sampling: keep the likeliest tokens while the probability before each is below
            ``top_p`` (the likeliest always stays); 1 keeps all.
    """

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


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two >= ``n`` and >= ``least``: few distinct shapes, few compilations."""
    return max(least, 1 << max(n - 1, 0).bit_length())


def least_rows() -> int:
    """Rows a decoding step runs at least: one. On a GPU a one-row product ``x @ W`` used to need a filler row
    (XLA:GPU rewrote it as ``x * W`` written to memory and summed, three times the weight's bytes: 1.4B VD at
    batch 1 on one H100, 196 tokens/s against 492 with two rows); decoding now compiles with that rewrite off
    (:func:`~monet_jax.kernels.dispatch.decode_compiler_options`), so a batch of one is one row everywhere."""
    return 1


class Decoding(NamedTuple):
    """What the decoding loop carries between steps (and between streamed chunks)."""

    cache: list            # per layer (keys, values) [b * kv_heads, S, head_dim]
    tokens: jax.Array      # int32 [b, N]: the new tokens, pad_id after a row's eos
    logits: jax.Array      # float32 [b, N, V] the tokens were drawn from ([b, 0, V] unless requested)
    position: jax.Array    # int32 [b]: position of the last drawn token
    done: jax.Array        # bool [b]: the row has drawn eos
    n: jax.Array           # int32: tokens drawn so far


class _Fixed(NamedTuple):
    """Per-call values that the loop reads but never changes."""

    key_mask: jax.Array    # bool [b, S]: real prompt tokens and every generated slot
    key: jax.Array         # PRNG key; step n samples with fold_in(key, n)
    eos: jax.Array         # int32 [k]: the ids that end a row (-1 = none)
    pad: jax.Array         # int32
    filler: jax.Array      # bool [b]: a row added to round the batch up (done from the start)


def _draw(s: Decoding, f: _Fixed, logits_bv, sampling: Sampling, keep_logits: bool) -> Decoding:
    tok = sample(logits_bv, jax.random.fold_in(f.key, s.n), sampling)
    tok = jnp.where(s.done, f.pad, tok)
    logits = s.logits.at[:, s.n].set(logits_bv) if keep_logits else s.logits
    ended = jnp.any(tok[:, None] == jnp.atleast_1d(f.eos)[None, :], axis=-1)
    return s._replace(tokens=s.tokens.at[:, s.n].set(tok), logits=logits, done=s.done | ended, n=s.n + 1)


def _prefill(model, ids_bp, position_bp, f: _Fixed, new: int, sampling: Sampling, keep_logits: bool) -> Decoding:
    b, p = ids_bp.shape
    cache = model.init_cache(b, f.key_mask.shape[1])
    logits, cache = model.cached(ids_bp, position_bp, f.key_mask, cache, 0, last_only=True)
    v = logits.shape[-1]
    s = Decoding(cache, jnp.zeros((b, new), jnp.int32), jnp.zeros((b, new if keep_logits else 0, v), jnp.float32),
                 position_bp[:, -1], f.filler, jnp.int32(0))
    return _draw(s, f, logits[:, -1], sampling, keep_logits)


def _decode(model, s: Decoding, f: _Fixed, stop, sampling: Sampling, keep_logits: bool) -> Decoding:
    """Draw tokens until ``stop`` are drawn or every row has drawn eos."""
    prompt = f.key_mask.shape[1] - s.tokens.shape[1]

    def step(s: Decoding) -> Decoding:
        position = s.position + 1
        logits, cache = model.cached(s.tokens[:, s.n - 1, None], position[:, None], f.key_mask, s.cache,
                                     prompt + s.n - 1)
        return _draw(s._replace(cache=cache, position=position), f, logits[:, -1], sampling, keep_logits)

    return jax.lax.while_loop(lambda s: (s.n < stop) & ~jnp.all(s.done), step, s)


def generate(model: MonetForCausalLM, prompts: list[list[int]], *, max_new_tokens: int,
             eos_id: int | Sequence[int] | None, pad_id: int = 0,
             sampling: Sampling = Sampling(), seed: int = 0, return_logits: bool = False,
             chunk: int | None = None, on_tokens: Callable[[np.ndarray], None] | None = None,
             pure: PureModel | None = None) -> dict:
    """Continue a batch of prompts on the device, with a key/value cache, in two compiled calls.

    The first call fills the cache and draws the first token; the second decodes the rest in one
    ``lax.while_loop``, so the host is not in the loop unless ``chunk`` asks for it. Prompt length, batch
    and cache are rounded up to powers of two, so a new prompt length rarely compiles again.

    Args:
        model: A ``MonetForCausalLM``.
        prompts: Token ids per prompt, bos included (``tokenizer.encode`` does not add it); lengths may
            differ.
        max_new_tokens: The most tokens to add to each prompt.
        eos_id: A row stops after it samples this id, or any of a list (a ``generation_config.json`` may
            name several); ``None``: rows run to ``max_new_tokens``.
        pad_id: Fills the prompts' left padding and a stopped row's tokens in ``on_tokens``.
        sampling: Greedy by default; see ``Sampling``.
        seed: The sampling key's seed: the same seed and prompts give the same tokens.
        return_logits: Also return the float32 logits each new token was drawn from.
        chunk: Return to the host every ``chunk`` tokens and call ``on_tokens`` (streaming).
        on_tokens: Called with every row's tokens so far, ``[rows, n]``, ``pad_id`` after eos.
        pure: The model already split (``PureModel(model)``), for repeated calls; with
            ``expert_rows=True`` the sparse path of small batches reads only the experts in use, as the one
            made here does when decoding takes that path.

    Returns:
        ``tokens`` (per prompt the new ids, eos included), ``prefill_seconds`` (with its compilation),
            ``decode_seconds`` and ``decode_tokens_per_second`` (after the first decoding step, which
            compiles; ``None`` when too few tokens were timed) and, with ``return_logits``, ``logits``
            ``[rows, steps, vocab]``.

    Raises:
        ValueError: An empty prompt, or ``max_new_tokens`` below 1.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    rows, p_len = len(prompts), max(len(p) for p in prompts)
    b, p = bucket(rows, least_rows()), bucket(p_len, 8)
    pure = pure if pure is not None else PureModel(model, expert_rows=decodes_sparse(model.config, b))
    total = bucket(p + max_new_tokens)
    ids = np.full((b, p), pad_id, np.int32)
    key_mask = np.zeros((b, total), bool)
    key_mask[:, p:] = True
    for i, prompt in enumerate(prompts + [prompts[0]] * (b - rows)):  # filler rows repeat the first prompt
        ids[i, p - len(prompt):] = prompt
        key_mask[i, p - len(prompt):p] = True
    positions = np.maximum(np.cumsum(key_mask[:, :p], axis=1) - 1, 0).astype(np.int32)
    eos = [] if eos_id is None else [int(eos_id)] if np.ndim(eos_id) == 0 else [int(e) for e in eos_id]
    fixed = _Fixed(jnp.asarray(key_mask), jax.random.key(seed), jnp.asarray(eos or [-1], jnp.int32),
                   jnp.int32(pad_id), jnp.arange(b) >= rows)
    prefill = pure.jit(_prefill, static_argnums=(3, 4, 5), rows=b * p)
    decode = pure.jit(_decode, static_argnums=(3, 4), donate_argnums=(0,), rows=b)

    t0 = time.perf_counter()
    state = prefill(jnp.asarray(ids), jnp.asarray(positions), fixed, total - p, sampling, return_logits)
    jax.block_until_ready(state.n)
    prefill_s = time.perf_counter() - t0
    step = chunk or max_new_tokens
    decode_s, timed_from = 0.0, None
    while True:
        n, all_done = int(state.n), bool(jnp.all(state.done))
        if on_tokens is not None:
            on_tokens(np.asarray(state.tokens[:rows, :n]))
        if n >= max_new_tokens or all_done:
            break
        # The first decoding call draws one token (and compiles); the rate is timed from the next.
        stop = n + 1 if timed_from is None else min(n + step, max_new_tokens)
        t0 = time.perf_counter()
        state = decode(state, fixed, jnp.int32(stop), sampling, return_logits)
        jax.block_until_ready(state.n)
        if timed_from is None:
            timed_from = stop
        else:
            decode_s += time.perf_counter() - t0
    steps = int(state.n)
    out = np.asarray(state.tokens[:rows, :steps])
    tokens = []
    for row in out:
        stop_at = np.flatnonzero(np.isin(row, eos))
        tokens.append(row[:stop_at[0] + 1].tolist() if len(stop_at) else row.tolist())
    timed = steps - (timed_from or steps)
    result = {"tokens": tokens, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
              "decode_tokens_per_second": rows * timed / decode_s if timed > 0 and decode_s > 0 else None}
    if return_logits:
        result["logits"] = np.asarray(state.logits[:rows, :steps])
    return result

"""AdamW with warmup + cosine / WSD schedules, masked weight decay, clipping and frozen routers."""

from __future__ import annotations

import jax
import optax

from monet_jax.train.config import OptimConfig


def learning_rate_schedule(o: OptimConfig) -> optax.Schedule:
    warmup = min(o.warmup_steps, o.steps - 1)
    end = o.learning_rate * o.end_lr_fraction
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, o.steps, end_value=end)
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
                                     optax.constant_schedule(o.learning_rate)], [warmup])
    # Warmup-stable-decay: flat after warmup, linear decay over the final ``decay_fraction`` of steps.
    decay = max(int(round(o.steps * o.decay_fraction)), 1)
    stable = max(o.steps - warmup - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
         optax.constant_schedule(o.learning_rate),
         optax.linear_schedule(o.learning_rate, end, decay)],
        [warmup, warmup + stable])


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def decays(path) -> bool:
    """Weight decay applies to matrices (kernels, embeddings) only: never norms, biases, expert biases."""
    return _key(path[-1]) in ("kernel", "embedding")


def is_router(path) -> bool:
    return any(_key(p) == "router" for p in path)


def make_optimizer(o: OptimConfig, *, freeze_routers: bool = False) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: decays(p), params)
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(learning_rate_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps,
                                 weight_decay=o.weight_decay, mask=decay_mask))
    if not freeze_routers:
        return tx
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if is_router(p) else "train", params)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

"""Next-token loss, shared by training (objective, validation) and evaluation (perplexity)."""

from __future__ import annotations

import optax
from flax import nnx


def next_token_loss(logits_btv, targets_bt):
    """Mean cross-entropy of ``logits[:, t]`` predicting ``targets[:, t]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt).mean()


@nnx.jit
def batch_loss(model, batch_bt):
    """Mean next-token loss of ``batch[:, :-1] -> batch[:, 1:]`` (inference mode: no state updates)."""
    return next_token_loss(model(batch_bt[:, :-1]).logits, batch_bt[:, 1:])

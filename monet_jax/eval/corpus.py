"""Corpus perplexity: mean next-token loss with each document scored on its own (``data.windows``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from tqdm import tqdm

from monet_jax.data.windows import count_batches, document_tokens, rows
from monet_jax.model.pure import PureModel


def perplexity(model, tokenizer, documents, *, seq_len: int = 128, batch_size: int = 8,
               max_tokens: int | None = None, max_batches: int | None = None, progress: bool = True) -> dict:
    """Mean next-token loss over the documents' tokens (each document scored on its own; see ``rows``)."""
    pure = PureModel(model)
    summed_nll = pure.jit(_summed_nll)
    docs = document_tokens(tokenizer, documents, max_tokens)
    if not docs:
        raise ValueError("no tokens to evaluate")
    total, count = 0.0, 0
    n = count_batches(docs, seq_len, batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    for b, batch in enumerate(tqdm(rows(docs, seq_len, batch_size, tokenizer.pad_id), total=n, desc="perplexity",
                                   unit="batch", disable=not progress)):
        if b == n:
            break
        nll, k = summed_nll(jnp.asarray(batch.ids), jnp.asarray(batch.valid))
        total += float(nll)
        count += int(k)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def _summed_nll(model, ids_bt, valid_bt):
    """Summed next-token loss and the number of predicted tokens of right-padded rows."""
    logits = model(ids_bt, attention_mask=valid_bt.astype(jnp.int32)).logits[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, ids_bt[:, 1:, None], axis=-1)[..., 0]
    mask = valid_bt[:, 1:]
    return -jnp.sum(jnp.where(mask, target, 0.0)), jnp.sum(mask)

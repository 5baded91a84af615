"""Zero- and few-shot multiple choice scored by log-likelihood, on local JSONL files.

One example per line::

    {"context": "Question: ...\\nAnswer:", "choices": [" Paris", " Rome"], "answer": 0}

``context`` may also be a list with one context per choice (partial scoring, as for WinoGrande: each
option fills the blank in its context and the rest of the sentence is the scored continuation).
``tools/tasks_to_jsonl.py`` writes this format from the published rows of MMLU, ARC, WinoGrande, PIQA,
SIQA, OpenBookQA, HellaSwag and CommonsenseQA (``monet_jax/eval/benchmarks.py``).

Each choice is scored as ``sum log p(choice tokens | bos + shots + context)``: context and choice are
joined as they are (no delimiter; choices carry their own leading space). ``acc`` takes the highest sum;
``acc_norm`` divides it by the choice's length in characters first (lm-eval's ``acc_norm``; its
``acc_bytes`` divides by UTF-8 bytes), so long answers are not penalized for their length. Few-shot
prompts prepend the first ``shots`` examples of a separate file (or of the same file, never the scored
example), each as its context, its correct choice and a blank line. ``python -m
monet_jax.eval.lm_eval_task`` writes an lm-eval task with these same conventions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from monet_jax.model.pure import PureModel


@dataclass(frozen=True)
class Example:
    context: str | tuple[str, ...]  # one shared context, or one per choice
    choices: tuple[str, ...]
    answer: int

    def context_for(self, choice: int) -> str:
        return self.context if isinstance(self.context, str) else self.context[choice]


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"task file {path}: not UTF-8 text") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ctx = row["context"]
            ctx = tuple(str(c) for c in ctx) if isinstance(ctx, list) else str(ctx)
            ex = Example(ctx, tuple(str(c) for c in row["choices"]), int(row["answer"]))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not valid JSON") from None
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}:{n}: expected context (string), choices (list) and answer (index)") from None
        if len(ex.choices) < 2 or not 0 <= ex.answer < len(ex.choices):
            raise ValueError(f"{path}:{n}: needs two or more choices and an answer index among them")
        if not isinstance(ex.context, str) and len(ex.context) != len(ex.choices):
            raise ValueError(f"{path}:{n}: a list of contexts needs one context per choice")
        examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def few_shot_prefix(shots: list[Example]) -> str:
    return "".join(ex.context_for(ex.answer) + ex.choices[ex.answer] + "\n\n" for ex in shots)


def _choice_logprobs(model, tokens_bt, score_mask_bt):
    """Sum of log p(token t | tokens < t) over the positions marked in ``score_mask``, and whether every
    marked token is the argmax there (lm-eval's ``is_greedy``)."""
    logits = model(tokens_bt[:, :-1]).logits
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = tokens_bt[:, 1:]
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    scored = score_mask_bt[:, 1:]
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == target) | (scored == 0), axis=-1)
    return jnp.sum(picked * scored, axis=-1), greedy


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 8,
                   max_len: int | None = None, progress: bool = True, return_greedy: bool = False):
    """``log p(continuation | context)`` for each ``(context, continuation)``; contexts are left-truncated
    to fit ``max_len`` (the model's positions by default), padded on the right to a bucket length.
    With ``return_greedy`` also whether greedy decoding would produce each continuation."""
    pairs = []
    for context, continuation in requests:
        cont = [int(t) for t in tokenizer.encode(continuation)]
        if not cont:
            raise ValueError(f"empty continuation after tokenization: {continuation!r}")
        pairs.append(([tokenizer.bos_id, *map(int, tokenizer.encode(context))], cont))
    return token_loglikelihoods(model, pairs, pad_id=tokenizer.pad_id, batch_size=batch_size, max_len=max_len,
                                progress=progress, return_greedy=return_greedy)


def token_loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int = 8,
                         max_len: int | None = None, progress: bool = True, return_greedy: bool = False):
    """:func:`loglikelihoods` on already tokenized ``(context ids, continuation ids)`` (no bos added), for
    callers that choose the token windows themselves (lm-eval's rolling log-likelihood)."""
    max_len = max_len or model.config.max_position_embeddings
    choice_logprobs = PureModel(model).jit(_choice_logprobs)
    rows, masks = [], []
    for ctx, cont in pairs:
        ids = (list(ctx) + list(cont))[-(max_len + 1):]
        rows.append(ids)
        masks.append([0.0] * (len(ids) - len(cont)) + [1.0] * len(cont))
    order = np.argsort([-len(r) for r in rows], kind="stable")  # similar lengths share a batch
    out = np.zeros(len(rows), np.float64)
    greedy = np.zeros(len(rows), bool)
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc="tasks", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        longest = max(len(rows[i]) for i in idx)
        width = max(min(1 << max(int(np.ceil(np.log2(longest))), 3), max_len + 1), longest)  # few shapes
        tokens = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for j, i in enumerate(idx):
            tokens[j, :len(rows[i])] = rows[i]
            mask[j, :len(masks[i])] = masks[i]
        scores, is_greedy = choice_logprobs(jnp.asarray(tokens), jnp.asarray(mask))
        out[idx] = np.asarray(scores)[:len(idx)]
        greedy[idx] = np.asarray(is_greedy)[:len(idx)]
    return (out, greedy) if return_greedy else out


def evaluate(model, tokenizer, examples: list[Example], *, shots: int = 0, shot_pool: list[Example] | None = None,
             batch_size: int = 8, progress: bool = True) -> dict:
    """Accuracy and length-normalized accuracy over ``examples``."""
    pool = shot_pool if shot_pool is not None else examples
    requests, owners = [], []
    for k, ex in enumerate(examples):
        shots_for = [s for s in pool if s is not ex][:shots] if shots else []
        if len(shots_for) < shots:
            raise ValueError(f"{shots} shots requested but only {len(shots_for)} examples are available for them")
        prefix = few_shot_prefix(shots_for)
        for c, choice in enumerate(ex.choices):
            requests.append((prefix + ex.context_for(c), choice))
            owners.append((k, c))
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    per_example: dict[int, list[tuple[int, float]]] = {}
    for (k, c), s in zip(owners, scores, strict=True):
        per_example.setdefault(k, []).append((c, s))
    correct = correct_norm = 0
    for k, ex in enumerate(examples):
        s = np.array([v for _, v in sorted(per_example[k])])
        lengths = np.array([max(len(ch), 1) for ch in ex.choices])  # characters, as lm-eval's acc_norm
        correct += int(np.argmax(s) == ex.answer)
        correct_norm += int(np.argmax(s / lengths) == ex.answer)
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "examples": n, "shots": shots}

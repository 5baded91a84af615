"""End-to-end expert deletion on the embedded default: train the tiny Monet on three domains, select
each domain's experts by the paper's rule, delete them, and compare per-domain losses.

    python tools/deletion_demo.py [--out runs/demo] [key=value training overrides]
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from monet_jax.data.domains import demo_domains

# At this size the paper's aux weight (1e-3) lets routing collapse onto few experts; 1e-2 keeps more of them
# in use, lowers every domain's loss and gives each domain more experts of its own.
DEFAULT_OVERRIDES = ("aux_loss_coef=1e-2",)


def write_corpora(out: Path, chars: int, held_out: float, seed: int) -> dict[str, dict[str, Path]]:
    """Per domain: ``select`` (training documents, for expert selection) and ``eval`` (held out) JSONL;
    plus ``train.jsonl`` mixing every domain's training documents."""
    out.mkdir(parents=True, exist_ok=True)
    paths, train = {}, []
    for name, docs in demo_domains(chars, seed).items():
        n_eval = max(1, int(len(docs) * held_out))
        paths[name] = {"select": _jsonl(out / f"{name}-select.jsonl", docs[n_eval:]),
                       "eval": _jsonl(out / f"{name}-eval.jsonl", docs[:n_eval])}
        train += docs[n_eval:]
    random.Random(seed).shuffle(train)
    _jsonl(out / "train.jsonl", train)
    return paths


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | tuple = (), *, chars: int = 100_000,
             held_out: float = 0.15, ratio: float = 2.0, seq_len: int = 128, eval_tokens: int | None = None,
             seed: int = 0) -> dict:
    from monet_jax import MonetForCausalLM
    from monet_jax.data.tokenizer import load_tokenizer
    from monet_jax.eval.corpus import perplexity
    from monet_jax.eval.experts_cli import read_corpus
    from monet_jax.experts.mask import apply_mask
    from monet_jax.experts.select import domain_experts
    from monet_jax.experts.stats import corpus_stats
    from monet_jax.train.config import TrainConfig
    from monet_jax.train.main import run

    out = Path(out)
    paths = write_corpora(out / "data", chars, held_out, seed)
    cfg = TrainConfig.load(None, [f"data.path={out / 'data' / 'train.jsonl'}", f"out_dir={out / 'run'}",
                                  *DEFAULT_OVERRIDES, *overrides])
    run(cfg)
    model = MonetForCausalLM.from_pretrained(out / "run" / "checkpoint")
    tok = load_tokenizer(cfg.data.tokenizer)
    kw = dict(seq_len=seq_len, batch_size=16, max_tokens=eval_tokens)
    means = {name: corpus_stats(model, tok, read_corpus(p["select"]), desc=f"select {name}", **kw).mean
             for name, p in paths.items()}
    masks = domain_experts(means, ratio=ratio)
    evals = {name: read_corpus(p["eval"]) for name, p in paths.items()}
    losses = {}
    for deleted in [None, *masks]:
        apply_mask(model, None if deleted is None else masks[deleted])
        losses[deleted] = {name: perplexity(model, tok, docs, progress=False, **kw)["loss"]
                           for name, docs in evals.items()}
        if deleted is not None:
            masks[deleted].save(out / "masks" / f"{deleted}.json")
    apply_mask(model, None)
    result = {"losses": {str(k): v for k, v in losses.items()},
              "deleted": {k: [int(g.size) for g in m.groups] for k, m in masks.items()},
              "experts_per_group": model.config.moe_experts**2}
    (out / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    """Markdown: rows = deleted domain, columns = loss on each domain (and its rise over no deletion)."""
    base = result["losses"]["None"]
    names = list(base)
    lines = ["| experts deleted | " + " | ".join(f"{n} loss (rise)" for n in names)
             + " | target rise / mean other rise |",
             "|---" * (len(names) + 2) + "|",
             "| none | " + " | ".join(f"{base[n]:.3f}" for n in names) + " | |"]
    per_group = result["experts_per_group"]
    for target, counts in result["deleted"].items():
        row = result["losses"][target]
        rise = {n: row[n] - base[n] for n in names}
        others = np.mean([rise[n] for n in names if n != target])
        ratio = f"{rise[target] / others:.1f}x" if others > 0 else "inf (others did not rise)"
        share = ", ".join(f"{c}" for c in counts)
        lines.append(f"| {target} ({share} of {per_group:,} per group) | "
                     + " | ".join(f"{row[n]:.3f} ({rise[n]:+.3f})" for n in names) + f" | {ratio} |")
    return "\n".join(lines)

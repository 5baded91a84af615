"""``train.py`` / ``monet-train``: train Monet with Optax on the embedded corpus or a local text file.

    python train.py                                   # the embedded default (tiny Monet-VD, CPU)
    python train.py --config configs/X.yaml optim.steps=1000 model.moe_groups=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from monet_jax.config import ConfigError, count_params
from monet_jax.data import text
from monet_jax.model import MonetForCausalLM
from monet_jax.model.loss import batch_loss, next_token_loss
from monet_jax.model.router import aux_losses
from monet_jax.train.config import TrainConfig


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    o = cfg.optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, min(o.warmup_steps, o.steps - 1), o.steps,
                                                  end_value=o.learning_rate * o.end_lr_fraction)
    # Decay only matrices (kernels, embeddings); never norms, biases or expert biases b/b1/b2.
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: str(getattr(path[-1], "key", path[-1])) in ("kernel", "embedding"), params)

    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))


def loss_terms(model: MonetForCausalLM, batch, aux_coef: float):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = model(inputs, output_router_probs=True)
    ce = next_token_loss(out.logits, targets)
    if out.router_probs:
        terms = [aux_losses(g1, g2) for g1, g2 in out.router_probs]
        unif = jnp.mean(jnp.stack([u for u, _ in terms]))
        amb = jnp.mean(jnp.stack([a for _, a in terms]))
    else:
        unif = amb = jnp.zeros((), jnp.float32)
    return ce + aux_coef * (unif + amb), {"ce": ce, "unif": unif, "amb": amb}


@nnx.jit(static_argnums=3)
def train_step(model, optimizer, batch, aux_coef):
    (loss, metrics), grads = nnx.value_and_grad(loss_terms, has_aux=True)(model, batch, aux_coef)
    optimizer.update(model, grads)
    return dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))


def validation_loss(model, sampler, batches: int) -> float:
    model.eval()
    losses = [float(batch_loss(model, jnp.asarray(b))) for b in sampler.sequential(batches)]
    model.train()
    return float(np.mean(losses))


def run(cfg: TrainConfig) -> dict:
    if cfg.model.vocab_size < text.BYTE_VOCAB:
        raise ConfigError(f"model.vocab_size must be at least {text.BYTE_VOCAB} for the byte tokenizer")
    docs = text.embedded_corpus() if cfg.data.path is None else text.read_documents(cfg.data.path)
    tokens = text.pack(docs)
    split = int(len(tokens) * (1 - cfg.data.val_fraction))
    train = text.WindowSampler(tokens[:split], cfg.data.seq_len, cfg.data.batch_size, cfg.seed)
    val = text.WindowSampler(tokens[split:], cfg.data.seq_len, cfg.data.batch_size, cfg.seed)

    model = MonetForCausalLM(cfg.model, rngs=nnx.Rngs(cfg.seed))
    model.train()
    optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
    print(f"model: {cfg.model.moe_decompose} {count_params(cfg.model) / 1e6:.2f}M params | data: "
          f"{len(tokens):,} tokens ({'embedded corpus' if cfg.data.path is None else cfg.data.path}) | "
          f"device: {jax.devices()[0].platform}", flush=True)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    first = last = None
    history = []
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.optim.steps + 1), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        metrics = train_step(model, optimizer, jnp.asarray(train.next()), cfg.aux_loss_coef)
        if step == 1 or step % 10 == 0 or step == cfg.optim.steps:
            m = {k: float(v) for k, v in metrics.items()}
            first = first or m
            last = m
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{m['ce']:.3f}", unif=f"{m['unif']:.2f}", amb=f"{m['amb']:.3f}",
                            tok_s=f"{step * tokens_per_step / elapsed:,.0f}")
        if step % cfg.eval_every == 0 or step == cfg.optim.steps:
            v = validation_loss(model, val, cfg.eval_batches)
            history.append((step, v))
            bar.write(f"step {step}: train ce {last['ce']:.4f}  val ce {v:.4f}")
    elapsed = time.perf_counter() - start

    out = Path(cfg.out_dir)
    model.eval()
    model.save_checkpoint(out / "checkpoint", overwrite=True)
    summary = {"steps": cfg.optim.steps, "first_train_loss": first["ce"], "final_train_loss": last["ce"],
               "final_val_loss": history[-1][1], "aux_unif": last["unif"], "aux_amb": last["amb"],
               "seconds": round(elapsed, 1), "tokens_per_second": round(cfg.optim.steps * tokens_per_step / elapsed)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {elapsed:.0f}s: train loss {first['ce']:.3f} -> {last['ce']:.3f}, "
          f"val loss {history[-1][1]:.3f}; checkpoint at {out / 'checkpoint'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="monet-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML training config (default: the embedded tiny run)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.steps=100")
    args = p.parse_args(argv)
    try:
        run(TrainConfig.load(args.config, args.overrides))
    except (ConfigError, ValueError) as e:
        print(f"monet-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

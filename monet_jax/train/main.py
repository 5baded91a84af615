"""``train.py`` / ``monet-train``: train Monet on one CPU, a GPU node, or a TPU pod.

    python train.py                                   # the embedded default (tiny Monet-VD, CPU)
    python train.py --config configs/X.yaml optim.steps=1000 mesh.fsdp=-1 mesh.data=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from monet_jax import distributed as dist
from monet_jax import sharding
from monet_jax.config import ConfigError, count_params
from monet_jax.convert.readers import ConvertError
from monet_jax.data.pipeline import make_iterator
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.train import metrics as M
from monet_jax.train.checkpoint import TrainCheckpoints
from monet_jax.train.config import TrainConfig, config_yaml, write_config
from monet_jax.train.optimizer import learning_rate_schedule
from monet_jax.train.step import BATCH_KEYS, global_batch, init_state, make_eval_step, make_train_step


class NonFiniteLoss(ValueError):
    pass


class _StopRequest:
    """SIGTERM / SIGINT ask the loop to save and exit at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the save
        self.signal = signal.Signals(signum).name

    def requested(self) -> bool:
        return dist.agree(self.signal is not None, "any")  # every host stops at the same step

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _validate(eval_fn, state, cfg: TrainConfig, tokenizer, mesh, rows: list[int]) -> float:
    it = make_iterator(cfg.data, tokenizer, split="validation", seed=cfg.seed, rows=rows)
    total = count = 0.0
    for _ in range(cfg.eval_batches):
        batch = next(it, None)
        if dist.agree(batch is None, "all"):
            break
        if batch is None:  # this process's rows ended first: contribute rows that count for nothing
            batch = {k: np.zeros((it.rows, it.seq_len), np.float32 if k == "loss_mask" else np.int32)
                     for k in BATCH_KEYS}
        s, n = eval_fn(state, global_batch(batch, mesh, rows, cfg.data.batch_size))
        total, count = total + float(s), count + float(n)
    it.close()
    return total / max(count, 1.0)


def run(cfg: TrainConfig, *, stop_at: int | None = None, distributed: bool = False) -> dict:
    """Train (resuming from ``out_dir/checkpoints`` when possible). ``stop_at`` behaves like a
    preemption signal arriving after that step (used to test resumption)."""
    if distributed:
        dist.initialize()
    primary = jax.process_index() == 0
    out = Path(cfg.out_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size "
                          f"is {cfg.model.vocab_size}")
    mesh = sharding.make_mesh(cfg.mesh)
    dp = sharding.data_parallel_size(mesh)
    if cfg.data.batch_size % (dp * cfg.optim.grad_accum):
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} is not divisible by the data-parallel mesh size "
                          f"{dp} (mesh.data x mesh.fsdp) times optim.grad_accum {cfg.optim.grad_accum}")
    rows = sharding.process_batch_rows(mesh, cfg.data.batch_size)  # the rows this process's devices hold
    train_it = make_iterator(cfg.data, tokenizer, split="train", seed=cfg.seed, rows=rows)

    if primary:  # the resolved config beside the checkpoints: `train.py --config out_dir/config.yaml` reruns it
        write_config(cfg, out)
    ts = init_state(cfg, mesh)
    identity = {"model": cfg.model.architecture(), "seed": cfg.seed,
                **{k: getattr(cfg.data, k) for k in ("path", "format", "tokenizer", "seq_len", "batch_size",
                                                      "packing", "val_fraction")}}
    ckpts = TrainCheckpoints(out / "checkpoints", cfg.checkpoint, identity)
    start, resumed = 0, None
    if cfg.checkpoint.resume:
        resumed = ckpts.restore_latest(ts.abstract(), train_it)
        if resumed is not None:
            start, ts.state, _ = resumed
    elif ckpts.steps():
        if primary:
            print(f"checkpoint.resume=false: deleting the checkpoints in {out / 'checkpoints'} (steps "
                  f"{', '.join(map(str, ckpts.steps()))})", flush=True)
        ckpts.delete_all()
    if start >= cfg.optim.steps:
        ckpts.close()
        train_it.close()
        if primary:
            print(f"{out / 'checkpoints'} already holds step {start} of optim.steps={cfg.optim.steps}: nothing to "
                  f"train (raise optim.steps, use another out_dir, or checkpoint.resume=false to start over)")
        return {"already_done": start}
    train_step, eval_step = make_train_step(ts, cfg), make_eval_step(ts)
    schedule = learning_rate_schedule(cfg.optim)
    writer = M.MetricsWriter(out, tensorboard=cfg.metrics.tensorboard, wandb_project=cfg.metrics.wandb_project,
                             config=dataclasses.asdict(cfg))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = M.train_flops_per_token(cfg.model, cfg.data.seq_len)
    if primary:
        print(f"model: {cfg.model.moe_decompose} {count_params(cfg.model) / 1e6:.2f}M params | data: "
              f"{cfg.data.path or 'embedded corpus'} ({cfg.data.tokenizer} tokenizer) | mesh: "
              + " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
              + f" on {jax.device_count()} {jax.devices()[0].platform} device(s)"
              + (f" | resumed at step {start}" if resumed else ""), flush=True)

    first = last = None
    history, skipped = [], 0
    stopped_by = None
    t_start = t_window = time.perf_counter()
    window_steps = 0
    # A progress bar on a terminal; plain lines at each log step when the output goes to a file or a pipe, where
    # the bar's redraws would be most of the log.
    tty = sys.stderr.isatty()
    bar = tqdm(range(start + 1, cfg.optim.steps + 1), desc="train", unit="step", dynamic_ncols=True,
               disable=not (primary and tty), initial=start, total=cfg.optim.steps)
    with _StopRequest() as stop:
        for step in bar:
            ts.state, m = train_step(ts.state, global_batch(next(train_it), mesh, rows, cfg.data.batch_size))
            window_steps += 1
            if not float(m["finite"]):
                if cfg.nan_policy == "stop":
                    ckpts.save(step - 1, ts.state, train_it, {"reason": "non-finite loss"}, force=True)
                    ckpts.wait()
                    raise NonFiniteLoss(f"non-finite loss or gradient at step {step} (nan_policy=stop); the state "
                                        f"before it is saved in {out / 'checkpoints'}")
                skipped += 1
                if primary:
                    bar.write(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
            if step % cfg.metrics.log_every == 0 or step in (start + 1, cfg.optim.steps):
                now = time.perf_counter()
                tok_s = window_steps * tokens_per_step / (now - t_window)
                t_window, window_steps = now, 0
                usage = np.asarray(m["expert_usage"])
                scalars = {k: float(m[k]) for k in ("loss", "ce", "unif", "amb", "unif_routed", "grad_norm")}
                scalars.update(lr=float(schedule(step - 1)), tokens_per_second=tok_s,
                               mfu=M.mfu(tok_s, cfg.model, cfg.data.seq_len, jax.device_count()),
                               skipped_steps=skipped)
                scalars.update({f"expert_usage/group{g}": float(u) for g, u in enumerate(usage)})
                scalars["expert_usage"] = float(usage.mean()) if usage.size else None
                writer.write(step, scalars)
                first = first or scalars
                last = scalars
                post = dict(loss=f"{scalars['ce']:.3f}", aux=f"{scalars['unif']:.2f}/{scalars['amb']:.3f}",
                            used="-" if scalars["expert_usage"] is None else f"{100 * scalars['expert_usage']:.0f}%",
                            lr=f"{scalars['lr']:.1e}", tok_s=f"{tok_s:,.0f}")
                if scalars["mfu"] is not None:
                    post["mfu"] = f"{100 * scalars['mfu']:.1f}%"
                bar.set_postfix(post)
                if primary and not tty:
                    print(f"step {step}/{cfg.optim.steps}  " + "  ".join(f"{k} {v}" for k, v in post.items()),
                          flush=True)
            if step % cfg.eval_every == 0 or step == cfg.optim.steps:
                v = _validate(eval_step, ts.state, cfg, tokenizer, mesh, rows)
                history.append((step, v))
                writer.write(step, {"val/ce": v})
                if primary:
                    bar.write(f"step {step}: train ce {last['ce']:.4f}  val ce {v:.4f}")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                ckpts.save(step, ts.state, train_it, {"train_ce": last["ce"] if last else None})
            if stop.requested() or step == stop_at:
                stopped_by = stop.signal or ("stop_at" if step == stop_at else "a signal to another process")
                ckpts.save(step, ts.state, train_it, {"reason": stopped_by}, force=True)
                break
    bar.close()
    elapsed = time.perf_counter() - t_start
    final_step = step
    if stopped_by is None:
        ckpts.save(final_step, ts.state, train_it, {"reason": "end"}, force=True)
    ckpts.wait()
    ckpts.close()
    writer.close()
    train_it.close()
    if stopped_by is not None:
        who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        print(f"{who}stopped by {stopped_by} after step {final_step}; saved to {out / 'checkpoints'} "
              f"(run the same command to resume)", flush=True)
        return {"stopped_at": final_step}

    model, _ = ts.modules()
    model.eval()
    model.save_checkpoint(out / "checkpoint", overwrite=True, tokenizer=tokenizer)  # eval.py reads it from there
    ran = final_step - start
    summary = {"steps": cfg.optim.steps, "resumed_from": start, "skipped_steps": skipped,
               "first_train_loss": first["ce"] if first else None, "final_train_loss": last["ce"] if last else None,
               "final_val_loss": history[-1][1] if history else None,
               "aux_unif": last["unif"] if last else None, "aux_amb": last["amb"] if last else None,
               "routed_unif": last["unif_routed"] if last else None,
               "expert_usage": last["expert_usage"] if last else None,
               "seconds": round(elapsed, 1),
               "tokens_per_second": round(ran * tokens_per_step / elapsed) if ran else None,
               "model_flops_per_token": flops_per_token}
    if primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if first and history:
            print(f"done in {elapsed:.0f}s: train loss {first['ce']:.3f} -> {last['ce']:.3f}, val loss "
                  f"{history[-1][1]:.3f}; checkpoint at {out / 'checkpoint'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``train.py`` / ``monet-train``: train from the embedded default, or from YAML configs merged in order
    with dotted ``key=value`` overrides; a run resumes from the latest checkpoint in its ``out_dir``.

    Args:
        argv: The command line without the program name (``None``: ``sys.argv[1:]``), e.g.
            ``["--config", "configs/monet-vd-1.4b.yaml", "optim.steps=100"]``.

    Returns:
        The exit status, 0 when the run finished or saved its state on a signal (the same command then
            continues it) and 2 for a bad config, corpus or checkpoint, after one line on stderr.
    """
    p = argparse.ArgumentParser(prog="monet-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None,
                   help="YAML config (repeatable: merged in order); default: the embedded tiny run")
    dist.add_launch_args(p)
    p.add_argument("--print-config", action="store_true",
                   help="print every config key with its value (after --config and the overrides) and exit")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.steps=100 "
                                                "(--print-config lists the keys)")
    args = p.parse_intermixed_args(argv)  # flags may come after the overrides
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        dist.launch(args)
        run(cfg)
    except (ConfigError, ConvertError, ValueError, dist.DistributedError) as e:
        print(f"monet-train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if jax.process_count() == 1:
            raise
        dist.abandon("monet-train", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())

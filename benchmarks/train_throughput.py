"""Training-step throughput: tokens/s, model TFLOP/s and MFU of Monet beside a dense baseline of equal size.

    python benchmarks/train_throughput.py                     # tiny Monet-VD vs an equal-size dense model
    python benchmarks/train_throughput.py --config configs/monet-vd-1.4b.yaml --baseline configs/llama-1.3b.yaml \\
        data.batch_size=16 data.seq_len=2048 model.compute_dtype=bfloat16 model.remat=layer

The real jitted, sharded train step (forward, backward, AdamW) on random tokens, over every local device
(``mesh.data=-1`` unless overridden). ``--baseline auto`` builds a dense SwiGLU model with the same
attention and an MLP sized to match Monet's parameter count. Overrides apply to both models; each model
runs in its own process, so each peak memory is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax
import numpy as np
from common import equal_size_dense

from monet_jax import sharding
from monet_jax.config import count_params
from monet_jax.train import metrics as M
from monet_jax.train.config import TrainConfig
from monet_jax.train.step import global_batch, init_state, make_train_step


def equal_size_dense_run(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, model=equal_size_dense(cfg.model))


def measure(cfg: TrainConfig, steps: int, warmup: int) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    ts = init_state(cfg, mesh)
    step = make_train_step(ts, cfg)
    rng = np.random.default_rng(0)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    ids = rng.integers(3, cfg.model.vocab_size, size=(b, t + 1)).astype(np.int32)
    batch = global_batch({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, t), np.float32),
                          "segment_ids": np.ones((b, t), np.int32),
                          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}, mesh)
    state = ts.state
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_and_warmup = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = b * t
    flops = M.train_flops_per_token(cfg.model, t) * tokens
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    mfu = M.mfu(tokens / step_s, cfg.model, t, jax.device_count(), device)
    return {"model": "monet-" + cfg.model.moe_decompose if cfg.model.is_moe else "dense",
            "params": count_params(cfg.model), "batch": b, "seq_len": t, "devices": jax.device_count(),
            "device": device.device_kind, "step_seconds": step_s, "tokens_per_second": tokens / step_s,
            "model_tflops_per_device": flops / step_s / jax.device_count() / 1e12,
            "mfu": mfu, "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
            "compile_and_warmup_seconds": compile_and_warmup, "loss": float(m["loss"])}


RESULT = "RESULT "


def isolated(index: int, argv) -> dict:
    """Run ``index`` measured in a fresh process, so each model's peak memory is its own (the backends
    report a process's peak, and the second model would inherit the first's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    out = subprocess.run([sys.executable, __file__, "--only", str(index), *argv], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode or not lines:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"run {index} failed (exit {out.returncode})")
    return json.loads(lines[-1][len(RESULT):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None, help="Monet config(s); default: the tiny default")
    p.add_argument("--baseline", default="auto", help="dense config YAML, 'auto' (equal size) or 'none'")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # one run, in a child process
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = TrainConfig.load(args.config, args.overrides)
    runs = [cfg]
    if args.baseline == "auto":
        runs.append(equal_size_dense_run(cfg))
    elif args.baseline != "none":
        runs.append(TrainConfig.load([*(args.config or [])[1:], args.baseline], args.overrides))
    if args.only is not None:
        print(RESULT + json.dumps(measure(runs[args.only], args.steps, args.warmup)))
        return 0
    results = []
    for i, c in enumerate(runs):
        r = measure(c, args.steps, args.warmup) if len(runs) == 1 else isolated(i, argv)
        results.append(r)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else "n/a"
        print(f"{r['model']:>15} {r['params'] / 1e6:9.2f}M params | batch {r['batch']} x {r['seq_len']} on "
              f"{r['devices']} x {r['device']} | step {1e3 * r['step_seconds']:8.1f} ms | "
              f"{r['tokens_per_second']:>12,.0f} tok/s | {r['model_tflops_per_device']:7.2f} TFLOP/s/device | "
              f"MFU {mfu} | peak memory {mem}", flush=True)
    if len(results) == 2:
        flops = [M.train_flops_per_token(r.model, cfg.data.seq_len) for r in runs]
        print(f"step time ratio monet/dense: {results[0]['step_seconds'] / results[1]['step_seconds']:.3f}  "
              f"(model FLOP ratio {flops[0] / flops[1]:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

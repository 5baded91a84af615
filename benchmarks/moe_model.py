"""Whole-model forward, forward+backward and batch-1 decoding per ``moe_impl``, beside the equal-size dense model.

    python benchmarks/moe_model.py --config configs/tiny-vd.yaml                   # CPU, small
    python benchmarks/moe_model.py --config configs/monet-vd-1.4b.yaml --batch 4 --seq 2048 \\
        --decode-prompt 128 --decode-tokens 64 model.compute_dtype=bfloat16         # GPU / TPU

Forward and forward+backward (cross-entropy on random tokens, gradients of every parameter) report
tokens/s and achieved TFLOP/s of the model FLOPs of ``monet_jax.train.metrics``; decoding reports
tokens/s of greedy generation with the key/value cache at batch 1 (``xla`` reads every expert weight
per token, ``sparse`` only the active experts'). Peak memory where the backend reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
from common import equal_size_dense, peak_memory_gib, timed
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig, count_params
from monet_jax.eval.generate import generate
from monet_jax.kernels import dispatch
from monet_jax.train import metrics as M


def measure(cfg: MonetConfig, args) -> dict:
    model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])

    @nnx.jit
    def fwd(model, inputs):
        return model(inputs).logits

    def loss(model, inputs):
        logp = jax.nn.log_softmax(model(inputs).logits)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    @nnx.jit
    def fwd_bwd(model, inputs):  # training mode: batch statistics in the routers
        return nnx.grad(loss)(model, inputs)

    tokens = args.batch * args.seq
    fwd_flops = 2 * M.forward_macs_per_token(cfg, args.seq) * tokens
    r = {"params": count_params(cfg)}
    for name, fn, mult in (("forward", fwd, 1), ("forward+backward", fwd_bwd, 3)):
        if args.decode_only:
            r[name] = None
            continue
        model.train() if name != "forward" else model.eval()
        s = timed(fn, (model, inputs), args.steps)
        r[name] = {"seconds": s, "tokens_per_second": tokens / s, "tflops": mult * fwd_flops / s / 1e12}
    model.eval()
    prompt = ids[0, :args.decode_prompt].tolist()
    g = generate(model, [prompt], max_new_tokens=args.decode_tokens, eos_id=None)
    r["decode"] = {"tokens_per_second": g["decode_tokens_per_second"], "prefill_seconds": g["prefill_seconds"]}
    r["peak_memory_gib"] = peak_memory_gib()
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-vd.yaml")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--impls", default="xla,pallas,sparse,auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--decode-prompt", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--no-dense", action="store_true", help="skip the dense twin")
    p.add_argument("--decode-only", action="store_true", help="only batch-1 decoding (large models on a CPU)")
    p.add_argument("--interpret", action="store_true", help="run Pallas in interpret mode (CPU; slow, for checks)")
    p.add_argument("overrides", nargs="*", help="dotted model overrides, e.g. model.compute_dtype=bfloat16")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = MonetConfig.from_yaml(args.config, [o.removeprefix("model.") for o in args.overrides])
    dev = jax.devices()[0]
    print(f"{cfg.moe_decompose} model {count_params(cfg) / 1e6:.2f}M params | batch {args.batch} x {args.seq} | "
          f"decode batch 1, prompt {args.decode_prompt}, {args.decode_tokens} tokens | {cfg.compute_dtype} | "
          f"{dev.device_kind} ({dev.platform})")
    runs = [(impl, dataclasses.replace(cfg, moe_impl=impl)) for impl in args.impls.split(",")]
    if not args.no_dense:
        runs.append(("dense", equal_size_dense(cfg)))
    with dispatch.force_interpret(True if args.interpret else None):
        for name, c in runs:
            r = measure(c, args)
            mem = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else "n/a"
            cols = " | ".join(f"{k} {1e3 * r[k]['seconds']:8.1f} ms {r[k]['tokens_per_second']:>10,.0f} tok/s "
                              f"{r[k]['tflops']:7.3f} TFLOP/s" for k in ("forward", "forward+backward") if r[k])
            dec = r["decode"]["tokens_per_second"]
            print(f"{name:>7} ({r['params'] / 1e6:.2f}M): {cols} | decode {dec:8.2f} tok/s | peak memory {mem}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

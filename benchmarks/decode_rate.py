"""Greedy decoding rate of a published-size model on random weights, against the weights' memory roofline.

    python benchmarks/decode_rate.py --config configs/monet-vd-1.4b.yaml               # GPU / TPU
    python benchmarks/decode_rate.py --config configs/tiny-vd.yaml --batches 1 --new-tokens 16   # CPU, a check

Each step of the decoding loop reads every weight once (the dense expert path; the sparse one reads fewer
expert rows), whatever the batch, so a step's floor is ``weight bytes / memory bandwidth``. The bandwidth is
measured in the same run (one pass over a 1 GiB array: bytes read plus bytes written), so the roofline
column is this device's, not a datasheet's. Rates are tokens/s per sequence (one step makes one token per
row) and in all; the best of ``--reps`` timed calls after a compiling one, prompt and decoding compiled once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import MonetConfig
from monet_jax.eval.generate import bucket, generate, least_rows
from monet_jax.kernels import dispatch


def copy_bandwidth(gib: float = 1.0, reps: int = 10) -> float:
    """Bytes/s of one elementwise pass (read + write) over a ``gib`` GiB bfloat16 array on the default device."""
    x = jnp.ones((int(gib * 2**30) // 2,), jnp.bfloat16)
    step = jax.jit(lambda a: a + 1)
    jax.block_until_ready(step(x))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best


def weight_bytes(model: MonetForCausalLM) -> int:
    """Bytes a decoding step reads: every parameter but the input embedding table (one row per token)."""
    _, params, _ = nnx.split(model, nnx.Param, ...)
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    return total - model.model.embed_tokens.embedding[...].nbytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/monet-vd-1.4b.yaml")
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--impls", default="auto", help="moe_impl values, comma-separated (auto, xla, sparse)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help="param and compute dtype")
    p.add_argument("overrides", nargs="*", help="dotted model overrides")
    args = p.parse_args(argv)
    base = MonetConfig.from_yaml(args.config, [f"param_dtype={args.dtype}", f"compute_dtype={args.dtype}",
                                               *(o.removeprefix("model.") for o in args.overrides)])
    dev = jax.devices()[0]
    bw = copy_bandwidth(0.25 if dev.platform == "cpu" else 1.0)
    print(f"{args.config} | {args.dtype} | prompt {args.prompt}, {args.new_tokens} new tokens | "
          f"{dev.device_kind} ({dev.platform}), copy bandwidth {bw / 1e9:,.0f} GB/s")
    rng = np.random.default_rng(0)
    for impl in args.impls.split(","):
        cfg = dataclasses.replace(base, moe_impl=impl)
        model = MonetForCausalLM(cfg, rngs=nnx.Rngs(0))
        model.eval()
        wb = weight_bytes(model)
        roof = bw / wb  # steps/s if a step only read the weights once at the measured bandwidth
        for b in map(int, args.batches.split(",")):
            prompts = [rng.integers(3, cfg.vocab_size, args.prompt).tolist() for _ in range(b)]
            generate(model, prompts, max_new_tokens=args.new_tokens, eos_id=None)  # compiles
            rate = max(generate(model, prompts, max_new_tokens=args.new_tokens, eos_id=None)["decode_tokens_per_second"]
                       for _ in range(args.reps))
            path = dispatch.choose(impl, bucket(b, least_rows()), cfg.moe_heads, cfg.moe_experts,
                                   dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, cfg.moe_experts))
            print(f"{impl:>6} -> {path:<6} batch {b:>3}: {rate / b:9.1f} tok/s per sequence {rate:10.1f} in all | "
                  f"weights {wb / 1e6:,.1f} MB a step, roofline {roof:,.0f} steps/s, reached {rate / b / roof:6.1%}",
                  flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

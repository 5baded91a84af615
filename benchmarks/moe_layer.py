"""One Monet MoE layer (router + experts) per ``moe_impl``, beside a dense SwiGLU MLP of equal parameter count.

    python benchmarks/moe_layer.py --config configs/tiny-vd.yaml --batch 4 --seq 64          # CPU, small
    python benchmarks/moe_layer.py --config configs/tiny-vd.yaml --interpret                 # + Pallas (interpreted)
    python benchmarks/moe_layer.py --config configs/monet-vd-1.4b.yaml --batch 8 --seq 2048 \\
        model.compute_dtype=bfloat16                                                          # GPU / TPU

Prints, for the forward and the forward+backward pass: time, tokens/s, achieved TFLOP/s of the model
FLOPs (router 2dHE + experts 2dEm + mixing 2HEm MACs per token forward, backward twice the forward;
dense 3df) and peak device memory where the backend reports it. ``sparse`` runs where its gathered
weights (``tokens * H * k * d * m``) stay small; a ``pallas`` request on a backend without a Pallas
lowering falls back to XLA (logged) and is reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import jax
import jax.numpy as jnp
from common import peak_memory_gib, timed
from flax import nnx

from monet_jax.config import MonetConfig
from monet_jax.kernels import dispatch
from monet_jax.model.experts import DenseMLP, make_experts
from monet_jax.model.router import Router


class MoeLayer(nnx.Module):
    def __init__(self, cfg: MonetConfig):
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype),
                  rngs=nnx.Rngs(0))
        self.router, self.experts = Router(cfg, **kw), make_experts(cfg, **kw)

    def __call__(self, x):
        return self.experts(x, *self.router(x))


def moe_params(cfg: MonetConfig) -> int:
    d, e, m, h = cfg.hidden_size, cfg.moe_experts, cfg.moe_dim, cfg.moe_heads
    return 2 * d * e * m + e * m + e * d + 2 * d * h * e


def dense_twin(cfg: MonetConfig) -> MonetConfig:
    width = max(1, round(moe_params(cfg) / (3 * cfg.hidden_size)))
    return dataclasses.replace(cfg, moe_decompose="none", hidden_act="silu", intermediate_size=width)


def forward_flops_per_token(cfg: MonetConfig) -> float:
    d = cfg.hidden_size
    if not cfg.is_moe:
        return 2.0 * 3 * d * cfg.intermediate_size
    e, m, h = cfg.moe_experts, cfg.moe_dim, cfg.moe_heads
    return 2.0 * (2 * d * h * e + 2 * d * e * m + 2 * h * e * m)


def measure(cfg: MonetConfig, batch: int, seq: int, steps: int) -> dict:
    layer = MoeLayer(cfg) if cfg.is_moe else DenseMLP(cfg, param_dtype=jnp.dtype(cfg.param_dtype),
                                                       compute_dtype=jnp.dtype(cfg.compute_dtype),
                                                       rngs=nnx.Rngs(0))
    if cfg.is_moe:  # routing as in a trained model: several experts per head
        for w in (layer.router.w1, layer.router.w2):
            w.kernel[...] = w.kernel[...] * 20
        layer.router.train()
    x = jax.random.normal(jax.random.key(1), (batch, seq, cfg.hidden_size), jnp.dtype(cfg.compute_dtype))

    @nnx.jit
    def fwd(layer, x):
        return layer(x)

    @nnx.jit
    def fwd_bwd(layer, x):  # gradients of every parameter and of the input
        return nnx.grad(lambda layer, x: jnp.mean(layer(x).astype(jnp.float32) ** 2), argnums=(0, 1))(layer, x)

    tokens = batch * seq
    flops = forward_flops_per_token(cfg) * tokens
    out = {"tokens": tokens}
    for name, fn, mult in (("forward", fwd, 1), ("forward+backward", fwd_bwd, 3)):
        s = timed(fn, (layer, x), steps)
        out[name] = {"seconds": s, "tokens_per_second": tokens / s, "tflops": mult * flops / s / 1e12}
    if cfg.is_moe:  # the sparse path is exact only within k active experts per head, else it runs dense
        out["max_active"] = max(int((g > 0).sum(-1).max()) for g in nnx.jit(lambda m, x: m.router(x))(layer, x))
    out["peak_memory_gib"] = peak_memory_gib()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-vd.yaml")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--impls", default="xla,pallas,sparse,auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--interpret", action="store_true", help="run Pallas in interpret mode (CPU; slow, for checks)")
    p.add_argument("--sparse-max-gib", type=float, default=2.0, help="skip sparse above this gathered-weight size")
    p.add_argument("overrides", nargs="*", help="dotted model overrides, e.g. model.compute_dtype=bfloat16")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = MonetConfig.from_yaml(args.config, [o.removeprefix("model.") for o in args.overrides])
    dev = jax.devices()[0]
    print(f"{cfg.moe_decompose} layer d={cfg.hidden_size} E={cfg.moe_experts} m={cfg.moe_dim} H={cfg.moe_heads} | "
          f"batch {args.batch} x {args.seq} | {cfg.compute_dtype} | {dev.device_kind} ({dev.platform})")
    k = dispatch.sparse_k(cfg.moe_sparse_k, cfg.moe_topk, cfg.moe_experts)
    runs = []
    with dispatch.force_interpret(True if args.interpret else None):
        for impl in args.impls.split(","):
            c = dataclasses.replace(cfg, moe_impl=impl)
            used = dispatch.choose(impl, args.batch * args.seq, cfg.moe_heads, cfg.moe_experts, k)
            gathered = args.batch * args.seq * cfg.moe_heads * k * cfg.hidden_size * cfg.moe_dim * 4 * 3
            if used == "sparse" and gathered > args.sparse_max_gib * 2**30:
                print(f"{impl:>8}: skipped (sparse would gather {gathered / 2**30:.1f} GiB of weights)")
                continue
            runs.append((f"{impl}" + (f" ({used})" if used != impl else ""), c))
        runs.append(("dense", dense_twin(cfg)))
        for name, c in runs:
            r = measure(c, args.batch, args.seq, args.steps)
            mem = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else "n/a"
            cols = " | ".join(f"{k} {1e3 * v['seconds']:8.2f} ms {v['tokens_per_second']:>11,.0f} tok/s "
                              f"{v['tflops']:7.3f} TFLOP/s" for k, v in r.items() if isinstance(v, dict))
            active = f" | max active experts/head {r['max_active']} (sparse k={k})" if "max_active" in r else ""
            print(f"{name:>16}: {cols} | peak memory {mem}{active}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

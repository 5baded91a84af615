"""The Pallas router and mixing kernels on this backend against the XLA path, on the same inputs of one layer.

    python benchmarks/mixing_kernels.py --config configs/monet-vd-1.4b.yaml --batch 8 --seq 2048   # GPU / TPU
    python benchmarks/mixing_kernels.py --config configs/tiny-vd.yaml --batch 2 --seq 40 --interpret --form gpu
                                                                     # CPU: the GPU form, interpreted (a check)
    python benchmarks/mixing_kernels.py --gpu-blocks 128,64,64,4 256,64,32,8   # GPU: the mixing op per
                                                                     # (tokens, experts, sums, warps) of its programs

For each of the fused router and the carrying mixing op (``ops.{vd,hd}_experts_carry``: mixing, ``v`` products,
expert biases) prints the largest error of the outputs and of every gradient against the XLA path of
:mod:`monet_jax.kernels.lanes` (relative to the largest value; the XLA path is itself tested against the
references), and the median time of forward and of forward+backward for both, in the compute dtype. Inputs:
random ``u`` outputs and routing probabilities from the reference router on random logits (a few experts per
head and token, as in a trained model).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from common import timed

from monet_jax.config import MonetConfig
from monet_jax.kernels import dispatch, lanes, mixing_gpu, ops
from monet_jax.kernels.reference import router_reference
from monet_jax.kernels.router import fused_router


def _inputs(cfg: MonetConfig, b: int, t: int, dtype):
    e, h, d = cfg.moe_experts, cfg.moe_heads, cfg.hidden_size
    vd = cfg.moe_decompose == "vertical"
    m = cfg.moe_dim // 2 if vd else cfg.moe_dim
    keys = iter(jax.random.split(jax.random.key(0), 12))
    z = [jax.random.normal(next(keys), (b * t, h, e)) * 1.5 for _ in range(2)]
    g = [router_reference(zi, zi.mean((0, 2)), zi.var((0, 2)), 2.0)[0].reshape(b, t, h, e) for zi in z]
    g = [lanes.probs_to_lanes(gi, dtype) for gi in g]
    p = [jax.random.normal(next(keys), (b, m, e, t), dtype) for _ in range(1 + vd)]
    normal = lambda *s: (jax.random.normal(next(keys), s) * 0.05).astype(dtype)  # noqa: E731
    w = (normal(2, e, m, d // 2), normal(2, e, m, d // 2), normal(e, d // 2), normal(e, d // 2)) if vd else \
        (normal(e, m, d), normal(e, d))
    return (*p, *g, *w), vd


def _xla(vd: bool):
    """The same layer on the XLA path (``lanes.{vd,hd}_experts``, the model's ``xla`` path on a TPU): ``(out, g1,
    g2)`` as the carrying ops return."""
    layer = lanes.vd_experts if vd else lanes.hd_experts
    return lambda *a: (layer(*a), a[1 + vd], a[2 + vd])


def _loss(fn):
    """A scalar of all of ``fn``'s outputs, so its gradient reaches every input (and ``g`` through both uses)."""
    def loss(*a):
        return sum(jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in jax.tree.leaves(fn(*a)))

    return loss


def _error(got, want) -> float:
    err = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = max(err, float(np.abs(a - b).max() / max(1e-30, np.abs(b).max())))
    return err


def compare(name: str, kernel, xla, args, steps: int) -> dict:
    argnums = tuple(range(len(args)))
    fwd_k, fwd_x = jax.jit(kernel), jax.jit(xla)
    bwd_k, bwd_x = (jax.jit(jax.value_and_grad(_loss(f), argnums=argnums)) for f in (kernel, xla))
    row = {"op": name, "forward error": _error(fwd_k(*args), fwd_x(*args)),
           "gradient error": _error(bwd_k(*args)[1], bwd_x(*args)[1])}
    for label, k, x in (("forward", fwd_k, fwd_x), ("forward+backward", bwd_k, bwd_x)):
        tk, tx = timed(k, args, steps), timed(x, args, steps)
        row[label] = (tk, tx)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/monet-vd-1.4b.yaml")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interpret", action="store_true", help="run the kernels in interpret mode (CPU: a check)")
    p.add_argument("--form", choices=["auto", "tpu", "gpu"], default="auto",
                   help="the kernels' form (auto: the backend's; with --interpret, either on a CPU)")
    p.add_argument("--gpu-blocks", nargs="*", default=[],
                   help="GPU form: rows of the mixing op for these TOKENS,EXPERTS,SUMS,NUM_WARPS of kernels.mixing_gpu")
    args = p.parse_args(argv)
    cfg = MonetConfig.from_yaml(args.config)
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    form = dispatch.lowering_for(args.form) if args.form != "auto" else contextlib.nullcontext()
    with dispatch.force_interpret(True if args.interpret else None), form:
        if not dispatch.pallas_available():
            print(f"no Pallas lowering on {dev.platform}: use --interpret", file=sys.stderr)
            return 2
        layer_args, vd = _inputs(cfg, args.batch, args.seq, dtype)
        h = cfg.moe_heads
        z = jax.random.normal(jax.random.key(5), (args.batch, h, cfg.moe_experts, args.seq), dtype) * 1.5
        mean, var = jnp.zeros(h), jnp.ones(h)
        rows = [compare("router", lambda z: fused_router(z, mean, var, 2.0, 1e-5, dtype),
                        lambda z: _xla_router(z, mean, var, dtype), (z,), args.steps)]
        name, op = ("vd_experts_carry", ops.vd_experts_carry) if vd else ("hd_experts_carry", ops.hd_experts_carry)
        for blocks in args.gpu_blocks or [None]:
            if blocks:  # new block sizes: jit's cache keys on the function, so trace a fresh one
                mixing_gpu.use_blocks(blocks)
            label = f"{name} ({blocks})" if blocks else name
            rows.append(compare(label, lambda *a, op=op: op(*a), _xla(vd), layer_args, args.steps))
    print(f"{cfg.moe_decompose} E={cfg.moe_experts} m={cfg.moe_dim} H={h} d={cfg.hidden_size} | batch {args.batch} x "
          f"{args.seq} | {args.dtype} | {dev.device_kind} ({dev.platform}) | kernels: "
          f"{'interpreted ' if args.interpret else ''}{args.form if args.form != 'auto' else dev.platform} form")
    print("| op | forward error | gradient error | forward: kernel / XLA ms (speedup) | fwd+bwd: kernel / XLA ms "
          "(speedup) |")
    print("|---|---|---|---|---|")
    for r in rows:
        f, fb = r["forward"], r["forward+backward"]
        print(f"| {r['op']} | {r['forward error']:.2e} | {r['gradient error']:.2e} | {f[0] * 1e3:.3f} / "
              f"{f[1] * 1e3:.3f} ({f[1] / f[0]:.2f}x) | {fb[0] * 1e3:.3f} / {fb[1] * 1e3:.3f} ({fb[1] / fb[0]:.2f}x) |")
    return 0


def _xla_router(z_bhet, mean, var, dtype):
    """The reference router on the kernel's layout: ``(g [b, H, E, t], sum_bt g, sum_bt (1 - max_e g))``."""
    b, h, e, t = z_bhet.shape
    z = jnp.transpose(z_bhet.astype(jnp.float32), (0, 3, 1, 2)).reshape(b * t, h, e)
    g, col, amb = router_reference(z, mean, var, 2.0, 1e-5)
    return jnp.transpose(g.reshape(b, t, h, e), (0, 2, 3, 1)).astype(dtype), col, amb


if __name__ == "__main__":
    raise SystemExit(main())

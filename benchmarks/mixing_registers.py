"""The Triton mixing kernels' registers, spills, shared memory and bytes a token per block size, compiled for one
H100 here.

    python benchmarks/mixing_registers.py --config configs/monet-vd-1.4b.yaml --gpu-blocks 128,128,64,4 128,128,128,4

Needs jax's CUDA plugin (``jax-cuda13-plugin`` and ``jax-cuda13-pjrt`` of the installed jax's version, in an
environment of their own: BENCHMARKS.md, "One H100 compiled from a CPU host") and ptxas; no GPU. Compiles one
layer's mixing forward and backward of ``kernels.mixing_gpu`` alone (the backward adding every gradient it can
inside: ``dg1``, ``dg2`` and the expert biases') for the H100 target of ``tools/aot_compile.py --topology h100``,
per ``TOKENS,EXPERTS,SUMS,NUM_WARPS`` (tokens and most experts per program, most sums a token, warps), and
prints for each ``aot_gpu.triton_kernels``'s table (what ptxas makes of the kernels, as in the training step's
compile) and the bytes a token each call moves (``mixing_gpu.TRAFFIC``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax: the GPU is only a compile target


def traffic(calls: dict[str, dict[str, int]]) -> str:
    """Bytes per token of each mixing call (as ``mixing_gpu.TRAFFIC`` counts them), and per pass against the
    least a pass can move: its distinct inputs read once and its outputs written once."""
    lines = ["bytes per token: reads (distinct) / writes / sums read, and the slices' partial sums added by XLA",
             f"  {'call':<24} {'reads':>8} {'distinct':>9} {'writes':>8} {'sums':>7}"]
    for name, c in sorted(calls.items()):
        lines.append(f"  {name:<24} {c['reads']:>8,} {c['unique']:>9,} {c['writes']:>8,} {c['sums']:>7,}")
    for name in sorted(n for n in calls if not n.endswith("_sums")):
        s, e = calls[f"{name}_sums"], calls[name]
        least = e["writes"] + max(s["unique"], e["unique"])  # the emitting call reads every input the sums do
        total = s["reads"] + s["writes"] * 2 + e["reads"] + e["writes"] + e["sums"]  # partial sums: out, XLA in
        distinct = s["unique"] + s["writes"] * 2 + e["unique"] + e["writes"] + e["sums"]
        lines.append(f"  {name}: {total:,} bytes a token ({distinct:,} with every block's roles sharing L2); "
                     f"least {least:,} ({total / least:.2f}x, {distinct / least:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/monet-vd-1.4b.yaml")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--gpu-blocks", nargs="*", default=[], help="TOKENS,EXPERTS,SUMS,NUM_WARPS of kernels.mixing_gpu "
                                                             "(default: its own)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from monet_jax.config import MonetConfig
    from monet_jax.kernels import dispatch, mixing_gpu
    from monet_jax.train import aot_gpu

    if not aot_gpu.plugin_available() or aot_gpu.find_ptxas() is None:
        print("mixing_registers: needs jax's CUDA plugin and ptxas", file=sys.stderr)
        return 2
    cfg = MonetConfig.from_yaml(args.config)
    sharding = jax.sharding.SingleDeviceSharding(aot_gpu.gpu_devices("h100")[0])
    b, t, e, h = args.batch, args.seq, cfg.moe_experts, cfg.moe_heads
    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)  # noqa: E731
    if cfg.moe_decompose == "vertical":
        m = cfg.moe_dim // 2

        def layer(p1, p2, g1, g2, dtop, dbot, dg1, dg2, ds1, ds2):
            return (mixing_gpu.vd_forward(p1, p2, g1, g2),
                    mixing_gpu.vd_backward(p1, p2, g1, g2, dtop, dbot, dg1, dg2, ds1, ds2))
        shapes = [bf(b, m, e, t)] * 2 + [bf(b, h, e, t)] * 2 + [bf(b, 2, m, e, t)] * 2 + [bf(b, h, e, t)] * 2 \
            + [bf(b, 1, e, t)] * 2
    else:
        m = cfg.moe_dim

        def layer(p, g1, g2, dz, dg1, dg2, ds2):
            return mixing_gpu.hd_forward(p, g1, g2), mixing_gpu.hd_backward(p, g1, g2, dz, dg1, dg2, ds2)
        shapes = [bf(b, m, e, t), bf(b, h, e, t), bf(b, h, e, t), bf(b, m, e, t), bf(b, h, e, t), bf(b, h, e, t),
                  bf(b, 1, e, t)]
    print(f"{cfg.moe_decompose} E={e} m={cfg.moe_dim} H={h} | batch {b} x {t} | bfloat16 | H100 (sm_90a)")
    default = mixing_gpu.blocks()
    for blocks in args.gpu_blocks or [default]:
        mixing_gpu.use_blocks(blocks)
        with tempfile.TemporaryDirectory(prefix="mixing-registers-") as dump:
            t0 = time.perf_counter()
            with dispatch.force_interpret(False), dispatch.lowering_for("gpu"):
                # A fresh function per block size: jit's cache keys on the function.
                jax.jit(lambda *a: layer(*a)).lower(*shapes).compile(compiler_options={"xla_dump_to": dump})
            rows = aot_gpu.triton_kernels(dump)
        print(f"\ntokens, experts, sums, warps per program: {blocks} ({time.perf_counter() - t0:.0f} s)")
        print("\n".join(aot_gpu.report_triton(rows)))
        print(traffic(mixing_gpu.TRAFFIC), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

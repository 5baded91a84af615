"""The matrix products of the decode_vs_torch model, alone: XLA's CPU matmul (its default, YNNPACK), XLA's
with each product through oneDNN (``ONEDNN_DOTS``) or Eigen (``EIGEN_DOTS``), the three that inference picks
among on x86 CPUs (``monet_jax.model.pure.cpu_compiler_options``), against PyTorch's on the same shapes, in
turns in one process. The anchor for the forward-pass ratio of ``decode_vs_torch.py``: a
forward that is almost all matmuls cannot beat PyTorch by more than these ratios allow.

    python benchmarks/cpu_gemm.py [--reps 20]

Shapes (float32): the 2 x 256-token forward's projections (``[512, 1024] x [1024, 4096]`` routers and
``u``, ``[512, 4096] x [4096, 512]`` ``v``, ``[512, 1024] x [1024, 8192]`` output head), decoding's
matrix-vector products at batch 1 and 8 (``[b, 1024] x [1024, 4096]``) and prefills of 32 to 256 tokens
(where oneDNN starts to pay: ``ONEDNN_MIN_ROWS``). Needs ``torch``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from monet_jax.model.pure import EIGEN_DOTS, ONEDNN_DOTS

SHAPES = [(512, 1024, 4096), (512, 4096, 512), (512, 1024, 8192), (1, 1024, 4096), (8, 1024, 4096),
          (32, 1024, 4096), (64, 1024, 4096), (128, 1024, 4096), (256, 1024, 4096)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    import torch

    torch.set_grad_enabled(False)
    mm, mm_dnn = jax.jit(jnp.matmul), jax.jit(jnp.matmul, compiler_options=ONEDNN_DOTS)
    mm_eigen = jax.jit(jnp.matmul, compiler_options=EIGEN_DOTS)
    print(f"{'m x k x n':>18} | {'XLA ms':>7} | {'oneDNN ms':>9} | {'Eigen ms':>8} | {'PyTorch ms':>10} | "
          "XLA GFLOP/s | oneDNN GFLOP/s | PyTorch GFLOP/s | PyTorch/XLA time | PyTorch/oneDNN time | "
          "PyTorch/Eigen time")
    for m, k, n in SHAPES:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        fns = {"xla": lambda ja=ja, jb=jb: mm(ja, jb).block_until_ready(),
               "onednn": lambda ja=ja, jb=jb: mm_dnn(ja, jb).block_until_ready(),
               "eigen": lambda ja=ja, jb=jb: mm_eigen(ja, jb).block_until_ready(),
               "torch": lambda ta=ta, tb=tb: torch.matmul(ta, tb)}
        for f in (mm, mm_dnn, mm_eigen):
            np.testing.assert_allclose(np.asarray(f(ja, jb)), torch.matmul(ta, tb).numpy(), rtol=1e-3, atol=1e-2)
        best = dict.fromkeys(fns, float("inf"))
        for fn in fns.values():
            fn()
        for _ in range(args.reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        flops = 2 * m * k * n
        print(f"{f'{m} x {k} x {n}':>18} | {1e3 * best['xla']:7.2f} | {1e3 * best['onednn']:9.2f} | "
              f"{1e3 * best['eigen']:8.2f} | {1e3 * best['torch']:10.2f} | {flops / best['xla'] / 1e9:11.1f} | "
              f"{flops / best['onednn'] / 1e9:14.1f} | "
              f"{flops / best['torch'] / 1e9:15.1f} | {best['torch'] / best['xla']:16.2f}x | "
              f"{best['torch'] / best['onednn']:19.2f}x | {best['torch'] / best['eigen']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

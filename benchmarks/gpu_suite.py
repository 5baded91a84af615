"""Everything one H100 must show, in about 8 minutes, as one table.

    python benchmarks/gpu_suite.py                 # on the GPU: train, mixing, decode, check
    python benchmarks/gpu_suite.py --dry-run       # print the commands only
    python benchmarks/gpu_suite.py --tiny          # the same runs at tiny sizes (a CPU check of the script)

Each part runs the project's own benchmark in a child process with a time limit (a part that fails or runs
out of time is a row saying so, and the others still run):

- ``train``: ``train_throughput.py``, Monet-VD 1.4B against LLaMA-1.3B and Monet-HD 1.4B alone, batch 8 x 2,048,
  with ``configs/train-h100.yaml`` (bfloat16, flash attention, ``remat: dots``): step time, tokens/s, MFU.
- ``mixing``: ``mixing_kernels.py`` for VD and HD at 1.4B: Pallas (Triton) against the XLA layer, errors and times.
- ``decode``: ``decode_rate.py`` for 1.4B VD, batch 1 and 8, ``moe_impl`` xla, sparse and auto.
- ``check``: whether this jax's XLA keeps a one-row product a matrix product under the decoding options (the
  pass name could change between versions), and which kernels the compiled training step of a tiny model
  launches on this device (flash attention as Triton calls).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CONFIGS = ROOT / "configs"
PARTS = ("train", "mixing", "decode", "check")
# Seconds per child process on one H100 (8 minutes in all, with each process's start-up and compiles).
LIMITS = {("train", "vd+dense"): 190, ("train", "hd"): 100, ("mixing", "vd"): 40, ("mixing", "hd"): 40,
          ("decode", "vd"): 90, ("check", "check"): 20}


def commands(tiny: bool, tmp: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """The child processes of each part: (label, argv)."""
    py = sys.executable
    if tiny:
        vd, hd, dense = (str(CONFIGS / f"tiny-{n}.yaml") for n in ("vd", "hd", "dense"))
        train = ["data.batch_size=2", "data.seq_len=128", "model.remat=dots"]
        steps, mix, dec = ["--steps", "1", "--warmup", "1"], ["--batch", "1", "--seq", "128", "--steps", "1",
                                                             "--interpret", "--form", "gpu"], ["--new-tokens", "4",
                                                                                              "--prompt", "8"]
        dec_cfg = vd
    else:
        vd, hd, dense = (str(CONFIGS / n) for n in ("monet-vd-1.4b.yaml", "monet-hd-1.4b.yaml", "llama-1.3b.yaml"))
        train = ["--config", str(CONFIGS / "train-h100.yaml")]
        steps, mix, dec = ["--steps", "5", "--warmup", "1"], ["--steps", "5"], ["--new-tokens", "128"]
        dec_cfg = vd
    if tiny:
        train_vd = ["--config", vd, "--baseline", dense, *steps, *train]
        train_hd = ["--config", hd, "--baseline", "none", *steps, *train]
    else:  # the model config first, the run's settings after it (train_throughput merges them in order)
        train_vd = ["--config", vd, *train[:2], "--baseline", dense, *steps]
        train_hd = ["--config", hd, *train[:2], "--baseline", "none", *steps]
    return {
        "train": [("vd+dense", [py, str(BENCH / "train_throughput.py"), *train_vd, "--json", str(tmp / "vd.json")]),
                  ("hd", [py, str(BENCH / "train_throughput.py"), *train_hd, "--json", str(tmp / "hd.json")])],
        "mixing": [(n, [py, str(BENCH / "mixing_kernels.py"), "--config", c, *mix])
                   for n, c in (("vd", vd), ("hd", hd))],
        "decode": [("vd", [py, str(BENCH / "decode_rate.py"), "--config", dec_cfg, "--batches", "1,8",
                           "--impls", "xla,sparse,auto", "--reps", "1" if tiny else "2", *dec])],
        "check": [("check", [py, __file__, "--check"])],
    }


def run(argv: list[str], limit: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # jax's default pool is 75% of the GPU's memory
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
        return out.returncode, out.stdout + ("\n" + out.stderr[-2000:] if out.returncode else ""), \
            time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, text + f"\n(stopped after {limit:.0f} s)", time.perf_counter() - t0


def rows_of(part: str, label: str, rc: int, text: str, tmp: Path) -> list[str]:
    """Table rows from a child's output: its JSON results (train) or its printed result lines."""
    if rc != 0:
        lines = [line for line in text.strip().splitlines() if line.strip() and "JAX_TRACEBACK_FILTERING" not in line]
        last = [line for line in lines if "Error" in line or "stopped after" in line][-1:] or lines[-1:] or ["none"]
        return [f"| {part} | {label} | failed (exit {rc}): {last[0][:150]} |"]
    if part == "train":
        out = []
        for r in json.loads((tmp / f"{label.split('+')[0]}.json").read_text()):
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            mem = f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else "n/a"
            out.append(f"| train | {r['model']} {r['params'] / 1e6:,.0f}M, {r['batch']} x {r['seq_len']} | step "
                       f"{1e3 * r['step_seconds']:.1f} ms, {r['tokens_per_second']:,.0f} tokens/s, MFU {mfu}, "
                       f"peak {mem} |")
        ratio = re.search(r"step time ratio monet/dense: ([\d.]+)\s+\(model FLOP ratio ([\d.]+)\)", text)
        if ratio:
            out.append(f"| train | {label} ratio | Monet / dense step {ratio.group(1)} (model FLOPs "
                       f"{ratio.group(2)}) |")
        return out
    if part == "mixing":
        return [f"| mixing | {label} {cells[0]} | errors {cells[1]} / {cells[2]}; fwd {cells[3]}; fwd+bwd "
                f"{cells[4]} |" for line in text.splitlines() if line.startswith("| ") and "---" not in line
                and not line.startswith("| op ") for cells in [[c.strip() for c in line.strip("| \n").split("|")]]
                if len(cells) == 5]
    if part == "decode":
        out = []
        for line in text.splitlines():
            if "tok/s per sequence" in line:
                head, rest = line.split(":", 1)
                out.append(f"| decode | {label} {' '.join(head.split())} | {rest.strip()} |")
        return out
    return [f"| check | {line.split(':', 1)[0]} | {line.split(':', 1)[1].strip()} |"
            for line in text.splitlines() if line.startswith("check ")]


def check() -> int:
    """Compile on this device: a one-row product under the decoding options, and a tiny training step."""
    import jax
    import jax.numpy as jnp

    from monet_jax.kernels import dispatch
    from monet_jax.train import aot_gpu

    x, w = jnp.ones((1, 2048), jnp.bfloat16), jnp.ones((2048, 2048), jnp.bfloat16)
    for label, options in (("default", None), ("decoding options", dispatch.decode_compiler_options())):
        text = jax.jit(lambda a, b: a @ b).lower(x, w).compile(compiler_options=options).as_text()
        inv = aot_gpu.inventory(text)
        print(f"check one-row product, {label} {options or ''}: {inv['multiply_reduce_products']} done as multiply "
              f"+ reduce, {inv['gemm_triton'] + inv['cublas']} as products (backend {jax.default_backend()})")
    from monet_jax.train.config import TrainConfig

    cfg = TrainConfig.load([str(CONFIGS / "tiny-vd.yaml")], ["model.compute_dtype=bfloat16", "model.remat=dots",
                                                            "data.batch_size=2", "data.seq_len=256"])
    r = aot_gpu.compile_train_step(cfg, cost=False, devices=jax.devices()[:1])
    inv = r["inventory"]
    print(f"check tiny VD step (remat dots): {inv['kernels']} kernels, {inv['pallas_triton']} Pallas calls, "
          f"[b, heads, t, t] buffers: {', '.join(inv['score_buffers']) or 'none'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--tiny", action="store_true", help="tiny configs and sizes (checks the script on a CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and time limits, run nothing")
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)  # the check part, in a child
    args = p.parse_args(argv)
    if args.check:
        return check()
    parts = [s for s in args.parts.split(",") if s]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"gpu_suite: error: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cmds = commands(args.tiny, tmp)
        if args.dry_run:
            for part in parts:
                for label, argv_ in cmds[part]:
                    print(f"[{part} {label}, {LIMITS[part, label]} s] " + " ".join(argv_))
            return 0
        table, t0 = ["| part | what | result |", "|---|---|---|"], time.perf_counter()
        for part in parts:
            for label, argv_ in cmds[part]:
                limit = LIMITS[part, label] * (6 if args.tiny else 1)  # a CPU compiles slower
                rc, text, seconds = run(argv_, limit)
                print(f"[{part} {label}: exit {rc} in {seconds:.0f} s]", file=sys.stderr, flush=True)
                table += rows_of(part, label, rc, text, tmp)
        print("\n".join(table))
        print(f"\n{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of checkpoint conversion against the checkpoint's size.

    python benchmarks/convert_memory.py [--config configs/monet-vd-850m.yaml] [--workdir /tmp/convert-bench]

Writes a random Hugging Face checkpoint of the config (bfloat16), then runs ``monet-convert hf-to-jax``
and ``jax-to-hf`` each in a fresh process and reports their peak resident memory (ru_maxrss), next to
the peak of a process that only imports JAX and the package (the fixed cost).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("ru_maxrss did not grow; run each measurement in a fresh parent")
    return after / 2**20, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/monet-vd-850m.yaml")
    p.add_argument("--workdir", default="/tmp/convert-bench")
    p.add_argument("--step", choices=["all", "make", "import", "hf-to-jax", "jax-to-hf"], default="all")
    args = p.parse_args()
    work = Path(args.workdir)
    hf, ours, back = work / "hf", work / "ours", work / "back"
    py = sys.executable
    if args.step == "all":
        # ru_maxrss of RUSAGE_CHILDREN is a max over all children: measure each step from its own parent.
        for step in ("make", "import", "hf-to-jax", "jax-to-hf"):
            subprocess.run([py, __file__, "--config", args.config, "--workdir", args.workdir, "--step", step],
                           check=True)
        return
    if args.step == "make":
        shutil.rmtree(work, ignore_errors=True)
        code = ("import sys; from monet_jax import MonetConfig, MonetForCausalLM; "
                f"cfg = MonetConfig.from_yaml('{args.config}', ['param_dtype=bfloat16']); "
                f"MonetForCausalLM(cfg).save_pretrained('{hf}', torch_dtype='bfloat16')")
        subprocess.run([py, "-c", code], check=True)
        size = sum(f.stat().st_size for f in hf.iterdir()) / 2**30
        print(f"checkpoint {args.config}: {size:.2f} GiB (bfloat16 safetensors)")
        return
    if args.step == "import":
        gib, _ = peak_of([py, "-c", "import jax, jax.numpy as jnp, orbax.checkpoint, monet_jax; jnp.zeros(1)"])
        print(f"import only: peak RSS {gib:.2f} GiB")
        return
    if args.step == "hf-to-jax":
        shutil.rmtree(ours, ignore_errors=True)
        gib, s = peak_of([py, "-m", "monet_jax.convert.cli", "hf-to-jax", str(hf), str(ours)])
    else:
        shutil.rmtree(back, ignore_errors=True)
        gib, s = peak_of([py, "-m", "monet_jax.convert.cli", "jax-to-hf", str(ours), str(back)])
    size = sum(f.stat().st_size for f in hf.iterdir()) / 2**30
    print(f"{args.step}: peak RSS {gib:.2f} GiB for a {size:.2f} GiB checkpoint ({gib / size:.2f}x), {s:.0f}s")


if __name__ == "__main__":
    main()

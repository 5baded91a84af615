"""Expert deletion on the embedded default: train the tiny Monet on English prose, Python source and
arithmetic, delete each domain's experts (mean score >= 1.75x the second domain) and print per-domain losses,
once per seed, then the spread of the effects over the seeds.

    python tools/deletion_demo.py [--out runs/demo] [--seeds 0,1,2] [--ratio 1.75] [--resume] [key=value ...]
"""

import argparse
import sys

from monet_jax.config import ConfigError
from monet_jax.eval.deletion_demo import RATIO, run_seeds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ratio", type=float, default=RATIO,
                   help="selection rule: mean score >= RATIO x second domain (default %(default)s)")
    p.add_argument("--chars", type=int, default=100_000, help="characters of text per domain")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (corpus sample, shuffle, initialization)")
    p.add_argument("--resume", action="store_true",
                   help="reuse what a run under --out already finished with the same settings: whole seeds, or their "
                        "trained checkpoints when only the selection (--ratio) changed")
    p.add_argument("overrides", nargs="*", help="training overrides, e.g. optim.steps=800")
    args = p.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    try:
        run_seeds(args.out, args.overrides, seeds, resume=args.resume, chars=args.chars, ratio=args.ratio)
    except (ConfigError, ValueError) as e:
        print(f"deletion_demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

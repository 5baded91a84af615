"""Convert a benchmark's published rows (JSONL / JSON / Parquet with the Hugging Face dataset fields) to
the ``eval.py tasks`` JSONL:

    python tools/tasks_to_jsonl.py arc ARC-Easy-test.parquet arc_easy.jsonl
    python eval.py tasks runs/default/checkpoint arc_easy.jsonl

Benchmarks: mmlu, arc, winogrande, piqa, siqa, openbookqa, hellaswag, commonsense_qa.
"""

import argparse
import sys

from monet_jax.eval.benchmarks import CONVERTERS, convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=sorted(CONVERTERS))
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args(argv)
    try:
        n = convert(args.benchmark, args.src, args.dst)
    except ValueError as e:
        print(f"tasks_to_jsonl: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} {args.benchmark} examples to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

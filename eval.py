"""Evaluate a checkpoint: ``python eval.py perplexity CHECKPOINT`` (see monet_jax/eval/main.py)."""

import sys

from monet_jax.eval.main import main

if __name__ == "__main__":
    sys.exit(main())

"""Compile the training step (or decoding loop) for a TPU topology or an H100 here: see ``monet_jax.train.aot``."""

import sys

from monet_jax.train.aot import main

if __name__ == "__main__":
    sys.exit(main())

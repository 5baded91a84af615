"""Compile the training step for a TPU topology on this machine: see ``monet_jax.train.aot``."""

import sys

from monet_jax.train.aot import main

if __name__ == "__main__":
    sys.exit(main())

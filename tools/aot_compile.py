"""Compile the training step (or decoding loop) for a TPU topology or an H100 here: see ``monet_jax.train.aot``."""

import os
import sys

# Before jax is imported (importing monet_jax imports it): the host runs on its CPU, the accelerator exists only
# as a compile target (with JAX_PLATFORMS unset, jax's CUDA plugin would look for a GPU's libraries).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from monet_jax.train.aot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

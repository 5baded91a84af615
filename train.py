"""Train Monet: ``python train.py [--config configs/X.yaml] [key=value ...]`` (see monet_jax/train/main.py)."""

import sys

from monet_jax.train.main import main

if __name__ == "__main__":
    sys.exit(main())

"""Hugging Face <-> monet-jax conversion (a leaf: it depends on the config, never on the model)."""

from monet_jax.convert.readers import ConvertError, open_checkpoint

__all__ = ["ConvertError", "open_checkpoint"]

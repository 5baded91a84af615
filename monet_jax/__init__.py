"""monet-jax: training, evaluation and conversion for Monet (Mixture of Monosemantic Experts)."""

from monet_jax import versions  # noqa: F401  first: checks the installed jax and flax before they are imported
from monet_jax.config import ConfigError, MonetConfig
from monet_jax.convert.readers import ConvertError
from monet_jax.data.tokenizer import load_tokenizer
from monet_jax.data.tokenizer_files import tokenizer_for_checkpoint
from monet_jax.model import CausalLMOutput, MonetForCausalLM

__all__ = ["CausalLMOutput", "ConfigError", "ConvertError", "MonetConfig", "MonetForCausalLM", "load_tokenizer",
           "tokenizer_for_checkpoint"]
__version__ = "0.1.0"

from monet_jax.model.transformer import CausalLMOutput, MonetForCausalLM, count_model_params

__all__ = ["CausalLMOutput", "MonetForCausalLM", "count_model_params"]

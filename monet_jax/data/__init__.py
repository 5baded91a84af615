"""Training data: ``pipeline`` (Grain: DataConfig, make_iterator), ``tokenizer`` (load_tokenizer),
``sources`` (file formats) and ``text`` (the embedded corpus). Nothing is imported here, so that
``from monet_jax.data import text`` stays cheap for evaluation."""

"""The Monet decoder (LLaMA backbone + Monet MoE in every layer) and ``MonetForCausalLM``."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monet_jax.config import MonetConfig
from monet_jax.kernels import attention
from monet_jax.model.attention import Attention, attention_mask
from monet_jax.model.experts import DenseMLP, ExpertDeletion, make_experts
from monet_jax.model.layers import Dense, Embed, RMSNorm, rope_tables
from monet_jax.model.router import Router
from monet_jax.sharding import constrain

if TYPE_CHECKING:
    from jax.typing import ArrayLike

    from monet_jax.data.tokenizer import Tokenizer

RESIDUAL = ("batch", "seq", "act_embed")


@flax.struct.dataclass
class CausalLMOutput:
    """What ``MonetForCausalLM.__call__`` returns (a pytree, so it passes through ``jax.jit``)."""

    logits: jax.Array  # [b, t, vocab] float32
    router_probs: tuple[tuple[jax.Array, jax.Array], ...] | None = None  # per routing group: (g1, g2)
    router_sums: tuple | None = None  # per routing group: the aux-loss token sums of Router.route


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MonetConfig, layer: int, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype), rngs=rngs)
        pd = kw["param_dtype"]
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        if cfg.is_moe:
            self.moe = make_experts(cfg, **kw)
            self.router = Router(cfg, **kw) if cfg.has_router(layer) else None
            self.deleted = nnx.data(None)  # an ExpertDeletion once an expert mask is applied (monet_jax.experts.mask)
        else:
            self.mlp = DenseMLP(cfg, **kw)
            self.router = None

    def __call__(self, x_btd, cos_btd, sin_btd, mask, probs):
        """``probs`` is the (g1, g2, sums, g1_lanes, g2_lanes) of the routing group's first layer (``g`` in the
        mixing layout last, or None); returns (x, probs)."""
        x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), cos_btd, sin_btd, mask)
        return self._mlp(x_btd, probs)

    def cached(self, x_btd, cos_btd, sin_btd, mask_bts, probs, kv, index):
        """One decoding step with this layer's key/value cache; returns (x, probs, kv)."""
        attn, kv = self.self_attn.cached(self.input_layernorm(x_btd), cos_btd, sin_btd, mask_bts, kv, index)
        return *self._mlp(x_btd + attn, probs), kv

    def _mlp(self, x_btd, probs):
        h_btd = self.post_attention_layernorm(x_btd)
        if not hasattr(self, "moe"):
            return x_btd + self.mlp(h_btd), None
        if self.router is not None:  # (g1, g2, sums) and g in the mixing layout, once per group
            probs = self.router.route(h_btd, lanes_dtype=self.moe.compute_dtype)
        deleted = None if self.deleted is None else self.deleted[...]
        out, lanes_probs = self.moe(h_btd, probs[0], probs[1], deleted=deleted, lanes_probs=probs[3:], carry=True)
        return x_btd + out, (*probs[:3], *(lanes_probs or ()))


class MonetModel(nnx.Module):
    def __init__(self, cfg: MonetConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, std=cfg.initializer_range,
                                  param_dtype=jnp.dtype(cfg.param_dtype),
                                  compute_dtype=jnp.dtype(cfg.compute_dtype), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids_bt, attention_mask_bt=None, position_ids_bt=None, segment_ids_bt=None):
        cfg = self.config
        b, t = input_ids_bt.shape
        x_btd = constrain(self.embed_tokens(input_ids_bt), RESIDUAL)
        if position_ids_bt is None:
            position_ids_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos_btd, sin_btd = rope_tables(position_ids_bt, cfg.head_size, cfg.rope_theta, x_btd.dtype)
        # [b, t] segment ids for the flash kernel, else the [b, t, t] boolean mask (see Attention.__call__)
        if attention.choose(cfg.attention_impl, t, cfg.head_size) == "flash":
            mask = attention.segments(attention_mask_bt, segment_ids_bt, b, t)
        else:
            mask = attention_mask(attention_mask_bt, t, segment_ids_bt)
        groups = self.routing_groups()
        if cfg.scan_groups and len(groups) > 1:
            x_btd, all_probs = _scan_groups(groups, x_btd, cos_btd, sin_btd, mask, cfg.remat)
        else:
            run = partial(_run_group, remat=cfg.remat)
            if cfg.remat == "group":
                run = nnx.remat(lambda group, *a: _run_group(group, *a))
            all_probs = []
            for group in groups:
                x_btd, probs = run(group, x_btd, cos_btd, sin_btd, mask)
                all_probs.append(probs)
        return self.norm(x_btd), tuple(p for p in all_probs if p is not None)

    def cached(self, input_ids_bt, position_ids_bt, key_mask_bs, cache, index):
        """Decode with a key/value cache: ``input_ids`` fill cache slots ``index .. index + t``; a query
        sees the valid (``key_mask``) slots up to its own."""
        cfg = self.config
        t, s = input_ids_bt.shape[1], key_mask_bs.shape[1]
        x_btd = self.embed_tokens(input_ids_bt)
        cos_btd, sin_btd = rope_tables(position_ids_bt, cfg.head_size, cfg.rope_theta, x_btd.dtype)
        causal_ts = jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None]
        mask_bts = key_mask_bs[:, None, :] & causal_ts[None]
        probs, new_cache = None, []
        for layer, kv in zip(self.layers, cache, strict=True):
            x_btd, probs, kv = layer.cached(x_btd, cos_btd, sin_btd, mask_bts, probs, kv, index)
            new_cache.append(kv)
        return self.norm(x_btd), new_cache

    def routing_groups(self) -> list[nnx.List]:
        """Consecutive layers sharing one router (each layer alone in the dense baseline)."""
        size = self.config.moe_groups if self.config.is_moe else 1
        return [nnx.List(self.layers[i:i + size]) for i in range(0, len(self.layers), size)]


def layer_policy(remat: str):
    """What a layer keeps for its backward pass under ``remat`` (``jax.checkpoint`` policy; None: nothing, the
    whole layer is recomputed). ``dots``: the outputs of the products without batch dimensions (projections,
    expert ``u`` / ``v``, router) and the attention output, recomputing the elementwise work, norms, RoPE,
    the routing-weighted mixing and the attention itself (whose scores would be ``[b, heads, t, t]``), as
    MaxText's ``minimal`` policy does."""
    if remat != "dots":
        return None
    cp = jax.checkpoint_policies
    return cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names("attention_out"))


def _run_group(group, x_btd, cos_btd, sin_btd, mask, remat: str = "none"):
    """The layers of one routing group (each rematerialized under ``remat`` ``layer`` or ``dots``); returns
    the residual stream and the group's (g1, g2)."""
    if remat in ("layer", "dots"):
        call = nnx.remat(lambda layer, *a: layer(*a), policy=layer_policy(remat))
    else:
        call = lambda layer, *a: layer(*a)  # noqa: E731
    probs = None
    for layer in group:
        x_btd, probs = call(layer, x_btd, cos_btd, sin_btd, mask, probs)
        x_btd = constrain(x_btd, RESIDUAL)
    return x_btd, None if probs is None else probs[:3]  # the mixing-layout copies stay inside the group


def _scan_groups(groups, x_btd, cos_btd, sin_btd, mask, remat: str):
    """``lax.scan`` over routing groups so a deep model compiles one group body. Parameters keep their
    per-layer layout (and checkpoint names); they are stacked inside the step, which costs one copy of
    the weights per step and buys compile time that no longer grows with depth."""
    graphdef, _, _ = nnx.split(groups[0], nnx.Param, ...)
    splits = [nnx.split(g, nnx.Param, ...)[1:] for g in groups]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *splits)

    def body(x, group_state):
        group = nnx.merge(graphdef, *group_state)
        x, probs = _run_group(group, x, cos_btd, sin_btd, mask, "none" if remat == "group" else remat)
        return x, (probs, nnx.state(group, nnx.BatchStat))

    if remat == "group":
        body = jax.checkpoint(body, prevent_cse=False)
    x_btd, (probs, stats) = jax.lax.scan(body, x_btd, stacked)
    for i, group in enumerate(groups):
        nnx.update(group, jax.tree.map(lambda s, i=i: s[i], stats))
    if probs is None:
        return x_btd, []
    return x_btd, [jax.tree.map(lambda p, i=i: p[i], probs) for i in range(len(groups))]


class MonetForCausalLM(nnx.Module):
    """Monet (or its dense LLaMA baseline) for next-token prediction: the one model class that training,
    evaluation, generation, conversion and the expert tools share.

    Build one from a config for training, or load a checkpoint with ``from_pretrained``. Logits are
    float32 whatever the compute dtype, so losses and sampling do not depend on it. ``model.train()``
    switches the routers' BatchNorm to batch statistics (updating the running statistics);
    ``model.eval()``, the default, uses the running statistics, as the published checkpoints expect.

    Args:
        config: The architecture (Hugging Face field names) and the dtype policy.
        rngs: Initialization randomness (default ``nnx.Rngs(0)``); loading replaces every parameter.
    """

    def __init__(self, config: MonetConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.model = MonetModel(config, rngs=rngs)
        self.lm_head = Dense(config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False,
                             std=config.initializer_range,
                             param_dtype=jnp.dtype(config.param_dtype),
                             compute_dtype=jnp.dtype(config.compute_dtype), rngs=rngs)

    def __call__(self, input_ids: ArrayLike, attention_mask: ArrayLike | None = None,
                 position_ids: ArrayLike | None = None, *, segment_ids: ArrayLike | None = None,
                 output_router_probs: bool = False) -> CausalLMOutput:
        """Logits of a batch of token ids: one causal forward pass, without a key/value cache.

        Args:
            input_ids: Token ids ``[batch, seq]``.
            attention_mask: ``[batch, seq]``, 1 for tokens and 0 for padding, which no token attends to
                (default: every token).
            position_ids: ``[batch, seq]`` rotary positions (default: ``0 .. seq - 1`` in every row).
            segment_ids: ``[batch, seq]`` for packed rows: a token attends only within its own document
                (0 = padding).
            output_router_probs: Also return each routing group's router probabilities (what the expert
                tools and the auxiliary losses read).

        Returns:
            Float32 ``logits [batch, seq, vocab]`` and, with ``output_router_probs``, per routing group the
                ``(g1, g2)`` probabilities ``[batch, seq, moe_heads, moe_experts]`` and the token sums of
                the auxiliary losses.
        """
        hidden_btd, probs = self.model(jnp.asarray(input_ids), attention_mask, position_ids, segment_ids)
        logits = self.lm_head(hidden_btd, out_dtype=jnp.float32).astype(jnp.float32)
        logits = constrain(logits, ("batch", "seq", "vocab"))
        if not output_router_probs:
            return CausalLMOutput(logits=logits)
        return CausalLMOutput(logits=logits, router_probs=tuple(p[:2] for p in probs),
                              router_sums=tuple(p[2] for p in probs))

    # -- decoding ----------------------------------------------------------------------------------
    def init_cache(self, batch: int, length: int) -> list[tuple[jax.Array, jax.Array]]:
        """Zeroed keys/values ``[batch * kv_heads, length, head_dim]`` per layer (row-major over rows, then
        KV heads), in the compute dtype."""
        cfg = self.config
        shape = (batch * cfg.kv_heads, length, cfg.head_size)
        return [(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
                for _ in range(cfg.num_hidden_layers)]

    def cached(self, input_ids, position_ids, key_mask, cache, index, *, last_only: bool = False):
        """Logits (float32) of ``input_ids`` written at cache slot ``index``, and the updated cache.
        ``last_only``: the logits of the last position alone (``[b, 1, V]``), all a prefill samples from:
        the output head then reads its weights for one row instead of one per prompt token."""
        hidden_btd, cache = self.model.cached(jnp.asarray(input_ids), position_ids, key_mask, cache, index)
        if last_only:
            hidden_btd = hidden_btd[:, -1:]
        return self.lm_head(hidden_btd, out_dtype=jnp.float32).astype(jnp.float32), cache

    # -- checkpoints -------------------------------------------------------------------------------
    @classmethod
    def abstract(cls, config: MonetConfig) -> MonetForCausalLM:
        """The model with ``ShapeDtypeStruct`` leaves: shapes and counts without allocating weights."""
        return nnx.eval_shape(lambda: cls(config))

    @classmethod
    def from_flat(cls, config: MonetConfig, flat: dict[str, object]) -> MonetForCausalLM:
        """Build the model from ``{"model.layers.0.moe.u1.kernel": array, ...}`` (every variable)."""
        graphdef, state = nnx.split(cls.abstract(config))
        leaves = []
        for path, var in nnx.to_flat_state(state):
            key = ".".join(map(str, path))
            want = var.get_value()
            array = flat.get(key)
            if array is None:
                raise ValueError(f"no value for {key}")
            if tuple(array.shape) != tuple(want.shape):
                raise ValueError(f"{key}: shape {tuple(array.shape)} != {tuple(want.shape)}")
            leaves.append((path, var.replace(jnp.asarray(array, dtype=want.dtype))))
        return nnx.merge(graphdef, nnx.from_flat_state(leaves))

    def flat_state(self) -> dict[str, jax.Array]:
        state = nnx.state(self, nnx.Not(ExpertDeletion))  # a deletion mask is applied, never saved
        return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None,
                        compute_dtype: str | None = None, moe_impl: str = "auto") -> MonetForCausalLM:
        """Load a Hugging Face checkpoint directory (any layout: safetensors, sharded, ``.bin``) or one of
        ours (``save_checkpoint``, ``train.py``'s ``out_dir/checkpoint``).

        The dtypes never come from the checkpoint: its stored dtype is only how it is kept on disk, and a
        bfloat16 file runs in float32 on a CPU.

        Args:
            path: The checkpoint directory.
            dtype: Parameters and computation, e.g. ``"bfloat16"`` (default: the platform's, float32 on a
                CPU and bfloat16 on TPU and GPU).
            param_dtype: Overrides the parameters' dtype alone.
            compute_dtype: Overrides the computation's dtype alone.
            moe_impl: The expert layers' implementation; ``"auto"``, for inference, reads only the experts
                in use when few tokens run (decoding) and takes the dense path otherwise.

        Returns:
            The model, in eval mode (BatchNorm on its running statistics).
        """
        from monet_jax.config import inference_dtypes
        from monet_jax.convert import hf

        params, compute = inference_dtypes(jax.default_backend(), dtype)
        policy = dict(param_dtype=param_dtype or params, compute_dtype=compute_dtype or compute)
        config = hf.read_config(path, **policy, **({"moe_impl": moe_impl} if moe_impl else {}))
        if hf.is_orbax_checkpoint(path):
            abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                        for k, v in cls.abstract(config).flat_state().items()}
            return cls.from_flat(config, hf.load_orbax(path, abstract))
        flat = {}
        for spec, array in hf.iter_hf_arrays(path, config, config.param_dtype):
            flat[spec.path_str] = jnp.asarray(array)
        return cls.from_flat(config, flat)

    def save_pretrained(self, out_dir: str | Path, *, torch_dtype: str | None = None,
                        max_shard_size: int | str = "5GB", overwrite: bool = False,
                        tokenizer: Tokenizer | None = None) -> Path:
        """Write the Hugging Face layout, which the upstream PyTorch code and ``from_pretrained`` load.

        Args:
            out_dir: The directory to write (``config.json``, safetensors shards and their index).
            torch_dtype: The stored dtype (default: the config's ``torch_dtype``).
            max_shard_size: The largest shard, in bytes or as ``"5GB"``.
            overwrite: Replace ``out_dir`` when it exists and is not empty (without it, an error). The
                directory is written beside and renamed into place, so it appears whole or not at all.
            tokenizer: A tokenizer of ``monet_jax.data.tokenizer`` to write beside the weights, so that
                the directory reads its text as ``AutoTokenizer`` would.

        Returns:
            ``out_dir``.
        """
        from monet_jax.convert import hf

        flat = self.flat_state()
        return hf.write_hf(out_dir, self.config, lambda spec: np.asarray(flat[spec.path_str]),
                           torch_dtype=torch_dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                           extra=_tokenizer_writer(tokenizer))

    def save_checkpoint(self, out_dir: str | Path, *, overwrite: bool = False,
                        tokenizer: Tokenizer | None = None) -> Path:
        """Write our own format, ``config.json`` and an Orbax ``state/``: the parameters and BatchNorm
        statistics exactly as they are in memory, without a conversion (``from_pretrained`` restores it).
        An applied expert-deletion mask is not saved.

        Args:
            out_dir: The directory to write.
            overwrite: Replace ``out_dir`` when it exists and is not empty (without it, an error). The
                directory is written beside and renamed into place, so it appears whole or not at all.
            tokenizer: A tokenizer of ``monet_jax.data.tokenizer`` to write beside it, so that ``eval.py``
                and ``AutoTokenizer`` read the checkpoint's text as it was trained.

        Returns:
            ``out_dir``.
        """
        from monet_jax.convert import hf

        return hf.save_orbax(out_dir, self.config, self.flat_state(), overwrite=overwrite,
                             extra=_tokenizer_writer(tokenizer))


def _tokenizer_writer(tokenizer):
    if tokenizer is None:
        return None
    from monet_jax.data.tokenizer_files import save_tokenizer

    return lambda directory: save_tokenizer(tokenizer, directory)


def count_model_params(config: MonetConfig) -> int:
    """Trainable parameters of ``config`` counted from the model's own shapes (no allocation)."""
    state = nnx.state(MonetForCausalLM.abstract(config), nnx.Param)
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))

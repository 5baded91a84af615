"""The Hugging Face <-> monet-jax key table, declared once and used in both directions.

Each entry names the HF tensor, the path of the matching variable in our NNX state, the HF shape
that ``config.json`` implies, and whether the tensor is a PyTorch ``nn.Linear`` weight
(``[out, in]``, transposed to our ``[in, out]`` kernel).
"""

from __future__ import annotations

import dataclasses
import re

from monet_jax.config import MonetConfig

Path = tuple[str | int, ...]

# Buffers older transformers versions saved that carry no information (recomputed from config).
IGNORED_HF_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class KeySpec:
    hf: str
    path: Path
    hf_shape: tuple[int, ...]
    linear: bool = False  # nn.Linear weight: transpose between [out, in] and [in, out]
    counter: bool = False  # BatchNorm num_batches_tracked: int64 in PyTorch

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.hf_shape)) if self.linear else self.hf_shape

    @property
    def path_str(self) -> str:
        return ".".join(map(str, self.path))


def key_table(cfg: MonetConfig) -> list[KeySpec]:
    d, v = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    table = [KeySpec("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), (v, d))]

    def linear(hf: str, path: Path, dout: int, din: int, bias: bool = False):
        table.append(KeySpec(f"{hf}.weight", (*path, "kernel"), (dout, din), linear=True))
        if bias:
            table.append(KeySpec(f"{hf}.bias", (*path, "bias"), (dout,)))

    for layer in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{layer}", ("model", "layers", layer)
        table.append(KeySpec(f"{hf}.input_layernorm.weight", (*ours, "input_layernorm", "weight"), (d,)))
        for name, dout, din in (("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)):
            linear(f"{hf}.self_attn.{name}", (*ours, "self_attn", name), dout, din)
        table.append(KeySpec(f"{hf}.post_attention_layernorm.weight",
                             (*ours, "post_attention_layernorm", "weight"), (d,)))
        e = cfg.moe_experts
        if cfg.moe_decompose == "vertical":
            half = e * cfg.moe_dim // 2
            for name in ("u1", "u2"):
                linear(f"{hf}.moe.{name}", (*ours, "moe", name), half, d, bias=True)
            for name in ("v11", "v12", "v21", "v22"):
                linear(f"{hf}.moe.{name}", (*ours, "moe", name), d // 2, half)
            for name in ("b1", "b2"):
                table.append(KeySpec(f"{hf}.moe.{name}", (*ours, "moe", name), (e, d // 2)))
        elif cfg.moe_decompose == "horizontal":
            full = e * cfg.moe_dim
            linear(f"{hf}.moe.u", (*ours, "moe", "u"), full, d, bias=True)
            linear(f"{hf}.moe.v", (*ours, "moe", "v"), d, full)
            table.append(KeySpec(f"{hf}.moe.b", (*ours, "moe", "b"), (e, d)))
        else:
            f = cfg.intermediate_size
            names = ("gate_proj", "up_proj") if cfg.hidden_act == "silu" else ("up_proj",)
            for name in names:
                linear(f"{hf}.mlp.{name}", (*ours, "mlp", name), f, d)
            linear(f"{hf}.mlp.down_proj", (*ours, "mlp", "down_proj"), d, f)
        if cfg.has_router(layer):
            he = cfg.moe_heads * cfg.moe_experts
            for name in ("w1", "w2"):
                linear(f"{hf}.router.{name}", (*ours, "router", name), he, d)
            for norm in ("norm1", "norm2"):
                for stat in ("running_mean", "running_var"):
                    table.append(KeySpec(f"{hf}.router.{norm}.{stat}", (*ours, "router", norm, stat),
                                         (cfg.moe_heads,)))
                table.append(KeySpec(f"{hf}.router.{norm}.num_batches_tracked",
                                     (*ours, "router", norm, "num_batches_tracked"), (), counter=True))
    table.append(KeySpec("model.norm.weight", ("model", "norm", "weight"), (d,)))
    linear("lm_head", ("lm_head",), v, d)
    return table

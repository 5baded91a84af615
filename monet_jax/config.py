"""Model configuration: a typed dataclass whose field names match the Hugging Face ``config.json``.

Also holds the small, generic machinery every job uses: typed construction from YAML/JSON dicts and
dotted ``key=value`` command-line overrides, with one-line errors that name the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message is one line and names the problem."""


# --------------------------------------------------------------------------------------------------
# Generic typed-dataclass helpers (shared by the model, training and evaluation configs).


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int/float/str/bool/Literal/Optional/list/dict/
    nested dataclass), converting only where the conversion is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def unknown_key(key: str, name: str, known) -> str:
    """The one-line error for an unknown key, with the nearest known names at its level (a typo such as
    ``optim.step`` names ``optim.steps``)."""
    close = difflib.get_close_matches(name, sorted(known), n=2, cutoff=0.6)
    hint = " (did you mean " + " or ".join(f"'{key[:len(key) - len(name)]}{c}'" for c in close) + "?)" if close else ""
    return f"unknown config key '{key}'{hint}"


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "", strict: bool = True):
    """Build dataclass ``cls`` from a plain dict; unknown keys are an error when ``strict``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in names]
    if unknown and strict:
        raise ConfigError(unknown_key(f"{prefix}{unknown[0]}", unknown[0], names))
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"bad override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"bad override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cfg, overrides: list[str]):
    """Return a copy of dataclass ``cfg`` with dotted ``key=value`` overrides applied, validated once at
    the end (so ``data.seq_len=4096 model.max_position_embeddings=4096`` works in either order)."""
    if not overrides:
        return cfg
    data = _as_fields(cfg)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, name in enumerate(path[:-1]):
            if not isinstance(node.get(name), dict):
                if name in node:  # a leaf used as a section
                    raise ConfigError(f"unknown config key '{'.'.join(path[:i + 2])}'")
                sections = [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(unknown_key(".".join(path[:i + 1]), name, sections))
            node = node[name]
        node[path[-1]] = value
    return from_dict(type(cfg), data)


def _as_fields(obj) -> dict[str, Any]:
    """Dataclass fields as a dict, nested dataclasses as dicts, other values untouched."""
    return {f.name: _as_fields(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
            for f in dataclasses.fields(obj) if f.init}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# --------------------------------------------------------------------------------------------------
# The model configuration.

DTYPES = ("float32", "bfloat16", "float16")
Decompose = Literal["vertical", "horizontal", "none"]
Remat = Literal["none", "layer", "dots", "group"]
MoeImpl = Literal["xla", "pallas", "sparse", "auto"]
AttentionImpl = Literal["auto", "xla", "flash"]
# ours, never in config.json
POLICY_FIELDS = ("param_dtype", "compute_dtype", "remat", "scan_groups", "moe_impl", "moe_sparse_k",
                 "attention_impl")

# Fields Hugging Face writes into config.json that carry no meaning for this model.
_HF_IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "use_cache",
    "pretraining_tp", "attention_dropout", "output_router_probs", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "_attn_implementation_autoset",
    "mlp_bias", "dtype",
}


@dataclasses.dataclass(frozen=True)
class MonetConfig:
    """The architecture of Monet or of its dense LLaMA baseline, plus how this project runs it.

    Field names are those of the Hugging Face ``config.json``, so a config reads and writes that file
    unchanged, and the LLaMA fields (``hidden_size``, ``num_attention_heads``, ``rope_theta``, ...) mean what
    they mean there; the defaults are Monet-VD 1.4B as published. Frozen, and checked when built:
    a bad value is a one-line ``ConfigError``. In YAML it is the ``model:`` section (``train.py
    --print-config`` lists every key).

    Attributes:
        moe_experts: ``E``, experts per side of each product-key router; a layer mixes ``E * E`` composed
            experts ``(i, j)``.
        moe_heads: ``H``, router heads; a composed expert's score is ``sum_h g1[h, i] * g2[h, j]``.
        moe_topk: About how many experts pass each head's BatchNorm threshold (the routers' sparsity).
        moe_dim: ``m``, the hidden units of each expert.
        moe_groups: Consecutive layers that share one router (a routing group).
        moe_decompose: ``vertical`` (Monet-VD), ``horizontal`` (Monet-HD), or ``none`` for the dense
            LLaMA MLP of ``intermediate_size``.
        torch_dtype: How the weights are stored in a Hugging Face checkpoint; never how they run.
        param_dtype: The parameters' dtype in memory (this project's policy, never in ``config.json``).
        compute_dtype: The dtype of activations and products (policy as well; logits are float32).
        remat: What the backward pass recomputes: ``none``, ``layer``, ``dots`` (keeps the products'
            outputs) or ``group``.
        scan_groups: ``lax.scan`` over routing groups, so compile time does not grow with depth.
        moe_impl: The expert layers' implementation: ``xla``, ``pallas`` (kernels), ``sparse`` (gathers
            the experts in use) or ``auto`` (chosen per call).
        moe_sparse_k: Experts the sparse path gathers per token and head (0: ``min(E, 2 * moe_topk)``).
        attention_impl: ``auto`` (the flash kernel on TPU and GPU when it applies), ``xla`` or ``flash``.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    hidden_act: str = "relu2"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    moe_dim: int = 16
    moe_heads: int = 8
    moe_experts: int = 512
    moe_topk: int = 8
    moe_groups: int = 4
    moe_decompose: Decompose = "vertical"
    torch_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: Remat = "none"       # recompute in the backward: per layer, per layer but keeping products, or per group
    scan_groups: bool = False   # lax.scan over routing groups: compile time independent of depth
    moe_impl: MoeImpl = "xla"   # expert/router kernels: plain XLA einsums, Pallas, sparse gather, or chosen per call
    moe_sparse_k: int = 0       # sparse path: experts gathered per token and head (0: min(E, 2 * moe_topk))
    attention_impl: AttentionImpl = "auto"  # flash kernel (TPU or GPU, tokens a multiple of 128) or XLA attention

    def __post_init__(self):
        self.validate()

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.moe_decompose != "none"

    @property
    def num_routers(self) -> int:
        return len(range(0, self.num_hidden_layers, self.moe_groups)) if self.is_moe else 0

    @property
    def router_sigma(self) -> float:
        """Phi^-1(1 - topk/E): the BatchNorm-space threshold that passes about ``moe_topk`` experts."""
        from statistics import NormalDist

        return NormalDist().inv_cdf(1.0 - self.moe_topk / self.moe_experts)

    def has_router(self, layer: int) -> bool:
        return self.is_moe and layer % self.moe_groups == 0

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.num_key_value_heads is None or self.num_key_value_heads > 0,
             f"num_key_value_heads must be positive, got {self.num_key_value_heads}")
        need(self.num_attention_heads % self.kv_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
             f"num_key_value_heads ({self.kv_heads})")
        need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
             f"({self.num_attention_heads}) unless head_dim is set")
        need(self.head_size > 0 and self.head_size % 2 == 0,
             f"head_dim must be a positive even number for RoPE, got {self.head_size}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.attention_impl in typing.get_args(AttentionImpl), "attention_impl must be one of "
             f"{', '.join(typing.get_args(AttentionImpl))}, got {self.attention_impl!r}")
        need(self.moe_impl in typing.get_args(MoeImpl),
             f"moe_impl must be one of {', '.join(typing.get_args(MoeImpl))}, got {self.moe_impl!r}")
        need(self.rope_scaling is None, "rope_scaling is not supported (must be null)")
        need(not self.attention_bias, "attention_bias=true is not supported (LLaMA attention has no biases)")
        need(not self.tie_word_embeddings, "tie_word_embeddings=true is not supported (lm_head is untied)")
        for name in ("torch_dtype", "param_dtype", "compute_dtype"):
            need(getattr(self, name) in DTYPES,
                 f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.is_moe:
            need(self.hidden_act == "relu2", f"hidden_act must be relu2 for Monet experts, got {self.hidden_act!r}")
            for name in ("moe_dim", "moe_heads", "moe_experts", "moe_topk", "moe_groups"):
                need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
            need(self.moe_sparse_k >= 0, f"moe_sparse_k must be >= 0, got {self.moe_sparse_k}")
            need(self.moe_topk < self.moe_experts,
                 f"moe_topk ({self.moe_topk}) must be smaller than moe_experts ({self.moe_experts})")
            if self.moe_decompose == "vertical":
                need(self.moe_dim % 2 == 0, f"moe_dim must be even for vertical decomposition, got {self.moe_dim}")
                need(self.hidden_size % 2 == 0,
                     f"hidden_size must be even for vertical decomposition, got {self.hidden_size}")
        else:
            need(self.hidden_act in ("silu", "relu2"),
                 f"hidden_act must be silu (SwiGLU) or relu2 for the dense MLP, got {self.hidden_act!r}")
            need(self.intermediate_size is not None and self.intermediate_size > 0,
                 "intermediate_size must be a positive integer when moe_decompose is none")

    # -- I/O -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, prefix: str = "") -> MonetConfig:
        """Build from a mapping of field names; an unknown key is an error that names the closest keys."""
        return from_dict(cls, data, prefix=prefix)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> MonetConfig:
        """Read a YAML file (its ``model:`` section if it has one), then apply dotted overrides."""
        data = load_yaml(path)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        try:
            cfg = cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        return apply_overrides(cfg, overrides or [])

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], **policy: str) -> MonetConfig:
        """Read a Hugging Face ``config.json`` dict (``model_type`` monet, or llama for a dense model)."""
        model_type = data.get("model_type")
        if model_type not in ("monet", "llama"):
            raise ConfigError(f"unsupported model_type {model_type!r} (expected 'monet' or 'llama')")
        if data.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known and k not in _HF_IGNORED}
        if "torch_dtype" not in fields and isinstance(data.get("dtype"), str):
            fields["torch_dtype"] = data["dtype"]
        if fields.get("torch_dtype") is None:
            fields.pop("torch_dtype", None)
        if model_type == "llama":
            fields["moe_decompose"] = "none"
            fields.setdefault("hidden_act", "silu")
        fields.update(policy)
        return cls.from_dict(fields)

    @classmethod
    def from_json(cls, path: str | Path, **policy: str) -> MonetConfig:
        """Read a Hugging Face ``config.json`` file; ``policy`` sets the fields it never holds (dtypes,
        ``moe_impl``, ...)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config.json not found: {path}")
        try:
            data = json.loads(path.read_bytes())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (not valid UTF-8)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_hf_dict(data, **policy)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def architecture(self) -> dict[str, Any]:
        """What fixes the weights' meaning: every field but the dtype / remat / scan policy."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in POLICY_FIELDS}
        d.pop("torch_dtype")
        d.update(num_key_value_heads=self.kv_heads, head_dim=self.head_size)
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` that the upstream PyTorch code (or transformers' LLaMA, when dense) loads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in POLICY_FIELDS:
            d.pop(k)
        d["num_key_value_heads"] = self.kv_heads
        d["head_dim"] = self.head_size
        if self.is_moe:
            d.update(model_type="monet", architectures=["MonetForCausalLM"])
            if self.intermediate_size is None:
                d.pop("intermediate_size")
        else:
            if self.hidden_act != "silu":
                raise ConfigError("only the SwiGLU dense baseline (hidden_act silu) has a Hugging Face (llama) layout")
            for k in [k for k in d if k.startswith("moe_")]:
                d.pop(k)
            d.update(model_type="llama", architectures=["LlamaForCausalLM"], mlp_bias=False)
        d.update(attention_dropout=0.0, use_cache=True)
        return d


def inference_dtypes(platform: str, dtype: str | None = None) -> tuple[str, str]:
    """``(param_dtype, compute_dtype)`` for running a loaded checkpoint, whatever dtype it stores, so an HF
    directory and our checkpoint of the same weights run alike: ``dtype`` for both when given, else float32
    on a CPU (XLA's CPU matrix products are several times slower in bfloat16, and bfloat16 weights would
    pay a cast per call) and bfloat16 on TPU and GPU (half the bytes a decoding step reads; the units'
    native products)."""
    if dtype is None:
        dtype = "float32" if platform == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype, dtype


def count_params(cfg: MonetConfig) -> int:
    """Closed-form parameter count (BatchNorm statistics are buffers, not parameters)."""
    d, layers, hd = cfg.hidden_size, cfg.num_hidden_layers, cfg.head_size
    attn = d * hd * (cfg.num_attention_heads * 2 + cfg.kv_heads * 2)
    if cfg.is_moe:
        em = cfg.moe_experts * cfg.moe_dim
        mlp = 2 * d * em + em + cfg.moe_experts * d
        router = 2 * d * cfg.moe_heads * cfg.moe_experts
    else:
        mlp = (3 if cfg.hidden_act == "silu" else 2) * d * cfg.intermediate_size
        router = 0
    return 2 * cfg.vocab_size * d + layers * (attn + mlp + 2 * d) + d + cfg.num_routers * router

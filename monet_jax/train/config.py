"""Training configuration: YAML + dotted overrides onto typed dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import yaml

from monet_jax.config import ConfigError, MonetConfig, apply_overrides, from_dict, load_yaml
from monet_jax.data.pipeline import DataConfig
from monet_jax.sharding import MeshConfig


def tiny_model() -> MonetConfig:
    """The embedded default: a small Monet-VD that trains on two CPU cores in a couple of minutes."""
    return MonetConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, moe_decompose="vertical",
                       moe_dim=8, moe_heads=4, moe_experts=64, moe_topk=8, moe_groups=2, torch_dtype="float32")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    steps: int = 400
    learning_rate: float = 3e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 40
    decay_fraction: float = 0.2      # wsd: the final fraction of steps that decays linearly
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1              # microbatches per step (the batch is split, gradients summed)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000                # save the training state every N steps (0: only at the end / on signal);
                                     # a hard kill loses at most this many steps
    keep: int = 3
    async_save: bool = True
    resume: bool = True              # continue from the latest checkpoint in out_dir when there is one


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    log_every: int = 10
    tensorboard: bool = True         # event files under out_dir/tensorboard
    wandb_project: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: MonetConfig = dataclasses.field(default_factory=tiny_model)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    init_from: str | None = None     # an HF or converted checkpoint to continue pre-training / fine-tune
    freeze_routers: bool = False     # keep router weights and BatchNorm statistics fixed (fine-tuning)
    aux_loss_coef: float = 1e-2      # the paper's 1e-3 is in configs/pretrain-v4-64.yaml (README: expert health)
    aux_probs: Literal["routed", "dense"] = "dense"  # uniformity loss over g (paper) or softmax(z) (Router.route)
    nan_policy: Literal["skip", "stop"] = "skip"
    seed: int = 0
    out_dir: str = "runs/default"
    eval_every: int = 100
    eval_batches: int = 8

    def __post_init__(self):
        o = self.optim
        if o.steps <= 0:
            raise ConfigError(f"optim.steps must be positive, got {o.steps}")
        if o.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must not be negative, got {o.warmup_steps}")
        if o.grad_accum <= 0:
            raise ConfigError(f"optim.grad_accum must be positive, got {o.grad_accum}")
        if not 0 <= o.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
        if self.data.batch_size % o.grad_accum:
            raise ConfigError(f"data.batch_size ({self.data.batch_size}) is not divisible by optim.grad_accum "
                              f"({o.grad_accum})")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                              f"({self.model.max_position_embeddings})")
        if not 0 < self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if self.eval_every <= 0 or self.metrics.log_every <= 0:
            raise ConfigError("eval_every and metrics.log_every must be positive")
        if self.checkpoint.every < 0 or self.checkpoint.keep <= 0:
            raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep positive")

    @classmethod
    def load(cls, paths: str | Path | list | None, overrides: list[str]) -> TrainConfig:
        """YAML files merged in order (later keys win, sections merge), then dotted overrides."""
        paths = [] if paths is None else [paths] if isinstance(paths, str | Path) else list(paths)
        if not paths:
            return apply_overrides(cls(), overrides)
        data: dict = {}
        for path in paths:
            _merge(data, load_yaml(path))
        try:
            cfg = from_dict(cls, data)
        except ConfigError as e:
            raise ConfigError(f"{', '.join(map(str, paths))}: {e}") from None
        return apply_overrides(cfg, overrides)


def config_yaml(cfg: TrainConfig) -> str:
    """Every key of ``cfg`` with its value, as YAML that ``TrainConfig.load`` reads back to the same config:
    what ``--print-config`` shows and what a run writes to ``out_dir/config.yaml``."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, list | tuple) else v

    return yaml.safe_dump(plain(dataclasses.asdict(cfg)), sort_keys=False, default_flow_style=False)


def write_config(cfg: TrainConfig, out_dir: str | Path) -> Path:
    """``out_dir/config.yaml``, written whole or not at all (a temporary file renamed into place)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(config_yaml(cfg))
    tmp.replace(out / "config.yaml")
    return out / "config.yaml"


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v

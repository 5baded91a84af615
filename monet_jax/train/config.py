"""Training configuration: YAML + dotted overrides onto typed dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from monet_jax.config import ConfigError, MonetConfig, apply_overrides, from_dict, load_yaml


def tiny_model() -> MonetConfig:
    """The embedded default: a small Monet-VD that trains on two CPU cores in a couple of minutes."""
    return MonetConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, moe_decompose="vertical",
                       moe_dim=8, moe_heads=4, moe_experts=64, moe_topk=8, moe_groups=2, torch_dtype="float32")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # text file or directory; null = the embedded corpus
    seq_len: int = 128
    batch_size: int = 16
    val_fraction: float = 0.05


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    steps: int = 400
    learning_rate: float = 3e-3
    warmup_steps: int = 40
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: MonetConfig = dataclasses.field(default_factory=tiny_model)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    aux_loss_coef: float = 1e-3
    seed: int = 0
    out_dir: str = "runs/default"
    eval_every: int = 100
    eval_batches: int = 8

    def __post_init__(self):
        if self.optim.steps <= 0:
            raise ConfigError(f"optim.steps must be positive, got {self.optim.steps}")
        if self.optim.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must not be negative, got {self.optim.warmup_steps}")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                              f"({self.model.max_position_embeddings})")
        if not 0 < self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str]) -> TrainConfig:
        cfg = cls()
        if path is not None:
            try:
                cfg = from_dict(cls, load_yaml(path))
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        return apply_overrides(cfg, overrides)

"""Model FLOPs (for MFU), device peaks, and metric writers (stdout, TensorBoard, optional W&B)."""

from __future__ import annotations

import math
from pathlib import Path

import jax

from monet_jax.config import MonetConfig

# Dense bf16 peak FLOP/s per JAX device (a v4/v5p device is one megacore chip).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((f for name, f in PEAK_FLOPS if name.lower() in kind.lower()), None)


def forward_macs_per_token(cfg: MonetConfig, seq_len: int) -> float:
    """Multiply-accumulates of one token's forward pass. Counts every matmul, the routing-weighted
    mixing einsums, and causal attention (half the ``T x T`` scores)."""
    d, hd, layers = cfg.hidden_size, cfg.head_size, cfg.num_hidden_layers
    attn_proj = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.kv_heads)
    attn_scores = cfg.num_attention_heads * hd * seq_len  # (q.k + p.v) over T/2 keys on average
    if cfg.is_moe:
        e, m, h = cfg.moe_experts, cfg.moe_dim, cfg.moe_heads
        mlp = 2 * d * e * m + 2 * h * e * m
        router = cfg.num_routers * 2 * d * h * e
    else:
        mlp = (3 if cfg.hidden_act == "silu" else 2) * d * cfg.intermediate_size
        router = 0
    return layers * (attn_proj + attn_scores + mlp) + router + d * cfg.vocab_size


def train_flops_per_token(cfg: MonetConfig, seq_len: int) -> float:
    """Model FLOPs of a training step per token: 2 FLOPs per MAC, backward twice the forward."""
    return 6.0 * forward_macs_per_token(cfg, seq_len)


def mfu(tokens_per_second: float, cfg: MonetConfig, seq_len: int, num_devices: int,
        device: jax.Device | None = None) -> float | None:
    peak = peak_flops(device)
    if peak is None:
        return None
    return tokens_per_second * train_flops_per_token(cfg, seq_len) / (peak * num_devices)


class MetricsWriter:
    """Scalars to TensorBoard event files (and W&B when configured), written by process 0 only."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool, wandb_project: str | None, config: dict):
        self.primary = jax.process_index() == 0
        self.tb = self.wandb = None
        if not self.primary:
            return
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("metrics.wandb_project is set but wandb is not installed "
                                 "(pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out_dir))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        scalars = {k: v for k, v in scalars.items() if v is not None and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

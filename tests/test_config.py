"""MonetConfig: YAML/JSON loading, dotted overrides, validation errors, published sizes."""

import dataclasses
import json

import numpy as np
import pytest

from monet_jax import ConfigError, MonetConfig
from monet_jax.config import apply_overrides
from monet_jax.model import count_model_params

# DESIGN.md section 2 (parameter counts in billions, to the table's precision).
PUBLISHED = {
    "monet-vd-850m": 0.854, "monet-hd-850m": 0.854,
    "monet-vd-1.4b": 1.465, "monet-hd-1.4b": 1.465,
    "monet-vd-4.1b": 4.173, "monet-hd-4.1b": 4.173,
}


def _independent_count(layers, d, heads, m, moe_heads, groups, vocab=32000, experts=512):
    """Count written from the HF key list (DESIGN.md section 3), not from the model code."""
    attn = 4 * d * d
    moe = 2 * (d * experts * m // 2 + experts * m // 2) + 4 * (experts * m // 2) * (d // 2) + 2 * experts * (d // 2)
    router = 2 * d * moe_heads * experts
    n_routers = len([layer for layer in range(layers) if layer % groups == 0])
    return 2 * vocab * d + layers * (attn + moe + 2 * d) + d + n_routers * router


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = MonetConfig.from_yaml(f"configs/{name}.yaml")
    n = count_model_params(cfg)  # jax.eval_shape: nothing is allocated
    assert round(n / 1e9, 3) == PUBLISHED[name]
    layers, d, heads, m, mh = {"850m": (24, 1536, 12, 12, 6), "1.4b": (24, 2048, 16, 16, 8),
                               "4.1b": (32, 3072, 24, 24, 12)}[name.split("-")[-1]]
    assert n == _independent_count(layers, d, heads, m, mh, groups=4)


@pytest.mark.parametrize("name,billions", [("llama-770m", 0.78), ("llama-1.3b", 1.29), ("llama-3.8b", 3.82)])
def test_dense_baselines(name, billions):
    cfg = MonetConfig.from_yaml(f"configs/{name}.yaml")
    assert cfg.moe_decompose == "none"
    assert round(count_model_params(cfg) / 1e9, 2) == billions


def test_yaml_overrides_and_types(tmp_path):
    cfg = MonetConfig.from_yaml("configs/tiny-vd.yaml", ["moe_groups=1", "rope_theta=500000", "compute_dtype=bfloat16"])
    assert cfg.moe_groups == 1 and cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
    assert cfg.compute_dtype == "bfloat16"
    assert cfg.num_routers == 4


@pytest.mark.parametrize("override,message", [
    ("moe_topk=32", r"moe_topk \(32\) must be smaller than moe_experts \(32\)"),
    ("moe_dim=7", "moe_dim must be even for vertical decomposition"),
    ("num_attention_heads=6", r"hidden_size \(64\) must be divisible by num_attention_heads \(6\)"),
    ("num_key_value_heads=3", "must be divisible by num_key_value_heads"),
    ("moe_decompose=diagonal", "moe_decompose: 'diagonal' is not one of vertical, horizontal, none"),
    ("moe_heads=two", "moe_heads: expected an integer, got 'two'"),
    ("mo_heads=2", r"unknown config key 'mo_heads' \(did you mean 'moe_heads'\?\)$"),
    ("data_parallel=2", "unknown config key 'data_parallel'$"),
    ("moe_heads.x=2", "unknown config key 'moe_heads.x'"),
    ("compute_dtype=float8", "compute_dtype must be one of"),
    ("moe_decompose=none", "intermediate_size must be a positive integer"),
    ("moe_groups=0", "moe_groups must be positive"),
    ("nokey", "expected key=value"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        MonetConfig.from_yaml("configs/tiny-vd.yaml", [override])
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        MonetConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        MonetConfig.from_yaml(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  hiden_size: 12\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key 'hiden_size'"):
        MonetConfig.from_yaml(unknown)


def test_hf_config_json_round_trip(tmp_path):
    cfg = MonetConfig.from_yaml("configs/monet-hd-1.4b.yaml")
    path = tmp_path / "config.json"
    hf = cfg.to_hf_dict()
    assert hf["model_type"] == "monet" and hf["head_dim"] == 128 and "param_dtype" not in hf
    # Extra fields written by transformers are tolerated; newer versions write "dtype".
    hf.update(transformers_version="4.56.0", auto_map={"AutoModel": "x"}, dtype=hf.pop("torch_dtype"))
    path.write_text(json.dumps(hf))
    again = MonetConfig.from_json(path)
    assert again.head_dim == 128 and dataclasses.replace(again, head_dim=None) == cfg
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        MonetConfig.from_json(path)


def test_router_sigma():
    cfg = MonetConfig.from_yaml("configs/monet-vd-1.4b.yaml")
    assert abs(cfg.router_sigma - 2.154) < 5e-4  # DESIGN.md: 2.154 for 8/512


def test_aux_losses_match_numpy():
    from monet_jax.model.router import aux_losses

    rng = np.random.default_rng(0)
    g = rng.random((2, 2, 5, 3, 8)) * (rng.random((2, 2, 5, 3, 8)) > 0.6)
    g[..., 0] += 1e-3
    g /= g.sum(-1, keepdims=True)
    g1, g2 = g[0].astype(np.float32), g[1].astype(np.float32)
    H, E = 3, 8
    unif = -sum((1 / E) * np.log(gg.mean((0, 1))[h, i] + 1e-10) for gg in (g1, g2)
                for h in range(H) for i in range(E)) / (2 * H)
    amb = sum((1 - gg.max(-1)[..., h]).mean() for gg in (g1, g2) for h in range(H)) / (2 * H)
    got_unif, got_amb = aux_losses(g1, g2)
    np.testing.assert_allclose(float(got_unif), unif, rtol=1e-5)
    np.testing.assert_allclose(float(got_amb), amb, rtol=1e-5)


def test_apply_overrides_returns_validated_copy():
    cfg = MonetConfig.from_yaml("configs/tiny-hd.yaml")
    new = apply_overrides(cfg, ["moe_experts=64"])
    assert cfg.moe_experts == 32 and new.moe_experts == 64


@pytest.mark.parametrize("paths, overrides", [
    (None, []),
    (None, ["optim.steps=7", "model.moe_decompose=horizontal", "data.seq_len=64"]),
    (["configs/monet-vd-1.4b.yaml", "configs/pretrain-v4-64.yaml"], ["mesh.fsdp=-1"]),
])
def test_printed_config_reads_back_to_the_same_config(tmp_path, capsys, paths, overrides):
    from monet_jax.train.config import TrainConfig, write_config
    from monet_jax.train.main import main as train_main

    cfg = TrainConfig.load(paths, overrides)
    written = write_config(cfg, tmp_path / "run")
    assert TrainConfig.load([written], []) == cfg
    argv = [a for p in (paths or []) for a in ("--config", p)] + ["--print-config", *overrides]
    assert train_main(argv) == 0
    assert capsys.readouterr().out == written.read_text()
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_a_long_run_saves_periodically_by_default():
    from monet_jax.train.config import TrainConfig

    assert TrainConfig().checkpoint.every == 1000
    assert TrainConfig.load(None, ["checkpoint.every=0"]).checkpoint.every == 0

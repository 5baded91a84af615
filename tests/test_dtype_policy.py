"""One dtype policy for loaded checkpoints: the platform (or --dtype) decides, never the dtype stored."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM
from monet_jax.config import ConfigError, MonetConfig, inference_dtypes
from monet_jax.convert import hf
from monet_jax.eval.main import main as eval_main

CFG = MonetConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, moe_dim=4, moe_heads=2, moe_experts=8, moe_topk=2, moe_groups=2,
                  torch_dtype="bfloat16", param_dtype="bfloat16", compute_dtype="bfloat16")
IDS = np.array([[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]], np.int32)


@pytest.fixture(scope="module")
def stored_bf16(tmp_path_factory):
    """The same bfloat16 weights as an HF directory and as our checkpoint converted from it (both bfloat16)."""
    root = tmp_path_factory.mktemp("dtype")
    MonetForCausalLM(CFG, rngs=nnx.Rngs(4)).save_pretrained(root / "hf")
    hf.convert_hf_to_orbax(root / "hf", root / "ours")
    return root


def _dtypes(model) -> set:
    return {np.dtype(v.dtype) for k, v in model.flat_state().items() if "norm1" not in k and "norm2" not in k}


def test_both_stored_bfloat16_and_the_converted_config_says_so(stored_bf16):
    blob = (stored_bf16 / "hf" / "model.safetensors").read_bytes()
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__" and "num_batches" not in k} == {"BF16"}
    assert json.loads((stored_bf16 / "ours" / "config.json").read_text())["param_dtype"] == "bfloat16"
    raw = hf.load_orbax(stored_bf16 / "ours", None)
    assert np.dtype(raw["lm_head.kernel"].dtype) == np.dtype(ml_dtypes.bfloat16)


def test_cpu_loads_both_in_float32_with_identical_logits(stored_bf16):
    a = MonetForCausalLM.from_pretrained(stored_bf16 / "hf")
    b = MonetForCausalLM.from_pretrained(stored_bf16 / "ours")
    for m in (a, b):
        assert (m.config.param_dtype, m.config.compute_dtype) == ("float32", "float32")
        assert _dtypes(m) == {np.dtype(np.float32)}
    for k, v in a.flat_state().items():  # bfloat16 values widened exactly, the same on both paths
        np.testing.assert_array_equal(np.asarray(v), np.asarray(b.flat_state()[k]), err_msg=k)
    la, lb = np.asarray(a(IDS).logits), np.asarray(b(IDS).logits)
    np.testing.assert_array_equal(la, lb)
    assert np.isfinite(la).all() and la.std() > 0


def test_dtype_bfloat16_gives_bfloat16(stored_bf16):
    for src in ("hf", "ours"):
        m = MonetForCausalLM.from_pretrained(stored_bf16 / src, dtype="bfloat16")
        assert (m.config.param_dtype, m.config.compute_dtype) == ("bfloat16", "bfloat16")
        assert _dtypes(m) == {np.dtype(ml_dtypes.bfloat16)}
        assert m.init_cache(1, 4)[0][0].dtype == jnp.bfloat16
    # a single field still overrides the other alone
    m = MonetForCausalLM.from_pretrained(stored_bf16 / "ours", compute_dtype="bfloat16")
    assert (m.config.param_dtype, m.config.compute_dtype) == ("float32", "bfloat16")


def test_platform_defaults():
    assert inference_dtypes("cpu") == ("float32", "float32")
    assert inference_dtypes("gpu") == ("bfloat16", "bfloat16")
    assert inference_dtypes("tpu") == ("bfloat16", "bfloat16")
    assert inference_dtypes("tpu", "float32") == ("float32", "float32")
    with pytest.raises(ConfigError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        inference_dtypes("cpu", "int8")


def test_eval_dtype_flag_on_every_subcommand(stored_bf16, capsys):
    for cmd in (["perplexity"], ["tasks"], ["generate"], ["experts", "tokens"], ["experts", "atlas"]):
        with pytest.raises(SystemExit):
            eval_main([*cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--dtype {float32,bfloat16,float16}" in out and "float32 on a CPU, bfloat16 on TPU and GPU" in out
    text = stored_bf16 / "t.txt"
    text.write_text("Hello world. " * 20)
    runs = {}
    for flag in ([], ["--dtype", "bfloat16"]):
        assert eval_main(["perplexity", str(stored_bf16 / "ours"), "--data", str(text), "--seq-len", "32", *flag]) == 0
        runs[tuple(flag)] = float(capsys.readouterr().out.split("loss ")[1].split()[0])
    # float32 from the HF directory and from ours agree; bfloat16 computation moves the loss a little
    assert eval_main(["perplexity", str(stored_bf16 / "hf"), "--data", str(text), "--seq-len", "32"]) == 0
    assert float(capsys.readouterr().out.split("loss ")[1].split()[0]) == runs[()]
    assert runs[("--dtype", "bfloat16")] == pytest.approx(runs[()], abs=0.05)


def test_lm_eval_dtype_model_arg(stored_bf16):
    pytest.importorskip("lm_eval")
    from monet_jax.eval.harness import MonetLM

    lm = MonetLM.create_from_arg_string(f"pretrained={stored_bf16 / 'ours'},dtype=bfloat16")
    assert lm.model.config.compute_dtype == "bfloat16" and _dtypes(lm.model) == {np.dtype(ml_dtypes.bfloat16)}
    assert MonetLM(pretrained=str(stored_bf16 / "hf")).model.config.compute_dtype == "float32"

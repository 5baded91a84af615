"""Conversion both ways: bit-exact round trips, the CLI, and one-line errors on bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from monet_jax import ConvertError, MonetForCausalLM
from monet_jax.convert.cli import main as convert_main
from tests.conftest import tiny_config, write_hf_checkpoint
from tests.torch_reference import ReferenceMonet, randomize


def _read_hf(directory):
    """Every tensor of an exported directory, read back with safetensors' PyTorch reader."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def _assert_bit_exact(got: dict, want: dict):
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype, key
        assert g.shape == w.shape, key
        assert torch.equal(g.view(-1).view(torch.uint8) if g.is_floating_point() else g,
                           w.view(-1).view(torch.uint8) if w.is_floating_point() else w), key


def _state(directory):
    if (directory / "model.safetensors").exists() or (directory / "model.safetensors.index.json").exists():
        return _read_hf(directory)
    index = directory / "pytorch_model.bin.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "pytorch_model.bin"]
    state = {}
    for name in names:
        state.update(torch.load(directory / name, weights_only=True))
    return state


@pytest.mark.parametrize("layout,dtype,decompose", [
    ("safetensors", "bfloat16", "vertical"),
    ("safetensors-sharded", "float32", "horizontal"),
    ("bin", "float16", "horizontal"),
    ("bin-sharded", "bfloat16", "vertical"),
])
def test_cli_round_trip_is_bit_exact(reference_checkpoint, tmp_path, layout, dtype, decompose, capsys):
    src, _ = reference_checkpoint(layout, dtype=dtype, moe_decompose=decompose)
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert_main(["hf-to-jax", str(src), str(ours)]) == 0
    assert (ours / "state").is_dir()
    assert convert_main(["jax-to-hf", str(ours), str(back), "--max-shard-size", "20KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (back / "model.safetensors.index.json").exists()  # small shards force the sharded layout
    _assert_bit_exact(_read_hf(back), _state(src))
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == "monet" and config["torch_dtype"] == dtype
    assert config["moe_decompose"] == decompose


def test_from_pretrained_save_pretrained_round_trip(reference_checkpoint, tmp_path):
    src, ref = reference_checkpoint("bin", dtype="bfloat16", moe_groups=3, num_hidden_layers=5)
    model = MonetForCausalLM.from_pretrained(src)
    out = model.save_pretrained(tmp_path / "hf")
    _assert_bit_exact(_read_hf(out), _state(src))


def test_exported_checkpoint_loads_into_pytorch_reference(reference_checkpoint, tmp_path):
    """What we write is what the PyTorch model expects: strict key/shape match and equal logits."""
    src, _ = reference_checkpoint(moe_decompose="horizontal", seed=2)
    model = MonetForCausalLM.from_pretrained(src)
    exported = model.save_pretrained(tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    ref = ReferenceMonet(config).eval()
    ref.load_state_dict(_read_hf(exported), strict=True)
    ids = np.arange(20, dtype=np.int32).reshape(2, 10) % 96
    with torch.no_grad():
        want, _ = ref(torch.from_numpy(ids).long())
    np.testing.assert_allclose(np.asarray(model(ids).logits), want.numpy(), atol=1e-4)


def test_orbax_checkpoint_round_trip(reference_checkpoint, tmp_path):
    src, _ = reference_checkpoint(seed=4)
    model = MonetForCausalLM.from_pretrained(src)
    model.save_checkpoint(tmp_path / "ours")
    again = MonetForCausalLM.from_pretrained(tmp_path / "ours")
    for key, value in model.flat_state().items():
        np.testing.assert_array_equal(np.asarray(again.flat_state()[key]), np.asarray(value), err_msg=key)
    ids = np.ones((1, 5), np.int32)
    np.testing.assert_array_equal(np.asarray(again(ids).logits), np.asarray(model(ids).logits))


def test_dense_llama_export_uses_llama_layout(tmp_path):
    from monet_jax import MonetConfig

    cfg = MonetConfig.from_yaml("configs/tiny-dense.yaml")
    out = MonetForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_act"] == "silu"
    assert "model.layers.0.mlp.gate_proj.weight" in _read_hf(out)
    assert not any(k.startswith("moe_") for k in config)


# ---------------------------------------------------------------------------------------------- errors


def _valid(tmp_path, layout="safetensors", **over):
    config = tiny_config(**over)
    ref = randomize(ReferenceMonet(config))
    return write_hf_checkpoint(tmp_path / "src", config, ref.state_dict(), layout), ref.state_dict(), config


def _expect_error(src, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=match) as info:
        from monet_jax.convert import hf

        hf.convert_hf_to_orbax(src, out)
    assert "\n" not in str(info.value)
    assert not out.exists(), "nothing may be half-written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    return str(info.value)


def test_missing_key(tmp_path):
    _, state, config = _valid(tmp_path)
    del state["model.layers.1.moe.u2.bias"]
    src = write_hf_checkpoint(tmp_path / "bad", config, state, "safetensors")
    _expect_error(src, tmp_path, r"missing key model\.layers\.1\.moe\.u2\.bias")


def test_unexpected_key(tmp_path):
    _, state, config = _valid(tmp_path)
    state["model.layers.1.router.w1.weight"] = torch.zeros(32, 32)  # layer 1 reuses layer 0's router
    src = write_hf_checkpoint(tmp_path / "bad", config, state, "bin")
    _expect_error(src, tmp_path, r"unexpected key model\.layers\.1\.router\.w1\.weight")


def test_shape_disagrees_with_config(tmp_path):
    _, state, config = _valid(tmp_path)
    state["model.layers.2.moe.b1"] = torch.zeros(16, 15)
    src = write_hf_checkpoint(tmp_path / "bad", config, state, "safetensors-sharded")
    msg = _expect_error(src, tmp_path, r"model\.layers\.2\.moe\.b1 has shape \[16, 15\]")
    assert "[16, 16]" in msg


def test_truncated_safetensors(tmp_path):
    src, _, _ = _valid(tmp_path)
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    _expect_error(src, tmp_path, "corrupted or truncated safetensors")


def test_truncated_bin(tmp_path):
    src, _, _ = _valid(tmp_path, layout="bin")
    path = src / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    _expect_error(src, tmp_path, "corrupted or truncated PyTorch file")


def test_missing_shard(tmp_path):
    src, _, _ = _valid(tmp_path, layout="safetensors-sharded")
    (src / "model-00002-of-00003.safetensors").unlink()
    _expect_error(src, tmp_path, "shard named in the index is missing")


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-sharded"])
def test_index_or_config_that_is_not_utf8(tmp_path, layout):
    src, _, _ = _valid(tmp_path, layout=layout)
    index = next(src.glob("*.index.json"))
    good = index.read_bytes()
    index.write_bytes(b"\xff\xfe" + good)  # not UTF-8
    _expect_error(src, tmp_path, f"{index.name}: not a valid index file")
    index.write_bytes(good)
    config = src / "config.json"
    config.write_bytes(b'{"model_type": "\xe9"}')
    _expect_error(src, tmp_path, r"config\.json: not a text file \(not valid UTF-8\)")


def test_unsupported_model_type(tmp_path):
    src, _, config = _valid(tmp_path)
    (src / "config.json").write_text(json.dumps({**config, "model_type": "mixtral"}))
    _expect_error(src, tmp_path, "unsupported model_type 'mixtral'")


def test_no_weights(tmp_path):
    src, _, _ = _valid(tmp_path)
    (src / "model.safetensors").unlink()
    _expect_error(src, tmp_path, "no weights found")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    _, state, config = _valid(tmp_path)
    sentinel = tmp_path / "pwned"
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    torch.save({**state, "model.norm.weight": _Payload(sentinel)}, src / "pytorch_model.bin")
    _expect_error(src, tmp_path, "refusing to load")
    assert not sentinel.exists()


def test_output_directory_is_not_clobbered(tmp_path, capsys):
    src, _, _ = _valid(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_main(["hf-to-jax", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("monet-convert: error:") and "not empty" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "mine"
    assert convert_main(["hf-to-jax", str(src), str(out), "--overwrite"]) == 0
    assert (out / "state").is_dir() and not (out / "keep.txt").exists()


def test_jax_to_hf_rejects_hf_directory(tmp_path, capsys):
    src, _, _ = _valid(tmp_path)
    assert convert_main(["jax-to-hf", str(src), str(tmp_path / "x")]) == 2
    assert "not a monet-jax checkpoint" in capsys.readouterr().err
    shutil.rmtree(src)

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight CPU devices, so meshes like 2x2x2 run here; single-device code keeps using device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".jax_cache"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The tests against the PyTorch reference need torch. The newest-jax run (Python 3.12+, where torch is a
# multi-GB CUDA download) installs the project without it; there those files are not collected, and the
# header says so.
HAS_TORCH = importlib.util.find_spec("torch") is not None
collect_ignore = [] if HAS_TORCH else ["test_convert.py", "test_parity.py"]


def pytest_report_header(config):
    return None if HAS_TORCH else "torch not installed: tests/test_convert.py and tests/test_parity.py not collected"


LAYOUTS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")


def tiny_config(**over) -> dict:
    """A Hugging Face config.json dict for a tiny random Monet."""
    c = dict(model_type="monet", architectures=["MonetForCausalLM"], vocab_size=96, hidden_size=32,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="relu2",
             moe_dim=6, moe_heads=2, moe_experts=16, moe_topk=3, moe_groups=2, moe_decompose="vertical",
             torch_dtype="float32", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
             transformers_version="4.46.0", use_cache=True)
    c.update(over)
    return c


def write_hf_checkpoint(directory: Path, config: dict, state: dict, layout: str) -> Path:
    """Write ``state`` (name -> torch tensor) the way Hugging Face does, in one of LAYOUTS."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if layout == "safetensors":
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif layout in ("safetensors-sharded", "bin-sharded"):
        keys = list(state)
        parts = [keys[i::3] for i in range(3)]
        ext = "safetensors" if layout.startswith("safetensors") else "bin"
        prefix = "model" if ext == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(parts):
            name = f"{prefix}-{i + 1:05d}-of-00003.{ext}"
            shard = {k: state[k] for k in part}
            if ext == "safetensors":
                save_file(shard, str(directory / name), metadata={"format": "pt"})
            else:
                torch.save(shard, directory / name)
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / f"{prefix}.{ext}.index.json").write_text(json.dumps(index))
    else:
        raise ValueError(layout)
    return directory


@pytest.fixture
def reference_checkpoint(tmp_path):
    """Factory: (config overrides, layout, dtype) -> (directory, float32 reference model)."""
    torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch")

    from tests.torch_reference import ReferenceMonet, randomize

    def make(layout="safetensors", dtype="float32", seed=0, **over):
        config = tiny_config(torch_dtype=dtype, **over)
        ref = randomize(ReferenceMonet(config), seed).eval()
        tdtype = getattr(torch, dtype)
        state = {k: (v.to(tdtype) if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
        directory = write_hf_checkpoint(tmp_path / f"hf-{layout}-{dtype}-{seed}", config, state, layout)
        # The reference computes in float32 from exactly the weights that were written.
        ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return directory, ref

    return make


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium page per test module (the atlas's and the lab's page tests); skipped without one."""
    from monet_jax.experts.viewer import find_chromium

    pytest.importorskip("websocket", reason="websocket-client not installed (pip install -e '.[test]')")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not installed (apt-get install chromium)")
    from tests.browser import Browser

    b = Browser(chromium)
    yield b
    b.close()

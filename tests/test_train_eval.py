"""The default training job and the perplexity evaluation, on a short run."""

import json
import re

import numpy as np

from monet_jax import MonetForCausalLM
from monet_jax.eval.main import main as eval_main
from monet_jax.train.config import TrainConfig
from monet_jax.train.main import main as train_main
from monet_jax.train.main import run


def test_short_training_run_lowers_loss_and_checkpoints(tmp_path, capsys):
    cfg = TrainConfig.load(None, [f"out_dir={tmp_path}", "optim.steps=25", "optim.warmup_steps=5",
                                  "data.batch_size=8", "data.seq_len=64", "eval_every=25", "eval_batches=2"])
    summary = run(cfg)
    log = capsys.readouterr()  # not a terminal: plain lines at each log step, no progress-bar redraws
    assert "\r" not in log.out + log.err
    assert re.search(r"^step 25/25  loss \d+\.\d{3}  aux ", log.out, flags=re.M), log.out
    assert summary["final_train_loss"] < summary["first_train_loss"] - 1.0
    assert np.isfinite(summary["final_val_loss"])
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 25
    assert TrainConfig.load([tmp_path / "config.yaml"], []) == cfg  # the resolved config beside the checkpoints
    model = MonetForCausalLM.from_pretrained(tmp_path / "checkpoint")
    norm = model.model.layers[0].router.norm1
    assert int(norm.num_batches_tracked[...]) == 25  # BatchNorm running statistics were trained
    assert not np.allclose(np.asarray(norm.running_var[...]), 1.0)
    assert eval_main(["perplexity", str(tmp_path / "checkpoint"), "--max-batches", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split("ppl ")[1].split()[0])
    assert 1.0 < ppl < 256.0  # better than uniform over bytes


def test_train_cli_errors_are_one_line(capsys):
    assert train_main(["optim.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "monet-train: error: unknown config key 'optim.stepz' (did you mean 'optim.steps'?)"
    assert train_main(["data.seq_len=4096"]) == 2
    assert "exceeds model.max_position_embeddings" in capsys.readouterr().err

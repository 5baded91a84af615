"""benchmarks/published_size_pipeline.py end to end at tiny size, so the benchmark cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about a minute of subprocesses; each step it runs has its own fast test
def test_pipeline_runs_every_step_at_tiny_size(tmp_path):
    work = tmp_path / "pipe"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "published_size_pipeline.py"), "--config",
           str(ROOT / "configs" / "tiny-vd.yaml"), "--set", "vocab_size=259", "--work", str(work),
           "--domains", "biology,history", "--domain-tokens", "150", "--examples", "2", "--corpus-tokens", "200",
           "--ppl-tokens", "150", "--new-tokens", "4", "--forward-tokens", "16", "--atlas-experts", "8",
           "--reps", "1"]
    proc = subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    names = [s["step"] for s in results["steps"]]
    assert names == ["write HF dir (random bf16)", "convert hf-to-jax", "perplexity", "generate b1 (HF dir)",
                     "generate b1 (converted)", "select-domain 1x", "select-domain 4x", "tasks (no mask)",
                     "tasks --mask biology", "tasks --mask history", "select-correlated", "atlas",
                     "monet-jax forward + generate"]
    for s in results["steps"]:
        assert s["rc"] == 0 and s["seconds"] > 0 and 0.05 < s["peak_rss_gib"] < 8, s
    # the HF directory holds bfloat16 safetensors, as published; each step did its work
    config = json.loads((work / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["moe_experts"] == 32
    for mult in (1, 4):
        assert {p.name for p in (work / f"masks{mult}").glob("*.json")} == {"biology.json", "history.json"}
    assert "tokens 1" in results["steps"][2]["output"]  # perplexity over up to 150 tokens
    assert (work / "correlated.json").is_file() and (work / "atlas" / "index.html").is_file()
    tasks_out = results["steps"][8]["output"]
    assert "biology.tasks.jsonl: acc" in tasks_out and "history.tasks.jsonl: acc" in tasks_out
    summary = results["summary"]
    assert len(summary["select-domain peak RSS GiB (1x, 4x corpus)"]) == 2
    assert summary["monet-jax forward s"] > 0 and len(json.loads((work / "jax.json").read_text())["tokens"]) == 4
    assert "| step | wall s | peak RSS GiB | result |" in proc.stdout

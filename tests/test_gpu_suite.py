"""The GPU suite's script on a CPU: it imports, plans its runs, turns its children's output into rows, and
(slow) runs every part at tiny sizes."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_kernels import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def test_help_and_dry_run(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--help"])
    assert e.value.code == 0 and "8 minutes" in capsys.readouterr().out
    assert gpu_suite.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[train vd+dense, 190 s", "[train hd, 100 s", "[mixing vd, 40 s",
                                                      "[mixing hd, 40 s", "[decode vd, 90 s", "[check check, 20 s"]
    assert "configs/train-h100.yaml --baseline" in lines[0] and "llama-1.3b.yaml" in lines[0]
    assert sum(gpu_suite.LIMITS.values()) <= 8 * 60
    assert gpu_suite.main(["--parts", "train,gemm"]) == 2


def test_rows_from_the_benchmarks_output(tmp_path):
    (tmp_path / "vd.json").write_text(json.dumps([
        {"model": "monet-vertical", "params": 1.465e9, "batch": 8, "seq_len": 2048, "step_seconds": 0.5,
         "tokens_per_second": 32768.0, "mfu": 0.29, "peak_memory_gib": 41.0},
        {"model": "dense", "params": 1.289e9, "batch": 8, "seq_len": 2048, "step_seconds": 0.4,
         "tokens_per_second": 40960.0, "mfu": None, "peak_memory_gib": None}]))
    rows = gpu_suite.rows_of("train", "vd+dense", 0, "step time ratio monet/dense: 1.250  (model FLOP ratio 1.116)",
                             tmp_path)
    assert rows == ["| train | monet-vertical 1,465M, 8 x 2048 | step 500.0 ms, 32,768 tokens/s, MFU 29.0%, "
                    "peak 41.0 GiB |",
                    "| train | dense 1,289M, 8 x 2048 | step 400.0 ms, 40,960 tokens/s, MFU n/a, peak n/a |",
                    "| train | vd+dense ratio | Monet / dense step 1.250 (model FLOPs 1.116) |"]
    text = "| op | forward error |\n|---|---|\n| router | 1.0e-03 | 2.0e-03 | 0.1 / 0.2 (2.00x) | 0.3 / 0.6 (2.00x) |"
    assert gpu_suite.rows_of("mixing", "vd", 0, text, tmp_path) == [
        "| mixing | vd router | errors 1.0e-03 / 2.0e-03; fwd 0.1 / 0.2 (2.00x); fwd+bwd 0.3 / 0.6 (2.00x) |"]
    text = "  auto -> xla    batch   1:     900.0 tok/s per sequence      900.0 in all | weights 2,800 MB a step"
    assert gpu_suite.rows_of("decode", "vd", 0, text, tmp_path) == [
        "| decode | vd auto -> xla batch 1 | 900.0 tok/s per sequence      900.0 in all | weights 2,800 MB a step |"]
    assert gpu_suite.rows_of("decode", "vd", 124, "x\n(stopped after 120 s)", tmp_path) == [
        "| decode | vd | failed (exit 124): (stopped after 120 s) |"]


@pytest.mark.slow
def test_tiny_suite_runs_every_part_on_a_cpu():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a GPU host has one GPU
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny"], capture_output=True,
                         text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert "failed" not in out.stdout
    assert [r.split(" | ")[0] for r in rows].count("| decode") == 6 and any("check tiny VD step" in r for r in rows)

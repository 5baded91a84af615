"""The three-domain corpus and the expert-deletion demo's plumbing (a few training steps)."""

import json

import numpy as np

from monet_jax.data.domains import demo_domains
from monet_jax.experts.demo import run_demo, table
from monet_jax.experts.mask import ExpertMask


def test_domains_are_distinct_and_deterministic():
    a, b = demo_domains(5000, seed=1), demo_domains(5000, seed=1)
    assert a == b and set(a) == {"english", "python", "arithmetic"}
    for docs in a.values():
        assert sum(map(len, docs)) >= 5000 - max(map(len, docs))
    assert all("def " in d or "class " in d for d in a["python"])
    for doc in a["arithmetic"]:
        for line in doc.splitlines():
            lhs, rhs = line.split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307
    assert all(d.endswith(".") for d in a["english"][:-1] if len(d) > 200)


def test_table_ratio():
    result = {"losses": {"None": {"a": 1.0, "b": 2.0, "c": 3.0}, "a": {"a": 1.9, "b": 2.1, "c": 3.1}},
              "deleted": {"a": [3, 4]}, "experts_per_group": 64}
    lines = table(result).splitlines()
    assert lines[2] == "| none | 1.000 | 2.000 | 3.000 | |"
    assert lines[3] == "| a (3, 4 of 64 per group) | 1.900 (+0.900) | 2.100 (+0.100) | 3.100 (+0.100) | 9.0x |"


def test_demo_runs_end_to_end_on_a_short_training(tmp_path, capsys):
    r = run_demo(tmp_path, ["optim.steps=4", "optim.warmup_steps=1", "data.batch_size=8", "data.seq_len=64",
                            "eval_every=1000"], chars=4000, eval_tokens=600, seq_len=64)
    assert set(r["losses"]) == {"None", "english", "python", "arithmetic"}
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["deleted"] == r["deleted"]
    masks = {n: ExpertMask.load(tmp_path / "masks" / f"{n}.json") for n in r["deleted"]}
    for name, m in masks.items():
        assert [int(g.size) for g in m.groups] == r["deleted"][name] and m.meta["domain"] == name
    for g in range(2):  # the 2x rule cannot give one expert to two domains
        sets = [set(m.groups[g].tolist()) for m in masks.values()]
        assert sum(map(len, sets)) == len(set().union(*sets))
    assert np.isfinite([v for row in r["losses"].values() for v in row.values()]).all()
    assert "| experts deleted |" in capsys.readouterr().out

"""The three-domain corpus and the expert-deletion demo's plumbing (a few training steps)."""

import json

import numpy as np

from monet_jax.data.domains import demo_domains
from monet_jax.eval.deletion_demo import robust, run_seeds, spread, table
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


def _result(seed, rise):
    """A demo result whose deletion of domain d raises domain n's loss by ``rise[d][n]``."""
    base = {"a": 1.0, "b": 2.0, "c": 3.0}
    losses = {"None": base, **{d: {n: base[n] + r for n, r in row.items()} for d, row in rise.items()}}
    return {"seed": seed, "losses": losses, "deleted": {d: [1, 1] for d in rise}, "experts_per_group": 64}


def test_spread_over_seeds_and_robustness_bar():
    r0 = _result(0, {"a": {"a": 0.30, "b": 0.02, "c": 0.04}, "b": {"a": 0.0, "b": 0.04, "c": 0.0}})
    r1 = _result(1, {"a": {"a": 0.10, "b": 0.01, "c": 0.05}, "b": {"a": 0.0, "b": 0.20, "c": 0.1}})
    lines = spread([r0, r1]).splitlines()
    assert lines[2] == "| a | +0.100 / +0.200 / +0.300 | +0.030 / +0.030 / +0.030 | 2 of 2 |"
    # b: +0.04 is under the 0.05 floor; +0.20 against a 0.05 mean rise of the others is 4x: one seed of two
    assert lines[3] == "| b | +0.040 / +0.120 / +0.200 | +0.000 / +0.025 / +0.050 | 1 of 2 |"
    assert robust(0.06, 0.02) and not robust(0.06, 0.021) and not robust(0.049, -1.0)


def test_demo_runs_end_to_end_on_a_short_training(tmp_path, capsys, monkeypatch):
    steps = ["optim.steps=4", "optim.warmup_steps=1", "data.batch_size=8", "data.seq_len=64", "eval_every=1000"]
    kw = dict(chars=4000, eval_tokens=600, seq_len=64)
    results = run_seeds(tmp_path, steps, (3, 4), **kw)
    assert [r["seed"] for r in results] == [3, 4]
    assert results[0]["losses"] != results[1]["losses"]  # another corpus sample and initialization
    assert (tmp_path / "seed4" / "demo.json").exists()
    assert (tmp_path / "spread.md").read_text().count(" of 2 |") == 3
    tmp_path = tmp_path / "seed3"
    r = results[0]
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

    # --resume: the same settings read every seed back; another ratio reselects without training again.
    import monet_jax.train.main

    def no_training(cfg):
        raise AssertionError("trained again")

    monkeypatch.setattr(monet_jax.train.main, "run", no_training)
    root = tmp_path.parent
    assert run_seeds(root, steps, (3, 4), resume=True, **kw) == results
    assert capsys.readouterr().out.count("finished earlier") == 2
    other = run_seeds(root, steps, (3, 4), resume=True, ratio=1.2, **kw)
    assert capsys.readouterr().out.count("trained earlier") == 2
    assert [o["losses"]["None"] for o in other] == [r["losses"]["None"] for r in results]
    assert all(sum(o["deleted"][d]) >= sum(r["deleted"][d]) for o, r in zip(other, results, strict=True)
               for d in r["deleted"])


def test_finished_reads_back_only_results_made_with_the_same_settings(tmp_path):
    from monet_jax.eval.deletion_demo import _settings, finished

    settings = _settings(["optim.steps=4"], 500, 0.15, 1.75, 128, None, 0)
    result = {**_result(0, {"a": {"a": 0.3, "b": 0.0, "c": 0.0}}), "settings": settings}
    (tmp_path / "demo.json").write_text(json.dumps(result))
    assert finished(tmp_path, json.loads(json.dumps(settings))) == result
    assert finished(tmp_path, {**settings, "overrides": ["optim.steps=8"]}) is None
    assert finished(tmp_path, {**settings, "ratio": 2.0}) is None
    (tmp_path / "demo.json").write_text("{")  # half-written: run again
    assert finished(tmp_path, settings) is None
    assert finished(tmp_path / "missing", settings) is None

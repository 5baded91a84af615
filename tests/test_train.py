"""Training at scale, on 8 simulated CPU devices: meshes, resumption, objective, optimizer, policies."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monet_jax import MonetForCausalLM, sharding
from monet_jax.config import ConfigError
from monet_jax.data.pipeline import make_iterator
from monet_jax.kernels.reference import aux_from_sums
from monet_jax.model.router import aux_losses
from monet_jax.train import metrics as M
from monet_jax.train.checkpoint import TrainCheckpoints
from monet_jax.train.config import TrainConfig
from monet_jax.train.main import NonFiniteLoss, run
from monet_jax.train.main import main as train_main
from monet_jax.train.optimizer import decays, is_router, learning_rate_schedule
from monet_jax.train.step import global_batch, init_state, make_train_step

TINY = ["model.hidden_size=32", "model.num_hidden_layers=4", "model.num_attention_heads=4",
        "model.num_key_value_heads=2", "model.moe_experts=16", "model.moe_dim=4", "model.moe_heads=2",
        "model.moe_topk=3", "model.moe_groups=2", "model.max_position_embeddings=64", "model.vocab_size=300",
        "data.seq_len=16", "data.batch_size=8", "optim.warmup_steps=1", "eval_every=1000", "eval_batches=1",
        "metrics.log_every=1", "metrics.tensorboard=false"]


def tiny(*over) -> TrainConfig:
    return TrainConfig.load(None, [*TINY, *over])


def random_batch(cfg: TrainConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    ids = rng.integers(3, cfg.model.vocab_size, size=(b, t + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, t), np.float32),
            "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def host(tree):
    return jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), tree)


def max_diff(a, b) -> float:
    return max((float(np.max(np.abs(x - y))) if x.size else 0.0) for x, y in
               zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True))


def train_steps(cfg: TrainConfig, mesh_shape, steps: int = 2):
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:math.prod(mesh_shape)])
    ts = init_state(cfg, mesh)
    step = make_train_step(ts, cfg)
    state, metrics = ts.state, []
    for i in range(steps):
        state, m = step(state, global_batch(random_batch(cfg, i), mesh))
        metrics.append(host(m))
    return ts, state, metrics


# -- meshes -----------------------------------------------------------------------------------------
def test_same_losses_gradients_and_batchnorm_on_every_mesh():
    cfg = tiny("optim.learning_rate=1e-2")
    results = {shape: train_steps(cfg, shape, steps=3) for shape in [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]}
    _, ref_state, ref_metrics = results[(1, 1, 1)]
    for shape, (ts, state, metrics) in results.items():
        for m, r in zip(metrics, ref_metrics):
            assert abs(m["loss"] - r["loss"]) < 1e-5 and abs(m["grad_norm"] - r["grad_norm"]) < 1e-5 * r["grad_norm"]
        # Parameters after three updates agree, so the gradients did; BatchNorm statistics are global.
        assert max_diff(state, ref_state) < 2e-5, shape
        model, _ = nnx.merge(ts.graphdef, state)
        ref_model, _ = nnx.merge(ts.graphdef, ref_state)
        r, rr = model.model.layers[2].router.norm1, ref_model.model.layers[2].router.norm1
        np.testing.assert_allclose(np.asarray(r.running_mean[...]), np.asarray(rr.running_mean[...]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(r.running_var[...]), np.asarray(rr.running_var[...]), rtol=1e-5)
        assert int(r.num_batches_tracked[...]) == 3
    # The sharded meshes really shard: the expert MLP is split over tensor, the embedding dim over fsdp.
    ts, state, _ = results[(1, 4, 2)]
    model, _ = nnx.merge(ts.graphdef, state)
    assert model.model.layers[0].moe.u1.kernel[...].sharding.spec == jax.P("fsdp", "tensor")
    assert model.model.layers[0].moe.v11.kernel[...].sharding.spec == jax.P("tensor", "fsdp")
    assert model.model.layers[0].router.w1.kernel[...].sharding.spec == jax.P("fsdp", "tensor")


def test_eager_initialisation_on_one_gpu_matches_the_jitted_one(monkeypatch):
    """The op-by-op initialisation (one GPU) gives the jitted one's weights (to the last bits), dtypes and
    placement, so a training step runs from it; CPU meshes keep the jitted one."""
    from monet_jax.train import step as step_mod

    cfg = tiny()
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
    assert not step_mod.eager_init(mesh)
    jitted = init_state(cfg, mesh)
    monkeypatch.setattr(step_mod, "eager_init", lambda mesh: True)
    eager = init_state(cfg, mesh)
    assert jax.tree.structure(eager.state) == jax.tree.structure(jitted.state)
    for a, b in zip(jax.tree.leaves(eager.state), jax.tree.leaves(jitted.state), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-7)
    _, m = make_train_step(eager, cfg)(eager.state, global_batch(random_batch(cfg), mesh))
    assert np.isfinite(float(m["loss"]))


def test_logical_rules_replicate_what_does_not_divide():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    assert sharding.logical_to_spec(("embed", "expert_mlp"), (32, 64), mesh) == jax.P("fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "expert_mlp"), (31, 63), mesh) == jax.P(None, None)
    assert sharding.logical_to_spec(("batch", "seq"), (8, 16), mesh) == jax.P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", "seq"), (2, 16), mesh) == jax.P("data", None)
    with pytest.raises(ConfigError, match="needs 12 devices, have 8"):
        sharding.make_mesh(sharding.MeshConfig(3, 2, 2))
    with pytest.raises(ConfigError, match="does not divide 8 devices"):
        sharding.make_mesh(sharding.MeshConfig(-1, 3, 1))


def test_batchnorm_statistics_are_global_when_the_batch_is_sharded():
    """Per-head mean/variance over a batch split across 8 devices equals the single-device statistics."""
    cfg = tiny()
    model = MonetForCausalLM(cfg.model, rngs=nnx.Rngs(0))
    model.train()
    x = jax.random.normal(jax.random.key(1), (8, 16, cfg.model.hidden_size))
    router = model.model.layers[0].router
    reference = nnx.clone(router)
    g1, _ = reference(x)
    want_mean = np.asarray(reference.norm1.running_mean[...])
    assert np.abs(want_mean).max() > 0  # the statistics moved
    mesh = sharding.make_mesh(sharding.MeshConfig(8, 1, 1))

    @nnx.jit
    def sharded(r, x):
        return r(jax.lax.with_sharding_constraint(x, jax.NamedSharding(mesh, jax.P("data"))))

    with sharding.activate(mesh):
        g1_sharded, _ = sharded(router, jax.device_put(x, jax.NamedSharding(mesh, jax.P("data"))))
    np.testing.assert_allclose(np.asarray(router.norm1.running_mean[...]), want_mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g1_sharded), np.asarray(g1), atol=1e-6)


# -- objective --------------------------------------------------------------------------------------
def test_aux_losses_match_numpy():
    rng = np.random.default_rng(0)
    b, t, h, e = 3, 5, 2, 8
    logits = rng.normal(size=(2, b, t, h, e))
    keep = rng.random(size=logits.shape) < 0.4
    keep[..., 0] = True
    g = np.where(keep, np.exp(logits), 0.0)
    g = g / g.sum(-1, keepdims=True)
    g1, g2 = g
    # DESIGN section 1, written out with loops.
    unif = amb = 0.0
    for gg in (g1, g2):
        for hh in range(h):
            unif -= sum(np.log(gg[:, :, hh, i].mean() + 1e-10) / e for i in range(e)) / (2 * h)
            amb += np.mean(1 - gg[:, :, hh, :].max(-1)) / (2 * h)
    got_unif, got_amb = aux_losses(jnp.asarray(g1, jnp.float32), jnp.asarray(g2, jnp.float32))
    assert abs(float(got_unif) - unif) < 1e-4 * abs(unif)
    assert abs(float(got_amb) - amb) < 1e-5


def test_grad_accumulation_equals_the_full_batch():
    """With routing fixed (frozen routers) and no aux loss, 4 microbatches give the full batch's update."""
    common = ("freeze_routers=true", "aux_loss_coef=0", "optim.learning_rate=1e-2")
    _, full, m_full = train_steps(tiny(*common), (2, 1, 1))
    _, accum, m_acc = train_steps(tiny(*common, "optim.grad_accum=4"), (2, 1, 1))
    assert abs(m_full[-1]["ce"] - m_acc[-1]["ce"]) < 1e-5
    assert abs(m_full[-1]["grad_norm"] - m_acc[-1]["grad_norm"]) < 1e-5 * m_full[-1]["grad_norm"]
    assert max_diff(full, accum) < 1e-5


def test_frozen_routers_keep_weights_and_statistics():
    cfg = tiny("freeze_routers=true", "optim.learning_rate=1e-2")
    ts, state, _ = train_steps(cfg, (1, 1, 1), steps=2)
    start, _ = nnx.merge(ts.graphdef, init_state(cfg, ts.mesh).state)
    after, _ = nnx.merge(ts.graphdef, state)
    r0, r1 = start.model.layers[0].router, after.model.layers[0].router
    np.testing.assert_array_equal(np.asarray(r0.w1.kernel[...]), np.asarray(r1.w1.kernel[...]))
    np.testing.assert_array_equal(np.asarray(r0.norm2.running_var[...]), np.asarray(r1.norm2.running_var[...]))
    assert not np.allclose(np.asarray(start.model.layers[0].moe.u1.kernel[...]),
                           np.asarray(after.model.layers[0].moe.u1.kernel[...]))


@pytest.mark.parametrize("over", [("model.remat=layer",), ("model.remat=group",), ("model.scan_groups=true",),
                                  ("model.scan_groups=true", "model.remat=group"),
                                  ("model.scan_groups=true", "model.remat=layer")])
def test_remat_and_scan_do_not_change_training(over):
    cfg = tiny("optim.learning_rate=1e-2")
    _, ref, m_ref = train_steps(cfg, (1, 1, 1))
    _, got, m_got = train_steps(tiny("optim.learning_rate=1e-2", *over), (1, 1, 1))
    assert abs(m_ref[-1]["loss"] - m_got[-1]["loss"]) < 1e-5
    np.testing.assert_allclose(m_got[-1]["expert_usage"], m_ref[-1]["expert_usage"])
    assert max_diff(ref, got) < 1e-5


# -- optimizer --------------------------------------------------------------------------------------
def test_weight_decay_and_freezing_select_the_right_parameters():
    model = MonetForCausalLM.abstract(tiny().model)
    paths = {".".join(map(str, p)): p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    decayed = {k for k, p in paths.items() if decays(p)}
    assert "model.layers.0.moe.u1.kernel" in decayed and "model.embed_tokens.embedding" in decayed
    assert "lm_head.kernel" in decayed
    for k in ("model.layers.0.moe.u1.bias", "model.layers.0.moe.b1", "model.norm.weight",
              "model.layers.1.input_layernorm.weight"):
        assert k in paths and k not in decayed
    routers = {k for k, p in paths.items() if is_router(p)}
    assert routers == {f"model.layers.{i}.router.w{j}.kernel" for i in (0, 2) for j in (1, 2)}


def test_schedules():
    cos = learning_rate_schedule(tiny("optim.steps=100", "optim.warmup_steps=10", "optim.learning_rate=1.0").optim)
    assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 1.0) < 1e-6 and abs(float(cos(100)) - 0.1) < 1e-6
    assert abs(float(cos(55)) - (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))) < 1e-6
    wsd = learning_rate_schedule(tiny("optim.steps=100", "optim.warmup_steps=10", "optim.learning_rate=1.0",
                                      "optim.schedule=wsd", "optim.decay_fraction=0.2").optim)
    assert abs(float(wsd(5)) - 0.5) < 1e-6 and float(wsd(50)) == 1.0 and float(wsd(80)) == 1.0
    assert abs(float(wsd(90)) - 0.55) < 1e-6 and abs(float(wsd(100)) - 0.1) < 1e-6


# -- the training loop ------------------------------------------------------------------------------
def _restore(out_dir, cfg, step):
    mesh = sharding.make_mesh(cfg.mesh)
    ts = init_state(cfg, mesh)
    it = make_iterator(cfg.data, "byte", split="train", seed=cfg.seed)
    ckpts = TrainCheckpoints(out_dir / "checkpoints", cfg.checkpoint)
    state, meta = ckpts.restore(step, ts.abstract(), it)
    ckpts.close()
    return state, next(it)


def test_resume_is_exact_and_crosses_meshes(tmp_path):
    base = ("optim.steps=6", "optim.learning_rate=1e-2", "checkpoint.every=2")
    straight = tiny(*base, f"out_dir={tmp_path / 'a'}", "mesh.data=-1")
    run(straight)
    # Preempted after step 3 on the same mesh, resumed to 6: bit-identical.
    resumed = tiny(*base, f"out_dir={tmp_path / 'b'}", "mesh.data=-1")
    assert run(resumed, stop_at=3) == {"stopped_at": 3}
    assert TrainCheckpoints(tmp_path / "b" / "checkpoints", resumed.checkpoint).steps()[-1] == 3
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    summary = run(resumed)
    assert summary["resumed_from"] == 3
    want_state, want_next = _restore(tmp_path / "a", straight, 6)
    got_state, got_next = _restore(tmp_path / "b", resumed, 6)
    assert max_diff(want_state, got_state) == 0.0  # parameters, AdamW moments, BatchNorm stats, step
    for k in want_next:  # and the data iterator continues with the same batch
        np.testing.assert_array_equal(want_next[k], got_next[k])
    # Saved on an 8x1x1 mesh (data parallel, parameters replicated), resumed on 1x4x2 (parameters sharded).
    assert run(tiny(*base, f"out_dir={tmp_path / 'c'}", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")
               )["resumed_from"] == 3
    got_state, _ = _restore(tmp_path / "c", straight, 6)
    assert max_diff(want_state, got_state) < 1e-5


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    cfg = tiny("optim.steps=4", "checkpoint.every=2", "checkpoint.async_save=false", f"out_dir={tmp_path}")
    run(cfg)
    ckdir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["2", "4"]
    for f in (ckdir / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files
            f.write_bytes(b"")
    mesh = sharding.make_mesh(cfg.mesh)
    ts = init_state(cfg, mesh)
    it = make_iterator(cfg.data, "byte", split="train", seed=cfg.seed)
    ckpts = TrainCheckpoints(ckdir, cfg.checkpoint)
    with pytest.warns(UserWarning, match="checkpoint step 4 .* could not be restored"):
        step, state, meta = ckpts.restore_latest(ts.abstract(), it)
    ckpts.close()
    assert step == 2 and meta["step"] == 2
    assert (ckdir / "4.corrupt").is_dir() and not (ckdir / "4").exists()
    model, opt = nnx.merge(ts.graphdef, state)
    assert int(opt.step[...]) == 2


def test_non_finite_loss_policies(tmp_path, capsys):
    blowup = ("optim.learning_rate=1e30", "optim.warmup_steps=0", "optim.clip_norm=1e30", "optim.steps=4",
              "optim.weight_decay=0")
    with pytest.raises(NonFiniteLoss, match="at step 2 "):
        run(tiny(*blowup, "nan_policy=stop", f"out_dir={tmp_path / 'stop'}"))
    summary = run(tiny(*blowup, "nan_policy=skip", f"out_dir={tmp_path / 'skip'}"))
    assert summary["skipped_steps"] == 3
    captured = capsys.readouterr()
    assert "step 2: non-finite loss or gradient, update skipped" in captured.out + captured.err


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files, read as raw TFRecords (length, crc, payload, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_training_writes_tensorboard_events(tmp_path):
    run(tiny("optim.steps=3", "metrics.tensorboard=true", f"out_dir={tmp_path}"))
    scalars = read_scalars(tmp_path / "tensorboard")
    assert {"loss", "ce", "unif", "amb", "grad_norm", "lr", "tokens_per_second", "val/ce",
            "expert_usage/group0", "expert_usage/group1"} <= set(scalars)
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    assert scalars["lr"][0][1] == 0.0 and scalars["lr"][1][1] > 0  # warmup starts at zero
    assert all(0 < u <= 1 for _, u in scalars["expert_usage/group0"])


def test_model_flops_agree_with_the_compiler():
    """The FLOP model behind MFU, against XLA's own count of the forward pass (dense and Monet)."""
    for over in ((), ("model.moe_decompose=none", "model.intermediate_size=96", "model.hidden_act=silu")):
        cfg = tiny(*over, "model.vocab_size=512", "model.hidden_size=64", "model.moe_experts=32",
                   "model.moe_dim=8", "data.seq_len=64")
        model = MonetForCausalLM(cfg.model, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        ids = jnp.zeros((2, 64), jnp.int32)
        forward = jax.jit(lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x).logits)
        cost = forward.lower(state, ids).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        # XLA computes the full T x T score matrix; the model counts the causal half.
        hd, heads, t = cfg.model.head_size, cfg.model.num_attention_heads, 64
        full_attention_extra = cfg.model.num_hidden_layers * heads * hd * t
        ours = 2 * 2 * 64 * (M.forward_macs_per_token(cfg.model, t) + full_attention_extra)
        assert abs(cost["flops"] - ours) / ours < 0.08, (over, cost["flops"], ours)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    cases = [
        (["data.batch_size=6", "mesh.data=4", "mesh.fsdp=2"], "not divisible by the data-parallel mesh size 8"),
        (["data.tokenizer=" + str(tmp_path / "missing" / "tokenizer.json")], "missing"),
        (["data.path=" + str(tmp_path / "empty.txt")], "empty.txt"),
        (["data.path=" + str(tmp_path / "short.txt")], "too short"),
        (["mesh.tensor=3"], "does not divide 8 devices"),
    ]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("just a few words\n\nand a second short document\n")
    for over, needle in cases:
        assert train_main([*TINY, f"out_dir={tmp_path / 'run'}", *over]) == 2, over
        err = capsys.readouterr().err.strip()
        assert err.startswith("monet-train: error:") and "\n" not in err and needle in err, (over, err)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_init_from_a_checkpoint_starts_from_its_weights(tmp_path):
    cfg = tiny()
    source = MonetForCausalLM(cfg.model, rngs=nnx.Rngs(7))
    source.save_checkpoint(tmp_path / "pretrained")
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    ts = init_state(tiny(f"init_from={tmp_path / 'pretrained'}", "model.remat=layer"), mesh)
    model, opt = ts.modules()
    assert model.config.remat == "layer"  # the run's policy, not the checkpoint's defaults
    want = source.flat_state()
    for k, v in model.flat_state().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k]))
    assert int(opt.step[...]) == 0
    with pytest.raises(ValueError, match="differs from model.* in .*hidden_size"):
        init_state(tiny(f"init_from={tmp_path / 'pretrained'}", "model.hidden_size=64"), mesh)
    assert json.loads((tmp_path / "pretrained" / "config.json").read_text())["hidden_size"] == 32


def test_rerunning_a_finished_or_different_run(tmp_path, capsys):
    cfg = tiny("optim.steps=2", f"out_dir={tmp_path}")
    run(cfg)
    assert run(cfg) == {"already_done": 2}
    assert "already holds step 2 of optim.steps=2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds checkpoints of a different run .*model"):
        run(tiny("optim.steps=4", "model.hidden_size=64", f"out_dir={tmp_path}"))
    assert (tmp_path / "checkpoints" / "2").is_dir()  # a mismatch is not mistaken for corruption
    # readable, but a train state of another structure (routers frozen: no optimizer state for them)
    with pytest.raises(ValueError, match=r"checkpoint step 2 holds a train state of another structure \(.*"
                                         r"opt_state.* is only saved\)"):
        run(tiny("optim.steps=4", "freeze_routers=true", f"out_dir={tmp_path}"))
    # readable, but a data position of another pipeline version
    data = tmp_path / "checkpoints" / "2" / "data" / "process_0.json"
    saved = data.read_text()
    data.write_text(saved.replace('"version": 2', '"version": 1'))
    with pytest.raises(ValueError, match="data iterator state has version 1, expected 2"):
        run(tiny("optim.steps=4", f"out_dir={tmp_path}"))
    # the corpus grew since (the embedded one follows the package's files): a one-line way out
    data.write_text(saved.replace('"documents": ', '"documents": 1', 1))
    with pytest.raises(ValueError, match=r"different pipeline: documents=1\d+ \(now \d+\) \(the data changed since "
                                         r"this checkpoint: use another out_dir, or checkpoint.resume=false"):
        run(tiny("optim.steps=4", f"out_dir={tmp_path}"))
    data.write_text(saved)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # nothing moved or deleted
    summary = run(tiny("optim.steps=3", "model.hidden_size=64", "checkpoint.resume=false", f"out_dir={tmp_path}"))
    assert summary["resumed_from"] == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


def test_dense_aux_probs_reach_unused_experts_and_leave_routing_unchanged():
    """aux_probs=dense: the uniformity loss reads softmax(z) over every expert, so a router column that no
    token routes to still gets a gradient (with the paper's g it gets none); g and the logits are unchanged."""
    cfg = tiny("model.num_hidden_layers=1", "model.moe_groups=1")
    model = MonetForCausalLM(cfg.model, rngs=nnx.Rngs(0))
    model.train()
    router = model.model.layers[0].router
    dead = 5
    kernel = np.array(router.w1.kernel[...]).reshape(cfg.model.hidden_size, cfg.model.moe_heads, -1)
    kernel[:, :, dead] = -5 * np.abs(kernel[:, :, dead])  # with positive inputs: far below every other logit
    router.w1.kernel[...] = jnp.asarray(kernel.reshape(cfg.model.hidden_size, -1))
    x = jnp.abs(jax.random.normal(jax.random.key(0), (2, 8, cfg.model.hidden_size))) + 0.5

    def unif_grad(kind):
        router.aux_probs = kind

        def loss(r):
            g1, g2, sums = r.route(x)[:3]
            return sum(aux_from_sums(u, a, 16)[0] for _, a, u in sums), (g1, g2, sums)

        (unif, out), grads = nnx.value_and_grad(loss, has_aux=True)(router)
        return float(unif), out, np.asarray(grads["w1"]["kernel"][...]).reshape(kernel.shape)

    _, (g1, g2, sums), grad_routed = unif_grad("routed")
    unif_dense, (d1, d2, dsums), grad_dense = unif_grad("dense")
    assert float(jnp.max(g1[..., dead])) == 0.0  # no token routes to the planted expert in any head
    assert np.all(grad_routed[:, :, dead] == 0.0)
    assert np.abs(grad_dense[:, :, dead]).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(g1))
    np.testing.assert_array_equal(np.asarray(d2), np.asarray(g2))
    np.testing.assert_array_equal(np.asarray(dsums[0][0]), np.asarray(sums[0][0]))  # usage still from g
    # the dense sums are the softmax of the raw logits over all experts, summed over tokens
    z = np.asarray(x.reshape(16, -1) @ router.w1.kernel[...]).reshape(16, cfg.model.moe_heads, -1)
    p = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(dsums[0][2]), (p / p.sum(-1, keepdims=True)).sum(0), rtol=1e-5)
    assert 0 < unif_dense < 23


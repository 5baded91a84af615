"""The sharded training state and the jitted train / eval steps.

The state is the NNX state of ``(model, optimizer)``: parameters (float32 master weights), BatchNorm
statistics and the AdamW moments, each sharded by its logical axes. Steps are pure functions of that
state, jitted with explicit in/out shardings and the state donated, so XLA updates it in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from monet_jax import sharding
from monet_jax.model import MonetForCausalLM
from monet_jax.model.router import router_aux
from monet_jax.train.config import TrainConfig
from monet_jax.train.optimizer import make_optimizer

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass
class TrainState:
    """What a step consumes and returns, plus what is needed to rebuild modules from it."""

    graphdef: Any
    state: nnx.State
    shardings: Any  # NamedSharding per leaf of ``state``
    mesh: Mesh

    def modules(self) -> tuple[MonetForCausalLM, nnx.Optimizer]:
        return nnx.merge(self.graphdef, self.state)

    def abstract(self):
        """``ShapeDtypeStruct`` tree with shardings: the restore target for checkpoints."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.state, self.shardings)


def _build(cfg: TrainConfig, model: MonetForCausalLM | None = None):
    model = model if model is not None else MonetForCausalLM(cfg.model, rngs=nnx.Rngs(cfg.seed))
    model.train()
    for layer in model.model.layers:
        if layer.router is not None:
            layer.router.aux_probs = cfg.aux_probs
            if cfg.freeze_routers:  # routing stays exactly as loaded: running statistics only
                layer.router.norm1.use_running_average = layer.router.norm2.use_running_average = True
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.optim, freeze_routers=cfg.freeze_routers), wrt=nnx.Param)
    return model, optimizer


def eager_init(mesh: Mesh) -> bool:
    """Whether a fresh state is initialised op by op rather than by one jitted function: on one GPU, where
    XLA:GPU took over 4 minutes to compile the jitted initialisation of a 1.4B model (an H100, jax 0.11.2).
    Elsewhere the jitted one stays: eager values differ from it in the last bit of some weights, and a seed
    should give the same weights on one device as on many."""
    return mesh.size == 1 and mesh.devices.flat[0].platform == "gpu"


def init_state(cfg: TrainConfig, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> TrainState:
    """A fresh (or ``init_from``) state, created directly in its sharded layout."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build(cfg)))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    if cfg.init_from is None and eager_init(mesh):
        state = jax.device_put(nnx.split(_build(cfg))[1], shardings)
    elif cfg.init_from is None:
        with sharding.activate(mesh, rules):
            state = jax.jit(lambda: nnx.split(_build(cfg))[1], out_shardings=shardings)()
    else:
        pretrained = MonetForCausalLM.from_pretrained(cfg.init_from, param_dtype=cfg.model.param_dtype)
        have, want = pretrained.config.architecture(), cfg.model.architecture()
        if have != want:
            diff = sorted(k for k in want if have[k] != want[k])
            raise ValueError(f"init_from {cfg.init_from}: its config.json differs from model.* in {', '.join(diff)}")
        # Rebuilt under cfg.model, so the run's dtype / remat / scan policy applies to the loaded weights.
        model = MonetForCausalLM.from_flat(cfg.model, pretrained.flat_state())
        del pretrained
        _, state = nnx.split(_build(cfg, model))
        state = jax.device_put(state, shardings)
    return TrainState(graphdef, state, shardings, mesh)


def loss_terms(model: MonetForCausalLM, batch: dict, total_tokens, aux_coef: float, micro: int):
    """The objective on one (micro)batch: cross-entropy summed here and divided by the tokens of the
    whole batch, so accumulated microbatch gradients equal the full batch's; plus the aux losses."""
    out = model(batch["input_ids"], position_ids=batch["positions"], segment_ids=batch["segment_ids"],
                output_router_probs=True)
    ce_sum, _ = _masked_ce(out.logits, batch)
    zero = jnp.zeros((), jnp.float32)
    if out.router_sums:
        # From the routers' token sums (the fused router kernel's on moe_impl=pallas), not from g again.
        # usage: the fraction of the E experts (per head, both halves) that any token of the batch routed to.
        tokens = batch["input_ids"].shape[0] * batch["input_ids"].shape[1]
        terms = [router_aux(sums, tokens) for sums in out.router_sums]
        unif, amb, routed = (jnp.mean(jnp.stack([t[i] for t in terms])) for i in (0, 1, 3))
        usage = jnp.stack([t[2] for t in terms])
    else:
        unif = amb = routed = zero
        usage = jnp.zeros((0,), jnp.float32)
    loss = ce_sum / total_tokens + aux_coef * (unif + amb) / micro
    return loss, {"ce_sum": ce_sum, "unif": unif / micro, "amb": amb / micro, "usage": usage,
                  "unif_routed": routed / micro}


def _masked_ce(logits, batch):
    """(sum of next-token cross-entropy over the tokens that count, how many count)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * mask), jnp.sum(mask)


def _under_mesh(jitted, mesh: Mesh, rules):
    """Call ``jitted`` with the mesh active, so activation constraints apply while it traces."""
    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)

    run.jitted = jitted
    return run


def _grads(model: MonetForCausalLM, batch: dict, cfg: TrainConfig):
    """Gradients of the batch, accumulated over ``optim.grad_accum`` microbatches with ``lax.scan``."""
    micro = cfg.optim.grad_accum
    total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    grad_fn = nnx.value_and_grad(loss_terms, has_aux=True)
    if micro == 1:
        (loss, aux), grads = grad_fn(model, batch, total, cfg.aux_loss_coef, 1)
        return loss, aux, grads
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    mbs = jax.tree.map(lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:]), batch)

    def body(carry, mb):
        rest, acc = carry
        # Fresh Variables in this trace: NNX refuses graph nodes created by the enclosing trace.
        m = nnx.merge(gdef, jax.tree.map(lambda x: x, params), rest)
        (loss, aux), g = grad_fn(m, mb, total, cfg.aux_loss_coef, micro)
        acc = jax.tree.map(jnp.add, acc, (loss, aux, g))
        return (nnx.state(m, nnx.Not(nnx.Param)), acc), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    aux0 = {"ce_sum": 0.0, "unif": 0.0, "amb": 0.0, "unif_routed": 0.0,
            "usage": jnp.zeros((cfg.model.num_routers,), jnp.float32)}
    aux0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), aux0)
    (rest, (loss, aux, grads)), _ = jax.lax.scan(body, (rest, (jnp.zeros(()), aux0, zeros)), mbs)
    nnx.update(model, rest)
    aux["usage"] = aux["usage"] / micro
    return loss, aux, grads


def make_train_step(ts: TrainState, cfg: TrainConfig, rules=sharding.DEFAULT_RULES):
    """``step(state, batch) -> (state, metrics)``. A step whose loss or gradient norm is not finite
    leaves the state untouched and reports ``finite = 0`` (the loop applies the NaN policy)."""
    graphdef = ts.graphdef

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, aux, grads = _grads(model, batch, cfg)
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        new_state = nnx.state((model, optimizer))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        metrics = {"loss": loss, "ce": aux["ce_sum"] / jnp.maximum(tokens, 1.0), "unif": aux["unif"],
                   "amb": aux["amb"], "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                   "expert_usage": aux["usage"], "unif_routed": aux["unif_routed"]}
        return new_state, metrics

    replicated = NamedSharding(ts.mesh, PartitionSpec())
    batch_sh = {k: sharding.batch_sharding(ts.mesh, 2, rules) for k in BATCH_KEYS}
    jitted = jax.jit(step, in_shardings=(ts.shardings, batch_sh), out_shardings=(ts.shardings, replicated),
                     donate_argnums=0)
    return _under_mesh(jitted, ts.mesh, rules)


def make_eval_step(ts: TrainState, rules=sharding.DEFAULT_RULES):
    """``eval(state, batch) -> (ce_sum, tokens)`` with BatchNorm on its running statistics."""
    graphdef = ts.graphdef

    def evaluate(state, batch):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        out = model(batch["input_ids"], position_ids=batch["positions"], segment_ids=batch["segment_ids"])
        return _masked_ce(out.logits, batch)

    batch_sh = {k: sharding.batch_sharding(ts.mesh, 2, rules) for k in BATCH_KEYS}
    return _under_mesh(jax.jit(evaluate, in_shardings=(ts.shardings, batch_sh)), ts.mesh, rules)


def global_batch(batch: dict, mesh: Mesh, rows: list[int] | None = None, total: int | None = None,
                 rules=sharding.DEFAULT_RULES) -> dict:
    """Global arrays of ``total`` rows, sharded over the data-parallel axes, from this process's rows.

    ``rows`` are the global indices of ``batch``'s rows (:func:`sharding.process_batch_rows`); with ``None``,
    ``batch`` is the whole global batch.
    """
    dp = sharding.data_parallel_size(mesh, rules)
    if rows is None:
        total = next(iter(batch.values())).shape[0]
    if total % dp:
        raise ValueError(f"global batch of {total} rows is not divisible by the {dp}-way data-parallel mesh "
                         f"(data x fsdp)")
    where = None if rows is None else {r: i for i, r in enumerate(rows)}

    def local_rows(local, idx):
        return local[[where[r] for r in range(*idx[0].indices(total))]]

    out = {}
    for k in BATCH_KEYS:
        sh = sharding.batch_sharding(mesh, batch[k].ndim, rules)
        if rows is None:
            out[k] = jax.device_put(batch[k], sh)
        else:
            out[k] = jax.make_array_from_callback((total, *batch[k].shape[1:]), sh,
                                                  functools.partial(local_rows, batch[k]))
    return out

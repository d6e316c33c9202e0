"""The pure train step: sharded == single-device, accumulation == large batch, NaN guard,
determinism, optimizer schedule and EMA semantics."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_standins as si
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.config import MeshConfig, OptimConfig
from bitgen.parallel import make_mesh
from bitgen.train import program as train_program
from bitgen.train import step as train_step
from bitgen.train.optim import clip_by_global_norm, ema_update, learning_rate_schedule, make_optimizer
from bitgen.train.state import TrainState
from bitgen.train.step import update_if_finite


def run(cfg, *, n_steps=3, devices=None, fns=None, batches=None):
    """Train ``n_steps`` on ``cfg.mesh``; return (losses, final state on host)."""
    program = si.program(cfg, make_mesh(cfg.mesh, devices), fns)
    state, step = program.init_state(), program.step_fn
    losses = []
    for k in range(n_steps):
        bits = batches[k] if batches is not None else si.batch_bits(k, cfg.data.batch_size)
        state, metrics = step(state, {"bits": bits})
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


MESHES = [
    MeshConfig(data=8, fsdp=1, tensor=1),
    MeshConfig(data=2, fsdp=2, tensor=2),
    MeshConfig(data=1, fsdp=8, tensor=1),
    MeshConfig(data=2, fsdp=1, tensor=4),
]


@pytest.fixture(scope="module")
def single_device_run():
    cfg = si.config(mesh=MeshConfig(data=1))
    return run(cfg, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: f"d{m.data}f{m.fsdp}t{m.tensor}")
def test_sharded_step_matches_single_device(mesh_cfg, single_device_run):
    losses, state = run(si.config(mesh=mesh_cfg))
    ref_losses, ref_state = single_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert int(state.step) == 3


def test_params_are_laid_out_by_the_rules():
    cfg = si.config(mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    program = si.program(cfg, make_mesh(cfg.mesh))
    shardings, abstract = program.shardings, program.abstract
    state = program.init_state()
    assert state.params["w_mid"].sharding.spec == jax.P("fsdp", "tensor")
    assert state.ema_params["w_in"].sharding.spec == jax.P(None, "fsdp")
    adam_mu = state.opt_state[1][0].mu
    assert adam_mu["w_mid"].sharding.spec == jax.P("fsdp", "tensor")
    assert state.rng.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
    assert abstract.params["w_out"].sharding == shardings.params["w_out"]


def test_same_config_reruns_are_bitwise_identical():
    cfg = si.config(mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    losses_a, state_a = run(cfg)
    losses_b, state_b = run(cfg)
    np.testing.assert_array_equal(losses_a, losses_b)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_equals_large_batch():
    # Noise-free loss: accumulation must then give the same update as one big batch.
    fns = si.step_fns(noisy=False)
    one, state_one = run(si.config(grad_accum=1, mesh=MeshConfig(data=4, fsdp=2)), fns=fns)
    four, state_four = run(si.config(grad_accum=4, mesh=MeshConfig(data=4, fsdp=2)), fns=fns)
    np.testing.assert_allclose(one, four, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_one.params), jax.tree.leaves(state_four.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Same sigma/mse rows reach the schedule buffer in the original row order.
    np.testing.assert_allclose(state_one.schedule["buffer"], state_four.schedule["buffer"], rtol=1e-5)


@pytest.mark.parametrize("branch", [True, False], ids=["branch", "select"])
def test_non_finite_loss_keeps_the_previous_state(branch, monkeypatch):
    # Both guards on the 8-device mesh: the step takes the branch on CPU, the select elsewhere.
    monkeypatch.setattr(train_program, "make_train_step",
                        functools.partial(train_step.make_train_step, guard_branch=branch))
    cfg = si.config(mesh=MeshConfig(data=8))

    def nan_loss(params, bits, sigma, key):
        value, aux = si.loss(params, bits, sigma, key)
        return value * jnp.nan, aux

    program = si.program(cfg, make_mesh(cfg.mesh), dataclasses.replace(si.step_fns(), loss=nan_loss))
    state = program.init_state()
    before = jax.device_get(state)
    state, metrics = program.step_fn(state, {"bits": si.batch_bits(0)})
    assert not bool(metrics["finite"])
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(after.replace(rng=None)), jax.tree.leaves(before.replace(rng=None))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("branch", [True, False], ids=["branch", "select"])
@pytest.mark.parametrize("finite", [True, False])
def test_the_guard_keeps_the_state_unless_the_step_is_finite(branch, finite):
    state = TrainState(step=jnp.int32(3), rng=jax.random.key(1), params={"w": jnp.arange(3.0)},
                       opt_state=(jnp.ones(3),), ema_params={"w": jnp.zeros(3)}, schedule={})

    def update(s):
        return s.replace(step=s.step + 1, params={"w": s.params["w"] * 2}, opt_state=(s.opt_state[0] + 1,))

    got = jax.jit(lambda f, s: update_if_finite(f, update, s, branch=branch))(jnp.bool_(finite), state)
    want = update(state) if finite else state
    for a, b in zip(jax.tree.leaves(got.replace(rng=None)), jax.tree.leaves(want.replace(rng=None))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(state.rng))


def test_learning_rate_schedule_shape():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr=1e-6)
    lr = learning_rate_schedule(cfg, total_steps=100)
    assert float(lr(0)) == pytest.approx(1e-4)  # first update: lr/warmup, never 0
    assert float(lr(9)) == pytest.approx(1e-3)  # update 10 ends the warm-up at the peak
    assert float(lr(99)) == pytest.approx(1e-6)  # last update reaches min_lr
    values = np.array([float(lr(k)) for k in range(10, 100)])
    assert np.all(np.diff(values) <= 1e-12)


def test_ema_starts_from_initial_weights_without_bias_correction():
    p0 = {"w": jnp.array([1.0, 2.0])}
    p1 = {"w": jnp.array([3.0, 0.0])}
    ema = ema_update(p0, p1, 0.9)
    np.testing.assert_allclose(ema["w"], [1.2, 1.8], rtol=1e-6)


def _tree(seed, scale):
    key_a, key_b = jax.random.split(jax.random.key(seed))
    return {"a": scale * jax.random.normal(key_a, (7, 5)), "b": scale * jax.random.normal(key_b, (11,))}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 999), log_scale=st.floats(-3.0, 3.0))
def test_clip_by_global_norm_follows_optax(seed, log_scale):
    """Below the max the gradients pass unchanged (bit for bit); above it they are scaled to the
    max. optax computes (g / n) · m and bitgen g · (m / n): each is the exact g·m/n after two
    roundings (relative error <= 2u + u², u = 2^-24), so they differ by <= ~4u·|g·m/n|, at most
    4 float32 ulps of the result (an ulp is >= u·|x|)."""
    grads = _tree(seed, 10.0**log_scale)
    ours, state = clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    norm = float(optax.tree.norm(grads))
    for got, want, g in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(grads)):
        if norm < 1.0:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(g))
        np.testing.assert_array_max_ulp(np.asarray(got), np.asarray(want), maxulp=4)
    assert state == optax.EmptyState()
    # A given norm is used instead of the gradients' own: with twice their norm, 2n, the
    # gradients pass unchanged if 2n < 1 and are otherwise multiplied by float32(1 / 2n).
    doubled = 2.0 * optax.tree.norm(grads)
    given_norm, _ = clip_by_global_norm(1.0).update(grads, None, grad_norm=doubled)
    for got, g in zip(jax.tree.leaves(given_norm), jax.tree.leaves(grads)):
        want = g if float(doubled) < 1.0 else g * (1.0 / doubled)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_optimizer_state_keeps_the_optax_layout():
    """Checkpoints written with optax.clip_by_global_norm in the chain restore into this one."""
    params = _tree(0, 1.0)
    cfg = OptimConfig()
    steps = cfg.warmup_steps + 1
    ours = make_optimizer(cfg, steps).init(params)
    theirs = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                         optax.adamw(learning_rate_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2,
                                     eps=cfg.eps)).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)

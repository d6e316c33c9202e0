"""Every registered model family trains sharded on the mesh rules: its parameters are laid out by
``parallel.LOGICAL_RULES`` and its first train step on an 8-device (data 2, fsdp 2, tensor 2) mesh
gives the single-device loss and gradient norm. A family registered later is covered by adding
nothing here (its options take their defaults, made small by ``SMALL_OPTIONS`` where it has them).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bitgen import families, parallel
from bitgen.codecs import BitCodec
from bitgen.config import MeshConfig, apply_overrides, load_config
from bitgen.data.pipeline import make_batch_dataset
from bitgen.parallel import make_mesh
from bitgen.train.program import build_train_program

VOCAB, WIDTH, TOKENS, BATCH = 64, 6, 16, 8
TINY = [f"model.seq_tokens={TOKENS}", f"model.patch_size={WIDTH}", "model.embed_dim=32",
        "model.n_heads=4", "model.n_blocks=1", "model.dim_ff=64", "model.content_dim=8",
        "model.head_hidden=16", f"data.batch_size={BATCH}", "train.steps=4",
        "optim.warmup_steps=1"]
# Smaller heads for the families that have them (speed only; any size must shard).
SMALL_OPTIONS = {"bitlm": ["family.head_width=32", "family.head_depth=1", "family.head_heads=4"]}

# Tolerance of the sharded step against the single-device one. Sharding changes only the order of
# float32 sums (batch means over the data axes, contractions split over fsdp/tensor). A sum of n
# terms in another order differs by at most n·u·Σ|x|/|Σx| relative (u = 2^-24 ≈ 6e-8); with terms
# of one sign (squared errors, cross-entropies, norms) the ratio is 1. Along the forward and
# backward path of this one-block model the contraction lengths add up to well under 1,600
# (batch·tokens = 128 rows of the loss mean, embed 32, ff 64, bits 96 per row, a few such sums
# per layer and again in the backward pass), so the relative difference stays below
# 1,600·6e-8 ≈ 1e-4.
RTOL = 1e-4


def family_config(name: str):
    return apply_overrides(load_config("demo_cpu"), [f"task={name}", *TINY, *SMALL_OPTIONS.get(name, [])])


def first_step(cfg, devices):
    """(loss, grad_norm) of step 0 and the state after two steps on ``devices``."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2) if len(devices) == 8 else MeshConfig(data=1),
                     devices)
    program = build_train_program(cfg, mesh, VOCAB)
    ids = np.random.default_rng(0).integers(0, VOCAB, (4 * BATCH, TOKENS)).astype(np.int32)
    batches = make_batch_dataset(ids, BitCodec(VOCAB, WIDTH), global_batch=BATCH, seed=0)
    state, metrics = program.init_state(), []
    for k in range(2):
        batch = parallel.global_batch(program.batch_of(batches[k]), mesh, BATCH)
        state, m = program.step_fn(state, batch)
        metrics.append(jax.device_get(m))
    return metrics, state, program


@pytest.mark.slow  # two compilations of a train step per family (about a minute each on 2 cores)
@pytest.mark.parametrize("name", families.names())
def test_a_family_trains_on_the_mesh_rules_as_on_one_device(name):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake CPU) devices; tests/conftest.py sets them")
    cfg = family_config(name)
    one, _, _ = first_step(cfg, jax.devices()[:1])
    eight, state, program = first_step(cfg, jax.devices())
    np.testing.assert_allclose(eight[0]["loss"], one[0]["loss"], rtol=RTOL)
    np.testing.assert_allclose(eight[0]["grad_norm"], one[0]["grad_norm"], rtol=RTOL)
    assert all(bool(m["finite"]) and np.isfinite(m["loss"]) for m in eight)
    # Every parameter sits where its logical axes put it, and the rules shard some of them.
    task = families.get(name).task(cfg, VOCAB)
    flat_axes = jax.tree.leaves(task.param_axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_params = jax.tree.leaves(state.params)
    assert len(flat_axes) == len(flat_params)
    specs = [p.sharding.spec for p in flat_params]
    for spec, axes, param in zip(specs, flat_axes, flat_params):
        assert same_spec(spec, parallel.logical_to_spec(axes), param.ndim), (name, axes, spec)
    assert any(any(s is not None for s in spec) for spec in specs), f"{name}: nothing is sharded"


def same_spec(spec, want, ndim: int) -> bool:
    """PartitionSpecs equal up to trailing ``None``s."""
    pad = lambda s: tuple(s) + (None,) * (ndim - len(s))  # noqa: E731
    return pad(spec) == pad(want)

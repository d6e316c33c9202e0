"""Checkpoint facade: exact resume, cross-mesh restore, params-only restore, data position,
corrupt-latest fallback, incompatible config, preemption flag."""

from __future__ import annotations

import dataclasses
import os
import signal

import grain
import jax
import numpy as np
import pytest
import train_standins as si

from bitgen.checkpoint import (
    Checkpointer,
    CheckpointError,
    IncompatibleCheckpointError,
    restore_params,
)
from bitgen.config import MeshConfig, ModelConfig, to_dict
from bitgen.parallel import make_mesh
from bitgen.preemption import PreemptionFlag


class Setup:
    """State layout + jitted step for a stand-in config on a given mesh."""

    def __init__(self, mesh_cfg: MeshConfig, config=None):
        self.cfg = config or si.config(mesh=mesh_cfg)
        self.mesh = make_mesh(self.cfg.mesh)
        self.program = si.program(self.cfg, self.mesh)
        self.shardings, self.abstract = self.program.shardings, self.program.abstract
        self.step = self.program.step_fn

    def fresh(self):
        return self.program.init_state()

    def train(self, state, start, stop, ckpt=None):
        losses = []
        for k in range(start, stop):
            state, metrics = self.step(state, {"bits": si.batch_bits(k)})
            losses.append(float(metrics["loss"]))
            if ckpt is not None:
                ckpt.save(k + 1, state, metadata={"config": to_dict(self.cfg)})
        return state, losses


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def setup():
    return Setup(MeshConfig(data=2, fsdp=2, tensor=2))


def test_resume_is_bitwise_identical(tmp_path, setup):
    full_state, full_losses = setup.train(setup.fresh(), 0, 6)

    ckpt = Checkpointer(tmp_path, save_every=3, keep=2)
    setup.train(setup.fresh(), 0, 4, ckpt)  # saves at step 3 (interval); step 4 is "lost"
    ckpt.close()

    ckpt = Checkpointer(tmp_path, save_every=3, keep=2)
    restored = ckpt.restore(setup.abstract, config=setup.cfg)
    assert restored.step == 3 and int(restored.state.step) == 3
    # A typed key comes back typed (not raw uint32 data), so the jitted step is not retraced.
    assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
    state, losses = setup.train(restored.state, 3, 6)
    ckpt.close()
    assert losses == full_losses[3:]
    leaves_equal(state.replace(rng=None), full_state.replace(rng=None))
    assert jax.random.key_data(state.rng).tolist() == jax.random.key_data(full_state.rng).tolist()


def test_restore_onto_a_different_mesh(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=2, keep=1)
    state, _ = setup.train(setup.fresh(), 0, 2, ckpt)
    ckpt.close()
    other = Setup(MeshConfig(data=1, fsdp=8, tensor=1))
    restored = Checkpointer(tmp_path, save_every=2, keep=1).restore(other.abstract, config=other.cfg)
    assert restored.state.params["w_mid"].sharding == other.shardings.params["w_mid"]
    leaves_equal(restored.state.params, state.params)
    # Training continues on the new mesh and agrees with the old one to float tolerance.
    _, losses_new = other.train(restored.state, 2, 4)
    _, losses_old = setup.train(state, 2, 4)
    np.testing.assert_allclose(losses_new, losses_old, rtol=1e-5)


def test_params_only_restore_reads_ema(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    state, _ = setup.train(setup.fresh(), 0, 1, ckpt)
    ckpt.close()
    ema = restore_params(tmp_path, setup.abstract.ema_params)
    leaves_equal(ema, state.ema_params)
    params = restore_params(tmp_path, setup.abstract.params, which="params")
    leaves_equal(params, state.params)


def test_data_iterator_position_is_restored(tmp_path, setup):
    dataset = grain.MapDataset.range(1000).batch(4)
    it = iter(dataset)
    for _ in range(5):
        next(it)
    ckpt = Checkpointer(tmp_path, save_every=5, keep=1)
    ckpt.save(5, setup.fresh(), metadata={"config": to_dict(setup.cfg)}, data_iter=it)
    ckpt.close()
    expected = next(it)
    fresh = iter(dataset)
    restored = Checkpointer(tmp_path, save_every=5, keep=1).restore(setup.abstract, data_iter=fresh)
    assert restored.data_restored
    np.testing.assert_array_equal(next(fresh), expected)


def _damage(step_dir):
    """Truncate every array data file of the state item (keeps the commit marker)."""
    damaged = 0
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            path = os.path.join(root, name)
            if "ocdbt.process" in root or name == "manifest.ocdbt":
                open(path, "wb").close()
                damaged += 1
    assert damaged


def test_corrupt_latest_checkpoint_errors_or_falls_back(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=3)
    state, _ = setup.train(setup.fresh(), 0, 2, ckpt)
    ckpt.close()
    _damage(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, save_every=1, keep=3)
    with pytest.raises(CheckpointError, match=r"2.*cannot be read.*fallback=True.*step 1"):
        ckpt.restore(setup.abstract, config=setup.cfg)
    restored = ckpt.restore(setup.abstract, config=setup.cfg, fallback=True)
    assert restored.step == 1 and int(restored.state.step) == 1


def test_incompatible_config_is_refused_by_name(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    setup.train(setup.fresh(), 0, 1, ckpt)
    ckpt.close()
    changed = dataclasses.replace(
        setup.cfg,
        model=ModelConfig(embed_dim=64, n_heads=4),
        optim=dataclasses.replace(setup.cfg.optim, lr=1.0),  # optim changes are allowed
    )
    with pytest.raises(IncompatibleCheckpointError, match=r"model\.embed_dim: checkpoint=768 config=64.*model\.n_heads"):
        Checkpointer(tmp_path, save_every=1, keep=1).restore(setup.abstract, config=changed, fallback=True)
    execution_only = dataclasses.replace(setup.cfg, model=ModelConfig(remat=True))
    Checkpointer(tmp_path, save_every=1, keep=1).restore(setup.abstract, config=execution_only)
    # Data settings that decide which token a bit pattern means are part of the model.
    recoded = dataclasses.replace(setup.cfg, data=dataclasses.replace(setup.cfg.data, bit_order="frequency"))
    with pytest.raises(IncompatibleCheckpointError, match=r"data\.bit_order: checkpoint='raw' config='frequency'"):
        Checkpointer(tmp_path, save_every=1, keep=1).restore(setup.abstract, config=recoded)
    batching = dataclasses.replace(setup.cfg, data=dataclasses.replace(setup.cfg.data, batch_size=7))
    Checkpointer(tmp_path, save_every=1, keep=1).restore(setup.abstract, config=batching)


def test_other_task_is_refused(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    setup.train(setup.fresh(), 0, 1, ckpt)
    ckpt.close()
    with pytest.raises(IncompatibleCheckpointError, match="task='cobit'.*task='ar'"):
        Checkpointer(tmp_path, save_every=1, keep=1).restore(
            setup.abstract, config=dataclasses.replace(setup.cfg, task="ar"))


def test_missing_checkpoint_is_a_clear_error(tmp_path, setup):
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        Checkpointer(tmp_path, save_every=1, keep=1).restore(setup.abstract)


def test_keep_last_n(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=2)
    setup.train(setup.fresh(), 0, 4, ckpt)
    ckpt.close()
    assert Checkpointer(tmp_path, save_every=1, keep=2).steps() == [3, 4]


def test_preemption_flag_catches_sigterm():
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not flag._handle


def test_keep_every_n_in_addition_to_the_last_n(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=2, keep_every=3)
    setup.train(setup.fresh(), 0, 8, ckpt)
    ckpt.close()
    assert Checkpointer(tmp_path, save_every=1, keep=2).steps() == [3, 6, 7, 8]


def test_saves_carry_one_checksum_per_array(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    state, _ = setup.train(setup.fresh(), 0, 1, ckpt)
    ckpt.close()
    stored = Checkpointer(tmp_path, save_every=1, keep=1).metadata(1)["checksums"]
    assert len(stored) == len(jax.tree.leaves(state)) and "ema_params/w_mid" in stored


def test_set_aside_renames_and_frees_the_step_number(tmp_path, setup):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=3)
    state, _ = setup.train(setup.fresh(), 0, 2, ckpt)
    ckpt.wait()
    moved = ckpt.set_aside([2], damaged={2})
    assert ckpt.steps() == [1] and moved[0].is_dir() and moved[0].name.startswith("2.damaged-")
    assert ckpt.save(2, state, metadata={"config": to_dict(setup.cfg)}, force=True)
    ckpt.close()
    assert Checkpointer(tmp_path, save_every=1, keep=3).steps() == [1, 2]


def test_read_only_notices_of_orbax_are_dropped_and_other_warnings_kept(caplog):
    """Sampling opens checkpoints read-only; orbax's three notices about that are not shown."""
    import logging

    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl.warning("CheckpointManagerOptions.read_only=True, setting create=False.")
        absl.warning("Given directory is read only=/runs/x/checkpoints")
        absl.warning("a checkpoint step was skipped")
    assert [r.getMessage() for r in caplog.records] == ["a checkpoint step was skipped"]

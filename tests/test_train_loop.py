"""End-to-end loop on tiny real CoBit and AR configs: determinism, preemption + resume on the same
and on another mesh, compilation count, params-only restore, NaN stop.

train() caches its jitted init/step per (config, mesh), so runs of one config in this module
compile once; the stand-in equivalents live in test_train_step.py / test_checkpoint.py."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from bitgen.checkpoint import (
    Checkpointer,
    CheckpointError,
    restore_params,
)
from bitgen.config import load_config
from bitgen.preemption import PreemptionFlag
from bitgen.train.loop import NonFiniteLossError, _fetch, max_param_difference, train
from bitgen.train.task import abstract_params

TINY = [
    "model.seq_tokens=16", "model.embed_dim=32", "model.n_heads=2", "model.n_blocks=1",
    "model.dim_ff=64", "model.content_dim=8", "model.head_hidden=16",
    "data.batch_size=8", "train.steps=6", "train.ckpt_every=3", "train.log_every=1",
    "train.sample_every=0", "optim.warmup_steps=2", "entropy.update_every=2",
    "entropy.min_per_bin=0", "entropy.warmup_steps=2", "entropy.transition_steps=2",
    "mesh.data=4", "mesh.fsdp=2",
]


class SignalAfter(PreemptionFlag):
    """Behaves as if SIGTERM arrived after ``polls`` step boundaries."""

    def __init__(self, polls: int):
        super().__init__()
        self.polls = polls

    @property
    def requested(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d["loss"] for d in map(json.loads, lines)}


@pytest.fixture(scope="module")
def cfg():
    return load_config("demo_cpu", TINY)


@pytest.fixture(scope="module")
def compilations():
    """Backend compilations recorded while the ``uninterrupted`` run executes."""
    return []


@pytest.fixture(scope="module")
def uninterrupted(cfg, tmp_path_factory, compilations):
    run_dir = tmp_path_factory.mktemp("full")

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compilations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = train(cfg, run_dir, progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert result.step == 6 and not result.preempted
    return run_dir


def test_reruns_are_bitwise_identical(cfg, uninterrupted, tmp_path):
    train(cfg, tmp_path, progress=False)
    assert losses(tmp_path) == losses(uninterrupted)
    assert max_param_difference(tmp_path, uninterrupted) == 0.0
    assert (tmp_path / "entropy_tables").is_dir() and (tmp_path / "tb").is_dir()


def test_preempt_then_resume_matches_uninterrupted(cfg, uninterrupted, tmp_path):
    first = train(cfg, tmp_path, flag=SignalAfter(4), progress=False)
    assert first.preempted and first.step == 5  # saved at the step boundary where the signal landed
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, tmp_path, progress=False)
    second = train(cfg, tmp_path, resume=True, progress=False)
    assert second.step == 6 and not second.preempted
    assert losses(tmp_path) == losses(uninterrupted)
    assert max_param_difference(tmp_path, uninterrupted) == 0.0
    assert max_param_difference(tmp_path, uninterrupted, which="ema_params") == 0.0


@pytest.mark.slow  # compiles the step for a second mesh (~20-40 s); stand-in version in test_checkpoint
def test_resume_on_a_different_mesh(cfg, uninterrupted, tmp_path):
    train(cfg, tmp_path, flag=SignalAfter(2), progress=False)
    other = load_config("demo_cpu", [*TINY[:-2], "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    train(other, tmp_path, resume=True, progress=False)
    got, want = losses(tmp_path), losses(uninterrupted)
    np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5)
    assert max_param_difference(tmp_path, uninterrupted) < 1e-5


def test_train_compiles_a_handful_of_programs(uninterrupted, compilations):
    # The first run of a config (6 steps, 2 checkpoint saves) compiles the state init, the train
    # step and a few scalar helpers — not one program per leaf, per save or per step.
    assert 2 <= len(compilations) <= 8


def test_a_second_run_of_the_same_config_compiles_nothing(cfg, uninterrupted, tmp_path):
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        train(cfg, tmp_path, flag=SignalAfter(2), progress=False)
        train(cfg, tmp_path, resume=True, progress=False)  # restored state has the fresh types
        max_param_difference(tmp_path, uninterrupted)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


AR_TINY = ["task=ar", "model.dropout=0.1", *TINY]


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_ar_task_trains_checkpoints_and_resumes_bitwise(tmp_path):
    cfg = load_config("demo_ar_cpu", AR_TINY)
    full = train(cfg, tmp_path / "full", progress=False)
    assert full.step == 6 and np.isfinite(full.last_metrics["loss"])
    assert 0.0 <= full.last_metrics["accuracy"] <= 1.0
    cut = tmp_path / "cut"
    assert train(cfg, cut, flag=SignalAfter(2), progress=False).preempted
    train(cfg, cut, resume=True, progress=False)
    assert losses(cut) == losses(tmp_path / "full")
    assert max_param_difference(cut, tmp_path / "full", which="ema_params") == 0.0
    # Params-only restore with the documented abstract target.
    ckpt = Checkpointer(cut / "checkpoints", save_every=1, keep=1)
    vocab = ckpt.metadata(6)["vocab_size"]
    ckpt.close()
    params = restore_params(cut / "checkpoints", abstract_params(cfg, vocab_size=vocab))
    assert params["lm_head"]["kernel"].shape == (cfg.model.embed_dim, vocab)


def test_non_finite_metrics_stop_with_the_step():
    good = {"loss": jax.numpy.float32(1.0), "grad_norm": jax.numpy.float32(1.0), "finite": jax.numpy.bool_(True)}
    bad = dict(good, loss=jax.numpy.float32(np.nan), finite=jax.numpy.bool_(False))
    assert _fetch([(1, good)])[0]["step"] == 1
    with pytest.raises(NonFiniteLossError, match="step 7"):
        _fetch([(6, good), (7, bad)])

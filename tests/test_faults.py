"""Fault injection on tiny real runs: two writers, SIGKILL during an async save, seven kinds of
checkpoint damage plus a flipped byte, a valid rewrite of one weight and NaN values, a torn
metrics line, an inconsistent data position, a resume target below the checkpoint, and damaged
checkpoints under ``sample``.

Every resumed run is compared with the uninterrupted one bitwise: recovery must not just run on,
it must continue exactly as if the damaged step had never been written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen import checksum
from bitgen.checkpoint import Checkpointer, DamagedCheckpointError
from bitgen.cli import main
from bitgen.config import ConfigError, load_config
from bitgen.runlock import RunLock, RunLockedError
from bitgen.train.loop import max_param_difference, train
from checkpoint_damage import DAMAGE, flip_byte
from test_train_loop import TINY as TRAIN_LOOP_TINY

REPO = Path(__file__).resolve().parent.parent
# The train-loop tests' tiny run, saving every 2 steps (a key may be given only once).
TINY = [o for o in TRAIN_LOOP_TINY if not o.startswith("train.ckpt_every=")] + ["train.ckpt_every=2"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def cfg():
    return load_config("demo_cpu", TINY)


@pytest.fixture(scope="module")
def full(cfg, tmp_path_factory):
    """The uninterrupted 6-step run every recovery is compared with."""
    run_dir = tmp_path_factory.mktemp("full")
    train(cfg, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def at_4(cfg, tmp_path_factory):
    """A run stopped after step 4 (checkpoints at steps 2 and 4); tests damage copies of it."""
    run_dir = tmp_path_factory.mktemp("at_4")
    assert train(cfg, run_dir, progress=False, flag=StopAfter(4)).step == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    return run_dir


class StopAfter:
    """A PreemptionFlag stand-in: the signal arrives during step ``n`` (polled once per step)."""

    def __init__(self, n: int):
        self.polls, self.signum = n - 1, signal.SIGTERM

    @property
    def requested(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def with_steps(steps: int) -> list[str]:
    return [o for o in TINY if not o.startswith("train.steps=")] + [f"train.steps={steps}"]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".bitgen.lock"))
    return dst


# -- one writer per run directory ----------------------------------------------------------------

def test_a_second_writer_stops_naming_the_holder(cfg, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from bitgen.runlock import RunLock
            RunLock({str(tmp_path)!r}).acquire()
            print("locked", flush=True)
            time.sleep(600)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"PID {holder.pid} on host {socket.gethostname()}"):
            train(cfg, tmp_path, progress=False)
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
        # The CLI prints it as one line, exit status 2.
        assert main(["train", "--config", "demo_cpu", *TINY, "--run-dir", str(tmp_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"PID {holder.pid}" in err
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, nothing stale is left
        holder.wait()
    with RunLock(tmp_path):
        pass
    # Within one process a second lock is refused as well (flock is per open file).
    with RunLock(tmp_path), pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()


# -- SIGKILL during an asynchronous save ---------------------------------------------------------

@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_bitwise(cfg, full, tmp_path):
    # The child kills itself right after the step-4 save has started (its write runs on in a
    # background thread), so the step is cut off mid-write.
    script = textwrap.dedent(f"""
        import os, signal
        from bitgen import checkpoint
        from bitgen.config import load_config
        from bitgen.train.loop import train
        save = checkpoint.Checkpointer.save
        def save_then_die(self, step, *args, **kwargs):
            started = save(self, step, *args, **kwargs)
            if started and step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return started
        checkpoint.Checkpointer.save = save_then_die
        train(load_config("demo_cpu", {TINY!r}), {str(tmp_path)!r}, progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    train(cfg, tmp_path, resume=True, progress=False)
    assert losses(tmp_path) == losses(full)
    assert max_param_difference(tmp_path, full) == 0.0


# -- damaged checkpoints -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_step_is_refused_then_moved_aside_and_passed(kind, cfg, full, at_4, tmp_path, capsys):
    run = copy_run(at_4, tmp_path / "run")
    DAMAGE[kind](run / "checkpoints" / "4")
    # orbax reads a valid rewrite without complaint; the checksums do not.
    why = "differ from their saved checksums" if kind == "one weight rewritten, files valid" else ""
    with pytest.raises(DamagedCheckpointError,
                       match=rf"checkpoints/4 cannot be read \(.*{why}.*--resume-fallback.* step 2"):
        train(cfg, run, resume=True, progress=False)
    # The CLI says the same in one line, exit status 2.
    assert main(["train", "--config", "demo_cpu", *TINY, "--run-dir", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume-fallback" in err

    train(cfg, run, resume=True, resume_fallback=True, progress=False)
    moved = sorted(p.name for p in (run / "checkpoints").glob("4.damaged-*"))
    assert len(moved) == 1  # renamed, not deleted
    assert losses(run) == losses(full)
    assert max_param_difference(run, full) == 0.0


def test_a_flipped_byte_is_refused_or_changes_nothing(cfg, full, at_4, tmp_path):
    # zstd or the checksums refuse it, or it decoded to the same values: either way the resumed
    # run must equal the uninterrupted one (an unnoticed change of a value would not).
    run = copy_run(at_4, tmp_path / "run")
    flip_byte(run / "checkpoints" / "4")
    try:
        train(cfg, run, resume=True, progress=False)
    except DamagedCheckpointError as error:
        assert "--resume-fallback" in str(error)
        train(cfg, run, resume=True, resume_fallback=True, progress=False)
    assert losses(run) == losses(full)
    assert max_param_difference(run, full) == 0.0


def test_the_command_reports_damage_in_exactly_one_line(at_4, tmp_path):
    # In a real process (pytest intercepts them otherwise): a failed orbax read leaves abandoned
    # coroutines and closed-event-loop callbacks that Python would report as dozens of tracebacks.
    run = copy_run(at_4, tmp_path / "run")
    DAMAGE["data file deleted"](run / "checkpoints" / "4")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("BITGEN_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", "bitgen.cli", "train", "--config", "demo_cpu", *TINY,
                           "--run-dir", str(run), "--resume", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith("bitgen train: checkpoint ") and "--resume-fallback" in done.stderr


def test_non_finite_values_are_checkpoint_damage(tmp_path):
    # The train step never lets a NaN into the state, so a restored one means damage, not a
    # learning-rate problem, even when the checksums agree (they were taken of the same values).
    state = {"w": jnp.array([1.0, jnp.nan, 1.0]), "step": jnp.int32(1)}
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    ckpt.save(1, state, metadata={})
    ckpt.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint .*1 cannot be read \(array\(s\) hold NaN/Inf.*: w"):
        Checkpointer(tmp_path, save_every=1, keep=1).restore(abstract)


def test_inconsistent_data_position_names_the_way_out(cfg, full, at_4, tmp_path):
    run = copy_run(at_4, tmp_path / "run")
    next((run / "checkpoints" / "4" / "data").glob("process_*.json")).write_text('{"next_index": 3}')
    with pytest.raises(DamagedCheckpointError, match=r"data position .* inconsistent.*--resume-fallback"):
        train(cfg, run, resume=True, progress=False)
    train(cfg, run, resume_from=2, progress=False)
    assert [p.name.split(".")[1].split("-")[0] for p in (run / "checkpoints").glob("4.*")] == ["superseded"]
    assert losses(run) == losses(full)
    assert max_param_difference(run, full) == 0.0


def test_resume_from_an_older_good_step(cfg, full, tmp_path):
    run = copy_run(full, tmp_path / "run")  # checkpoints 4 and 6 (keep_checkpoints=2)
    train(cfg, run, resume_from=4, progress=False)
    assert len(list((run / "checkpoints").glob("6.superseded-*"))) == 1
    assert losses(run) == losses(full)
    assert max_param_difference(run, full) == 0.0


# -- resume bookkeeping --------------------------------------------------------------------------

def test_torn_last_metrics_line_is_dropped(cfg, full, tmp_path, caplog):
    run = copy_run(full, tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # a crash in the middle of a write
    train(cfg, run, resume=True, progress=False)  # at train.steps already: restores, trains nothing
    assert "not JSON" in caplog.text
    assert losses(run) == losses(full)


def test_resume_target_below_the_checkpoint_is_refused_before_writing(full, tmp_path):
    run = copy_run(full, tmp_path / "run")
    before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"train.steps=5 is below the checkpoint's step 6"):
        train(load_config("demo_cpu", with_steps(5)), run, resume=True, progress=False)
    assert (run / "config.json").read_text() == before


# -- readers: sample / eval ----------------------------------------------------------------------

def test_sample_reads_a_chosen_step_and_skips_a_damaged_newest_one(full, tmp_path, caplog, capsys):
    from bitgen.loading import load_model

    run = copy_run(full, tmp_path / "run")
    assert load_model(str(run), step=4).step == 4
    DAMAGE["OCDBT manifest emptied"](run / "checkpoints" / "6")
    model = load_model(str(run))
    assert model.step == 4 and "skipping step 6" in caplog.text
    with pytest.raises(DamagedCheckpointError, match=r"checkpoints/6 cannot be read.*older step.*\[4\]"):
        load_model(str(run), step=6)
    assert main(["sample", "--run-dir", str(run), "--step", "6", "--num", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--step" in err


# -- exit status (bitgen.cli docstring): 0 done, 2 refused, 128+N signal, traceback for a bug --------

def test_exit_status_policy(full, tmp_path, monkeypatch):
    from bitgen.data import cli as data_cli
    from bitgen.preemption import PreemptionFlag

    with pytest.raises(SystemExit) as usage:
        main(["train", "--no-progress"])  # --config missing
    assert usage.value.code == 2
    # SIGTERM arrives as the flag is installed: the command saves what it has and exits 128 + 15.
    monkeypatch.setattr(PreemptionFlag, "install", lambda self: (self.request(signal.SIGTERM), self)[1])
    out = tmp_path / "s.txt"
    assert main(["sample", "--run-dir", str(full), "--num", "1", "--out", str(out), "--no-progress"]) == 143
    assert out.exists()
    monkeypatch.setattr(data_cli, "run", lambda args: 1 / 0)  # not a BitgenError: a bug
    with pytest.raises(ZeroDivisionError):
        main(["data", "--no-progress"])


def test_every_error_class_bitgen_defines_is_a_bitgen_error():
    # bitgen.cli recognises bitgen's errors by isinstance(err, BitgenError) alone.
    import ast
    import importlib

    from bitgen.errors import BitgenError

    classes = []
    for path in sorted((REPO / "bitgen").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                classes.append(getattr(importlib.import_module(module), node.name))
    assert len(classes) >= 15 and BitgenError in classes
    assert [c.__qualname__ for c in classes if not issubclass(c, BitgenError)] == []


# -- one-line reports ----------------------------------------------------------------------------

def test_library_errors_are_cut_to_one_line_with_their_root_cause():
    from bitgen.errors import one_line

    nested = ValueError('DATA_LOSS: Error opening "zarr" driver: ' + "x" * 400 + ": Encoded length (0) "
                        "is less than minimum length (16) [tensorstore_spec='{\"a\": 1}']\nmore")
    text = one_line(nested)
    assert text.startswith("ValueError: DATA_LOSS") and text.endswith("minimum length (16)")
    assert "\n" not in text and len(text) <= 310
    try:  # orbax wraps the TensorStore error; the cause is what names the damage
        try:
            raise nested
        except ValueError as cause:
            raise RuntimeError("Encountered error while reading array index") from cause
    except RuntimeError as wrapped:
        assert one_line(wrapped) == text


def test_closed_event_loop_reports_are_dropped_and_others_kept():
    from types import SimpleNamespace

    from bitgen.cli import _drop_closed_loop_noise

    async def ours():
        pass

    seen = []
    hook = _drop_closed_loop_noise(seen.append)
    hook(SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None))
    coroutine = ours()  # not orbax's: kept
    others = [SimpleNamespace(exc_value=RuntimeError("something else"), object=None),
              SimpleNamespace(exc_value=Exception("read failed"), object=coroutine)]
    for other in others:
        hook(other)
    coroutine.close()
    assert seen == others


def test_abandoned_orbax_read_tasks_are_not_logged_and_others_are(tmp_path, caplog):
    # A real asyncio report: tasks that failed with nobody retrieving the exception are logged
    # when the garbage collector reaches them, one from a coroutine defined under an orbax folder.
    import asyncio
    import gc
    import logging

    from bitgen.cli import _not_an_abandoned_checkpoint_read

    orbax_module = {}
    exec(compile("async def read():\n    raise ValueError('truncated stream')\n",
                 str(tmp_path / "orbax" / "reader.py"), "exec"), orbax_module)

    async def ours():
        raise ValueError("our own failure")

    def failed_future(loop, message):
        future = loop.create_future()
        future.set_exception(ValueError(message))
        return future

    logger = logging.getLogger("asyncio")
    logger.addFilter(_not_an_abandoned_checkpoint_read)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop = asyncio.new_event_loop()
            tasks = [loop.create_task(orbax_module["read"]()), loop.create_task(ours()),
                     # TensorStore's read futures fail without a Python frame to point at orbax.
                     failed_future(loop, 'FAILED_PRECONDITION: Error reading "params.w/0.0" in '
                                         'OCDBT database at local file "/run/4/state/"'),
                     failed_future(loop, "our own future")]
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.close()
            del tasks
            gc.collect()
    finally:
        logger.removeFilter(_not_an_abandoned_checkpoint_read)
    reports = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(reports) == 2, reports
    task, future = sorted(reports, reverse=True)  # the garbage collector's order varies
    assert task.startswith("Task exception was never retrieved") and "ours" in task
    assert future.startswith("Future exception was never retrieved") and "our own future" in future


# -- the checksum itself -------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)]),
       dtype=st.sampled_from(["float32", "bfloat16", "int32", "uint8", "bool"]),
       data=st.data())
def test_any_change_to_one_element_changes_the_digest(shape, dtype, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    value = jnp.asarray(rng.integers(0, 2, shape) if dtype == "bool" else rng.integers(0, 100, shape),
                        dtype=dtype)
    index = data.draw(st.tuples(*(st.integers(0, n - 1) for n in shape)))
    old = value[index]
    new = data.draw(st.integers(0, 255).filter(lambda v: jnp.asarray(v, dtype) != old))
    changed = value.at[index].set(jnp.asarray(new, dtype))
    digest = checksum.summarize({"x": value})[0]["x"]
    assert checksum.summarize({"x": changed})[0]["x"] != digest
    # Odd weights are invertible mod 2**32: no single-element change can cancel out.


def test_digest_is_the_same_on_every_sharding():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    value = jnp.arange(64 * 6, dtype=jnp.float32).reshape(64, 6)
    digest = checksum.summarize({"x": value})[0]
    for shape, spec in (((8,), PartitionSpec("a")), ((4, 2), PartitionSpec("a", "b")),
                        ((2, 4), PartitionSpec(None, None))):
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("a", "b")[: len(shape)])
        sharded = jax.device_put(value, NamedSharding(mesh, spec))
        assert checksum.summarize({"x": sharded})[0] == digest

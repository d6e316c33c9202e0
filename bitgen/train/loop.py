"""The training loop: the only place with side effects (data reads, logging, checkpoints, signals).

Run directory layout::

    <run_dir>/.bitgen.lock         held (flock) by the one process writing the run
    <run_dir>/config.json          the resolved ExperimentConfig
    <run_dir>/tokenizer/           the tokenizer(s) and codec (bitgen.textcodec): sampling needs no corpus
    <run_dir>/metrics.jsonl        one JSON line per logged step
    <run_dir>/tb/                  TensorBoard event files
    <run_dir>/checkpoints/<step>/  orbax checkpoints (state, data position, metadata)
    <run_dir>/entropy_tables/      entropy_table_<step>.npz each time the table is rebuilt
    <run_dir>/samples.jsonl        decoded text samples (train.sample_every > 0)

The loop dispatches steps asynchronously and reads metrics back only when it logs or saves; the
step itself refuses non-finite updates, so the state in memory and on disk is never NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from bitgen import __version__ as bitgen_version
from bitgen import parallel
from bitgen.checkpoint import (
    Checkpointer,
    CheckpointError,
    DamagedCheckpointError,
    Restored,
)
from bitgen.config import ConfigError, ExperimentConfig, to_dict
from bitgen.errors import BitgenError
from bitgen.families import family_of
from bitgen.preemption import PreemptionFlag
from bitgen.runlock import RunLock, RunLockedError
from bitgen.train.program import build_train_program
from bitgen.train.state import TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(BitgenError, FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; no state after it was kept or saved."""


@dataclasses.dataclass
class TrainResult:
    step: int  # updates completed
    preempted: bool  # stopped early by a signal / preemption notice (after saving)
    last_metrics: dict[str, float]


def _is_main() -> bool:
    return jax.process_index() == 0


def _agree(flag: bool) -> bool:
    """True on every process when any process saw ``flag`` (collective in multi-process runs)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class _Logger:
    """metrics.jsonl + TensorBoard + progress bar, written by process 0 only."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, start: int, enabled: bool, progress: bool):
        self.enabled = enabled
        self.tokens_per_step = cfg.data.batch_size * cfg.model.seq_tokens
        self.metrics_path = run_dir / "metrics.jsonl"
        self.bar = self.tb = None
        if not enabled:
            return
        self._truncate_after(start)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        # A resumed run repeats the steps after its checkpoint: drop their old lines. A line that
        # is not JSON is the torn end of a write cut short by a crash: dropped with a warning.
        if not self.metrics_path.exists():
            return
        kept = []
        for number, line in enumerate(self.metrics_path.read_text().splitlines(), 1):
            try:
                row = json.loads(line) if line else None
            except json.JSONDecodeError:
                row = None
                log.warning("%s line %d is not JSON (a write cut short?); dropped it",
                            self.metrics_path, number)
            if isinstance(row, dict) and row.get("step", step + 1) <= step:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def write(self, rows: list[dict[str, Any]], window_seconds: float, window_steps: int) -> dict[str, Any]:
        step_time = window_seconds / max(window_steps, 1)
        last = dict(rows[-1], step_time_s=step_time, tokens_per_s=self.tokens_per_step / max(step_time, 1e-9),
                    loss_window=float(np.mean([r["loss"] for r in rows])))
        if not self.enabled:
            return last
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(last) + "\n")
        for key, value in last.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}", value, last["step"])
        if self.bar is not None:
            self.bar.update(last["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                 step_s=f"{step_time:.3f}")
        return last

    def text(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _fetch(pending: list[tuple[int, dict[str, jax.Array]]]) -> list[dict[str, Any]]:
    """Device metrics of the pending steps -> host rows; raise on the first non-finite step."""
    rows = []
    for step, metrics in pending:
        host = {k: v.item() for k, v in jax.device_get(metrics).items()}
        if not host.pop("finite"):
            raise NonFiniteLossError(
                f"non-finite loss/gradient at step {step} (loss={host['loss']}, "
                f"grad_norm={host['grad_norm']}); that update was discarded and nothing after it "
                "was saved. Resume from the last checkpoint with a lower optim.lr or "
                "optim.grad_clip, or check the data"
            )
        rows.append({"step": step, **host})
    return rows


def _write_samples(cfg: ExperimentConfig, state: TrainState, rows, step: int, run_dir: Path, logger: _Logger) -> None:
    """Draw a few samples with the EMA weights and log them as text."""
    key = jax.random.fold_in(jax.random.key(cfg.train.seed + 1), step)
    family = family_of(cfg)
    raw, method = family.training_samples(cfg, state, rows, key, min(4, cfg.sampler.batch_size))
    texts = [decoded.text for decoded, _ in family.decode(raw, rows.text_codec)]
    if not logger.enabled:
        return
    with (run_dir / "samples.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "method": method, "samples": texts}) + "\n")
    for i, text in enumerate(texts):
        logger.text(f"[sample step {step} #{i}] {text[:300]}")
    if logger.tb is not None:
        logger.tb.add_text("samples", "\n\n".join(texts), step)


def _metadata(cfg: ExperimentConfig, mesh, step: int, vocab_size: int) -> dict[str, Any]:
    return {
        "config": to_dict(cfg),
        "step": step,
        "vocab_size": vocab_size,
        "bitgen_version": bitgen_version,
        "jax_version": jax.__version__,
        "process_count": jax.process_count(),
        "mesh": dict(mesh.shape),
    }


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """Hold the run directory's lock (process 0 takes it; every process stops when it cannot)."""
    lock, error = RunLock(run_dir), None
    if _is_main():
        try:
            lock.acquire()
        except RunLockedError as err:
            error = err
    if _agree(error is not None):
        raise error or RunLockedError(f"process 0 could not lock {run_dir}; see its error")
    try:
        yield
    finally:
        lock.release()


def _resume(ckpt: Checkpointer, cfg: ExperimentConfig, abstract: TrainState, data_iter: Any, *,
            fallback: bool, step: int | None) -> Restored:
    """Restore the train state and data position; refuse a target below the checkpoint's step;
    move the steps after the restored one aside (damaged or superseded) so training can pass them."""

    def consistent(restored: Restored) -> None:
        # batch k is the k-th of the iterator: a step-s checkpoint must sit at position s.
        position = data_iter.get_state()
        if restored.data_restored and position["next_index"] != restored.step:
            raise DamagedCheckpointError(
                f"its data position {position} does not match its step (expected "
                f"next_index={restored.step}); the checkpoint is inconsistent")

    restored = ckpt.restore(abstract, config=cfg, step=step, data_iter=data_iter, fallback=fallback,
                            check=consistent)
    if restored.step > cfg.train.steps:
        raise ConfigError(
            f"train.steps={cfg.train.steps} is below the checkpoint's step {restored.step}; set "
            f"train.steps >= {restored.step} to continue this run"
        )
    after = [s for s in ckpt.steps() if s > restored.step]
    if after:
        ckpt.set_aside(after, damaged={s for s, _ in restored.damaged})
    return restored


def train(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    resume_fallback: bool = False,
    resume_from: int | None = None,
    flag: PreemptionFlag | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg`` (any registered model family) in ``run_dir`` until ``train.steps`` or a
    preemption signal.

    The jitted init/step are cached per (config, mesh, vocabulary): calling train() again in the
    same process (resume, several runs) does not recompile. Checkpoint metadata stores
    ``vocab_size``; ``bitgen.train.task.abstract_params(cfg, vocab_size=...)`` builds the target
    for ``bitgen.checkpoint.restore_params``.

    The run directory is locked for the whole call (``bitgen.runlock``): a second writer raises
    RunLockedError before anything is written.
    ``resume``: continue from the latest checkpoint in ``run_dir`` (required when one exists).
    ``resume_fallback``: skip damaged steps for the newest good one. ``resume_from``: continue
    from that step (implies ``resume``). Either way the steps after the restored one are renamed
    aside (never deleted), so training can save their numbers again.
    ``flag``: polled at every step boundary; when set, the state is saved and the run returns
    with ``preempted=True``.
    """
    run_dir = Path(run_dir)
    with _run_lock(run_dir):
        return _train(cfg, run_dir, resume=resume or resume_from is not None,
                      fallback=resume_fallback, resume_from=resume_from,
                      flag=flag or PreemptionFlag(), progress=progress)


def _train(cfg: ExperimentConfig, run_dir: Path, *, resume: bool, fallback: bool,
           resume_from: int | None, flag: PreemptionFlag, progress: bool) -> TrainResult:
    from bitgen.data.corpus import build_corpus_rows, document_summary, pin_code_map
    from bitgen.data.pipeline import make_batch_dataset, make_batch_iterator
    from bitgen.textcodec import pin_run_text_codec

    mesh = parallel.make_mesh(cfg.mesh)
    main = _is_main()

    rows = build_corpus_rows(cfg.data, cfg.model.seq_tokens, progress=progress and main)
    pin_code_map(run_dir, rows.codec, write=main)
    family = family_of(cfg)
    family.check(cfg, rows.text_codec)
    pin_run_text_codec(run_dir, rows.text_codec, write=main)
    dataset = make_batch_dataset(
        rows.train_rows, rows.codec, global_batch=cfg.data.batch_size, seed=cfg.data.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        prompt_tokens=rows.prompt_tokens,
    )

    vocab_size = rows.codec.vocab_size
    program = build_train_program(cfg, mesh, vocab_size)
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=cfg.train.ckpt_every,
                        keep=cfg.train.keep_checkpoints, keep_every=cfg.train.keep_every)
    data_iter = make_batch_iterator(dataset)
    try:
        if ckpt.latest_step() is not None:
            if not resume:
                raise CheckpointError(
                    f"{run_dir} already holds checkpoints (latest step {ckpt.latest_step()}); pass "
                    "--resume to continue it or choose another --run-dir"
                )
            restored = _resume(ckpt, cfg, program.abstract, data_iter, fallback=fallback,
                               step=resume_from)
            state, start = restored.state, restored.step
            if not restored.data_restored:  # other process layout: batch k is a pure function of k
                data_iter = make_batch_iterator(dataset, start_batch=start)
        elif resume_from is not None:
            raise CheckpointError(f"--resume-from {resume_from}: {ckpt.directory} holds no checkpoint")
        else:
            state, start = program.init_state(), 0
    except BaseException:
        ckpt.close()
        raise

    if main:
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    logger = _Logger(run_dir, cfg, start, enabled=main, progress=progress)
    logger.text(f"data: {rows.stats.source}, documents {document_summary(rows.stats)}; "
                f"{rows.stats.train_rows:,} train rows of {rows.stats.seq_tokens} tokens")
    step_fn = program.step_fn

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    preempted = False
    try:
        for step in range(start, cfg.train.steps):
            local = next(data_iter)
            batch = parallel.global_batch(program.batch_of(local), mesh, cfg.data.batch_size)
            state, metrics = step_fn(state, batch)
            done = step + 1
            pending.append((done, metrics))
            window_steps += 1

            log_now = done % cfg.train.log_every == 0 or done == cfg.train.steps
            # Signals are agreed across processes only when logging (a collective per step
            # would stall the pipeline); a TPU preemption notice is agreed every step by orbax.
            signalled = flag.requested
            if jax.process_count() > 1:
                signalled = log_now and _agree(signalled)
            preempted = signalled or ckpt.reached_preemption(done)
            save_now = preempted or done == cfg.train.steps or done % cfg.train.ckpt_every == 0
            if log_now or save_now:
                rows_out = _fetch(pending)  # raises before any save of a non-finite state
                pending.clear()
                if log_now:
                    last = logger.write(rows_out, time.perf_counter() - window_start, window_steps)
                    window_start, window_steps = time.perf_counter(), 0
            if main:
                family.after_step(cfg, state, run_dir, done)
            if cfg.train.sample_every and done % cfg.train.sample_every == 0 and not preempted:
                with parallel.activation_mesh(mesh):  # the model's activation constraints act
                    _write_samples(cfg, state, rows, done, run_dir, logger)
            ckpt.save(done, state, metadata=_metadata(cfg, mesh, done, vocab_size), data_iter=data_iter,
                      force=save_now)
            if preempted:
                logger.text(f"preempted: saved step {done} to {ckpt.directory}; resume with --resume")
                break
        ckpt.wait()
    finally:
        ckpt.close()
        logger.close()
    return TrainResult(step=int(jax.device_get(state.step)), preempted=preempted, last_metrics=last)


def max_param_difference(run_a: str | Path, run_b: str | Path, which: str = "params") -> float:
    """Largest |a - b| over the parameters of the latest checkpoints of two run directories."""
    from bitgen.checkpoint import restore_params
    from bitgen.config import from_dict
    from bitgen.train.task import abstract_params

    checkpoints = Path(run_a) / "checkpoints"
    ckpt = Checkpointer(checkpoints, save_every=1, keep=1)
    try:
        meta = ckpt.metadata(ckpt.latest_step())
    finally:
        ckpt.close()
    target = abstract_params(from_dict(meta["config"]), vocab_size=meta.get("vocab_size"))
    a = restore_params(checkpoints, target, which=which)
    b = restore_params(Path(run_b) / "checkpoints", target, which=which)
    # On the host: one eager device op per leaf would compile one program per leaf shape.
    a, b = jax.device_get((a, b))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

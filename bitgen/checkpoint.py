"""The one facade over orbax: train state + data-iterator position + JSON metadata per step.

Layout of ``<dir>/<step>/``: ``state/`` (the TrainState pytree, one shard file set per process),
``data/`` (grain iterator state, one JSON per process), ``meta/`` (config, versions, mesh).
Orbax commits a step atomically (``commit_success.txt``); unfinished steps are never listed.

* Saves are asynchronous (the device->host copy blocks, the write happens in the background) and
  happen on a fixed interval, on a TPU preemption notice, or when forced (SIGTERM/SIGINT via
  ``PreemptionFlag``). The last ``keep`` steps are kept.
* Restores take an abstract target carrying the shardings of the *current* mesh, so a run can
  resume on a different mesh or device count. The config stored with the checkpoint is checked
  first; differing model/diffusion settings are refused by name.
* A latest step that cannot be read raises ``CheckpointError``; ``fallback=True`` walks back to
  the newest readable step instead.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from bitgen.config import ConfigError, ExperimentConfig, config_diff, from_dict

log = logging.getLogger(__name__)

# Sections whose differences make a checkpoint meaningless for a config; keys listed in
# EXECUTION_ONLY_KEYS change how the same function is computed, not the function, so they may differ.
COMPATIBILITY_SECTIONS = ("model", "diffusion")
EXECUTION_ONLY_KEYS = frozenset({"model.attention", "model.remat", "model.compute_dtype"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match; the message names the fix."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written with a different model/diffusion config."""


class PreemptionFlag:
    """Set by SIGTERM/SIGINT; loops poll ``requested`` at safe points and save before exiting.

    Poll it at step boundaries *and* inside long inner loops (evaluation, sampling), so a job
    scheduler's grace period is not spent waiting for a loop to finish. Handlers are installed
    only from the main thread and restored by ``uninstall``.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        log.warning("received %s: will checkpoint and stop at the next safe point",
                    signal.Signals(signum).name)

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore`` returns."""

    step: int
    state: Any
    metadata: dict[str, Any]
    data_restored: bool  # False when the data state was saved with another process layout


def check_compatible(saved_config: dict[str, Any], config: ExperimentConfig, where: str) -> None:
    """Raise IncompatibleCheckpointError naming each differing model/diffusion key."""
    try:
        saved = from_dict(saved_config)
    except ConfigError as err:
        raise IncompatibleCheckpointError(f"{where}: stored config cannot be read ({err})") from err
    if saved.task != config.task:
        raise IncompatibleCheckpointError(
            f"{where} holds a task={saved.task!r} model but the config has task={config.task!r}; "
            "set task to match or start a new --run-dir"
        )
    differing = [k for k in config_diff(saved, config, COMPATIBILITY_SECTIONS) if k not in EXECUTION_ONLY_KEYS]
    if differing:
        saved_d, now_d = dataclasses.asdict(saved), dataclasses.asdict(config)
        details = ", ".join(
            f"{k}: checkpoint={saved_d[k.split('.')[0]][k.split('.')[1]]!r} "
            f"config={now_d[k.split('.')[0]][k.split('.')[1]]!r}"
            for k in differing
        )
        raise IncompatibleCheckpointError(
            f"{where} was written with a different config ({details}); use the checkpoint's "
            "values (its meta/ holds the full config) or start a new --run-dir"
        )


# Orbax's default "replica-parallel" save splits every replicated shard into one slice per replica,
# each an eager ``slice`` op compiled for its own shape and offset: ~180 compilations (~10 s) for
# the first save of a tiny model on 8 devices. Splitting only pays off for large shards, so leaves
# whose per-replica slice would be under this size are written whole by one replica.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 4 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """PyTree handler for the train state with the replica-parallel threshold above."""
    registry = ocp.type_handlers.create_type_handler_registry(*(
        (ty, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES))
        if ty is jax.Array else (ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()
    ))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(item=abstract,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _rewrap_keys(restored: Any, abstract: Any) -> Any:
    """Turn the raw ``uint32`` key data orbax restores for typed PRNG keys back into typed keys.

    Without this a resumed state differs in type from a fresh one: the train step would be
    retraced and recompiled for it, and key-typed code would see raw arrays.
    """

    def fix(value, target):
        if jax.dtypes.issubdtype(target.dtype, jax.dtypes.prng_key) and not jax.dtypes.issubdtype(
                value.dtype, jax.dtypes.prng_key):
            # ``dtype._impl`` is the key's PRNG implementation (no public accessor on an abstract key).
            return jax.random.wrap_key_data(value, impl=target.dtype._impl)
        return value

    return jax.tree.map(fix, restored, abstract)


def _data_file(step_dir: Path) -> Path:
    return step_dir / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class Checkpointer:
    """Orbax CheckpointManager with bitgen's policies (see module docstring)."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ConfigError("train.ckpt_every and train.keep_checkpoints must be >= 1")
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save,
                save_decision_policy=sdp.AnySavePolicy(
                    [sdp.PreemptionCheckpointingPolicy(), sdp.FixedIntervalPolicy(interval=save_every)]
                ),
                preservation_policy=pp.LatestN(keep),
                create=True,
            ),
        )

    # -- queries --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a cluster preemption notice has been agreed on."""
        return self._manager.reached_preemption(step)

    # -- save -----------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, metadata: dict[str, Any], data_iter: Any = None,
             force: bool = False) -> bool:
        """Start an async save when the policy (or ``force``) says so; return whether it did.

        Every process must call this (it is collective). ``state`` leaves must be global arrays.
        """
        items = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(metadata)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- restore --------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, *, config: ExperimentConfig | None = None,
                step: int | None = None, data_iter: Any = None, fallback: bool = False) -> Restored:
        """Restore ``step`` (default: latest) onto the shardings carried by ``abstract_state``.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
        ``bitgen.train.state.state_layout``). ``data_iter`` (grain iterator) is restored in place
        when the checkpoint holds this process layout's data state. With ``fallback=True`` an
        unreadable step is skipped (logged) in favour of the newest readable older one;
        an incompatible config is never skipped.
        """
        candidates = self.steps() if step is None else [step]
        if not candidates:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        if step is not None and step not in self.steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.steps()}")
        errors = []
        for candidate in reversed(candidates):
            try:
                return self._restore_step(candidate, abstract_state, config, data_iter)
            except IncompatibleCheckpointError:
                raise
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                where = self.directory / str(candidate)
                errors.append(f"step {candidate}: {type(err).__name__}: {err}")
                if not fallback:
                    older = [s for s in self.steps() if s < candidate]
                    hint = (f"pass fallback=True (CLI: --resume-fallback) to use step {older[-1]}, "
                            if older else "")
                    raise CheckpointError(
                        f"checkpoint {where} cannot be read ({type(err).__name__}: {err}); "
                        f"{hint}or delete that step directory"
                    ) from err
                log.warning("checkpoint %s is unreadable (%s); trying an older one", where, err)
        raise CheckpointError(f"no readable checkpoint in {self.directory}:\n  " + "\n  ".join(errors))

    def _restore_step(self, step: int, abstract_state: Any, config: ExperimentConfig | None,
                      data_iter: Any) -> Restored:
        meta = self.metadata(step)
        if config is not None:
            check_compatible(meta.get("config", {}), config, f"checkpoint {self.directory / str(step)}")
        items = {"state": _restore_args(abstract_state)}
        data_restored = data_iter is not None and _data_file(self.directory / str(step)).exists()
        if data_restored:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = _rewrap_keys(restored["state"], abstract_state)
        return Restored(step=step, state=state, metadata=meta, data_restored=data_restored)


def restore_params(directory: str | Path, abstract_params: Any, *, step: int | None = None,
                   which: str = "ema_params") -> Any:
    """Only the parameters (default: the EMA weights, for sampling/eval) from a checkpoint dir.

    ``abstract_params``: ShapeDtypeStructs with the target shardings. Optimizer state and the
    schedule buffer are not read.
    """
    directory = Path(directory).absolute()
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {directory}")
        target = {which: abstract_params}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )),
        )
        return restored["state"][which]
    finally:
        manager.close()

"""The one facade over orbax: train state + data-iterator position + JSON metadata per step.

Layout of ``<dir>/<step>/``: ``state/`` (the TrainState pytree, one shard file set per process),
``data/`` (grain iterator state, one JSON per process), ``meta/`` (config, versions, mesh).
Orbax commits a step atomically (``commit_success.txt``); unfinished steps are never listed.

* Saves are asynchronous (the device->host copy blocks, the write happens in the background) and
  happen on a fixed interval, on a TPU preemption notice, or when forced (SIGTERM/SIGINT via
  ``bitgen.preemption.PreemptionFlag``). The last ``keep`` steps are kept, and with ``keep_every`` also every step
  that is a multiple of it.
* Every save stores a content checksum per array in ``meta/`` (``bitgen.checksum``); a restore
  recomputes them and refuses a step whose arrays differ or hold NaN/Inf, like any other damage.
* Restores take an abstract target carrying the shardings of the *current* mesh, so a run can
  resume on a different mesh or device count. The config stored with the checkpoint is checked
  first; differing model/diffusion settings are refused by name.
* A step that cannot be read raises ``DamagedCheckpointError`` (one line); ``fallback=True`` walks
  back to the newest good step instead, and ``set_aside`` renames the steps after it to
  ``<step>.damaged-<time>`` / ``<step>.superseded-<time>`` (outside orbax's step-name pattern,
  never deleted) so that training can save those step numbers again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from bitgen import checksum
from bitgen.config import ConfigError, ExperimentConfig, config_diff, from_dict
from bitgen.errors import BitgenError, one_line

log = logging.getLogger(__name__)


def _not_a_read_only_notice(record: logging.LogRecord) -> bool:
    """False for orbax's notices that a manager opened read-only (for sampling) is read-only:
    three WARNING lines per restore that tell the user nothing."""
    message = record.getMessage()
    return "read_only=True" not in message and "is read only" not in message


logging.getLogger("absl").addFilter(_not_a_read_only_notice)

# Sections whose differences make a checkpoint meaningless for a config; keys listed in
# EXECUTION_ONLY_KEYS change how the same function is computed, not the function, so they may differ.
COMPATIBILITY_SECTIONS = ("model", "diffusion")
# Data settings that decide which token a bit pattern stands for: a change makes the weights decode
# into other tokens.
BIT_DEFINING_KEYS = ("data.tokenizer", "data.vocab_size", "data.packing", "data.code_tokenizer",
                     "data.code_policy", "data.bit_order")
EXECUTION_ONLY_KEYS = frozenset({"model.attention", "model.remat", "model.compute_dtype"})


class CheckpointError(BitgenError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match; the message names the fix."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written with a different model/diffusion config."""


class DamagedCheckpointError(CheckpointError):
    """A step cannot be read, fails its checksums, holds NaN/Inf or is inconsistent."""


@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore`` returns."""

    step: int
    state: Any
    metadata: dict[str, Any]
    data_restored: bool  # False when the data state was saved with another process layout
    damaged: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # skipped: (step, why)


def check_compatible(saved_config: dict[str, Any], config: ExperimentConfig, where: str) -> None:
    """Raise IncompatibleCheckpointError naming each differing model/diffusion/bit-defining key."""
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
    differing += [k for k in config_diff(saved, config, ("data",)) if k in BIT_DEFINING_KEYS]
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


def _any_process(flag: bool) -> bool:
    """True on every process when any process saw ``flag`` (collective in multi-process runs)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _reason(err: Exception) -> str:
    """One line on why a step failed: bitgen's own message, or a library error's root cause."""
    return str(err) if isinstance(err, BitgenError) else one_line(err)


def verify_arrays(tree: Any, expected: dict[str, str]) -> None:
    """Raise DamagedCheckpointError when restored arrays differ from their saved checksums or hold
    NaN/Inf (a saved train state never does: the train step refuses non-finite updates)."""
    wrong, non_finite = checksum.mismatches(tree, expected)
    if wrong:
        raise DamagedCheckpointError(
            f"{len(wrong)} array(s) differ from their saved checksums: {', '.join(wrong[:3])}"
            f"{', …' if len(wrong) > 3 else ''}")
    if non_finite:
        raise DamagedCheckpointError(
            f"array(s) hold NaN/Inf, which a saved state never does: {', '.join(non_finite[:3])}")


class Checkpointer:
    """Orbax CheckpointManager with bitgen's policies (see module docstring)."""

    def __init__(self, directory: str | Path, *, save_every: int, keep: int, keep_every: int = 0,
                 async_save: bool = True):
        if save_every < 1 or keep < 1 or keep_every < 0:
            raise ConfigError("train.ckpt_every and train.keep_checkpoints must be >= 1 and "
                              "train.keep_every >= 0")
        self.directory = Path(directory).absolute()
        keep_policy = pp.LatestN(keep)
        if keep_every:
            keep_policy = pp.AnyPreservationPolicy([keep_policy, pp.EveryNSteps(keep_every)])
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save,
                save_decision_policy=sdp.AnySavePolicy(
                    [sdp.PreemptionCheckpointingPolicy(), sdp.FixedIntervalPolicy(interval=save_every)]
                ),
                preservation_policy=keep_policy,
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
        The per-array checksums are computed from the same (immutable) arrays orbax writes.
        """
        if not force and not self._manager.should_save(step):
            return False
        digests, _ = checksum.summarize(state)
        items = {"state": ocp.args.PyTreeSave(state),
                 "meta": ocp.args.JsonSave({**metadata, "checksums": digests})}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def set_aside(self, steps: list[int], damaged: set[int] = frozenset()) -> list[Path]:
        """Rename ``steps`` out of orbax's view (never deleted) so their numbers can be saved again:
        ``<step>.damaged-<time>`` for those in ``damaged``, else ``<step>.superseded-<time>``.
        Collective; process 0 renames. Returns the new paths."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = [self.directory / f"{s}.{'damaged' if s in damaged else 'superseded'}-{stamp}"
                 for s in steps]
        if jax.process_index() == 0:
            for s, target in zip(steps, moved):
                (self.directory / str(s)).rename(target)
                log.warning("moved checkpoint step %d aside to %s", s, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("bitgen_checkpoint_set_aside")
        self._manager.reload()
        return moved

    # -- restore --------------------------------------------------------------------------------
    def metadata(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, *, config: ExperimentConfig | None = None,
                step: int | None = None, data_iter: Any = None, fallback: bool = False,
                check: Callable[[Restored], None] | None = None) -> Restored:
        """Restore ``step`` (default: latest) onto the shardings carried by ``abstract_state``.

        ``abstract_state``: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
        ``bitgen.train.state.state_layout``). ``data_iter`` (grain iterator) is restored in place
        when the checkpoint holds this process layout's data state. ``check`` may raise
        DamagedCheckpointError for a restored step that is inconsistent. A damaged step raises
        DamagedCheckpointError; with ``fallback=True`` it is skipped (logged, listed in
        ``Restored.damaged``) for the newest good older one. An incompatible config is never skipped.
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        top = steps[-1] if step is None else step
        candidates = [s for s in steps if s <= top] if fallback else [top]
        damaged: list[tuple[int, str]] = []
        for candidate in reversed(candidates):
            where = self.directory / str(candidate)
            try:
                restored, error = self._restore_step(candidate, abstract_state, config, data_iter), None
                if check is not None:
                    check(restored)
            except IncompatibleCheckpointError:
                raise
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                restored, error = None, err
            if _any_process(error is not None):
                reason = _reason(error) if error is not None else "unreadable on another process"
                if not fallback:
                    older = [s for s in steps if s < candidate]
                    hint = (f"pass fallback=True (CLI: --resume-fallback) to use step {older[-1]} and "
                            "move this one aside, or pick an older one with --resume-from STEP"
                            if older else "no older step is left; start a new --run-dir")
                    raise DamagedCheckpointError(
                        f"checkpoint {where} cannot be read ({reason}); {hint}") from error
                log.warning("checkpoint %s is damaged (%s); trying an older one", where, reason)
                damaged.append((candidate, reason))
                continue
            restored.damaged = damaged
            return restored
        raise DamagedCheckpointError(
            f"no readable checkpoint in {self.directory} (damaged: "
            + "; ".join(f"step {s}: {why}" for s, why in damaged) + "); start a new --run-dir")

    def _restore_step(self, step: int, abstract_state: Any, config: ExperimentConfig | None,
                      data_iter: Any) -> Restored:
        where = self.directory / str(step)
        meta = self.metadata(step)
        if config is not None:
            check_compatible(meta.get("config", {}), config, f"checkpoint {where}")
        items = {"state": _restore_args(abstract_state)}
        data_restored = data_iter is not None and _data_file(where).exists()
        if data_restored:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = _rewrap_keys(restored["state"], abstract_state)
        verify_arrays(state, meta.get("checksums", {}))
        return Restored(step=step, state=state, metadata=meta, data_restored=data_restored)


def restore_params(directory: str | Path, abstract_params: Any, *, step: int | None = None,
                   which: str = "ema_params") -> Any:
    """Only the parameters (default: the EMA weights, for sampling/eval) from a checkpoint dir,
    verified against their saved checksums.

    ``abstract_params``: ShapeDtypeStructs with the target shardings. Optimizer state and the
    schedule buffer are not read. A step that cannot be read raises DamagedCheckpointError.
    """
    directory = Path(directory).absolute()
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {directory}")
        where = directory / str(step)
        target = {which: abstract_params}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore(),
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            ))
            verify_arrays(restored["state"], restored["meta"].get("checksums", {}))
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            older = sorted(s for s in manager.all_steps() if s < step)
            raise DamagedCheckpointError(
                f"checkpoint {where} cannot be read ({_reason(err)}); it is damaged or was written for "
                f"another config; {f'read an older step (CLI: --step N), have {older}' if older else 'no older step exists'}"
            ) from err
        return restored["state"][which]
    finally:
        manager.close()

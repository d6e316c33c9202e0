"""``bitgen export RUN OUT``: write a trained run as a shareable model folder.

The folder (layout in ``bitgen.modelio``) holds the run's config, a copy of its text pipeline
(``<run>/tokenizer/``; runs trained before runs kept one get it rebuilt from their config), the
weights as ``model.safetensors`` (EMA by default, ``--weights raw`` for the training params), the
run's entropy table at that step, and a short model card. ``bitgen sample --model-dir OUT`` reads
it.

Example::

    bitgen export runs/demo/cobit shared/demo_cobit
    bitgen export runs/demo/cobit shared/demo_cobit_raw_500 --weights raw --step 500
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bitgen.errors import BitgenError, one_line
from bitgen.loading import WEIGHTS, latest_entropy_table_path, run_text
from bitgen.modelio import TABLE_FILE, TOKENIZER_DIR, write_model_folder


class ExportError(BitgenError, ValueError):
    """A run cannot be exported; the message names the fix."""


def _run_parts(run: Path, step: int | None) -> tuple[Path, int, dict]:
    """(checkpoints dir, step, checkpoint metadata) of ``run``; ExportError when there is none."""
    from bitgen.checkpoint import Checkpointer

    ckpt_dir = run / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ExportError(f"{run} has no checkpoints/ directory; give a run directory written by "
                          "`bitgen train --run-dir`")
    ckpt = Checkpointer(ckpt_dir, save_every=1, keep=1)
    try:
        steps = ckpt.steps()
        if not steps:
            raise ExportError(f"no committed checkpoint in {ckpt_dir}; train the run first")
        if step is not None and step not in steps:
            raise ExportError(f"no checkpoint for step {step} in {ckpt_dir}; have steps {steps}")
        step = steps[-1] if step is None else step
        return ckpt_dir, step, ckpt.metadata(step)
    finally:
        ckpt.close()


def _run_config(run: Path, meta: dict) -> dict:
    """The run's config.json, else the config stored in the checkpoint metadata."""
    path = run / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ExportError(f"cannot read {path} ({one_line(err)}); restore it from the "
                              "checkpoint metadata or train again") from err
    if "config" not in meta:
        raise ExportError(f"{run} has no config.json and its checkpoint stores no config")
    return meta["config"]


def export_run(run_dir: str | Path, out: str | Path, *, weights: str = "ema",
               step: int | None = None) -> Path:
    """Write the model folder of ``run_dir`` at ``step`` (default: newest) to ``out``.

    weights: "ema" (the EMA shadow, what sampling uses) or "raw" (the training params). The
    safetensors metadata records bitgen_version, step, task, vocab_size and weights.
    """
    import jax

    from bitgen import __version__
    from bitgen.checkpoint import restore_params
    from bitgen.config import from_dict
    from bitgen.train.task import abstract_params

    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r} is not one of {sorted(WEIGHTS)}")
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ExportError(f"run directory {run} does not exist; check the path")
    ckpt_dir, step, meta = _run_parts(run, step)
    cfg_dict = _run_config(run, meta)
    cfg = from_dict(cfg_dict)
    vocab_size = meta.get("vocab_size")
    params = restore_params(ckpt_dir, abstract_params(cfg, vocab_size=vocab_size), step=step,
                            which=WEIGHTS[weights])
    info = {"bitgen_version": __version__, "step": step, "task": cfg.task,
            "vocab_size": vocab_size, "weights": weights}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = run / TOKENIZER_DIR
        if not tokenizer_dir.is_dir():  # an older run: the pipeline rebuilt from its config
            tokenizer_dir = run_text(cfg, run).save(Path(tmp) / TOKENIZER_DIR)
        folder = write_model_folder(out, cfg_dict, jax.device_get(params), tokenizer_dir, info)
    table = latest_entropy_table_path(run, step)
    if table is not None:
        shutil.copyfile(table, folder / TABLE_FILE)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory written by bitgen train")
    parser.add_argument("out", type=Path, help="the model folder to write (must not exist or be empty)")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="ema",
                        help="ema: the EMA weights sampling uses (default); raw: the training params")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out, weights=args.weights, step=args.step)
    extra = f", {TABLE_FILE}" if (out / TABLE_FILE).is_file() else ""
    print(f"wrote model folder {out} (config.json, {TOKENIZER_DIR}/, model.safetensors{extra}, "
          "README.md)")
    return 0

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
import shutil
import tempfile
from pathlib import Path

from bitgen.loading import WEIGHTS, latest_entropy_table_path, load_model
from bitgen.modelio import TABLE_FILE, TOKENIZER_DIR, write_model_folder


def export_run(run_dir: str | Path, out: str | Path, *, weights: str = "ema",
               step: int | None = None) -> Path:
    """Write the model folder of ``run_dir`` at ``step`` (default: the newest good one) to ``out``.

    The run is read as ``bitgen sample`` reads it (``bitgen.loading.load_model``: checksums
    verified, a damaged newest step skipped). weights: "ema" (the EMA shadow, what sampling uses)
    or "raw" (the training params). The safetensors metadata records bitgen_version, step, task,
    vocab_size and weights.
    """
    import jax

    from bitgen import __version__
    from bitgen.config import to_dict

    model = load_model(str(run_dir), weights=weights, step=step)
    info = {"bitgen_version": __version__, "step": model.step, "task": model.task,
            "vocab_size": model.text.vocab_size, "weights": weights}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = model.text.save(Path(tmp) / TOKENIZER_DIR)
        folder = write_model_folder(out, to_dict(model.cfg), jax.device_get(model.params),
                                    tokenizer_dir, info)
    table = latest_entropy_table_path(model.run, model.step)
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

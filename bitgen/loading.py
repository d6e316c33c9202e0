"""Load a trained model for sampling and evaluation: parameters, config, text pipeline, table.

``load_model`` reads a run directory (or a checkpoints directory, or one step in it). The text
pipeline comes from the run's ``tokenizer/`` folder (``bitgen.textcodec``), so sampling never
rebuilds the training corpus; runs saved before runs kept it rebuild it once from their config.
The corpus itself (``LoadedModel.rows``) is built only when asked for (held-out reference rows).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitgen.config import ExperimentConfig, apply_overrides, from_dict
from bitgen.errors import BitgenError
from bitgen.families import family_of
from bitgen.textcodec import TextCodec, run_text_codec

# Weights a checkpoint holds: the EMA shadow (default for sampling) or the raw training params.
WEIGHTS = {"ema": "ema_params", "raw": "params"}


class SampleError(BitgenError, RuntimeError):
    """A run, checkpoint, table or evaluator cannot be used; the message names the fix."""


@dataclass(frozen=True)
class LoadedModel:
    """A restored model with everything needed to sample and decode.

    text: the run's tokenizer + codec; table: the run's latest entropy table (CoBit; None when
    none was written yet); run: the run directory when known.
    """

    cfg: ExperimentConfig
    params: Any
    text: TextCodec
    table: Any  # EntropyTable | None
    step: int
    source: str
    run: Path | None = None

    @property
    def family(self):
        return family_of(self.cfg)

    @property
    def task(self) -> str:
        """The family's name (the ``task`` value), for labels and records."""
        return self.family.name

    @functools.cached_property
    def rows(self):
        """The run's packed corpus (``bitgen.data.corpus.PackedRows``), built or read from the
        cache on first use; refused when it no longer matches the model's text pipeline."""
        from bitgen.data.corpus import build_corpus_rows
        from bitgen.data.sources import DataError
        from bitgen.tokenizers import tokenizer_hash

        rows = build_corpus_rows(self.cfg.data, self.cfg.model.seq_tokens)
        same = (rows.codec == self.text.codec
                and tokenizer_hash(rows.tokenizer) == tokenizer_hash(self.text.tokenizer))
        if not same:
            raise DataError(f"the corpus built from the run's data settings no longer matches the "
                            f"tokenizer/codec the model was trained with ({self.source}); restore "
                            "the data source, or use --reference test")
        return rows


def _checkpoint_location(run_dir: str | None, checkpoint: str | None) -> tuple[Path, int | None, Path | None]:
    """(checkpoints directory, step or None for latest, run directory or None)."""
    if run_dir:
        run = Path(run_dir).expanduser()
        if not run.is_dir():
            raise SampleError(f"run directory {run} does not exist; train one with "
                              "`bitgen train --config ... --run-dir DIR` or check the path")
        return run / "checkpoints", None, run
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise SampleError(f"checkpoint directory {path} does not exist")
    if path.name.isdigit():  # a single step directory: <run>/checkpoints/<step>
        return path.parent, int(path.name), path.parent.parent
    return path, None, path.parent


def _committed_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.glob("*") if p.is_dir() and p.name.isdigit())


def _run_config(config: str | None, run: Path | None, ckpt_dir: Path, step: int) -> ExperimentConfig:
    """--config wins; else the run's config.json; else the config stored in the checkpoint."""
    from bitgen.config import load_config

    if config:
        return load_config(config)
    if run is not None and (run / "config.json").is_file():
        return from_dict(json.loads((run / "config.json").read_text()))
    from bitgen.checkpoint import Checkpointer

    meta = Checkpointer(ckpt_dir, save_every=1, keep=1).metadata(step)
    if "config" not in meta:
        raise SampleError(f"no config.json next to {ckpt_dir} and none in its metadata; pass --config")
    return from_dict(meta["config"])


def run_text(cfg: ExperimentConfig, run: Path | None) -> TextCodec:
    """The text pipeline a run was trained with: its ``tokenizer/`` folder, or (older runs) the
    corpus rebuilt from its config, checked against the run's pinned id -> code map."""
    saved = run_text_codec(run) if run is not None else None
    if saved is not None:
        return saved
    from bitgen.data.corpus import build_corpus_rows, pin_code_map

    rows = build_corpus_rows(cfg.data, cfg.model.seq_tokens)
    if run is not None:
        pin_code_map(run, rows.codec, write=False)
    return rows.text_codec


def text_codec_from_config(cfg: ExperimentConfig) -> TextCodec:
    """The text pipeline a config names by file (tokenizer, code tokenizer, code order), built
    without reading the corpus: what sampling from released or converted weights needs."""
    from bitgen.data.corpus import codec_for, resolve_code_tokenizer
    from bitgen.data.sources import DataError
    from bitgen.tokenizers import load_tokenizer, vocab_size_of

    data = cfg.data
    if data.tokenizer == "bpe":
        raise DataError("data.tokenizer=bpe is trained on the corpus, so weights alone cannot name it; "
                        "set data.tokenizer to the tokenizer file the weights were trained with (a "
                        "run keeps it as <run>/tokenizer/tokenizer.json)")
    if data.bit_order == "frequency":
        raise DataError("data.bit_order=frequency is ranked on the training rows; set data.bit_order "
                        "to the run's id->code map (<run>/tokenizer/code_map.npy)")
    tokenizer = load_tokenizer(data.tokenizer)
    code_tokenizer = resolve_code_tokenizer(data, tokenizer)
    vocab_size = code_tokenizer.code_vocab_size if code_tokenizer else vocab_size_of(tokenizer)
    return TextCodec(tokenizer, codec_for(data, vocab_size, code_tokenizer), code_tokenizer)


def latest_entropy_table(run: Path | None, step: int | None = None):
    """The newest ``entropy_tables/entropy_table_<step>.npz`` of a run written at or before
    ``step`` (default: any), or None."""
    from bitgen.diffusion.entropy_schedule import load_entropy_table

    if run is None:
        return None
    tables = sorted(p for p in (run / "entropy_tables").glob("entropy_table_*.npz")
                    if step is None or int(p.stem.rsplit("_", 1)[1]) <= step)
    if not tables:
        return None
    return load_entropy_table(tables[-1])


def load_model(run_dir: str | None = None, checkpoint: str | None = None, *, config: str | None = None,
               overrides: list[str] = (), table: str | None = None, weights: str = "ema",
               step: int | None = None) -> LoadedModel:
    """Restore the parameters of a run or a checkpoint directory for sampling.

    step: the checkpoint step to read (default: the newest; a damaged newest step is skipped,
    with a warning, for the newest good one). The weights are verified against their checksums.
    overrides: ``sampler.*`` and ``family.*`` only (the model must match the checkpoint).
    table: a shipped table name or path; default the run's newest entropy table.
    """
    from bitgen.checkpoint import DamagedCheckpointError, restore_params
    from bitgen.diffusion.entropy_schedule import load_entropy_table
    from bitgen.train.task import abstract_params

    if bool(run_dir) == bool(checkpoint):
        raise SampleError("give exactly one of --run-dir or --checkpoint")
    if weights not in WEIGHTS:
        raise SampleError(f"weights={weights!r} is not one of {sorted(WEIGHTS)}")
    bad = [o for o in overrides if not o.startswith(("sampler.", "family."))]
    if bad:
        raise SampleError(f"only sampler.* and family.* overrides apply to a trained model, got "
                          f"{bad}; the model and diffusion settings come from the checkpoint")
    ckpt_dir, path_step, run = _checkpoint_location(run_dir, checkpoint)
    if step is not None and path_step is not None and step != path_step:
        raise SampleError(f"--step {step} disagrees with the step directory {checkpoint}; give one")
    step = path_step if step is None else step
    steps = _committed_steps(ckpt_dir) if ckpt_dir.is_dir() else []
    if not steps:
        raise SampleError(f"no checkpoint in {ckpt_dir}; train first (bitgen train ... --run-dir "
                          f"{run or ckpt_dir.parent}) or point --checkpoint at a checkpoints directory")
    if step is not None and step not in steps:
        raise SampleError(f"no checkpoint for step {step} in {ckpt_dir}; have steps {steps}")
    candidates = [step] if step is not None else steps[::-1]
    cfg = apply_overrides(_run_config(config, run, ckpt_dir, candidates[0]), list(overrides))
    text = run_text(cfg, run)
    family_of(cfg).check(cfg, text)
    target = abstract_params(cfg, vocab_size=text.vocab_size)
    for k, step in enumerate(candidates):
        try:
            params = restore_params(ckpt_dir, target, step=step, which=WEIGHTS[weights])
            break
        except DamagedCheckpointError as err:
            if k + 1 == len(candidates):
                raise
            logging.getLogger(__name__).warning("skipping step %d: %s; reading step %d instead",
                                                step, err, candidates[k + 1])
    entropy_table = load_entropy_table(table) if table else latest_entropy_table(run, step)
    return LoadedModel(cfg, params, text, entropy_table, step, str(ckpt_dir / str(step)), run)

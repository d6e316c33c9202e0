"""Load a trained model for sampling and evaluation: parameters, config, text pipeline, table.

``load_model`` reads one of

* a run directory, a checkpoints directory or one step in it (orbax checkpoints);
* a model folder written by ``bitgen export`` (config, ``tokenizer/``, ``model.safetensors``);
* a parameter file with a config: ``.npz`` from ``bitgen convert`` (the released official weights)
  or ``.safetensors``; the text pipeline then comes from the tokenizer files the config names.

Runs and model folders carry their text pipeline (``bitgen.textcodec``), so sampling never rebuilds
the training corpus (runs saved before runs kept it rebuild it once from their config). The corpus
itself (``LoadedModel.rows``) is built only when asked for (held-out reference rows). Paths may be
``hf:OWNER/NAME/FILE[@REV]`` (files) or ``hf:OWNER/NAME[@REV]`` (folders), fetched by
``bitgen.hub``.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bitgen.config import ExperimentConfig, apply_overrides, from_dict
from bitgen.errors import BitgenError
from bitgen.families import family_of
from bitgen.hub import is_hub_spec, resolve
from bitgen.textcodec import TextCodec, run_text_codec

# Weights a checkpoint holds: the EMA shadow (default for sampling) or the raw training params.
WEIGHTS = {"ema": "ema_params", "raw": "params"}
# Model settings no parameter shape reveals: a converted file and its --config must agree on them.
SHAPELESS_MODEL_KEYS = ("n_heads", "seq_tokens", "rope_base", "logit_scaling", "mf_clip")


class SampleError(BitgenError, RuntimeError):
    """A run, checkpoint, table or evaluator cannot be used; the message names the fix."""


@dataclass(frozen=True)
class LoadedModel:
    """A restored model with everything needed to sample and decode.

    text: the run's tokenizer + codec; table: the run's latest entropy table (CoBit; None when
    none was written yet); run: the run directory when known. loaded_with: the loading choices
    that change the draws and are not the defaults (``{"weights": "raw"}``, ``{"table": "lm1b"}``),
    recorded beside samples and in ``bitgen eval``'s cache key; empty for the defaults.
    """

    cfg: ExperimentConfig
    params: Any
    text: TextCodec
    table: Any  # EntropyTable | None
    step: int
    source: str
    run: Path | None = None
    loaded_with: dict[str, str] = field(default_factory=dict)

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
        codes = (rows.code_tokenizer, self.text.code_tokenizer)
        same_codes = codes[0] is codes[1] is None or (
            None not in codes and tokenizer_hash(codes[0].tokenizer) == tokenizer_hash(codes[1].tokenizer))
        same = (same_codes and rows.codec == self.text.codec
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


def _local(spec: str | Path) -> Path:
    """A local path for ``spec`` (``hf:`` specs are fetched; plain paths must exist)."""
    return resolve(spec) if is_hub_spec(spec) else Path(spec).expanduser()


def latest_entropy_table_path(run: Path | None, step: int | None = None) -> Path | None:
    """The newest ``entropy_tables/entropy_table_<step>.npz`` of a run written at or before
    ``step`` (default: any), or None."""
    if run is None:
        return None
    tables = sorted(p for p in (run / "entropy_tables").glob("entropy_table_*.npz")
                    if step is None or int(p.stem.rsplit("_", 1)[1]) <= step)
    return tables[-1] if tables else None


def latest_entropy_table(run: Path | None, step: int | None = None):
    """The table at ``latest_entropy_table_path`` loaded, or None."""
    from bitgen.diffusion.entropy_schedule import load_entropy_table

    path = latest_entropy_table_path(run, step)
    return None if path is None else load_entropy_table(path)


def _table(table: str | None, default: Path | None):
    """``--table`` (a shipped name or a path) when given, else the model's own table, or None."""
    from bitgen.diffusion.entropy_schedule import load_entropy_table

    if table:
        return load_entropy_table(table)
    return None if default is None else load_entropy_table(default)


def _load_folder(spec: str, overrides: list[str], table: str | None) -> LoadedModel:
    """A model folder written by ``bitgen export``."""
    from bitgen.modelio import TABLE_FILE, open_model_folder, read_params_file
    from bitgen.train.task import abstract_params

    folder = open_model_folder(_local(spec))
    cfg = apply_overrides(from_dict(folder.config), list(overrides))
    text = TextCodec.load(folder.tokenizer)
    family_of(cfg).check(cfg, text)
    params = read_params_file(folder.weights, abstract_params(cfg, vocab_size=text.vocab_size))
    own_table = folder.root / TABLE_FILE
    return LoadedModel(cfg, params, text, _table(table, own_table if own_table.is_file() else None),
                       int(folder.meta.get("step", 0)), str(folder.root))


def _load_params_file(spec: str, config: str | None, overrides: list[str],
                      table: str | None) -> LoadedModel:
    """A parameter file (``bitgen convert``'s .npz, or .safetensors) with the config it belongs to."""
    from bitgen.config import load_config
    from bitgen.modelio import read_params_file, stored_model_config
    from bitgen.train.task import abstract_params

    if not config:
        raise SampleError("--params needs --config naming the model's settings (e.g. --config "
                          "cobit_s_owt for the released CoBit-S OWT weights)")
    cfg = load_config(config, list(overrides))
    path = _local(spec)
    stored = stored_model_config(path)
    if stored is not None:  # settings no parameter shape shows must agree with the file's
        differ = [k for k in SHAPELESS_MODEL_KEYS if getattr(stored, k) != getattr(cfg.model, k)]
        if differ:
            key = differ[0]
            raise SampleError(f"{spec} holds a model with model.{key}={getattr(stored, key)!r} but "
                              f"the config has {getattr(cfg.model, key)!r}; set model.{key}="
                              f"{getattr(stored, key)} or convert the weights with the config's value")
    text = text_codec_from_config(cfg)
    family_of(cfg).check(cfg, text)
    params = read_params_file(path, abstract_params(cfg, vocab_size=text.vocab_size))
    return LoadedModel(cfg, params, text, _table(table, None), 0, str(spec))


def load_model(run_dir: str | None = None, checkpoint: str | None = None, *,
               model_dir: str | None = None, params: str | None = None, config: str | None = None,
               overrides: list[str] = (), table: str | None = None, weights: str = "ema",
               step: int | None = None) -> LoadedModel:
    """Restore a model for sampling from exactly one of ``run_dir``, ``checkpoint``, ``model_dir``
    or ``params`` (with ``config``).

    step: the checkpoint step to read (default: the newest; a damaged newest step is skipped,
    with a warning, for the newest good one). The weights are verified against their checksums.
    weights: ``ema`` or ``raw`` (checkpoints hold both; files and folders hold one set).
    overrides: ``sampler.*`` and ``family.*`` only (the model must match its weights); with
    ``params`` any ``section.field=value`` (the config is the only source of the settings).
    table: a shipped table name or path; default the run's (or folder's) newest entropy table.
    """
    sources = [name for name, value in (("--run-dir", run_dir), ("--checkpoint", checkpoint),
                                        ("--model-dir", model_dir), ("--params", params)) if value]
    if len(sources) != 1:
        raise SampleError("give exactly one of --run-dir, --checkpoint, --model-dir or --params")
    if weights not in WEIGHTS:
        raise SampleError(f"weights={weights!r} is not one of {sorted(WEIGHTS)}")
    if (model_dir or params) and (step is not None or weights != "ema"):
        raise SampleError(f"{sources[0]} holds one set of weights: --step and --weights apply to "
                          "run and checkpoint directories only")
    chosen = {name: value for name, value in (("weights", weights), ("table", table))
              if value and value != "ema"}
    if params:
        return replace(_load_params_file(params, config, list(overrides), table), loaded_with=chosen)
    bad = [o for o in overrides if not o.startswith(("sampler.", "family."))]
    if bad:
        raise SampleError(f"only sampler.* and family.* overrides apply to a trained model, got "
                          f"{bad}; the model and diffusion settings come from the checkpoint")
    if model_dir:
        if config:
            raise SampleError("--model-dir carries its config; drop --config")
        return replace(_load_folder(model_dir, list(overrides), table), loaded_with=chosen)
    return replace(_load_checkpoint(run_dir, checkpoint, config, list(overrides), table, weights, step),
                   loaded_with=chosen)


def _load_checkpoint(run_dir: str | None, checkpoint: str | None, config: str | None,
                     overrides: list[str], table: str | None, weights: str,
                     step: int | None) -> LoadedModel:
    """A run directory, a checkpoints directory or one step directory in it."""
    from bitgen.checkpoint import DamagedCheckpointError, restore_params
    from bitgen.train.task import abstract_params

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
    return LoadedModel(cfg, params, text, _table(table, latest_entropy_table_path(run, step)), step,
                       str(ckpt_dir / str(step)), run)

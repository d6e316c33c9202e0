"""``bitgen sample``: draw samples from a trained run (CoBit or the AR baseline) and write them out.

Examples::

    bitgen sample --run-dir runs/demo/cobit --num 64 --seed 0 --out samples.txt
    bitgen sample --run-dir runs/demo/cobit sampler.name=heun sampler.grid=karras \\
        sampler.gamma=0.13 sampler.nfe=128 sampler.window_q=0.1,0.9 --num 256 --out heun.txt
    bitgen sample --run-dir runs/demo/ar --temperature 0.9 --top-p 0.95 --num 64 --out ar.txt

Outputs: ``--out`` (default ``<run>/samples/<step>_seed<S>.txt``) holds the texts (one sample
per block, blocks separated by a ``=== i ===`` line); ``<out>.jsonl`` holds one JSON object per
sample (text, ids, packed bits as hex, invalid-code count, seed, settings).

The library half (``load_model``, ``generate``) is what ``bitgen eval`` and ``bitgen demo`` call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitgen.config import (
    ExperimentConfig,
    SamplerConfig,
    apply_overrides,
    from_dict,
)
from bitgen.errors import BitgenError

# Weights a checkpoint holds: the EMA shadow (default for sampling) or the raw training params.
WEIGHTS = {"ema": "ema_params", "raw": "params"}


class SampleError(BitgenError, RuntimeError):
    """A run, checkpoint, table or evaluator cannot be used; the message names the fix."""


@dataclass(frozen=True)
class Sample:
    """One generated sequence. ids: token ids at the decoded length; bits_hex: the packed raw bits
    (MSB-first, CoBit only); n_invalid: codes naming no token (CoBit only, 0 for AR)."""

    text: str
    ids: tuple[int, ...]
    bits_hex: str
    n_invalid: int
    seed: int
    index: int


@dataclass(frozen=True)
class LoadedModel:
    """A restored model with everything needed to sample and decode.

    task: "cobit" | "ar"; rows: the run's packed corpus (tokenizer, codec, held-out rows);
    table: the run's latest entropy table (CoBit; None when none was written yet).
    """

    cfg: ExperimentConfig
    params: Any
    rows: Any  # bitgen.data.corpus.PackedRows
    table: Any  # EntropyTable | None
    step: int
    source: str

    @property
    def task(self) -> str:
        return self.cfg.task


# --------------------------------------------------------------------------------------------------
# Loading


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
    overrides: ``sampler.*=value`` only (model/diffusion must match the checkpoint).
    table: a shipped table name or path; default the run's newest entropy table.
    """
    from bitgen.checkpoint import DamagedCheckpointError, restore_params
    from bitgen.data.corpus import build_corpus_rows, pin_code_map
    from bitgen.diffusion.entropy_schedule import load_entropy_table
    from bitgen.train.task import abstract_params

    if bool(run_dir) == bool(checkpoint):
        raise SampleError("give exactly one of --run-dir or --checkpoint")
    if weights not in WEIGHTS:
        raise SampleError(f"weights={weights!r} is not one of {sorted(WEIGHTS)}")
    bad = [o for o in overrides if not o.startswith("sampler.")]
    if bad:
        raise SampleError(f"only sampler.* overrides apply to a trained model, got {bad}; the model "
                          "and diffusion settings come from the checkpoint")
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
    rows = build_corpus_rows(cfg.data, cfg.model.seq_tokens)
    if run is not None:
        pin_code_map(run, rows.codec, write=False)
    target = abstract_params(cfg, vocab_size=rows.codec.vocab_size)
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
    return LoadedModel(cfg, params, rows, entropy_table, step, str(ckpt_dir / str(step)))


# --------------------------------------------------------------------------------------------------
# Generation


def sampler_settings_dict(model: LoadedModel, sampler_cfg: SamplerConfig, *, temperature: float,
                          top_p: float) -> dict[str, Any]:
    """What identifies how a sample was drawn (written next to every sample and table row)."""
    if model.task == "ar":
        return {"task": "ar", "temperature": temperature, "top_p": top_p, "step": model.step}
    return {"task": "cobit", **dataclasses.asdict(sampler_cfg), "step": model.step}


def _cobit_draw(model: LoadedModel, sampler_cfg: SamplerConfig):
    from bitgen.sampling import build_sampler

    if sampler_cfg.grid == "entropic" and model.table is None:
        raise SampleError("sampler.grid=entropic needs an entropy table, and the run has none "
                          "(entropy_tables/ is empty); pass --table lm1b|owt|PATH or set "
                          "sampler.grid=karras")
    return build_sampler(model.cfg.model, sampler_cfg, model.table, model.cfg.model.seq_bits,
                         model.cfg.diffusion)


def _ar_draw(model: LoadedModel, temperature: float, top_p: float):
    import jax.numpy as jnp

    from bitgen.nn.ar import ar_sample
    from bitgen.tokenizers import separator_id
    from bitgen.train.task import ar_config

    ar_cfg = ar_config(model.cfg, model.rows.codec.vocab_size)
    # Rows are chunks of one document stream; the separator is the natural "start of text".
    bos = separator_id(model.rows.tokenizer)

    def draw(params, key, batch):
        prompt = jnp.full((batch, 1), bos, jnp.int32)
        return ar_sample(params, key, prompt, cfg=ar_cfg, length=ar_cfg.seq_len,
                         temperature=temperature, top_p=top_p)

    return draw


def generate(model: LoadedModel, num: int, seed: int, sampler_cfg: SamplerConfig | None = None, *,
             temperature: float = 1.0, top_p: float = 1.0, flag=None,
             progress: bool = True) -> list[Sample]:
    """Draw ``num`` samples in micro-batches of ``sampler.batch_size``.

    Micro-batch k uses ``fold_in(key(seed), k)``, so the first n samples do not depend on ``num``.
    ``flag`` (a PreemptionFlag) is polled between micro-batches; when set, the samples drawn so
    far are returned.
    """
    import jax

    if num < 1:
        raise SampleError(f"--num must be >= 1, got {num}")
    sampler_cfg = sampler_cfg or model.cfg.sampler
    batch = sampler_cfg.batch_size
    if model.task == "ar":
        draw = _ar_draw(model, temperature, top_p)
    else:
        sampler = _cobit_draw(model, sampler_cfg)
        draw = lambda params, key, b: sampler(params, key, b).bits
    root = jax.random.key(seed)
    n_batches = -(-num // batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, unit="sample", desc="sampling", leave=False, dynamic_ncols=True)
    samples: list[Sample] = []
    try:
        for k in range(n_batches):
            if flag is not None and flag.requested:
                break
            out = np.asarray(jax.device_get(draw(model.params, jax.random.fold_in(root, k), batch)))
            samples.extend(decode_samples(model, out, seed=seed, start=k * batch)[: num - len(samples)])
            if bar is not None:
                bar.update(min(batch, num - k * batch))
    finally:
        if bar is not None:
            bar.close()
    return samples


def decode_samples(model: LoadedModel, out: np.ndarray, *, seed: int, start: int) -> list[Sample]:
    """Raw sampler output (CoBit bits [B,S] or AR ids [B,T]) -> Samples with text (spec §5.4)."""
    rows = model.rows
    if model.task == "ar":
        return [Sample(rows.decode_text(ids), tuple(int(i) for i in ids), "", 0, seed, start + r)
                for r, ids in enumerate(out)]
    decoded = rows.codec.decode(out)
    return [
        Sample(rows.decode_text(ids[:length]), tuple(int(i) for i in ids[:length]),
               np.packbits(bits.astype(np.uint8)).tobytes().hex(), int(n_bad), seed, start + r)
        for r, (bits, ids, n_bad, length) in enumerate(zip(out, decoded.ids, decoded.n_invalid,
                                                           decoded.length))
    ]


def write_samples(samples: list[Sample], out: Path, settings: dict[str, Any]) -> Path:
    """Write ``out`` (text blocks) and ``out`` with suffix .jsonl; returns the JSONL path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"=== {s.index} ===\n{s.text}\n" for s in samples))
    jsonl = out.with_suffix(".jsonl")
    with jsonl.open("w") as f:
        for s in samples:
            f.write(json.dumps({"index": s.index, "text": s.text, "ids": list(s.ids), "bits": s.bits_hex,
                                "n_invalid": s.n_invalid, "seed": s.seed, "settings": settings}) + "\n")
    return jsonl


# --------------------------------------------------------------------------------------------------
# CLI


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``bitgen sample`` and ``bitgen eval``: which model and how to sample it."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a training run directory (latest checkpoint)")
    source.add_argument("--checkpoint", help="a checkpoints directory or one <step> directory in it")
    parser.add_argument("--step", type=int, help="checkpoint step to read (default: the newest good one)")
    parser.add_argument("--config", help="config name/path (default: the run's config.json)")
    parser.add_argument("--table", help="entropy table: lm1b | owt | owt_medium | .npz | directory "
                                        "(default: the run's newest entropy table)")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="ema",
                        help="EMA weights (default) or the raw training parameters")
    parser.add_argument("--temperature", type=float, default=1.0, help="AR runs: softmax temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="AR runs: nucleus mass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="sampler.field=value",
                        help="sampler overrides, e.g. sampler.name=heun sampler.nfe=128")
    parser.add_argument("--num", type=int, default=16, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="text output; the JSONL goes next to it "
                                      "(default: <run>/samples/<step>_seed<S>.txt)")


def run(args: argparse.Namespace) -> int:
    from bitgen.checkpoint import PreemptionFlag

    model = load_model(args.run_dir, args.checkpoint, config=args.config, overrides=args.overrides,
                       table=args.table, weights=args.weights, step=args.step)
    print(f"bitgen sample: {model.task} model from {model.source} (step {model.step})",
          file=sys.stderr)
    start = time.perf_counter()
    with PreemptionFlag() as flag:
        samples = generate(model, args.num, args.seed, temperature=args.temperature,
                           top_p=args.top_p, flag=flag, progress=not args.no_progress)
    settings = sampler_settings_dict(model, model.cfg.sampler, temperature=args.temperature,
                                     top_p=args.top_p)
    out = Path(args.out) if args.out else (
        Path(model.source).parent.parent / "samples" / f"{model.step}_seed{args.seed}.txt")
    jsonl = write_samples(samples, out, settings)
    print(f"bitgen sample: wrote {len(samples)} samples to {out} and {jsonl} "
          f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    if flag.requested:
        print("bitgen sample: stopped early by a signal; the file holds the samples drawn so far",
              file=sys.stderr)
        return 128 + (flag.signum or 15)
    return 0

"""Sampler sweeps: samples -> GenPPL and unigram entropy per operating point, over seeds (spec §6).

Pieces, from pure to I/O:

* ``parse_sweep(spec)`` — ``"name=ddim,heun grid=entropic,karras nfe=32,64 gamma=0,0.2"`` -> the
  cartesian product as lists of ``sampler.*`` overrides (``window_q`` values are written ``lo:hi``).
* ``score_samples(texts, ids, evaluator)`` — GenPPL (re-tokenised with the evaluator's tokenizer,
  no BOS, windowed token-weighted corpus perplexity, §6.1) and mean per-sample unigram entropy of
  the given token ids (§6.2; callers pass ``reference.entropy_ids``: base ids, not codes).
* ``bitgen.eval.table`` — what keys a point, mean ± std over seeds, the table as text and CSV.
* ``load_evaluator(spec, dtype)`` — a trained AR run directory or ``gpt2:DIR`` (Hugging Face GPT-2
  files, float32 or bfloat16).
* ``run_sweep(...)`` — draws and scores every (point, seed), appending each result to a JSONL
  file as soon as it is known; rows already in the file are reused, so an interrupted sweep
  continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitgen.eval.metrics import gen_ppl, mean_unigram_entropy
from bitgen.eval.reference import entropy_ids, reference_label, reference_rows
from bitgen.eval.table import POINT_KEYS, describe_point, point_key
from bitgen.generation import Sample, generate, sampler_settings_dict, sampling_options, write_samples
from bitgen.loading import LoadedModel, SampleError

# Bump when how a row is scored changes; rows of another version are scored again, not reused
# (2: texts scored one at a time, entropy on base ids of second-stage codes, reference labels).
SCORING_VERSION = 2


@dataclass(frozen=True)
class Evaluator:
    """A GenPPL scorer: ``encode(text) -> ids`` (no BOS), a jitted ``score(ids, mask)`` and its
    context ``window`` (tokens)."""

    name: str
    encode: Callable[[str], Sequence[int]]
    score: Callable
    window: int


def parse_sweep(spec: str) -> list[list[str]]:
    """``"key=v1,v2 key2=w1"`` -> one list of ``sampler.key=value`` overrides per combination.

    Keys are SamplerConfig fields (``sampler.`` prefix optional). ``window_q`` values are written
    ``lo:hi`` because commas separate values. ``;`` joins several such grids (their union, in
    order). An empty spec gives one empty combination.
    """
    if ";" in spec:
        return [p for part in spec.split(";") for p in parse_sweep(part)]
    from bitgen.config import ConfigError, SamplerConfig

    fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    axes: list[list[str]] = []
    for item in spec.split():
        if "=" not in item:
            raise ConfigError(f"sweep item {item!r} must look like key=v1,v2 (e.g. gamma=0,0.1,0.2)")
        key, values = item.split("=", 1)
        key = key.removeprefix("sampler.")
        if key not in fields:
            raise ConfigError(f"sweep key {key!r} is not a sampler field; valid: {sorted(fields)}")
        options = [v for v in values.split(",") if v]
        if not options:
            raise ConfigError(f"sweep key {key!r} has no values")
        axes.append([f"sampler.{key}={v.replace(':', ',')}" for v in options])
    return [list(combo) for combo in itertools.product(*axes)]


def score_samples(texts: Sequence[str], ids: Sequence[Sequence[int]],
                  evaluator: Evaluator) -> tuple[float, float]:
    """(GenPPL under ``evaluator``, mean unigram entropy in nats of ``ids``). Each text is scored
    alone (``gen_ppl``), so neither number depends on how texts are grouped or ordered beyond the
    float64 rounding of the sums over texts."""
    result = gen_ppl(list(texts), evaluator.encode, _pow2_windows(evaluator.score, evaluator.window),
                     window=evaluator.window, min_bucket=min(64, evaluator.window))
    return result.ppl, mean_unigram_entropy([np.asarray(i) for i in ids])


def _pow2_windows(score: Callable, window: int) -> Callable:
    """``score`` on inputs right-padded to a power-of-two number of windows.

    Padding is masked out, so the NLL is unchanged; it caps the scorer's compilations at
    log2(longest/window) shapes instead of one per window count (garbled samples re-tokenise to
    many different lengths).
    """

    def padded(ids, mask):
        length = ids.shape[1]
        n_windows = -(-length // window)
        target = window * (1 << max(0, n_windows - 1).bit_length())
        if target > length:
            ids = np.pad(np.asarray(ids), ((0, 0), (0, target - length)))
            mask = np.pad(np.asarray(mask), ((0, 0), (0, target - length)))
        return score(ids, mask)

    return padded


# --------------------------------------------------------------------------------------------------
# I/O: evaluators, reference rows, the sweep driver


def evaluator_dtype(dtype: str = "auto") -> str:
    """``auto`` -> bfloat16 on accelerators (the reference's GPT-2 Large runs in bf16), else float32."""
    import jax

    if dtype not in ("auto", "float32", "bfloat16"):
        raise SampleError(f"evaluator dtype {dtype!r} is not one of auto, float32, bfloat16")
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


def load_evaluator(spec: str, dtype: str = "auto") -> Evaluator:
    """``gpt2:DIR`` (HF GPT-2 config.json + weights + tokenizer.json, local files; or
    ``gpt2:hf:OWNER/NAME[@REV]``, fetched) or an AR run directory (scored in its own compute dtype).

    ``dtype`` (gpt2:DIR only, see ``evaluator_dtype``): bfloat16 holds the weights and runs the
    matmuls in bf16 as the reference's ``hf_dtype=bfloat16`` evaluator; float32 keeps full precision.
    """
    import jax

    if spec.startswith("gpt2:"):
        from bitgen.nn import gpt2

        from bitgen.hub import is_hub_spec, resolve

        model_dir = spec.removeprefix("gpt2:")
        if is_hub_spec(model_dir):  # gpt2:hf:OWNER/NAME[@REV]: the snapshot's local folder
            model_dir = resolve(model_dir)
        dtype = evaluator_dtype(dtype)
        try:
            params, cfg = gpt2.load_gpt2(model_dir, compute_dtype=dtype)
            encode = gpt2.load_gpt2_encoder(model_dir)
        except (FileNotFoundError, ImportError, ValueError) as err:  # missing or wrong files
            raise SampleError(f"evaluator {spec!r}: {err}") from err
        if dtype == "bfloat16":
            params = jax.tree.map(lambda p: p.astype(jax.numpy.bfloat16), params)
        _check_tokenizer(spec, encode, cfg.vocab_size)
        score = jax.jit(functools.partial(gpt2.sequence_nll, params, cfg=cfg))
        return Evaluator(f"{spec}@{dtype}", encode, score, cfg.n_positions)
    from bitgen.loading import load_model

    model = load_model(spec)
    if not hasattr(model.family, "sequence_scorer"):
        raise SampleError(f"evaluator run {spec} is a {model.task!r} run, which cannot score text; an "
                          "evaluator must be an AR run (task=ar, e.g. configs/demo_ar_eval_cpu.py) "
                          "or gpt2:DIR")
    tokenizer = model.text.tokenizer

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    score, vocab_size, window = model.family.sequence_scorer(model)
    _check_tokenizer(spec, encode, vocab_size)
    # The step is part of the name so rows scored by an earlier checkpoint are not reused.
    return Evaluator(f"{spec}@{model.step}", encode, jax.jit(score), window)


def _check_tokenizer(spec: str, encode: Callable[[str], Sequence[int]], vocab_size: int) -> None:
    """An evaluator whose tokenizer emits ids beyond its embedding table cannot score text."""
    probe = encode("The quick brown fox, 42 times! Ünïcödé text\n")
    if not probe or max(probe) >= vocab_size:
        raise SampleError(f"evaluator {spec}: its tokenizer produces ids up to {max(probe, default=-1)} "
                          f"but the model has {vocab_size} embeddings; the tokenizer and weights do not "
                          "belong together")


def reference_row(model: LoadedModel, evaluator: Evaluator, num: int, reference: str = "heldout",
                  test_source: str = "") -> dict[str, Any]:
    """The real-data point: the first ``num`` reference rows (``reference.reference_rows``: the
    held-out tail or the test split) decoded and scored through the samples' pipeline."""
    start = time.perf_counter()
    label, rows = reference_rows(model, reference, num, test_source)
    if len(rows) == 0:
        raise SampleError("the run's corpus has no held-out rows (data.val_fraction=0); the "
                          "real-data reference needs some, or use --reference test")
    texts = [model.text.decode_ids(r) for r in rows]
    ppl, entropy = score_samples(texts, [entropy_ids(model.text, r) for r in rows], evaluator)
    return {**{k: None for k in POINT_KEYS}, "model": "real data", "evaluator": evaluator.name,
            "reference": label, "reference_num": num, "seed": 0, "n": len(rows),
            "scoring": SCORING_VERSION, "genppl": ppl, "entropy": entropy, "n_invalid_mean": 0.0,
            "seconds": time.perf_counter() - start}


def reference_point(model: LoadedModel, evaluator: Evaluator, num: int, out_jsonl: Path,
                    reference: str = "heldout", test_source: str = "") -> dict[str, Any]:
    """``reference_row``, reused from ``out_jsonl`` when already there, else computed and appended."""
    wanted = (reference_label(model, reference, test_source), num, evaluator.name, SCORING_VERSION)
    for row in read_rows(out_jsonl):
        if row["model"] == "real data" and wanted == (row.get("reference"), row.get("reference_num"),
                                                      row["evaluator"], row.get("scoring")):
            return row
    row = reference_row(model, evaluator, num, reference, test_source)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with out_jsonl.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row_for(model: LoadedModel, sampler_cfg, temperature: float, top_p: float) -> dict[str, Any]:
    settings = sampler_settings_dict(model, sampler_cfg, temperature=temperature, top_p=top_p)
    row = {k: settings.get(k) for k in POINT_KEYS}
    row["model"] = model.task
    return row


def _samples_file(samples_dir: Path, row: dict[str, Any], seed: int, num: int, batch: int) -> Path:
    """Where the samples of one (point, seed, n, micro-batch) are cached (the evaluator is not part
    of the name: the same samples can be scored under any evaluator)."""
    import hashlib

    identity = json.dumps([point_key({**row, "evaluator": None}), seed, num, batch])
    return samples_dir / f"{row['model']}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.jsonl"


def _read_samples(path: Path) -> tuple[list[Sample], float | None]:
    """Cached samples and the seconds it took to draw them."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    samples = [Sample(r["text"], tuple(r["ids"]), r["bits"], r["n_invalid"], r["seed"], r["index"])
               for r in records]
    return samples, records[0]["settings"].get("draw_seconds") if records else None


def run_sweep(model: LoadedModel, evaluator: Evaluator | None, out_jsonl: Path, *,
              points: Sequence[Sequence[str]] = ((),), seeds: Sequence[int] = (0,), num: int = 64,
              temperatures: Sequence[float] = (1.0,), top_p: float = 1.0, batch_size: int | None = None,
              flag=None, progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Draw and score ``num`` samples per (point, seed); returns this sweep's rows.

    CoBit models sweep ``points`` (lists of sampler overrides); AR models sweep ``temperatures``.
    ``batch_size`` (micro-batch of the sampler) defaults to the run's ``sampler.batch_size``.
    Samples are cached under ``<out_jsonl dir>/samples/`` (``write_samples`` format) and scored
    rows are appended to ``out_jsonl`` as soon as known; both are reused on a re-run, so an
    interrupted sweep continues and a new evaluator rescores without redrawing. ``evaluator=None``
    only draws and caches. Stops early (returning what is done) when ``flag`` is set.
    """
    from bitgen.config import apply_overrides

    done = {(point_key(r), r["seed"], r["n"]): r for r in read_rows(out_jsonl)
            if r.get("scoring") == SCORING_VERSION}
    if model.family.sweeps_sampler:
        configs = [(apply_overrides(model.cfg, list(p)).sampler, 1.0) for p in points]
    else:
        configs = [(model.cfg.sampler, sampling_options(model, t, top_p)[0]) for t in temperatures]
    top_p = sampling_options(model, None, top_p)[1]
    if batch_size:
        configs = [(dataclasses.replace(c, batch_size=batch_size), t) for c, t in configs]
    rows = []
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    for sampler_cfg, temperature in configs:
        for seed in seeds:
            if flag is not None and flag.requested:
                return rows
            row = _row_for(model, sampler_cfg, temperature, top_p)
            row["evaluator"] = evaluator.name if evaluator else None
            cached = done.get((point_key(row), seed, num))
            if cached is not None:
                rows.append(cached)
                continue
            cache = _samples_file(out_jsonl.parent / "samples", row, seed, num, sampler_cfg.batch_size)
            start = time.perf_counter()
            samples, seconds = _read_samples(cache) if cache.is_file() else ([], None)
            if len(samples) != num:  # absent, or cut short while being written
                samples = generate(model, num, seed, sampler_cfg, temperature=temperature,
                                   top_p=top_p, flag=flag, progress=progress)
                if len(samples) < num:  # interrupted mid-point: record nothing partial
                    return rows
                seconds = time.perf_counter() - start
                settings = sampler_settings_dict(model, sampler_cfg, temperature=temperature, top_p=top_p)
                write_samples(samples, cache.with_suffix(".txt"), {**settings, "draw_seconds": seconds})
            if evaluator is None:
                log(f"  {row['model']} {describe_point(row)} nfe={row['nfe']} seed={seed}: drew {num} "
                    f"samples ({time.perf_counter() - start:.1f} s)")
                continue
            ppl, entropy = score_samples([s.text for s in samples],
                                         [entropy_ids(model.text, s.ids) for s in samples], evaluator)
            row.update(seed=seed, n=num, scoring=SCORING_VERSION, genppl=ppl, entropy=entropy,
                       seconds=seconds,
                       n_invalid_mean=float(np.mean([s.n_invalid for s in samples])))
            with out_jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            log(f"  {row['model']} {describe_point(row)} nfe={row['nfe']} seed={seed}: "
                f"GenPPL {ppl:.2f}, entropy {entropy:.3f} ({time.perf_counter() - start:.1f} s)")
    return rows


"""Draw samples from a loaded model and write them out: what ``bitgen sample``, ``bitgen eval``
and the demo share.

``generate`` asks the model's family for its sampler and decoder, so it holds no per-family code.
A sample file is text blocks (``=== i ===`` then the text) with a JSONL twin holding one record per
sample (text, ids, packed bits as hex, invalid-code count, seed, prompt, settings).

Prompted sampling (``bitgen.prompts``): ``generate(..., prompt=layout)`` draws rows whose first
tokens are the prompt's; ``generate_prompted`` draws ``num`` samples for each of several prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitgen.config import SamplerConfig
from bitgen.loading import LoadedModel, SampleError
from bitgen.prompts import PromptLayout


@dataclass(frozen=True)
class Sample:
    """One generated sequence. ids: token ids at the decoded length; bits_hex: the packed raw bits
    (MSB-first; "" for families that generate ids); n_invalid: codes naming no token; prompt: the
    prompt or infill text as given (gap markers included), None when drawn unprompted."""

    text: str
    ids: tuple[int, ...]
    bits_hex: str
    n_invalid: int
    seed: int
    index: int
    prompt: str | None = None


def sampling_options(model: LoadedModel, temperature: float | None,
                     top_p: float | None) -> tuple[float, float]:
    """(temperature, top_p): the flags when given, else the family section's defaults."""
    section = model.cfg.family
    default_t = getattr(section, "temperature", 1.0)
    default_p = getattr(section, "top_p", 1.0)
    return (default_t if temperature is None else temperature,
            default_p if top_p is None else top_p)


def sampler_settings_dict(model: LoadedModel, sampler_cfg: SamplerConfig, *, temperature: float,
                          top_p: float) -> dict[str, Any]:
    """What identifies how a sample was drawn (written next to every sample and table row)."""
    drawn = {**model.family.settings(sampler_cfg, options=model.cfg.family, temperature=temperature,
                                     top_p=top_p), "step": model.step}
    return {**drawn, "loaded_with": model.loaded_with} if model.loaded_with else drawn


def decode_samples(model: LoadedModel, out: np.ndarray, *, seed: int, start: int,
                   prompt: str | None = None) -> list[Sample]:
    """Raw sampler output (bits [B,S] or ids [B,T], per family) -> Samples with text (spec §5.4)."""
    return [Sample(d.text, d.ids, bits_hex, d.n_invalid, seed, start + r, prompt)
            for r, (d, bits_hex) in enumerate(model.family.decode(out, model.text))]


def check_guidance(model: LoadedModel, sampler_cfg: SamplerConfig, *, conditioned: bool) -> None:
    """Refuse ``sampler.guidance`` w != 1 for a family that does not guide, or with nothing to
    guide towards (``conditioned``: a prompt, an infill or clamped bits are given)."""
    w = sampler_cfg.guidance
    if w == 1:
        return
    if not getattr(model.family, "guides", False):
        raise SampleError(f"--guidance {w:g}: task={model.task} runs have no classifier-free "
                          "guidance; drop --guidance (sampler.guidance=1)")
    if not conditioned:
        raise SampleError(f"--guidance {w:g} steers samples towards a condition and none is given; "
                          "pass --prompt/--prompts/--infill, or drop --guidance (sampler.guidance=1)")


def guidance_note(sampler_cfg: SamplerConfig) -> str | None:
    """What guidance costs, for logs: None at w = 1 (one network call per denoise)."""
    from bitgen.sampling import nfe_to_grid_points

    if sampler_cfg.guidance == 1:
        return None
    points = nfe_to_grid_points(sampler_cfg.nfe, sampler_cfg.name, sampler_cfg.sc_mode, guided=True)
    return (f"guidance w={sampler_cfg.guidance:g}: two network calls per denoise (conditional and "
            f"unconditional); sampler.nfe={sampler_cfg.nfe} counts both, so the σ-grid has "
            f"{points} points")


def generate(model: LoadedModel, num: int, seed: int, sampler_cfg: SamplerConfig | None = None, *,
             temperature: float | None = None, top_p: float | None = None, flag=None,
             progress: bool = True, prompt: PromptLayout | None = None,
             first_index: int = 0) -> list[Sample]:
    """Draw ``num`` samples in micro-batches of ``sampler.batch_size``.

    Micro-batch k uses ``fold_in(key(seed), k)``, so the first n samples do not depend on ``num``.
    ``flag`` (a PreemptionFlag) is polled between micro-batches; when set, the samples drawn so
    far are returned. ``prompt``: every row starts with its given tokens (``bitgen.prompts``).
    Sample indices count from ``first_index``.
    """
    import jax

    if num < 1:
        raise SampleError(f"--num must be >= 1, got {num}")
    sampler_cfg = sampler_cfg or model.cfg.sampler
    check_guidance(model, sampler_cfg, conditioned=prompt is not None)
    temperature, top_p = sampling_options(model, temperature, top_p)
    batch = sampler_cfg.batch_size
    prompted = {} if prompt is None else {"prompt": prompt}
    draw = model.family.draw(model, sampler_cfg, temperature=temperature, top_p=top_p, **prompted)
    label = None if prompt is None else prompt.text
    root = jax.random.key(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, unit="sample", desc="sampling", leave=False, dynamic_ncols=True)
    samples: list[Sample] = []
    try:
        for k in range(-(-num // batch)):
            if flag is not None and flag.requested:
                break
            out = np.asarray(jax.device_get(draw(model.params, jax.random.fold_in(root, k), batch)))
            samples.extend(decode_samples(model, out, seed=seed, start=first_index + k * batch,
                                          prompt=label)[: num - len(samples)])
            if bar is not None:
                bar.update(min(batch, num - k * batch))
    finally:
        if bar is not None:
            bar.close()
    return samples


def generate_prompted(model: LoadedModel, prompts: list[PromptLayout], num: int, seed: int,
                      sampler_cfg: SamplerConfig | None = None, *, flag=None,
                      **options) -> list[Sample]:
    """``num`` samples per prompt, in order, indices running across prompts. Every prompt is
    drawn with the same ``seed``, so its samples do not depend on the other prompts. ``options``:
    those of ``generate``."""
    samples: list[Sample] = []
    for prompt in prompts:
        if flag is not None and flag.requested:
            break
        samples += generate(model, num, seed, sampler_cfg, flag=flag, prompt=prompt,
                            first_index=len(samples), **options)
    return samples


def not_beginning_with_prompt(samples: list[Sample]) -> list[Sample]:
    """Prefix-prompted samples whose text does not begin with their prompt although their ids do:
    a decoder that rewrites a token by the ones after it joined the prompt's end to the next
    token (``bitgen.prompts``, "Begins with"). Pass samples of prefix prompts only."""
    return [s for s in samples if s.prompt is not None and not s.text.startswith(s.prompt)]


def write_samples(samples: list[Sample], out: Path, settings: dict[str, Any]) -> Path:
    """Write ``out`` (text blocks) and ``out`` with suffix .jsonl; returns the JSONL path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"=== {s.index} ===\n{s.text}\n" for s in samples))
    jsonl = out.with_suffix(".jsonl")
    with jsonl.open("w") as f:
        for s in samples:
            f.write(json.dumps({"index": s.index, "text": s.text, "ids": list(s.ids), "bits": s.bits_hex,
                                "n_invalid": s.n_invalid, "seed": s.seed, "prompt": s.prompt,
                                "settings": settings}) + "\n")
    return jsonl

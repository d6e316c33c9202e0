"""CoBit: bitstream diffusion over P-bit token codes (the SDT denoiser, spec §2-§5)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitgen.errors import BitgenError, ConfigError
from bitgen.families.base import Draw, Task

if TYPE_CHECKING:  # the registry imports this module to read a config: model code loads on use
    import jax
    import numpy as np

    from bitgen.config import ExperimentConfig, SamplerConfig
    from bitgen.prompts import PromptLayout
    from bitgen.textcodec import DecodedText, TextCodec


class MissingTableError(BitgenError, RuntimeError):
    """The entropic σ-grid was asked for but the model has no entropy table."""


def check_code_width(cfg: Any, text: TextCodec) -> None:
    """Raise ConfigError unless ``model.patch_size`` is the codec's bits per token (every family
    that generates the codes CoBit diffuses: CoBit, BitLM, block CoBit)."""
    if text.codec.width != cfg.model.patch_size:
        raise ConfigError(
            f"the tokenizer/codec gives {text.codec.width} bits per token but "
            f"model.patch_size={cfg.model.patch_size}; set model.patch_size={text.codec.width}")


def check_table(model: Any, sampler_cfg: SamplerConfig) -> None:
    """Raise MissingTableError when ``sampler_cfg`` asks for the entropic grid and the loaded
    ``model`` has no entropy table."""
    if sampler_cfg.grid == "entropic" and model.table is None:
        raise MissingTableError(
            "sampler.grid=entropic needs an entropy table and this model has none (a run's "
            "entropy_tables/ is empty, or a weights file or folder came without one); pass "
            "--table lm1b|owt|PATH or set sampler.grid=karras")


class CoBit:
    name = "cobit"
    options = None
    sweeps_sampler = True
    guides = True

    def check(self, cfg: ExperimentConfig, text: TextCodec) -> None:
        check_code_width(cfg, text)

    def task(self, cfg: ExperimentConfig, vocab_size: int | None = None) -> Task:
        import jax.numpy as jnp

        from bitgen.diffusion import entropy_schedule as es
        from bitgen.diffusion.denoiser import init_params, param_logical_axes
        from bitgen.diffusion.loss import diffusion_loss
        from bitgen.train.step import StepFns

        def loss(params, bits, sigma, key, cond_mask=None):
            # cond_mask [B,S] (batch entry "cond_mask", True = known bit): conditional training.
            value, aux = diffusion_loss(params, bits, sigma, key, model_cfg=cfg.model,
                                        diffusion_cfg=cfg.diffusion, train=True,
                                        cond_mask=cond_mask)
            mse = aux["mse_per_sample"]
            if cond_mask is None:
                return value, ({"mse": jnp.mean(mse)}, mse)
            # Rows without target bits have MSE NaN: the schedule drops them, the metric skips them.
            scored = jnp.isfinite(mse)
            mean_mse = jnp.sum(jnp.where(scored, mse, 0.0)) / jnp.maximum(jnp.sum(scored), 1)
            return value, ({"mse": mean_mse}, mse)

        def draw_cond(schedule, key, batch, step):
            return es.draw_training_sigma(schedule, key, batch, step, cfg.entropy, cfg.diffusion)

        def update_schedule(schedule, sigma, mse, step_after):
            # The table is rebuilt when the number of completed updates hits the cadence.
            return es.maybe_rebuild(es.push_samples(schedule, sigma, mse), step_after, cfg.entropy)

        return Task(
            name=self.name,
            init_params=lambda key: init_params(key, cfg.model),
            param_axes=param_logical_axes(cfg.model),
            init_schedule=lambda: es.init_schedule_state(cfg.entropy, cfg.diffusion),
            step_fns=StepFns(input_key="bits", loss=loss, optional_inputs=("cond_mask",),
                             draw_cond=draw_cond,
                             update_schedule=update_schedule,
                             cond_metrics=lambda sigma: {"sigma_median": jnp.median(sigma)}),
        )

    def draw(self, model: Any, sampler_cfg: SamplerConfig, *, temperature: float = 1.0,
             top_p: float = 1.0, prompt: PromptLayout | None = None) -> Draw:
        """The run's sampler (``temperature``/``top_p`` are AR settings and do not apply).

        ``prompt``: its given tokens' bits are clamped at every solver step (``Cond.clamped``), a
        prefix or an infill alike. A model trained without conditioning still takes them
        ("replacement" conditioning); ``prompt=None`` is the unconditional sampler bit for bit.
        With a prompt and ``sampler_cfg.guidance`` w != 1 the sampler is guided (``guided_denoise``:
        two network calls per denoise out of the ``nfe`` budget); w = 1 is the plain conditional
        sampler. Callers refuse w != 1 without a prompt (``bitgen.generation.check_guidance``).
        """
        import jax.numpy as jnp
        import numpy as np

        from bitgen.diffusion.cond import Cond
        from bitgen.sampling import build_sampler

        check_table(model, sampler_cfg)
        guided = prompt is not None and sampler_cfg.guidance != 1
        sampler = build_sampler(model.cfg.model, sampler_cfg, model.table, model.cfg.model.seq_bits,
                                model.cfg.diffusion, guided=guided)
        if prompt is None:
            return lambda params, key, batch: sampler(params, key, batch).bits
        mask, bits = prompt.known_bits(model.text, model.cfg.model.seq_bits)
        scale = {"guidance": jnp.float32(sampler_cfg.guidance)} if guided else {}

        def draw(params, key, batch):
            cond = Cond.clamped(np.broadcast_to(mask, (batch, mask.size)),
                                np.broadcast_to(bits, (batch, bits.size)), **scale)
            return sampler(params, key, batch, cond=cond).bits

        return draw

    def decode(self, out: np.ndarray, text: TextCodec) -> list[tuple[DecodedText, str]]:
        import numpy as np

        bits = np.asarray(out)
        return [(row, np.packbits(b.astype(np.uint8)).tobytes().hex())
                for row, b in zip(text.decode_bits(bits), bits)]

    def settings(self, sampler_cfg: SamplerConfig, *, options: None = None, temperature: float = 1.0,
                 top_p: float = 1.0) -> dict[str, Any]:
        """Every ``sampler.*`` field (CoBit has no family section; temperature/top_p do not apply)."""
        return {"task": self.name, **dataclasses.asdict(sampler_cfg)}

    def training_samples(self, cfg: ExperimentConfig, state: Any, rows: Any, key: jax.Array,
                         n: int) -> tuple[np.ndarray, str]:
        """``cfg.sampler`` on the Karras grid until the run has learned its entropy table."""
        import jax
        import numpy as np
        from jax.experimental import multihost_utils

        from bitgen.sampling import build_sampler

        sampler_cfg, table = cfg.sampler, None
        if bool(jax.device_get(state.schedule.table_ready)):
            table = jax.device_get(state.schedule.table)
        elif sampler_cfg.grid == "entropic":
            sampler_cfg = dataclasses.replace(sampler_cfg, grid="karras")  # no table learned yet
        draw = build_sampler(cfg.model, sampler_cfg, table, cfg.model.seq_bits, cfg.diffusion)
        bits = multihost_utils.process_allgather(draw(state.ema_params, key, n).bits, tiled=True)
        return np.asarray(jax.device_get(bits)), sampler_cfg.grid

    def after_step(self, cfg: ExperimentConfig, state: Any, run_dir: Path, done: int) -> None:
        """Write the entropy table each time the schedule rebuilds it."""
        import jax

        from bitgen.diffusion.entropy_schedule import save_entropy_table

        if not (cfg.entropy.enabled and done % cfg.entropy.update_every == 0):
            return
        if bool(jax.device_get(state.schedule.table_ready)):
            save_entropy_table(jax.device_get(state.schedule.table),
                               run_dir / "entropy_tables" / f"entropy_table_{done:08d}.npz")


FAMILY = CoBit()

"""Block CoBit: CoBit's SDT, σ process, loss and sampler applied block by block (issue 13).

Attention is full inside a block of m = ``family.block_tokens`` tokens and causal across blocks;
each block has its own σ in training; sampling denoises one block at a time with the run's CoBit
sampler (``sampler.*``) while the blocks before it are clean context in a KV cache
(``bitgen.nn.block_sdt``, ``bitgen.sampling.block_cobit_sampler``). The SDT's sizes, the σ
process and the entropy-rate schedule are CoBit's (``model.*``, ``diffusion.*``, ``entropy.*``);
docs/block_cobit.md lists every choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitgen.errors import ConfigError
from bitgen.families.base import Draw, Task

if TYPE_CHECKING:  # the registry imports this module to read a config: model code loads on use
    import jax
    import numpy as np

    from bitgen.config import ExperimentConfig, SamplerConfig
    from bitgen.prompts import PromptLayout
    from bitgen.textcodec import DecodedText, TextCodec

# bitgen.sampling.block_cobit_sampler.POSITIONWISE_POLICIES (kept here: reading a config loads no
# model code).
CODE_POLICIES = ("modulo", "nearest")


@dataclass(frozen=True)
class BlockCoBitOptions:
    """Block CoBit's section (``family.*`` keys)."""

    block_tokens: int = 4  # m: tokens per block (m = T: CoBit; m = 1: bitwise autoregression)
    clean_sigma: float = 0.002  # σ level the network is told for clean context tokens
    stop_at_separator: bool = True  # early stop once a row generated the separator

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ConfigError(f"family.block_tokens={self.block_tokens} must be >= 1")
        if not self.clean_sigma > 0:
            raise ConfigError(f"family.clean_sigma={self.clean_sigma} must be > 0")


def _check(cfg: ExperimentConfig) -> None:
    m = cfg.family.block_tokens
    if cfg.model.seq_tokens % m:
        raise ConfigError(f"model.seq_tokens={cfg.model.seq_tokens} is not a multiple of "
                          f"family.block_tokens={m}; choose a divisor")
    if cfg.model.head_chunk_tokens:
        raise ConfigError("task=block_cobit has no chunked per-bit head; set model.head_chunk_tokens=0")


class BlockCoBit:
    name = "block_cobit"
    options = BlockCoBitOptions
    sweeps_sampler = True

    def check(self, cfg: ExperimentConfig, text: TextCodec) -> None:
        from bitgen.families.cobit import check_code_width

        check_code_width(cfg, text)
        if text.codec.policy not in CODE_POLICIES:
            raise ConfigError(f"data.code_policy={text.codec.policy!r}: block CoBit decodes each block "
                              f"token by token; set data.code_policy to one of {CODE_POLICIES}")
        _check(cfg)

    def task(self, cfg: ExperimentConfig, vocab_size: int | None = None) -> Task:
        import jax.numpy as jnp

        from bitgen.diffusion import entropy_schedule as es
        from bitgen.diffusion.denoiser import init_params, param_logical_axes
        from bitgen.nn.block_sdt import block_cobit_loss
        from bitgen.train.step import StepFns

        _check(cfg)
        m = cfg.family.block_tokens
        n_blocks = cfg.model.seq_tokens // m

        def loss(params, bits, sigma, key):
            value, aux = block_cobit_loss(params, bits, sigma, key, cfg=cfg.model,
                                          diffusion_cfg=cfg.diffusion, block_tokens=m,
                                          clean_sigma=cfg.family.clean_sigma, train=True)
            mse = aux["mse_per_block"]
            return value, ({"mse": jnp.mean(mse)}, mse)

        def draw_cond(schedule, key, batch, step):  # one σ per block, drawn as CoBit draws a row's
            sigma = es.draw_training_sigma(schedule, key, batch * n_blocks, step, cfg.entropy, cfg.diffusion)
            return sigma.reshape(batch, n_blocks)

        def update_schedule(schedule, sigma, mse, step_after):
            pushed = es.push_samples(schedule, sigma.reshape(-1), mse.reshape(-1))
            return es.maybe_rebuild(pushed, step_after, cfg.entropy)

        return Task(name=self.name, init_params=lambda key: init_params(key, cfg.model),
                    param_axes=param_logical_axes(cfg.model),
                    init_schedule=lambda: es.init_schedule_state(cfg.entropy, cfg.diffusion),
                    step_fns=StepFns(input_key="bits", loss=loss, draw_cond=draw_cond,
                                     update_schedule=update_schedule,
                                     cond_metrics=lambda sigma: {"sigma_median": jnp.median(sigma)}))

    def draw(self, model: Any, sampler_cfg: SamplerConfig, *, temperature: float = 1.0,
             top_p: float = 1.0, prompt: PromptLayout | None = None) -> Draw:
        """The run's CoBit sampler per block (``temperature``/``top_p`` do not apply). Without a
        prompt every row starts from the separator; a prompt's ids are given instead. Infills are
        refused (generation is left to right by blocks)."""
        import numpy as np

        from bitgen.families.cobit import MissingTableError
        from bitgen.prompts import PromptError

        if prompt is not None and prompt.infill:
            raise PromptError("block CoBit generates left to right by blocks and cannot condition on "
                              "text after a gap; use --prompt for a prefix, or a CoBit run for --infill")
        ids = np.asarray([model.text.separator_id]) if prompt is None else np.asarray(prompt.ids)
        seq = model.cfg.model.seq_tokens
        if ids.size >= seq:
            raise PromptError(f"the prompt has {ids.size} tokens; a row holds {seq}, so at most "
                              f"{seq - 1} can be given")
        if sampler_cfg.grid == "entropic" and model.table is None:
            raise MissingTableError("sampler.grid=entropic needs an entropy table and this model has "
                                    "none; pass --table lm1b|owt|PATH or set sampler.grid=karras")
        return self._sampler(model.cfg, sampler_cfg, model.table, model.text, ids)

    @staticmethod
    def _sampler(cfg: ExperimentConfig, sampler_cfg: SamplerConfig, table: Any, text: TextCodec,
                 prefix: np.ndarray) -> Draw:
        """(params, key, batch) -> rows [batch, 2, T] continuing the ids ``prefix`` [L]."""
        import jax.numpy as jnp
        import numpy as np

        from bitgen.sampling.block_cobit_sampler import BlockCoBitSampling, block_cobit_sample
        from bitgen.sampling.settings import build_settings, sampling_grid

        options, model_cfg = cfg.family, cfg.model
        m = options.block_tokens
        grid = sampling_grid(sampler_cfg, table, cfg.diffusion)
        settings = build_settings(sampler_cfg, grid, seq_bits=m * model_cfg.patch_size, table=table,
                                  diffusion_cfg=cfg.diffusion)
        opts = BlockCoBitSampling(settings=settings, block_tokens=m, clean_sigma=options.clean_sigma,
                                  stop_id=text.separator_id if options.stop_at_separator else -1)
        known = np.arange(model_cfg.seq_tokens) < prefix.size
        bits = np.zeros(model_cfg.seq_bits, np.uint8)
        bits[: prefix.size * model_cfg.patch_size] = np.asarray(text.codec.ids_to_bits(prefix))
        grid_device = jnp.asarray(grid)

        def draw(params, key, batch):
            return block_cobit_sample(params, key, jnp.broadcast_to(jnp.asarray(bits), (batch, bits.size)),
                                      jnp.broadcast_to(jnp.asarray(known), (batch, known.size)),
                                      grid_device, cfg=model_cfg, opts=opts, codec=text.codec,
                                      prefill_blocks=prefix.size // m)

        return draw

    def decode(self, out: np.ndarray, text: TextCodec) -> list[tuple[DecodedText, str]]:
        """Rows [B, 2, T] (ids, status) -> text of the generated and given positions."""
        from bitgen.sampling.block_rows import decode_block_rows

        return decode_block_rows(out, text)

    def settings(self, sampler_cfg: SamplerConfig, *, options: BlockCoBitOptions,
                 temperature: float = 1.0, top_p: float = 1.0) -> dict[str, Any]:
        """The sampler's settings and, under ``"family"``, the section's (block size, clean σ and
        the early stop change samples too)."""
        return {"task": self.name, **dataclasses.asdict(sampler_cfg),
                "family": dataclasses.asdict(options)}

    def training_samples(self, cfg: ExperimentConfig, state: Any, rows: Any, key: jax.Array,
                         n: int) -> tuple[np.ndarray, str]:
        """``n`` rows from the separator with ``cfg.sampler``, on the Karras grid until the run
        has learned its entropy table."""
        import jax
        import numpy as np
        from jax.experimental import multihost_utils

        sampler_cfg, table = cfg.sampler, None
        if bool(jax.device_get(state.schedule.table_ready)):
            table = jax.device_get(state.schedule.table)
        elif sampler_cfg.grid == "entropic":
            sampler_cfg = dataclasses.replace(sampler_cfg, grid="karras")  # no table learned yet
        text = rows.text_codec
        draw = self._sampler(cfg, sampler_cfg, table, text, np.asarray([text.separator_id]))
        out = multihost_utils.process_allgather(draw(state.ema_params, key, n), tiled=True)
        return np.asarray(jax.device_get(out)), sampler_cfg.grid

    def after_step(self, cfg: ExperimentConfig, state: Any, run_dir: Path, done: int) -> None:
        """Write the entropy table each time the schedule rebuilds it (as CoBit)."""
        from bitgen.families.cobit import FAMILY as COBIT

        COBIT.after_step(cfg, state, run_dir, done)


FAMILY = BlockCoBit()

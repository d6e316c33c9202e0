"""The autoregressive baseline: a causal softmax transformer over token ids.

It reuses the trunk sizes of ``cfg.model`` (embed_dim, n_heads, n_blocks, dim_ff, dropout,
compute_dtype, seq_tokens, rope_base) and takes its vocabulary from the data codec, so a CoBit
config and its AR twin differ only in ``task``. Its own section ``cfg.family`` holds the sampling
defaults (``ARSampling``).

Conditional data (batches with a ``cond_mask``, e.g. Sudoku): a token whose bits are all known is
given, not generated, and the loss scores only the other tokens (``ar_loss(target_mask=...)``);
the model continues the given prefix at sampling time. ``diffusion.cond_dropout`` does not apply:
an AR model has no unconditional branch to train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitgen.errors import ConfigError
from bitgen.families.base import Draw, Task

if TYPE_CHECKING:  # the registry imports this module to read a config: model code loads on use
    import jax
    import numpy as np

    from bitgen.config import ExperimentConfig
    from bitgen.prompts import PromptLayout
    from bitgen.textcodec import DecodedText, TextCodec


@dataclass(frozen=True)
class ARSampling:
    """Defaults of ``bitgen sample``/``eval`` for an AR run (flags override them)."""

    temperature: float = 1.0  # softmax temperature
    top_p: float = 1.0  # nucleus mass (1 = off)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"family.temperature={self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"family.top_p={self.top_p} must be in (0, 1]")


def given_tokens(cond_mask: jax.Array, seq_tokens: int) -> jax.Array:
    """Bit mask [B, T*P] -> token mask [B, T]: True where all P bits of the token are known."""
    return cond_mask.reshape(cond_mask.shape[0], seq_tokens, -1).all(axis=-1)


def ar_config(cfg: ExperimentConfig, vocab_size: int):
    """The ``ARConfig`` of an AR experiment (sizes from ``cfg.model``, vocab from the data)."""
    from bitgen.nn.ar import ARConfig

    m = cfg.model
    return ARConfig(vocab_size=vocab_size, seq_len=m.seq_tokens, embed_dim=m.embed_dim,
                    n_heads=m.n_heads, n_blocks=m.n_blocks, dim_ff=m.dim_ff, dropout=m.dropout,
                    compute_dtype=m.compute_dtype, rope_base=m.rope_base)


class AR:
    name = "ar"
    options = ARSampling
    sweeps_sampler = False

    def check(self, cfg: ExperimentConfig, text: TextCodec) -> None:
        """Any vocabulary works: the softmax has one row per id."""

    def task(self, cfg: ExperimentConfig, vocab_size: int | None) -> Task:
        from bitgen.nn import ar
        from bitgen.train.step import StepFns

        if vocab_size is None:
            raise ConfigError("task='ar' needs the vocabulary size of the data pipeline "
                              "(TextCodec.vocab_size, or a checkpoint's meta['vocab_size'])")
        model_cfg = ar_config(cfg, vocab_size)

        def loss(params, ids, cond, key, cond_mask=None):
            # cond_mask [B, T*P] (batch entry "cond_mask"): tokens with every bit known are given.
            target_mask = None if cond_mask is None else ~given_tokens(cond_mask, ids.shape[1])
            value, aux = ar.ar_loss(params, ids, key, cfg=model_cfg, train=True,
                                    target_mask=target_mask)
            return value, ({"accuracy": aux["accuracy"]}, {})

        return Task(
            name=self.name,
            init_params=lambda key: ar.init_ar_params(key, model_cfg),
            param_axes=ar.param_logical_axes(model_cfg),
            init_schedule=lambda: None,
            step_fns=StepFns(input_key="ids", loss=loss, optional_inputs=("cond_mask",)),
        )

    def draw(self, model: Any, sampler_cfg: Any, *, temperature: float, top_p: float,
             prompt: PromptLayout | None = None) -> Draw:
        """Rows are chunks of one document stream: without a prompt every sample starts from the
        separator; a prompt's ids are the prefix instead (no separator before them). Infills are
        refused: the model generates left to right and cannot read text after a gap."""
        import jax.numpy as jnp
        import numpy as np

        from bitgen.nn.ar import ar_sample
        from bitgen.prompts import PromptError

        model_cfg = ar_config(model.cfg, model.text.vocab_size)
        if prompt is None:
            prefix = np.asarray([model.text.separator_id], np.int32)
        elif prompt.infill:
            raise PromptError("an AR model generates left to right and cannot condition on text "
                              "after a gap; use --prompt for a prefix, or a CoBit run for --infill")
        else:
            prefix = prompt.ids.astype(np.int32)

        def draw(params, key, batch):
            ids = jnp.broadcast_to(jnp.asarray(prefix), (batch, prefix.size))
            return ar_sample(params, key, ids, cfg=model_cfg, length=model_cfg.seq_len,
                             temperature=temperature, top_p=top_p)

        return draw

    def sequence_scorer(self, model: Any):
        """(score(ids, mask) -> (per-row NLL sum, token count), vocabulary size, window): an AR
        run as a GenPPL evaluator (``bitgen.eval.sweep.load_evaluator``)."""
        import functools

        from bitgen.nn import ar

        model_cfg = ar_config(model.cfg, model.text.vocab_size)
        return (functools.partial(ar.sequence_nll, model.params, cfg=model_cfg), model_cfg.vocab_size,
                model_cfg.seq_len)

    def decode(self, out: np.ndarray, text: TextCodec) -> list[tuple[DecodedText, str]]:
        import numpy as np

        from bitgen.textcodec import DecodedText

        return [(DecodedText(text.decode_ids(ids), tuple(int(i) for i in ids), 0), "")
                for ids in np.asarray(out)]

    def settings(self, sampler_cfg: Any, *, options: ARSampling, temperature: float,
                 top_p: float) -> dict[str, Any]:
        """The section's only options are the defaults of the effective ``temperature``/``top_p``."""
        return {"task": self.name, "temperature": temperature, "top_p": top_p}

    def training_samples(self, cfg: ExperimentConfig, state: Any, rows: Any, key: jax.Array,
                         n: int) -> tuple[np.ndarray, str]:
        """Temperature-1 continuations of the first token of ``n`` validation rows (of their
        given prompt, for rows that begin with one: ``rows.prompt_tokens``)."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils

        from bitgen.nn.ar import ar_sample

        source = rows.val_rows if len(rows.val_rows) >= n else rows.train_rows
        prompt = jnp.asarray(source[:n, :max(1, rows.prompt_tokens)].astype("int32"))
        ids = ar_sample(state.ema_params, key, prompt, cfg=ar_config(cfg, rows.codec.vocab_size),
                        length=cfg.model.seq_tokens)
        return np.asarray(jax.device_get(multihost_utils.process_allgather(ids, tiled=True))), self.name

    def after_step(self, cfg: ExperimentConfig, state: Any, run_dir: Path, done: int) -> None:
        """The AR baseline writes nothing beside its checkpoints."""


FAMILY = AR()

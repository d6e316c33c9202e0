"""BitLM: a block-causal backbone over token ids with a bitwise diffusion head per block of m tokens
(spec Part A; ``bitgen.nn.bitlm``, ``bitgen.nn.bit_head``, ``bitgen.sampling.bitlm_sampler``).

The trunk takes the sizes of ``cfg.model`` (embed_dim, n_heads, n_blocks, dim_ff, dropout,
compute_dtype, seq_tokens, rope_base) and its vocabulary from the data codec, as the AR baseline
does; the head's bits per token are ``model.patch_size`` (= the codec's width, so the head
generates the same codes CoBit diffuses). Its own section ``cfg.family`` is ``BitLMOptions``.
Training reads the batch's ``ids`` and their codes ``bits``; docs/bitlm.md lists every choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitgen.errors import BitgenError, ConfigError
from bitgen.families.base import Draw, Task

if TYPE_CHECKING:  # the registry imports this module to read a config: model code loads on use
    import jax
    import numpy as np

    from bitgen.config import ExperimentConfig
    from bitgen.prompts import PromptLayout
    from bitgen.textcodec import DecodedText, TextCodec


# The policies of ``bitgen.sampling.bitlm_sampler.POLICIES`` (kept here so reading a config loads
# no model code).
INVALID_CODE_POLICIES = ("max_correlation", "sign_nearest")


# The ``family.*`` options that change how a trained model samples (``BitLM.settings``).
SAMPLING_OPTIONS = ("head_steps", "guidance", "t_end", "invalid_code_policy", "stop_at_separator")


class MissingCodesError(BitgenError, ValueError):
    """A BitLM train batch without the ids' bit codes."""


@dataclass(frozen=True)
class BitLMOptions:
    """BitLM's section (``family.*`` keys). Spec defaults: m = 4, K = 15, CFG 9.0 (§A.6)."""

    block_tokens: int = 4  # m: tokens per block (full attention inside, causal across)
    head: str = "diffusion"  # diffusion | softmax (the paper's same-backbone LM-head control)
    head_width: int = 256  # C
    head_depth: int = 2  # Transformer blocks over the m slots
    head_heads: int = 4
    head_bounded: bool = True  # x̂ = tanh(o/2) (BitDance-T2I) instead of raw o
    head_steps: int = 15  # K: Euler steps per block (then one clean-prediction call)
    guidance: float = 9.0  # CFG scale w (1 = off: one head branch)
    t_end: float = 0.95  # last time of the ODE grid (BitDance)
    invalid_code_policy: str = "max_correlation"  # max_correlation | sign_nearest (spec §A.2)
    cond_dropout: float = 0.1  # P(a block's condition is the null condition) in training
    t_mean: float = -0.8  # logit-normal training times: t = sigmoid(N(t_mean, t_std²))
    t_std: float = 0.8
    v_floor: float = 0.05  # loss weight 1/max(1−t, v_floor)²
    batch_mul: int = 4  # (t, ε) draws per block and step (BitDance's diffusion batch multiplier)
    stop_at_separator: bool = True  # early stop once a row generated the separator
    temperature: float = 1.0  # softmax control only

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.head_steps < 1 or self.batch_mul < 1:
            raise ConfigError("family.block_tokens, family.head_steps and family.batch_mul must be >= 1")
        if self.head not in ("diffusion", "softmax"):
            raise ConfigError(f"family.head={self.head!r} must be 'diffusion' or 'softmax'")
        if self.invalid_code_policy not in INVALID_CODE_POLICIES:
            raise ConfigError(f"family.invalid_code_policy={self.invalid_code_policy!r} is not one of "
                              f"{INVALID_CODE_POLICIES}")
        if not 0.0 <= self.cond_dropout < 1.0 or not 0.0 < self.t_end < 1.0:
            raise ConfigError("family.cond_dropout must be in [0, 1) and family.t_end in (0, 1)")
        if not self.temperature > 0:
            raise ConfigError(f"family.temperature={self.temperature} must be > 0")


def bitlm_config(cfg: ExperimentConfig, vocab_size: int):
    """The ``BitLMConfig`` of a BitLM experiment."""
    from bitgen.nn.bit_head import BitHeadConfig
    from bitgen.nn.bitlm import BitLMConfig
    from bitgen.families.ar import ar_config

    o = cfg.family
    head = BitHeadConfig(bits=cfg.model.patch_size, block_tokens=o.block_tokens, width=o.head_width,
                         depth=o.head_depth, n_heads=o.head_heads, bounded=o.head_bounded)
    try:
        return BitLMConfig(trunk=ar_config(cfg, vocab_size), block_tokens=o.block_tokens, head=head,
                           head_kind=o.head, t_mean=o.t_mean, t_std=o.t_std, v_floor=o.v_floor,
                           batch_mul=o.batch_mul, cond_dropout=o.cond_dropout)
    except ValueError as err:
        raise ConfigError(f"{err}; change model.seq_tokens or family.* accordingly") from None


def code_table(text: TextCodec):
    """[V, P] float32: the ±1 codes of ids 0..V−1 under the run's codec."""
    import numpy as np

    bits = np.asarray(text.codec.ids_to_bits(np.arange(text.vocab_size)), np.float32)
    return 2.0 * bits.reshape(text.vocab_size, -1) - 1.0


def sampling(options: BitLMOptions, stop_id: int):
    from bitgen.sampling.bitlm_sampler import BitLMSampling

    return BitLMSampling(steps=options.head_steps, guidance=options.guidance, t_end=options.t_end,
                         policy=options.invalid_code_policy,
                         stop_id=stop_id if options.stop_at_separator else -1,
                         temperature=options.temperature)


class BitLM:
    name = "bitlm"
    options = BitLMOptions
    sweeps_sampler = False

    def check(self, cfg: ExperimentConfig, text: TextCodec) -> None:
        from bitgen.families.cobit import check_code_width

        check_code_width(cfg, text)

    def task(self, cfg: ExperimentConfig, vocab_size: int | None) -> Task:
        from bitgen.nn import bitlm
        from bitgen.train.step import StepFns

        if vocab_size is None:
            raise ConfigError("task='bitlm' needs the vocabulary size of the data pipeline")
        model_cfg = bitlm_config(cfg, vocab_size)

        def loss(params, ids, cond, key, bits=None):
            if bits is None:
                raise MissingCodesError("a BitLM train batch needs 'bits' (the ids' codes) beside 'ids'; "
                                        "use the text data pipeline, which provides both")
            codes = 2.0 * bits.reshape(*ids.shape, -1).astype("float32") - 1.0
            value, aux = bitlm.bitlm_loss(params, ids, codes, key, cfg=model_cfg, train=True)
            return value, (aux, {})

        return Task(name=self.name, init_params=lambda key: bitlm.init_bitlm_params(key, model_cfg),
                    param_axes=bitlm.param_logical_axes(model_cfg), init_schedule=lambda: None,
                    step_fns=StepFns(input_key="ids", loss=loss, optional_inputs=("bits",)))

    def draw(self, model: Any, sampler_cfg: Any, *, temperature: float, top_p: float,
             prompt: PromptLayout | None = None) -> Draw:
        """Without a prompt every row starts from the separator (as the AR baseline's); a prompt's
        ids are given instead. Infills are refused (generation is left to right by blocks)."""
        import jax.numpy as jnp
        import numpy as np

        from bitgen.prompts import PromptError

        if prompt is not None and prompt.infill:
            raise PromptError("BitLM generates left to right by blocks and cannot condition on text "
                              "after a gap; use --prompt for a prefix, or a CoBit run for --infill")
        ids = (np.asarray([model.text.separator_id]) if prompt is None else prompt.ids).astype(np.int32)
        seq = model.cfg.model.seq_tokens
        if ids.size >= seq:
            raise PromptError(f"the prompt has {ids.size} tokens; a BitLM row holds {seq}, so at most "
                              f"{seq - 1} can be given")
        model_cfg = bitlm_config(model.cfg, model.text.vocab_size)
        sample = self._sampler(model_cfg, model.cfg.family, model.text, ids.size, temperature)
        return lambda params, key, batch: sample(params, key, jnp.broadcast_to(jnp.asarray(ids),
                                                                              (batch, ids.size)))

    @staticmethod
    def _sampler(model_cfg, options: BitLMOptions, text: TextCodec, prefix_len: int, temperature: float):
        """(params, key, prefix ids [B, prefix_len]) -> rows [B, 2, T] of ``bitlm_sample``."""
        import dataclasses

        import jax.numpy as jnp

        from bitgen.sampling.bitlm_sampler import bitlm_sample

        opts = dataclasses.replace(sampling(options, text.separator_id), temperature=temperature)
        table = jnp.asarray(code_table(text))
        seq = model_cfg.trunk.seq_len
        known = jnp.arange(seq) < prefix_len

        def sample(params, key, prefix):
            batch = prefix.shape[0]
            rows = jnp.zeros((batch, seq), jnp.int32).at[:, :prefix_len].set(prefix.astype(jnp.int32))
            return bitlm_sample(params, key, rows, jnp.broadcast_to(known, (batch, seq)), table,
                                cfg=model_cfg, opts=opts, prefill_blocks=prefix_len // model_cfg.block_tokens)

        return sample

    def decode(self, out: np.ndarray, text: TextCodec) -> list[tuple[DecodedText, str]]:
        """Rows [B, 2, T] (ids, status) -> text of the generated and given positions."""
        from bitgen.sampling.block_rows import decode_block_rows

        return decode_block_rows(out, text)

    def settings(self, sampler_cfg: Any, *, options: BitLMOptions, temperature: float,
                 top_p: float) -> dict[str, Any]:
        """The effective temperature, and under ``"family"`` the head and, for the diffusion head,
        the section's ``SAMPLING_OPTIONS`` (the softmax control draws at the temperature with the
        early stop alone; the other options shape the model, fixed by its checkpoint). The head is named so that the
        two kinds of run read apart in a table."""
        used = SAMPLING_OPTIONS if options.head == "diffusion" else ("stop_at_separator",)
        return {"task": self.name, "temperature": temperature,
                "family": {"head": options.head, **{name: getattr(options, name) for name in used}}}

    def training_samples(self, cfg: ExperimentConfig, state: Any, rows: Any, key: jax.Array,
                         n: int) -> tuple[np.ndarray, str]:
        """Continuations of the first token of ``n`` validation rows with the run's settings."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.experimental import multihost_utils

        source = rows.val_rows if len(rows.val_rows) >= n else rows.train_rows
        model_cfg = bitlm_config(cfg, rows.codec.vocab_size)
        sample = self._sampler(model_cfg, cfg.family, rows.text_codec, 1, cfg.family.temperature)
        out = sample(state.ema_params, key, jnp.asarray(source[:n, :1].astype("int32")))
        out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(jax.device_get(out)), self.name

    def after_step(self, cfg: ExperimentConfig, state: Any, run_dir: Path, done: int) -> None:
        """BitLM writes nothing beside its checkpoints."""


FAMILY = BitLM()

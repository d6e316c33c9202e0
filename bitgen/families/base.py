"""What a model family provides: the ``Family`` protocol and the training ``Task`` it builds.

Train, sample, eval, bench and demo look a family up once (``bitgen.families.family_of``) and call
these functions; none of them branches on the family's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types only: a family module imports no model code until it is used
    import jax
    import numpy as np

    from bitgen.prompts import PromptLayout
    from bitgen.textcodec import DecodedText, TextCodec
    from bitgen.train.step import StepFns


@dataclasses.dataclass(frozen=True)
class Task:
    """The training pieces of a family bound to one config.

    init_params:   key -> params (float32 pytree).
    param_axes:    pytree of logical-axis tuples matching the params.
    init_schedule: () -> schedule state pytree, or None when the family has none.
    step_fns:      the loss/conditioning pieces of the train step.
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    param_axes: Any
    init_schedule: Callable[[], Any]
    step_fns: StepFns


# (params, key, batch) -> the family's raw output for ``decode`` (bits [B,S] or ids [B,T]).
Draw = Callable[[Any, Any, int], Any]


class Family(Protocol):
    """name: the ``task`` value. options: the dataclass of the family's own config section
    (``ExperimentConfig.family``), or None when it has none. sweeps_sampler: whether an operating
    point is a set of ``sampler.*`` settings (else the sampling temperature).

    Optional: ``sequence_scorer(model) -> (score(ids, mask), vocab_size, window)`` for a family
    whose runs can score text as GenPPL evaluators (the AR baseline); ``guides = True`` for a
    family whose ``draw`` applies classifier-free guidance at ``sampler.guidance`` (CoBit)."""

    name: str
    options: type | None
    sweeps_sampler: bool

    def check(self, cfg: Any, text: TextCodec) -> None:
        """Raise ConfigError when the model cannot generate ``text``'s codes (e.g. bit width)."""

    def task(self, cfg: Any, vocab_size: int) -> Task:
        """Parameter init, logical axes, schedule state and train-step pieces."""

    def draw(self, model: Any, sampler_cfg: Any, *, temperature: float, top_p: float,
             prompt: PromptLayout | None = None) -> Draw:
        """A sampler for a loaded model (``bitgen.loading.LoadedModel``).

        ``prompt`` (``bitgen.prompts``): every row's first ``prompt.length`` tokens hold its given
        ids where ``prompt.known``; raise ``PromptError`` for a layout the family cannot
        condition on. Callers pass it only when set, so a family without prompts may omit it.
        """

    def decode(self, out: np.ndarray, text: TextCodec) -> list[tuple[DecodedText, str]]:
        """Raw draws -> (decoded text, packed bits as hex or "") per row."""

    def settings(self, sampler_cfg: Any, *, options: Any, temperature: float,
                 top_p: float) -> dict[str, Any]:
        """What identifies how a sample was drawn: stored beside samples and table rows, and the
        key under which ``bitgen eval`` reuses cached points (``bitgen.eval.table.POINT_KEYS``).

        ``options`` is the family section the model was loaded with (``model.cfg.family``, with
        any ``family.*`` command-line overrides applied; None for a family without one);
        ``temperature``/``top_p`` are the effective values (flags, else the section's defaults).
        Return a JSON-ready dict with ``"task"`` (the family's name) and every setting that changes
        the draws: the ``sampler.*`` fields a ``sweeps_sampler`` family reads, the effective
        ``temperature``/``top_p`` where the family uses them, and under ``"family"`` a flat dict
        of the options of ``options`` that change sampling and are not already given above (leave
        the key out when there are none, so older results keep their keys)."""

    def training_samples(self, cfg: Any, state: Any, rows: Any, key: jax.Array,
                         n: int) -> tuple[np.ndarray, str]:
        """``n`` raw draws from ``state.ema_params`` during training, and a label of the method."""

    def after_step(self, cfg: Any, state: Any, run_dir: Path, done: int) -> None:
        """Files a family writes beside its checkpoints after step ``done`` (process 0 only)."""

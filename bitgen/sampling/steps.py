"""Per-step arithmetic of the samplers and one step object per method (spec §5.2-5.5).

A step object advances one grid interval from the churned state x̂ and declares how many
network calls that takes (``calls_per_step``: the SC "refined" refresh included, doubled when the
step is guided, since every guided denoise runs both branches); the NFE accounting
(``calls_per_step``, ``nfe_to_grid_points``, ``model_calls``) reads that declaration. Steps reach
the network only through ``StepOps`` (denoise + clamp), so conditioning, guidance and replay need
no change here: the self-conditioning state is opaque to a step (one array, or one per guidance
branch) and ``denoise`` returns the next one beside D.

Arithmetic follows the reference op by op in float32 (σ̂ = σ_i·float32(1+γ_i);
x̂ = x + δ·(ε·S_noise); d = (−σ̂)·((D − x̂)/(σ̂·σ̂)); x' = x̂ + (σ_{i+1} − σ̂)·d), which makes the
update chain bit-exact given the same logits and δ. Every product is passed through ``_rounded``
before it is added, so XLA can neither contract it into a fused multiply-add nor reassociate it
(see docs/parity.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from bitgen.config import ConfigError
from bitgen.diffusion.bit_constants import DATA_CENTER
from bitgen.diffusion.denoiser import score

Array = jax.Array


class StepSchedule(NamedTuple):
    """Per-interval constants [N-1] (float32 unless noted); one row of it per step."""

    sigma: jax.Array  # σ_i
    sigma_next: jax.Array  # σ_{i+1}
    sigma_hat: jax.Array  # σ_i·(1+γ_i)
    sigma_delta: jax.Array  # churn std sqrt(σ̂² − σ_i²), 0 where not churned
    label: jax.Array  # σ fed to the network for the first call (ATI-shifted σ̂)
    label_next: jax.Array  # σ fed to the Heun corrector / SC refresh (ATI-shifted σ_{i+1})
    churned: jax.Array  # bool: γ_i > 0


class StepOps(NamedTuple):
    """What a step may call besides arithmetic.

    denoise(x [B,S], label σ (scalar), sc) -> (D [B,S] float32 in [0,1] with clamped bits at
    their clean value, sc'): sc is the self-conditioning state, x0_hat [B,S] (sc' = D) or, when
    guided, one [B,S] estimate per branch (sc' = each branch's own D). impose(x [B,S]) -> x with
    clamped bits re-imposed.
    """

    denoise: Callable[[Array, Array, Any], tuple[Array, Any]]
    impose: Callable[[Array], Array]


def _sc_trace(sc) -> dict:
    """Trace entries of an SC state: ``x0_hat_in`` (+ ``x0_hat_uncond_in`` when guided)."""
    if isinstance(sc, tuple):
        return {"x0_hat_in": sc[0], "x0_hat_uncond_in": sc[1]}
    return {"x0_hat_in": sc}


def _rounded(v: jax.Array) -> jax.Array:
    """v as its own rounded float32 value (NaN kept NaN).

    XLA on CPU contracts ``a + b*c`` into one fused multiply-add and reorders products of scalars;
    optimization barriers are stripped before code generation. The select makes the operand of the
    next add (or multiply) a select rather than a product, which neither XLA nor LLVM fuses or
    reorders, so ``x + _rounded(h*d)`` rounds twice, as the reference does.
    """
    return jnp.where(jnp.isnan(v), jnp.float32(jnp.nan), v)


def direction(D: Array, x: Array, sigma: Array) -> Array:
    """d = −σ·score(D, x, σ) [B,S] for one σ (scalar), in the reference's operation order."""
    # Heun adds two directions: rounded, so no FMA there either.
    return _rounded((-sigma) * score(D, x, jnp.broadcast_to(sigma, x.shape[:1])))


def churn(x: Array, noise: Array, sched: StepSchedule, s_noise: float) -> Array:
    """x̂ = x + δ·(ε·S_noise) where the step churns, else x; noise ε [B,S] standard normal."""
    added = sched.sigma_delta * _rounded(noise * jnp.float32(s_noise))
    return jnp.where(sched.churned, x + _rounded(added), x)


def initial_state(noise: Array, sigma_max: Array) -> Array:
    """x_T = ε·σ_0 + ½ [B,S]: the prior is centred on the data centre, not on 0."""
    scaled = _rounded(jnp.asarray(noise, jnp.float32) * jnp.asarray(sigma_max, jnp.float32))
    return scaled + jnp.float32(DATA_CENTER)


@dataclass(frozen=True)
class Step(ABC):
    """One grid interval: x̂ -> x' (+ the self-conditioning estimate for the next step).

    ``network_calls``: denoiser calls of the update itself; ``refine_sc`` adds one call that
    refreshes the SC estimate at the new state (sc_mode "refined"; "carry" reuses D); ``guided``
    doubles every call (two network passes per guided denoise).
    ``__call__(x_hat, sc, sched, ops) -> ((x', sc'), trace)``; trace holds x_hat, D, x0_hat_in
    (+ x0_hat_uncond_in when guided), x and the method's own intermediates, each [B,S].
    """

    refine_sc: bool = False
    guided: bool = False
    network_calls: ClassVar[int] = 0

    @property
    def calls_per_step(self) -> int:
        return (self.network_calls + int(self.refine_sc)) * self.calls_per_denoise

    @property
    def calls_per_denoise(self) -> int:
        """Network calls of one denoise (the final one included): 2 when guided, else 1."""
        return 2 if self.guided else 1

    def __call__(self, x_hat: Array, sc, sched: StepSchedule, ops: StepOps):
        D, sc_next = ops.denoise(x_hat, sched.label, sc)
        x_new, extra = self.update(x_hat, D, sc_next, sched, ops)
        x_new = ops.impose(x_new)
        if self.refine_sc:
            sc_next = ops.denoise(x_new, sched.label_next, sc_next)[1]
        return (x_new, sc_next), {"x_hat": x_hat, "D": D, **_sc_trace(sc), **extra, "x": x_new}

    @abstractmethod
    def update(self, x_hat: Array, D: Array, sc, sched: StepSchedule,
               ops: StepOps) -> tuple[Array, dict]:
        """x' [B,S] from x̂, its denoised D and the SC state D came with, and the method's trace
        entries."""


@dataclass(frozen=True)
class EulerStep(Step):
    """Euler / DDIM (η = 0): x' = x̂ + (σ_{i+1} − σ̂)·d(x̂). One call."""

    network_calls: ClassVar[int] = 1

    def update(self, x_hat, D, sc, sched, ops):
        h = sched.sigma_next - sched.sigma_hat
        return x_hat + _rounded(h * direction(D, x_hat, sched.sigma_hat)), {}


@dataclass(frozen=True)
class HeunStep(Step):
    """Heun (EDM Alg. 2): Euler predictor x_pred, corrector at σ_{i+1} averaging both directions.

    Two calls; the predictor feeds its D (per branch when guided) as the corrector's SC
    estimate, as the reference does.
    """

    network_calls: ClassVar[int] = 2

    def update(self, x_hat, D, sc, sched, ops):
        d = direction(D, x_hat, sched.sigma_hat)
        h = sched.sigma_next - sched.sigma_hat
        x_pred = ops.impose(x_hat + _rounded(h * d))
        D2, _ = ops.denoise(x_pred, sched.label_next, sc)
        x_new = x_hat + _rounded((0.5 * h) * (d + direction(D2, x_pred, sched.sigma_next)))
        return x_new, {"x_pred": x_pred, "D2": D2}


STEPS: dict[str, type[Step]] = {"ddim": EulerStep, "heun": HeunStep}  # sampler.name -> step
SC_MODES: dict[str, bool] = {"carry": False, "refined": True}  # sampler.sc_mode -> refine_sc


def make_step(sampler: str, sc_mode: str, guided: bool = False) -> Step:
    """The step object for ``sampler.name`` / ``sampler.sc_mode``, classifier-free guided or not."""
    if sampler not in STEPS or sc_mode not in SC_MODES:
        raise ConfigError(f"unknown sampler/sc_mode {sampler!r}/{sc_mode!r}; choose the sampler "
                          f"from {sorted(STEPS)} and sc_mode from {sorted(SC_MODES)}")
    return STEPS[sampler](refine_sc=SC_MODES[sc_mode], guided=guided)


def calls_per_step(sampler: str, sc_mode: str, guided: bool = False) -> int:
    """Network calls per grid interval, as the step declares it: DDIM 1, Heun 2, +1 refined SC,
    all doubled when guided."""
    return make_step(sampler, sc_mode, guided).calls_per_step


def nfe_to_grid_points(nfe: int, sampler: str, sc_mode: str, guided: bool = False) -> int:
    """Number of σ-grid points N for a target NFE label, as the reference computes it.

    The reference sets N = (nfe - 1) // calls_per_step and calls the run "nfe"; since N points
    give N - 1 intervals, the real count is calls_per_step*(N-1) + 1 (e.g. "256 NFE" DDIM+carry
    = 255 points = 255 denoiser calls). See ``model_calls``. Guided, the same budget buys half the
    intervals.
    """
    if nfe < 2:
        raise ConfigError(f"sampler.nfe={nfe} must be >= 2")
    return max(1, (nfe - 1) // calls_per_step(sampler, sc_mode, guided))


def model_calls(n_points: int, sampler: str, sc_mode: str, guided: bool = False) -> int:
    """Actual network calls of a sampler run on an N-point grid (incl. the final denoise)."""
    step = make_step(sampler, sc_mode, guided)
    return step.calls_per_step * (n_points - 1) + step.calls_per_denoise

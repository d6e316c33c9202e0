"""Fixed point of ab under the diagonal dynamics (derived here; see docs/mesa.md).

On the diagonal, ŷ_{t,j} = c_j g_{t,j} x_{t+1,j} with c_j = a_j b_j and
g_{t,j} = (1/(t-1)) Σ_{n=1}^{t-1} Σ_k |x_{1,k}|² (λ_k / λ_j)^n. Averaging over the uniform phases,
E g = |x_{1,j}|² and E|g|² = |x_{1,j}|⁴ + Σ_{k≠j} |x_{1,k}|⁴ / (t-1), so the loss is stationary at

    c* = (T-2) E|x_j|⁴ / [(T-2) E|x_j|⁶ + H_{T-2} Σ_{k≠j} E|x_j|² |x_k|⁴],   H_n = Σ_{i=1}^n 1/i,

and the prediction ratio ŷ_{T-1} / x_T averages c* E|x_j|² over the nonzero entries.
"""

from __future__ import annotations

from typing import NamedTuple


class Moments(NamedTuple):
    """E|x_j|², E|x_j|⁴, E|x_j|⁶ and Σ_{k≠j} E|x_j|²|x_k|⁴ of a first token, the first over x_j ≠ 0."""

    second: float
    fourth: float
    sixth: float
    cross: float


def moments(start: str, d: int, scale: float = 1.0) -> Moments:
    """Moments of the first-token distributions of `tools.mesa.data.first_token`."""
    if start == "gaussian":        # real N(0, σ²): E x⁴ = 3σ⁴, E x⁶ = 15σ⁶
        return Moments(scale**2, 3 * scale**4, 15 * scale**6, (d - 1) * 3 * scale**6)
    if start == "sparse":          # one nonzero entry of size s, in coordinate j with prob. 1/d
        return Moments(scale**2, scale**4 / d, scale**6 / d, 0.0)
    if start == "ones":
        return Moments(1.0, 1.0, 1.0, d - 1.0)
    raise ValueError(f"unknown start {start!r}")


def harmonic(n: int) -> float:
    """H_n = Σ_{i=1}^n 1/i."""
    return sum(1.0 / i for i in range(1, n + 1))


def ab_star(start: str, d: int, T: int, scale: float = 1.0) -> float:
    """The stationary ab for sequences of length T."""
    mom = moments(start, d, scale)
    return (T - 2) * mom.fourth / ((T - 2) * mom.sixth + harmonic(T - 2) * mom.cross)


def ratio_star(start: str, d: int, T: int, scale: float = 1.0) -> float:
    """The stationary mean of Re(ŷ_{T-1} / x_T) over nonzero entries."""
    return ab_star(start, d, T, scale) * moments(start, d, scale).second

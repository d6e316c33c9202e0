"""Online entropy-rate σ schedule for training (spec §4.3) and entropy-table I/O (spec §9).

The schedule is a pure pytree (``ScheduleState``) carried in the train state:

* a fixed-size ring buffer of (σ, metric) pairs, where metric is the per-sample unweighted MSE of
  the denoiser (``push_samples``);
* an ``EntropyTable`` (pdf/cdf over ``num_bins`` log-spaced σ bins), rebuilt from the buffer every
  ``update_every`` steps once the buffer holds ``num_bins * min_per_bin`` samples
  (``maybe_rebuild``): pdf_k ∝ g(σ_k) · mean_rate_k^p with g(σ) = σⁿ/(σⁿ + cⁿ) and
  rate = metric/σ² (the I-MMSE information rate per bit);
* σ draws for a training batch (``draw_training_sigma``): truncated log-normal during warm-up,
  then a linear mixture that becomes fully entropic after ``warmup_steps + transition_steps``.

Multi-host: call ``push_samples`` inside the jitted train step with the *global* batch's σ and
metric (jit sees global arrays, so every process holds the same buffer) and the rebuilt table is
identical on all processes without any broadcast. The reference instead pushed rank 0's local
batch only; a global buffer is the same estimator with more samples.

Tables are stored as ``.npz`` with keys pdf, cdf, sigmas, edges (float32). The released CoBit
tables ship in ``bitgen/assets/entropy_tables`` and load by name (``load_entropy_table("lm1b")``).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from bitgen.config import DiffusionConfig, EntropyScheduleConfig
from bitgen.errors import BitgenError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "entropy_tables"
SHIPPED_TABLES = ("lm1b", "owt", "owt_medium")
_TABLE_KEYS = ("pdf", "cdf", "sigmas", "edges")


class EntropyTableError(BitgenError, FileNotFoundError):
    """An entropy table is missing or malformed; the message says what to provide instead."""


@struct.dataclass
class EntropyTable:
    """Entropy-rate density over K log-spaced σ bins.

    pdf [K], cdf [K] (cumulative, ends at 1), sigmas [K] (bin midpoints, ascending, in {0,1}-bit
    units), edges [K+1] (bin edges). numpy on the host, jax arrays inside jit.
    """

    pdf: jax.Array
    cdf: jax.Array
    sigmas: jax.Array
    edges: jax.Array


@struct.dataclass
class ScheduleState:
    """Ring buffer of (σ, metric) plus the current table. All leaves are arrays (checkpointable).

    buffer_sigma/buffer_metric [capacity] float32; write_pos, size int32 scalars (next slot and
    number of filled slots); table_ready bool scalar. sigma_min/sigma_max are static bounds of the
    σ bins, copied from DiffusionConfig at init.
    """

    buffer_sigma: jax.Array
    buffer_metric: jax.Array
    write_pos: jax.Array
    size: jax.Array
    table: EntropyTable
    table_ready: jax.Array
    sigma_min: float = struct.field(pytree_node=False, default=0.002)
    sigma_max: float = struct.field(pytree_node=False, default=80.0)


def reference_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded exactly as the reference's ``torch.linspace`` on CPU.

    torch computes a float32 step and fills the first half as ``start + step*i`` and the second
    half as ``end - step*(n-1-i)``, each with a single rounding (fused multiply-add). numpy's
    linspace rounds differently, which moves grid points and bin edges by an ulp.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    # float64 holds step*i exactly, so rounding the float64 sum once emulates the FMA.
    head = (np.float64(start32) + np.float64(step) * i).astype(np.float32)
    tail = (np.float64(end32) - np.float64(step) * (n - 1 - i)).astype(np.float32)
    return np.where(np.arange(n) < n // 2, head, tail).astype(np.float32)


def log_bins(num_bins: int, sigma_min: float, sigma_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log_edges [K+1], edges [K+1], midpoints [K]) of the log-uniform σ bins, float32."""
    log_edges = reference_linspace(math.log(sigma_min), math.log(sigma_max), num_bins + 1)
    mid_log = np.float32(0.5) * (log_edges[:-1] + log_edges[1:])
    return log_edges, np.exp(log_edges).astype(np.float32), np.exp(mid_log).astype(np.float32)


def regularizer(sigmas: jax.Array, c: float, n: float) -> jax.Array:
    """g(σ) = σⁿ/(σⁿ + cⁿ), computed as x/(1+x) with x = (σ/c)ⁿ like the reference."""
    # The barrier stops XLA from turning σ/c into σ·(1/c), which rounds differently.
    c_full = jax.lax.optimization_barrier(jnp.full(jnp.shape(sigmas), c, jnp.float32))
    x = _power(jnp.maximum(sigmas, 1e-12) / c_full, n)
    return x / (1.0 + x)


def _power(x: jax.Array, p: float) -> jax.Array:
    # torch evaluates integer powers by repeated multiplication and 0.5 by sqrt; match it.
    if p == 0.5:
        return jnp.sqrt(x)
    if float(p).is_integer() and 0 <= p <= 4:
        return jax.lax.integer_pow(x, int(p))
    return jnp.power(x, jnp.float32(p))


def rebuild_table(sigmas: jax.Array, metrics: jax.Array, valid_mask: jax.Array,
                  cfg: EntropyScheduleConfig, diffusion_cfg: DiffusionConfig,
                  ) -> tuple[EntropyTable, dict[str, jax.Array]]:
    """Entropy-rate table from (σ, metric) samples [N]; rows with valid_mask False are ignored.

    Returns the table and intermediates (bin_idx [N], rate [N], sum_rate/count/mean_rate [K]) for
    diagnostics and parity. Non-finite rows are dropped, σ is clamped to [σ_min, σ_max], the rate
    is clamped ≥ 0 per sample before bin averaging, empty bins get pdf 0, a degenerate (all-zero
    or non-finite) histogram falls back to the uniform pdf, and cdf = cummax(cumsum(pdf)) with
    cdf[-1] = 1. Jit-compatible.
    """
    num_bins = cfg.num_bins
    log_edges, edges, mids = log_bins(num_bins, diffusion_cfg.sigma_min, diffusion_cfg.sigma_max)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    metrics = jnp.asarray(metrics, jnp.float32)
    keep = valid_mask & jnp.isfinite(sigmas) & jnp.isfinite(metrics)
    sig = jnp.clip(sigmas, np.float32(diffusion_cfg.sigma_min), np.float32(diffusion_cfg.sigma_max))
    sig = jnp.where(keep, sig, 1.0)  # keep NaN rows out of the arithmetic below
    # torch.bucketize(right=False) - 1 == searchsorted(side='left') - 1.
    bin_idx = jnp.clip(jnp.searchsorted(jnp.asarray(log_edges), jnp.log(sig), side="left") - 1,
                       0, num_bins - 1)
    rate = jnp.maximum(jnp.where(keep, metrics, 0.0) / (sig * sig + 1e-12), 0.0)
    weight = keep.astype(jnp.float32)
    sum_rate = jnp.zeros(num_bins, jnp.float32).at[bin_idx].add(rate * weight)
    count = jnp.zeros(num_bins, jnp.float32).at[bin_idx].add(weight)
    mean_rate = jnp.maximum(sum_rate / (count + 1e-8), 0.0)
    unnormalised = regularizer(jnp.asarray(mids), cfg.regularizer_c, cfg.regularizer_n) * (
        _power(mean_rate, cfg.target_power) if cfg.target_power != 0 else jnp.ones_like(mean_rate))
    total = jnp.sum(unnormalised)
    good = jnp.all(jnp.isfinite(unnormalised)) & (total > 0) & jnp.any(keep)
    pdf = jnp.where(good, unnormalised / jnp.where(good, total, 1.0),
                    jnp.full(num_bins, 1.0 / num_bins, jnp.float32))
    table = EntropyTable(pdf=pdf, cdf=_cdf_from_pdf(pdf), sigmas=jnp.asarray(mids),
                         edges=jnp.asarray(edges))
    debug = {"bin_idx": bin_idx, "rate": rate, "sum_rate": sum_rate, "count": count, "mean_rate": mean_rate}
    return table, debug


def _cdf_from_pdf(pdf: jax.Array) -> jax.Array:
    cdf = jax.lax.cummax(jnp.cumsum(pdf), axis=0)
    return cdf.at[-1].set(1.0)


def closed_cdf(cdf):
    """cdf with cdf[-1] forced to 1, as every consumer in the reference does (numpy or jax)."""
    if isinstance(cdf, np.ndarray):
        out = np.maximum(cdf.astype(np.float32), np.float32(0.0))
        out[-1] = 1.0
        return out
    return jnp.maximum(cdf, 0.0).at[-1].set(1.0)


def init_schedule_state(cfg: EntropyScheduleConfig, diffusion_cfg: DiffusionConfig,
                        table: EntropyTable | None = None) -> ScheduleState:
    """Empty buffer; the table is ``table`` (ready) or a uniform placeholder (not ready)."""
    if cfg.buffer_size < 1 or cfg.num_bins < 2:
        raise ValueError("entropy.buffer_size must be >= 1 and entropy.num_bins >= 2")
    if table is None:
        _, edges, mids = log_bins(cfg.num_bins, diffusion_cfg.sigma_min, diffusion_cfg.sigma_max)
        pdf = np.full(cfg.num_bins, 1.0 / cfg.num_bins, np.float32)
        table = EntropyTable(pdf=jnp.asarray(pdf), cdf=_cdf_from_pdf(jnp.asarray(pdf)),
                             sigmas=jnp.asarray(mids), edges=jnp.asarray(edges))
        ready = False
    else:
        if np.shape(table.pdf) != (cfg.num_bins,):
            raise ValueError(f"table has {np.shape(table.pdf)[0]} bins but entropy.num_bins="
                             f"{cfg.num_bins}; set entropy.num_bins to match the table")
        table = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), table)
        ready = True
    return ScheduleState(
        buffer_sigma=jnp.zeros(cfg.buffer_size, jnp.float32),
        buffer_metric=jnp.zeros(cfg.buffer_size, jnp.float32),
        write_pos=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32),
        table=table, table_ready=jnp.asarray(ready),
        sigma_min=float(diffusion_cfg.sigma_min), sigma_max=float(diffusion_cfg.sigma_max))


def push_samples(state: ScheduleState, sigma: jax.Array, metric: jax.Array) -> ScheduleState:
    """Append a batch of (σ [B], metric [B]) to the ring buffer, overwriting the oldest entries."""
    capacity = state.buffer_sigma.shape[0]
    sigma = jnp.asarray(sigma, jnp.float32).reshape(-1)
    metric = jnp.asarray(metric, jnp.float32).reshape(-1)
    if sigma.shape != metric.shape:
        raise ValueError(f"sigma {sigma.shape} and metric {metric.shape} must have the same shape")
    n = sigma.shape[0]
    pos = state.write_pos
    if n > capacity:  # only the newest `capacity` samples survive; skip writing the rest
        pos = (pos + (n - capacity)) % capacity
        sigma, metric, n_written = sigma[-capacity:], metric[-capacity:], capacity
    else:
        n_written = n
    slots = (pos + jnp.arange(n_written, dtype=jnp.int32)) % capacity
    return state.replace(
        buffer_sigma=state.buffer_sigma.at[slots].set(sigma),
        buffer_metric=state.buffer_metric.at[slots].set(metric),
        write_pos=((pos + n_written) % capacity).astype(jnp.int32),
        size=jnp.minimum(state.size + n, capacity).astype(jnp.int32))


def buffer_in_push_order(state: ScheduleState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(σ [cap], metric [cap], valid [cap]) oldest first, so bin sums add in push order."""
    capacity = state.buffer_sigma.shape[0]
    start = jnp.where(state.size == capacity, state.write_pos, 0)
    order = (start + jnp.arange(capacity)) % capacity
    return (state.buffer_sigma[order], state.buffer_metric[order],
            jnp.arange(capacity) < state.size)


def maybe_rebuild(state: ScheduleState, step: jax.Array, cfg: EntropyScheduleConfig) -> ScheduleState:
    """Rebuild the table when ``step % update_every == 0`` and the buffer holds enough samples."""
    due = (jnp.asarray(step) % cfg.update_every == 0) & (
        state.size >= cfg.num_bins * cfg.min_per_bin)
    bounds = DiffusionConfig(sigma_min=state.sigma_min, sigma_max=state.sigma_max)

    def rebuild(s: ScheduleState) -> ScheduleState:
        table, _ = rebuild_table(*buffer_in_push_order(s), cfg, bounds)
        return s.replace(table=table, table_ready=jnp.asarray(True))

    return jax.lax.cond(due, rebuild, lambda s: s, state)


def lognormal_draw(key: jax.Array, n: int, diffusion_cfg: DiffusionConfig) -> jax.Array:
    """σ [n] with ln σ ~ N(p_mean, p_std²) truncated to [σ_min, σ_max].

    The reference redraws rejected rows in a data-dependent loop; here the truncated normal is
    sampled by inverse CDF (``jax.random.truncated_normal``), which has exactly the same
    distribution, a fixed cost and no host round trip. The final clip only guards float rounding
    at the bounds.
    """
    d = diffusion_cfg
    lo = (math.log(d.sigma_min) - d.p_mean) / d.p_std
    hi = (math.log(d.sigma_max) - d.p_mean) / d.p_std
    z = jax.random.truncated_normal(key, lo, hi, (n,), jnp.float32)
    sigma = jnp.exp(jnp.float32(d.p_mean) + jnp.float32(d.p_std) * z)
    return jnp.clip(sigma, np.float32(d.sigma_min), np.float32(d.sigma_max))


def entropic_draw(table: EntropyTable, u: jax.Array, v: jax.Array, *,
                  sigma_min: float = 0.002, sigma_max: float = 80.0) -> tuple[jax.Array, jax.Array]:
    """σ [K] from the table given uniforms u (bin choice) and v (position in the bin); returns (σ, bin).

    bin = searchsorted(cdf, u, 'left') clamped to [0, K-1] (u == 0 selects bin 0 even if empty,
    as in the reference), then σ is log-uniform between the bin's edges clamped to
    [sigma_min, sigma_max].
    """
    cdf = closed_cdf(jnp.asarray(table.cdf, jnp.float32))
    edges = jnp.asarray(table.edges, jnp.float32)
    num_bins = cdf.shape[0]
    idx = jnp.clip(jnp.searchsorted(cdf, u, side="left"), 0, num_bins - 1)
    lo = jnp.maximum(edges[idx], np.float32(sigma_min))
    hi = jnp.minimum(edges[idx + 1], np.float32(sigma_max))
    log_lo = jnp.log(lo)
    sigma = jnp.exp(log_lo + v * (jnp.log(hi) - log_lo))
    return jnp.clip(sigma, np.float32(sigma_min), np.float32(sigma_max)), idx


def entropic_weight(step: jax.Array, table_ready: jax.Array, cfg: EntropyScheduleConfig) -> jax.Array:
    """γ(step): probability of an entropic draw (0 before warm-up, linear ramp, then γ_max)."""
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((step - cfg.warmup_steps) / max(1, cfg.transition_steps), 0.0, 1.0)
    gamma = jnp.clip(cfg.gamma_max * frac, 0.0, 1.0)
    return jnp.where(table_ready & (step >= cfg.warmup_steps) & cfg.enabled, gamma, 0.0)


def draw_training_sigma(state: ScheduleState, key: jax.Array, batch: int, step: jax.Array,
                        cfg: EntropyScheduleConfig, diffusion_cfg: DiffusionConfig) -> jax.Array:
    """σ [batch] for one training step: log-normal, replaced by entropic draws with prob γ(step)."""
    k_base, k_mix, k_bin, k_pos = jax.random.split(key, 4)
    base = lognormal_draw(k_base, batch, diffusion_cfg)
    use_entropic = jax.random.uniform(k_mix, (batch,)) < entropic_weight(step, state.table_ready, cfg)
    entropic, _ = entropic_draw(state.table, jax.random.uniform(k_bin, (batch,)),
                                jax.random.uniform(k_pos, (batch,)),
                                sigma_min=diffusion_cfg.sigma_min, sigma_max=diffusion_cfg.sigma_max)
    return jnp.where(use_entropic, entropic, base)


# ---------------------------------------------------------------------------------------------
# Table files
# ---------------------------------------------------------------------------------------------

def save_entropy_table(table: EntropyTable, path: str | Path) -> Path:
    """Write pdf/cdf/sigmas/edges (float32) to an ``.npz`` file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: np.asarray(getattr(table, k), np.float32) for k in _TABLE_KEYS})
    return path


def load_entropy_table(name_or_path: str | Path) -> EntropyTable:
    """Load a table (numpy float32) by shipped name, ``.npz`` file, or directory.

    Accepted: "lm1b" | "owt" | "owt_medium" (the released CoBit tables); an ``.npz`` with keys
    pdf/cdf/sigmas/edges; a directory holding ``entropy_table.npz`` or the official
    ``entropy_{pdf,cdf,sigmas,edges}.pt`` files (needs torch) or the same names as ``.npy``.
    """
    text = str(name_or_path)
    if text in SHIPPED_TABLES:
        return _table_from_arrays(_read_npz(ASSET_DIR / f"{text}.npz"), text)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return _table_from_arrays(_read_npz(path), path)
    if path.is_dir():
        if (path / "entropy_table.npz").is_file():
            return _table_from_arrays(_read_npz(path / "entropy_table.npz"), path)
        if all((path / f"entropy_{k}.npy").is_file() for k in _TABLE_KEYS):
            return _table_from_arrays({k: np.load(path / f"entropy_{k}.npy") for k in _TABLE_KEYS}, path)
        if all((path / f"entropy_{k}.pt").is_file() for k in _TABLE_KEYS):
            return _table_from_arrays(_read_torch_dir(path), path)
    raise EntropyTableError(
        f"no entropy table at {text!r}. Give one of the shipped names {SHIPPED_TABLES}, an .npz "
        "with keys pdf/cdf/sigmas/edges, or a directory with entropy_table.npz or the official "
        "entropy_{pdf,cdf,sigmas,edges}.pt files (a training run writes them to its run dir). "
        "The entropic grid needs a table; use sampler.grid=karras to sample without one.")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in _TABLE_KEYS if k not in data.files]
        if missing:
            raise EntropyTableError(f"{path} lacks arrays {missing}; expected keys {_TABLE_KEYS}")
        return {k: data[k] for k in _TABLE_KEYS}


def _read_torch_dir(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise EntropyTableError(
            f"{path} holds official .pt entropy tables, which need torch to read: "
            "pip install torch==2.13.0 (or convert them once to entropy_table.npz)") from None
    return {k: torch.load(path / f"entropy_{k}.pt", map_location="cpu", weights_only=True)
            .float().numpy() for k in _TABLE_KEYS}


def _table_from_arrays(arrays: dict[str, np.ndarray], source) -> EntropyTable:
    a = {k: np.asarray(v, np.float32).reshape(-1) for k, v in arrays.items()}
    k = a["pdf"].shape[0]
    if k < 2 or a["cdf"].shape != (k,) or a["sigmas"].shape != (k,) or a["edges"].shape != (k + 1,):
        raise EntropyTableError(
            f"entropy table {source}: expected pdf/cdf/sigmas [K] and edges [K+1] with K >= 2, got "
            + ", ".join(f"{n} {a[n].shape}" for n in _TABLE_KEYS))
    if not all(np.all(np.isfinite(a[n])) for n in _TABLE_KEYS):
        raise EntropyTableError(f"entropy table {source} contains NaN/inf values")
    # A learned cdf may overshoot 1 by float32 rounding just before its last bin (cumsum, then
    # cdf[-1] = 1, as in the reference); descents that small are rounding, larger ones are damage.
    if np.any(np.diff(a["sigmas"]) <= 0) or np.any(np.diff(a["cdf"]) < -1e-6):
        raise EntropyTableError(f"entropy table {source}: sigmas must be strictly ascending and "
                                "cdf non-decreasing")
    a["cdf"] = np.minimum(a["cdf"], np.float32(1.0))
    return EntropyTable(**a)

"""Parity of the DDIM and Heun samplers with the reference traces (sampler_{ddim,heun}.npz).

For every recorded setting (e.g. det / sto02full / sto03win) this checks the grid, churn window,
per-step γ, σ̂ and δ, the initial state, and the full trace twice:

(a) replay: the compiled sampler driven by the recorded noise, with the denoiser replaced by a
    lookup of the recorded logits (the pure arithmetic chain);
(b) model: the same, with the real SDT denoiser and the fixture's parameters.

Setting names, grid size and batch shape are read from the fixture, never assumed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bitgen.diffusion.entropy_schedule import load_entropy_table
from bitgen.diffusion.grids import churn_window, entropic_grid
from bitgen.parity import CheckResult, compare, load_npz
from bitgen.sampling import (
    SamplerSettings,
    churn_gammas,
    sample_from_noise,
    step_schedule,
)

SAMPLER_FILES = {"ddim": "sampler_ddim.npz", "heun": "sampler_heun.npz"}
# XLA fuses x + h*d into one FMA (single rounding; an optimization barrier does not stop it)
# and its sigmoid differs from torch's by <=1 ulp, so the chain is faithful to ~1 ulp per op of
# the operands' scale rather than bit-exact. States x can cancel to ~0 from O(sigma) terms, so
# errors are measured against each step's scale (max |want| over the batch), not elementwise.
REPLAY_NOTE = "recorded logits; err <= 1e-5 x step scale (XLA FMA contraction, sigmoid ulp)"
MODEL_NOTE = ("real SDT + recorded noise; err <= 1e-4 x step scale: the replay's ~1e-5 state "
              "differences pass through dD/dx ~ 1/sigma^2 at low sigma (same size as in replay)")


def recorded_logits_denoiser(model_x, model_sigma, model_x0_hat, model_logits):
    """A denoiser that returns the recorded logits of the call whose inputs are nearest.

    The call is identified by (x, σ, x0_hat), so it works inside the compiled scan; when the
    replayed chain matches the reference, the nearest call is the exact one.
    """
    mx, ms, m0, ml = (jnp.asarray(a, jnp.float32) for a in (model_x, model_sigma, model_x0_hat,
                                                          model_logits))

    def denoiser(params, x, sigma, x0_hat):
        del params
        dist = (jnp.sum(jnp.abs(mx - x[None]), axis=(1, 2))
                + jnp.sum(jnp.abs(m0 - x0_hat[None]), axis=(1, 2))
                + jnp.sum(jnp.abs(ms - sigma[None]), axis=1))
        return ml[jnp.argmin(dist)]

    return denoiser


def _manifest_settings(fixture_dir: Path, file_name: str) -> dict:
    path = Path(fixture_dir) / "manifest.json"
    if not path.exists():
        return {}
    entry = json.loads(path.read_text()).get("files", {}).get(file_name, {})
    return entry.get("settings", {})


def _model_denoiser(fixture_dir: Path, common: dict):
    """(params, denoiser) of the fixture's SDT, or (None, reason) when it cannot be built."""
    try:
        from bitgen.convert import (
            from_official,
            load_official_state_dict,
            model_config_from_official,
        )
        from bitgen.diffusion.denoiser import denoise
    except ImportError as err:  # the model lives in another module; report instead of failing
        return None, f"denoiser unavailable: {err}"
    cfg = model_config_from_official(json.loads((Path(fixture_dir) / "sdt_config.json").read_text()))
    params_file = common.get("model_params_file", "sdt_params.npz")
    params = from_official(load_official_state_dict(Path(fixture_dir) / params_file), cfg)
    return params, functools.partial(denoise, cfg=cfg)


def _trace_names(method: str) -> list[tuple[str, str]]:
    pairs = [("x_hat", "x_hat"), ("x", "x_steps"), ("D", "D_steps"), ("x0_hat_in", "x0_hat_in")]
    if method == "heun":
        pairs += [("x_pred", "x_pred"), ("D2", "D2_steps")]
    return pairs


def checks(fixture_dir: Path, *, with_model: bool = True) -> Iterator[CheckResult]:
    """All sampler checks; ``with_model=False`` skips (b) (the SDT compile is the slow part)."""
    for method, file_name in SAMPLER_FILES.items():
        if not (Path(fixture_dir) / file_name).exists():
            continue
        data = load_npz(fixture_dir, file_name)
        meta = _manifest_settings(fixture_dir, file_name)
        common = meta.get("common", {})
        per_setting = meta.get("settings", {})
        table = load_entropy_table(Path(common.get("entropy_table", "lm1b")).name)
        terminal = float(common.get("sigma_min_override(terminal)", 0.08))
        sc_mode = common.get("sc_refresh_mode", "carry")
        model = (_model_denoiser(fixture_dir, common) if with_model
                 else (None, "with_model=False"))
        names = sorted(k[: -len("_sigmas")] for k in data if k.endswith("_sigmas"))
        for name in names:
            yield from _setting_checks(method, name, data, per_setting.get(name, {}), table,
                                       terminal, sc_mode, model)


def _setting_checks(method, name, data, setting, table, terminal, sc_mode, model):
    def get(key):
        return data[f"{name}_{key}"]

    tag = f"{method}.{name}"
    grid = get("sigmas")
    n = grid.shape[0]
    yield compare(f"{tag}.grid", entropic_grid(table, n, terminal, 80.0), grid)
    s_churn = float(get("s_churn"))
    bounds = tuple(float(b) for b in get("s_tmin_s_tmax"))
    if s_churn > 0 and "window_q" in setting:
        yield compare(f"{tag}.window", churn_window(table, *setting["window_q"], terminal, 80.0),
                      np.array(bounds), rtol=0, atol=0)
    gammas = churn_gammas(grid, s_churn, bounds if s_churn > 0 else None)
    yield compare(f"{tag}.gamma", gammas, get("gamma"), rtol=0, atol=0)
    settings = SamplerSettings(method=method, sc_mode=sc_mode, gammas=tuple(gammas),
                               s_noise=float(setting.get("s_noise", 1.003)), seq_bits=grid.shape[0])
    sched = step_schedule(jnp.asarray(grid), settings)
    yield compare(f"{tag}.sigma_hat", sched.sigma_hat, get("sigma_hat"), rtol=0, atol=0)
    yield compare(f"{tag}.sigma_delta", sched.sigma_delta, get("sigma_delta"), rtol=2e-7, atol=0,
                  note="torch float32 sqrt is not correctly rounded")
    yield compare(f"{tag}.x_init", get("noise_init") * grid[0] + np.float32(0.5), get("x_init"),
                  rtol=0, atol=0)
    replay = recorded_logits_denoiser(get("model_x"), get("model_sigma"), get("model_x0_hat"),
                                      get("model_logits"))
    yield from _trace_checks(f"{tag}.replay", None, replay, data, name, grid, settings, method,
                             scale_tol=1e-5, note=REPLAY_NOTE)
    params, denoiser = model
    if params is None:
        yield CheckResult(f"{tag}.model", 0.0, 0.0, True, note=f"skipped: {denoiser}")
        return
    yield from _trace_checks(f"{tag}.model", params, denoiser, data, name, grid, settings, method,
                             scale_tol=1e-4, note=MODEL_NOTE)


def _step_scale(want: np.ndarray) -> np.ndarray:
    """max |want| per sampler step ([N-1,1,1] for traces, a scalar for final arrays)."""
    if want.ndim == 3:
        return np.abs(want).max(axis=(1, 2), keepdims=True)
    return np.asarray(np.abs(want).max())


def _trace_checks(tag, params, denoiser, data, name, grid, settings, method, *, scale_tol, note):
    def get(key):
        return data[f"{name}_{key}"]

    result = sample_from_noise(params, jnp.asarray(get("noise_init")), jnp.asarray(get("noise_churn")),
                               grid=jnp.asarray(grid), settings=settings, denoiser=denoiser,
                               sigma_delta=jnp.asarray(get("sigma_delta")), return_trace=True)
    arrays = [(theirs, result.trace[ours]) for ours, theirs in _trace_names(method)]
    arrays += [("x_final", result.x), ("D_final", result.D)]
    for theirs, ours in arrays:
        want = get(theirs)
        yield compare(f"{tag}.{theirs}", ours, want, rtol=0, atol=scale_tol * _step_scale(want),
                      note=note)
    yield compare(f"{tag}.bits", result.bits, get("bits"), rtol=0, atol=0)
    yield compare(f"{tag}.nfe", np.array(result.nfe), np.array(get("model_logits").shape[0]),
                  rtol=0, atol=0)

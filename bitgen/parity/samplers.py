"""Parity of the DDIM and Heun samplers with the reference traces (sampler_{ddim,heun}.npz).

For every recorded setting (e.g. det / sto02full / sto03win) this checks the grid, churn window,
per-step γ, σ̂ and δ, the initial state, and the full trace twice:

(a) replay: the compiled sampler driven by the recorded noise, with the denoiser replaced by a
    lookup of the recorded logits (the pure arithmetic chain);
(b) model: the same, with the real SDT denoiser and the fixture's parameters.

Each trace element must lie within the first-order error bound of ``bitgen.parity.bounds``,
computed from the reference trace: in (a) the only differing input is the float32 sigmoid
(≤ 8u·|D|, checked on D itself); in (b) the network's float32 error (the model suite's
criterion) and its Jacobian at the reference inputs are added. Bits and NFE must match exactly.
Setting names, grid size and batch shape are read from the fixture, never assumed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.diffusion.entropy_schedule import load_entropy_table
from bitgen.diffusion.grids import churn_window, entropic_grid
from bitgen.parity import ATOL, RTOL, CheckResult, compare, load_npz
from bitgen.parity.bounds import sigmoid_gap, trace_bounds
from bitgen.sampling import (
    SamplerSettings,
    churn_gammas,
    sample_from_noise,
    step_schedule,
)

SAMPLER_FILES = {"ddim": "sampler_ddim.npz", "heun": "sampler_heun.npz"}
REPLAY_NOTE = "recorded logits; err <= derived bound (sigmoid gap only)"
MODEL_NOTE = "real SDT + recorded noise; err <= derived bound (network error + its Jacobian)"


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
    """(params, denoiser, cfg) of the fixture's SDT, or (None, reason, None) when it cannot be built."""
    try:
        from bitgen.convert import (
            from_official,
            load_official_state_dict,
            model_config_from_official,
        )
        from bitgen.diffusion.denoiser import denoise
    except ImportError as err:  # the model lives in another module; report instead of failing
        return None, f"denoiser unavailable: {err}", None
    cfg = model_config_from_official(json.loads((Path(fixture_dir) / "sdt_config.json").read_text()))
    params_file = common.get("model_params_file", "sdt_params.npz")
    params = from_official(load_official_state_dict(Path(fixture_dir) / params_file), cfg)
    return params, functools.partial(denoise, cfg=cfg), cfg


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
        if sc_mode != "carry":
            raise ValueError(f"{file_name}: the trace bounds assume sc_refresh_mode='carry', "
                             f"got {sc_mode!r}")
        model = (_model_denoiser(fixture_dir, common) if with_model
                 else (None, "with_model=False", None))
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
    ref_D = _sigmoid64(get("model_logits"))
    ctx = (data, name, grid, settings, method)
    yield from _trace_checks(f"{tag}.replay", None, replay, ctx,
                             lambda c, ex, e0: sigmoid_gap(ref_D[c]), note=REPLAY_NOTE)
    params, denoiser, cfg = model
    if params is None:
        yield CheckResult(f"{tag}.model", 0.0, 0.0, True, note=f"skipped: {denoiser}")
        return
    yield from _trace_checks(f"{tag}.model", params, denoiser, ctx,
                             _model_delta_D(params, denoiser, cfg, data, name), note=MODEL_NOTE)


def _sigmoid64(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def _model_delta_D(params, denoiser, cfg, data, name):
    """ΔD bound of each model call: sigmoid gap + D(1−D)·(network error + |J_x|·Δx + |J_x0|·Δx0).

    The network error is the model suite's criterion max(ATOL, RTOL·max|f_θ|, RTOL·|logit|) with
    f_θ = logit − matched filter; the Jacobians are the fixture SDT's at the reference inputs.
    """
    mx, ms, m0, ml = (data[f"{name}_model_{k}"] for k in ("x", "sigma", "x0_hat", "logits"))
    D = _sigmoid64(ml)
    s2 = np.maximum(ms.astype(np.float32) ** 2, np.float32(1e-12))[:, :, None]
    f_theta = ml - np.clip((mx - np.float32(0.5)) / s2, -cfg.mf_clip, cfg.mf_clip)
    scale = np.abs(f_theta).max(axis=(1, 2), keepdims=True)
    eps = np.maximum(np.maximum(ATOL, RTOL * scale), RTOL * np.abs(ml))
    j_x, j_0 = (np.abs(np.asarray(j, np.float64))
                for j in _row_jacobians(params, mx, ms, m0, denoiser=denoiser))

    def delta_D(c, x_err, x0_err):
        logit_err = (eps[c] + np.einsum("bst,bt->bs", j_x[c], x_err)
                     + np.einsum("bst,bt->bs", j_0[c], x0_err))
        return sigmoid_gap(D[c]) + D[c] * (1.0 - D[c]) * logit_err

    return delta_D


@functools.partial(jax.jit, static_argnames="denoiser")
def _row_jacobians(params, mx, ms, m0, *, denoiser):
    """∂logits/∂x and ∂logits/∂x0_hat [M,B,S,S] of every call (rows are independent)."""
    def row(x, sig, x0):
        return denoiser(params, x[None], sig[None], x0[None])[0]

    return jax.vmap(jax.vmap(jax.jacfwd(row, argnums=(0, 2))))(mx, ms, m0)


def _trace_checks(tag, params, denoiser, ctx, delta_D, *, note):
    data, name, grid, settings, method = ctx

    def get(key):
        return data[f"{name}_{key}"]

    result = sample_from_noise(params, jnp.asarray(get("noise_init")), jnp.asarray(get("noise_churn")),
                               grid=jnp.asarray(grid), settings=settings, denoiser=denoiser,
                               sigma_delta=jnp.asarray(get("sigma_delta")), return_trace=True)
    ref = {k: get(k).astype(np.float64) for k in ("x_hat", "x_steps", "D_steps", "x_pred", "D2_steps")
           if f"{name}_{k}" in data}
    sched = step_schedule(jnp.asarray(grid), settings, jnp.asarray(get("sigma_delta")))
    bound = trace_bounds(method, ref, grid.astype(np.float64),
                         np.asarray(sched.sigma_hat, np.float64), np.asarray(sched.churned),
                         delta_D)
    bound["x0_hat_in"] = np.concatenate([np.zeros_like(bound["D_steps"][:1]),
                                         bound["D_steps"][:-1]])
    arrays = [(theirs, result.trace[ours]) for ours, theirs in _trace_names(method)]
    arrays += [("x_final", result.x), ("D_final", result.D)]
    for theirs, ours in arrays:
        yield compare(f"{tag}.{theirs}", ours, get(theirs), rtol=0, atol=bound[theirs], note=note)
    yield compare(f"{tag}.bits", result.bits, get("bits"), rtol=0, atol=0)
    yield compare(f"{tag}.nfe", np.array(result.nfe), np.array(get("model_logits").shape[0]),
                  rtol=0, atol=0)

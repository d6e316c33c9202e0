"""Parity of the SDT denoiser with the official model (``sdt_forward*.npz``).

For every forward fixture ``sdt_forward<suffix>.npz`` the weights ``sdt_params<suffix>.npz`` are
loaded through the converter, the ModelConfig is read from ``sdt_config.json``, and f_θ, logits,
D, the matched filter and every recorded intermediate (``dbg_<case>__<module>__<what>``) are
compared. Also checks the parameter count against ``derived.n_parameters``.

Tolerance: rtol 1e-5 measured against each array's scale (atol = 1e-5·max|want|, at least 1e-6),
not per element. Two float32 implementations round differently (GEMM summation order, the
reference's non-correctly-rounded sqrt/exp/sin), and in the fan-in fixture — unit-gain layers,
activations up to ~5 — those few-ulp differences land on elements near zero, where an elementwise
relative test is meaningless. Checked against a float64 evaluation of the same weights: bitgen's
float32 error is at or below the reference's at every intermediate (both ≤ ~1.5e-6·max|x|).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitgen.config import ModelConfig
from bitgen.official import (
    from_official,
    model_config_from_official,
    official_to_bitgen_name,
)
from bitgen.diffusion.denoiser import (
    combine_logits,
    count_params,
    denoised_mean,
    matched_filter_llr,
    residual_logits,
)
from bitgen.parity import ATOL, RTOL, CheckResult, compare, load_json, load_npz


def _compare_scaled(name: str, got, want, scale=None) -> CheckResult:
    """compare() with atol = RTOL·max|scale| (default: want); see the module docstring."""
    scale = want if scale is None else scale
    atol = max(ATOL, RTOL * float(np.abs(scale).max(initial=0.0)))
    return compare(name, got, want, atol=atol, note=f"atol={atol:.1e}")


def fixture_model_config(fixture_dir: Path) -> ModelConfig:
    """ModelConfig of the fixture's model (from ``sdt_config.json``), evaluation settings."""
    return model_config_from_official(load_json(fixture_dir, "sdt_config.json"))


def load_fixture_params(fixture_dir: Path, name: str, cfg: ModelConfig) -> dict:
    return from_official(load_npz(fixture_dir, name), cfg)


@partial(jax.jit, static_argnames=("cfg", "bootstrap"))
def _forward(params, x_t, sigma, x0_hat, *, cfg: ModelConfig, bootstrap: bool):
    f_theta, inter = residual_logits(params, x_t, sigma, None if bootstrap else x0_hat, cfg=cfg,
                                     capture_intermediates=True)
    logits = combine_logits(f_theta, x_t, sigma, cfg=cfg)
    return f_theta, logits, denoised_mean(logits), inter


def _intermediate(inter: dict, module: str, what: str) -> np.ndarray | None:
    """Find the sown value for the official ``<module>`` and ``<what>`` (in/out/out0/out1)."""
    path = official_to_bitgen_name(module + ".weight")[:-1]
    node = inter
    if what in ("out0", "out1"):  # adaLN-Zero: (modulated features, gate)
        keys = (*path, what)
    else:
        keys = (*path[:-1], f"{path[-1]}_{what}")
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return np.asarray(node[0])


def _case_specs(fixture_dir: Path, forward_name: str, arrays: dict) -> dict[str, dict]:
    """case -> {group, x0_hat kind} from the manifest when present, else from array names."""
    cases = {k[: -len("_f_theta")] for k in arrays if k.endswith("_f_theta")}
    manifest_path = Path(fixture_dir) / "manifest.json"
    described = {}
    if manifest_path.exists():
        files = json.loads(manifest_path.read_text()).get("files", {})
        described = files.get(forward_name, {}).get("settings", {}).get("cases", {})
    specs = {}
    for case in sorted(cases):
        group = described.get(case, {}).get("group", "extra" if case == "extra" else "main")
        specs[case] = {"group": group}
    return specs


def checks(fixture_dir: Path) -> Iterator[CheckResult]:
    fixture_dir = Path(fixture_dir)
    cfg = fixture_model_config(fixture_dir)
    derived = load_json(fixture_dir, "sdt_config.json").get("derived", {})
    if "n_parameters" in derived:
        n = count_params(cfg)
        yield CheckResult("model/n_parameters", abs(n - derived["n_parameters"]), 0.0,
                          n == derived["n_parameters"], f"{n:,} vs {derived['n_parameters']:,}")
    for forward_path in sorted(fixture_dir.glob("sdt_forward*.npz")):
        suffix = forward_path.stem[len("sdt_forward"):]
        tag = f"model{suffix}"
        arrays = load_npz(fixture_dir, forward_path.name)
        params = load_fixture_params(fixture_dir, f"sdt_params{suffix}.npz", cfg)
        for group in sorted({k[: -len("_mf")] for k in arrays if k.endswith("_mf")}):
            mf = matched_filter_llr(jnp.asarray(arrays[f"{group}_x_t"]),
                                    jnp.asarray(arrays[f"{group}_sigma"]), cfg.mf_clip)
            yield compare(f"{tag}/{group}/matched_filter", mf, arrays[f"{group}_mf"])
        for case, spec in _case_specs(fixture_dir, forward_path.name, arrays).items():
            group = spec["group"]
            x_t = jnp.asarray(arrays[f"{group}_x_t"])
            sigma = jnp.asarray(arrays[f"{group}_sigma"])
            bootstrap = case == "none"  # reference quirk: x0_hat=None
            x0_hat = (jnp.asarray(arrays[f"{case}_x0_hat"]) if f"{case}_x0_hat" in arrays
                      else jnp.zeros_like(x_t))
            f_theta, logits, denoised, inter = _forward(params, x_t, sigma, x0_hat, cfg=cfg,
                                                        bootstrap=bootstrap)
            yield _compare_scaled(f"{tag}/{case}/f_theta", f_theta, arrays[f"{case}_f_theta"])
            # logits = f_θ + an exact matched filter: the error scale is f_θ's, not the ±30 clip's.
            yield _compare_scaled(f"{tag}/{case}/logits", logits, arrays[f"{case}_logits"],
                                  scale=arrays[f"{case}_f_theta"])
            yield _compare_scaled(f"{tag}/{case}/D", denoised, arrays[f"{case}_D"])
            inter = jax.device_get(inter)
            prefix = f"dbg_{case}__"
            for key in sorted(k for k in arrays if k.startswith(prefix)):
                module, what = key[len(prefix):].rsplit("__", 1)
                got = _intermediate(inter, module, what)
                name = f"{tag}/{case}/{module}:{what}"
                if got is None:
                    yield CheckResult(name, float("inf"), float("inf"), False, "not produced")
                else:
                    yield _compare_scaled(name, got, arrays[key])

"""Parity of the training loss with the official trainer (``loss.npz``).

Replays the fixture's explicit noise and self-conditioning rows: x_t, the EDM weight, the
bootstrap (x0_hat=None) logits, the main-pass x0_hat, logits and D, then every loss variant
(binary_sm / binary_ce × edm / unit) and the per-sample MSE metric, both through the full
``diffusion_loss`` pipeline and through ``loss_from_logits`` on the fixture's own logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp

from bitgen.config import DiffusionConfig
from bitgen.diffusion.denoiser import denoise, denoised_mean
from bitgen.diffusion.loss import (
    diffusion_loss,
    loss_from_logits,
    loss_weight,
    self_conditioning_input,
)
from bitgen.parity import CheckResult, compare, load_json, load_npz
from bitgen.parity.model import fixture_model_config, load_fixture_params

_VARIANTS = {"sm": "binary_sm", "ce": "binary_ce"}


def _params_file(fixture_dir: Path) -> str:
    manifest = Path(fixture_dir) / "manifest.json"
    if manifest.exists():
        settings = json.loads(manifest.read_text()).get("files", {}).get("loss.npz", {}).get("settings", {})
        return settings.get("model_params_file", "sdt_params.npz")
    return "sdt_params.npz"


def checks(fixture_dir: Path) -> Iterator[CheckResult]:
    fixture_dir = Path(fixture_dir)
    cfg = fixture_model_config(fixture_dir)
    continuous = load_json(fixture_dir, "sdt_config.json").get("diffusion", {}).get("continuous", {})
    base = DiffusionConfig(sigma_data=float(continuous.get("sigma_data", 0.5)))
    params = load_fixture_params(fixture_dir, _params_file(fixture_dir), cfg)
    a = load_npz(fixture_dir, "loss.npz")
    bits, sigma, eps = jnp.asarray(a["b"]), jnp.asarray(a["sigma"]), jnp.asarray(a["eps"])
    sc_mask = jnp.asarray(a["sc_mask"])

    x_t = sigma[:, None] * eps + bits.astype(jnp.float32)
    yield compare("loss/x_t", x_t, a["x_t"])
    yield compare("loss/weight_edm",
                  loss_weight(sigma, weighting="edm", sigma_data=base.sigma_data), a["weight_edm"])
    bootstrap = jax.jit(denoise, static_argnames=("cfg",))(params, x_t, sigma, None, cfg=cfg)
    yield compare("loss/logits_sc_bootstrap", bootstrap, a["logits_sc_bootstrap"])
    x0_hat = jax.jit(self_conditioning_input, static_argnames=("cfg", "train"))(
        params, x_t, sigma, sc_mask, cfg=cfg, train=False)
    yield compare("loss/x0_hat", x0_hat, a["x0_hat"])
    logits = jax.jit(denoise, static_argnames=("cfg",))(params, x_t, sigma, x0_hat, cfg=cfg)
    yield compare("loss/logits", logits, a["logits"])
    yield compare("loss/D", denoised_mean(logits), a["D"])

    # The whole pipeline (noise, SC bootstrap, main pass, loss) once, for the headline variant;
    # the other variants reuse its logits (the model does not depend on the loss settings).
    dcfg = replace(base, loss_type="binary_sm", loss_weighting="edm")
    loss, aux = jax.jit(diffusion_loss, static_argnames=("model_cfg", "diffusion_cfg", "train"))(
        params, bits, sigma, jax.random.key(0), model_cfg=cfg, diffusion_cfg=dcfg, train=False,
        sc_mask=sc_mask, noise=eps)
    yield compare("loss/sm_edm/diffusion_loss", loss, a["loss_sm_edm"])
    yield compare("loss/sm_edm/diffusion_loss_mse", aux["mse_per_sample"], a["metric_sm_edm"])
    for short, loss_type in _VARIANTS.items():
        for weighting in ("edm", "unit"):
            name = f"{short}_{weighting}"
            if f"loss_{name}" not in a:
                continue
            for source, values in (("", logits), ("_from_fixture_logits", jnp.asarray(a["logits"]))):
                got, got_aux = loss_from_logits(values, bits, sigma, loss_type=loss_type,
                                                weighting=weighting, sigma_data=base.sigma_data)
                yield compare(f"loss/{name}/loss{source}", got, a[f"loss_{name}"])
                yield compare(f"loss/{name}/mse_per_sample{source}", got_aux["mse_per_sample"],
                              a[f"metric_{name}"])

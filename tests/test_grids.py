"""σ-grids, quantiles, churn windows and NFE accounting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.config import DiffusionConfig, SamplerConfig
from bitgen.diffusion import grids
from bitgen.diffusion.entropy_schedule import load_entropy_table, reference_linspace
from bitgen.parity import grids as grids_parity
from bitgen.sampling import settings as sampler_settings
from bitgen.sampling import steps

LM1B = load_entropy_table("lm1b")


def test_golden_parity(reference_dir):
    failed = [r.line() for r in grids_parity.checks(reference_dir) if not r.passed]
    assert not failed, "\n".join(failed)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 400), lo=st.floats(0.01, 1.0), table=st.sampled_from(["lm1b", "owt"]))
def test_entropic_grid_shape_order_endpoints(n, lo, table):
    tab = load_entropy_table(table)
    grid = grids.entropic_grid(tab, n, lo, 80.0)
    assert grid.shape == (n,) and grid.dtype == np.float32
    assert np.all(np.diff(grid) <= 0)
    assert grid[0] == np.float32(tab.sigmas[-1]) and grid[-1] == np.float32(max(lo, tab.sigmas[0]))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 400))
def test_karras_grid_and_linspace(n):
    grid = grids.karras_grid(n, 0.08, 80.0)
    assert grid[0] == np.float32(80.0) and grid[-1] == np.float32(0.08)
    assert np.all(np.diff(grid) < 0)
    lin = reference_linspace(0.0, 1.0, n)
    assert lin[0] == 0 and lin[-1] == 1 and np.all(np.diff(lin) > 0)


def test_quantiles_and_windows():
    assert grids.entropy_quantile(LM1B, 0.0) == float(LM1B.sigmas[0])  # reference quirk
    qs = [grids.entropy_quantile(LM1B, q) for q in np.linspace(0, 1, 21)]
    assert np.all(np.diff(qs) >= 0)
    assert grids.churn_window(LM1B, 0.0, 1.0, 0.08, 80.0) == (0.08, float(LM1B.sigmas[-1]))
    assert grids.churn_window(None, 0.1, 0.9, 0.08, 80.0) == (0.08, 80.0)


def test_nfe_accounting():
    # "256 NFE" DDIM+carry = 255 grid points = 254 steps + final denoise = 255 real calls
    assert steps.nfe_to_grid_points(256, "ddim", "carry") == 255
    assert steps.model_calls(255, "ddim", "carry") == 255
    assert steps.nfe_to_grid_points(256, "heun", "carry") == 127
    assert steps.nfe_to_grid_points(256, "ddim", "refined") == 127
    assert steps.nfe_to_grid_points(256, "heun", "refined") == 85
    with pytest.raises(ValueError, match="sampler/sc_mode"):
        steps.calls_per_step("euler", "carry")


def test_entropic_grid_without_table_is_an_error():
    with pytest.raises(ValueError, match="no silent Karras fallback"):
        sampler_settings.sampling_grid(SamplerConfig(), None, DiffusionConfig())
    karras = sampler_settings.sampling_grid(SamplerConfig(grid="karras", nfe=17), None, DiffusionConfig())
    assert karras.shape == (16,)

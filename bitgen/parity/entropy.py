"""Parity of the entropy-rate table rebuild and entropic σ draws with entropy_table.npz, and of
the shipped tables (bitgen/assets) with entropy_tables/*.npz.

The reference's seeded draws (``draw_sigma`` after ``torch.manual_seed``) depend on torch's RNG
stream and cannot be reproduced with JAX keys; they are checked through their recorded uniforms
instead (the injected-uniform draws below exercise the same arithmetic), and statistically in
tests/test_entropy_schedule.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bitgen.config import DiffusionConfig, EntropyScheduleConfig
from bitgen.diffusion.entropy_schedule import (
    EntropyTable,
    entropic_draw,
    load_entropy_table,
    log_bins,
    rebuild_table,
    regularizer,
)
from bitgen.parity import CheckResult, compare, load_npz

EXP_NOTE = "float32 exp/log differ from torch by <=1 ulp"


def checks(fixture_dir: Path) -> Iterator[CheckResult]:
    data = load_npz(fixture_dir, "entropy_table.npz")
    cfg, dcfg = EntropyScheduleConfig(num_bins=data["pdf"].shape[0]), DiffusionConfig()
    log_edges, edges, mids = log_bins(cfg.num_bins, dcfg.sigma_min, dcfg.sigma_max)
    yield compare("entropy.edges_log", log_edges, data["dbg_edges_log"], rtol=0, atol=0)
    yield compare("entropy.edges", edges, data["edges"], rtol=2.5e-7, atol=0, note=EXP_NOTE)
    yield compare("entropy.sigmas", mids, data["sigmas"], rtol=2.5e-7, atol=0, note=EXP_NOTE)
    yield compare("entropy.reg(ref midpoints)",
                  regularizer(jnp.asarray(data["sigmas"]), cfg.regularizer_c, cfg.regularizer_n),
                  data["dbg_reg"], rtol=0, atol=0)

    sig, met = data["buffer_sigma"], data["buffer_metric"]
    table, dbg = rebuild_table(sig, met, np.ones(sig.shape, bool), cfg, dcfg)
    for ours, theirs in (("bin_idx", "dbg_bin_idx"), ("rate", "dbg_rate_samples"),
                         ("sum_rate", "dbg_sum_rate"), ("count", "dbg_count"),
                         ("mean_rate", "dbg_mean_rate")):
        yield compare(f"entropy.{theirs}", dbg[ours], data[theirs])
    yield compare("entropy.pdf", table.pdf, data["pdf"], note="via midpoints: " + EXP_NOTE)
    yield compare("entropy.cdf", table.cdf, data["cdf"])

    esig, emet = data["edge_buffer_sigma"], data["edge_buffer_metric"]
    etable, edbg = rebuild_table(esig, emet, np.ones(esig.shape, bool), cfg, dcfg)
    finite = np.isfinite(esig) & np.isfinite(emet)
    yield compare("entropy.edge_bin_idx", np.asarray(edbg["bin_idx"])[finite], data["edge_dbg_bin_idx"],
                  rtol=0, atol=0)
    yield compare("entropy.edge_count", edbg["count"], data["edge_dbg_count"], rtol=0, atol=0)
    yield compare("entropy.edge_pdf", etable.pdf, data["edge_pdf"])
    yield compare("entropy.edge_cdf", etable.cdf, data["edge_cdf"])

    u, v = jnp.asarray(data["draw_u"]), jnp.asarray(data["draw_v"])
    ref_table = EntropyTable(pdf=data["pdf"], cdf=data["cdf"], sigmas=data["sigmas"], edges=data["edges"])
    sigma, idx = entropic_draw(ref_table, u, v, sigma_min=dcfg.sigma_min, sigma_max=dcfg.sigma_max)
    yield compare("entropy.draw_bin", idx, data["draw_bin"], rtol=0, atol=0)
    yield compare("entropy.draw_lo", np.maximum(data["edges"][idx], np.float32(dcfg.sigma_min)),
                  data["draw_lo"], rtol=0, atol=0)
    yield compare("entropy.draw_hi", np.minimum(data["edges"][np.asarray(idx) + 1], np.float32(dcfg.sigma_max)),
                  data["draw_hi"], rtol=0, atol=0)
    yield compare("entropy.draw_sigma", sigma, data["draw_sigma"], rtol=1e-6, atol=0, note=EXP_NOTE)

    lm1b = load_entropy_table("lm1b")
    sigma, idx = entropic_draw(lm1b, u, v, sigma_min=dcfg.sigma_min, sigma_max=dcfg.sigma_max)
    yield compare("entropy.lm1b_draw_bin", idx, data["lm1b_draw_bin"], rtol=0, atol=0)
    yield compare("entropy.lm1b_draw_sigma", sigma, data["lm1b_draw_sigma"], rtol=1e-6, atol=0,
                  note=EXP_NOTE)

    for path in sorted((Path(fixture_dir) / "entropy_tables").glob("*.npz")):
        want = load_npz(path.parent, path.name)
        try:
            got = load_entropy_table(path.stem)
        except FileNotFoundError as err:
            yield CheckResult(f"entropy.shipped.{path.stem}", float("inf"), float("inf"), False, str(err))
            continue
        for key in ("pdf", "cdf", "sigmas", "edges"):
            yield compare(f"entropy.shipped.{path.stem}.{key}", getattr(got, key), want[key],
                          rtol=0, atol=0)

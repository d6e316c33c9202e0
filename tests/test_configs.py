"""Every shipped experiment config loads, validates, and the paper configs have the paper's sizes."""

from __future__ import annotations

import pytest

from bitgen.config import CONFIG_DIR, ConfigError, load_config

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))

# Trunk shapes of the spec §2 table: (P, T, E, heads, blocks, dim_ff). tests/test_sdt.py checks
# that these shapes give the official parameter counts.
PAPER_SHAPES = {
    "cobit_s_lm1b": (15, 128, 768, 12, 12, 3072),
    "cobit_s_owt": (16, 1024, 768, 12, 12, 3072),
    "cobit_m_owt": (16, 1024, 1024, 16, 24, 4096),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.name == name


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_paper_configs_have_the_paper_trunks(name):
    m = load_config(name).model
    assert (m.patch_size, m.seq_tokens, m.embed_dim, m.n_heads, m.n_blocks, m.dim_ff) == PAPER_SHAPES[name]
    assert (m.content_dim, m.head_hidden, m.dropout) == (64, 128, 0.1)


def test_paper_settings_match_the_spec():
    lm1b, owt_s, owt_m = (load_config(n) for n in ("cobit_s_lm1b", "cobit_s_owt", "cobit_m_owt"))
    assert (lm1b.model.patch_size, lm1b.model.seq_tokens, lm1b.sampler.gamma) == (15, 128, 0.2)
    assert (owt_s.model.patch_size, owt_s.model.seq_tokens, owt_s.sampler.gamma) == (16, 1024, 0.13)
    assert (owt_m.optim.lr, owt_m.optim.warmup_steps, owt_m.sampler.gamma) == (2e-4, 5000, 0.21)
    for cfg in (lm1b, owt_s, owt_m):
        assert cfg.data.batch_size == 512 and cfg.optim.weight_decay == 0.01
        assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.grad_clip) == (0.9, 0.99, 1.0)
        assert cfg.sampler.nfe == 256 and cfg.sampler.terminal_sigma == 0.08


def test_unknown_config_names_the_known_ones():
    with pytest.raises(ConfigError, match="demo_cpu"):
        load_config("no_such_config")


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="model.no_such_field"):
        load_config("demo_cpu", ["model.no_such_field=1"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config("demo_cpu", ["model.embed_dim=100", "model.n_heads=3"])


def test_cli_reports_bitgen_errors_without_a_traceback(capsys):
    from bitgen.cli import main

    assert main(["data", "data.source=/no/such/corpus.txt", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitgen data: ") and "does not exist" in err and "Traceback" not in err


def test_owt_configs_keep_the_checkpoints_the_paper_evaluates():
    for name in ("cobit_s_owt", "cobit_m_owt"):
        train = load_config(name).train
        assert train.keep_every == 50_000 and 750_000 % train.keep_every == 0
        assert 750_000 % train.ckpt_every == 0  # the 750K step is saved at all


# Values that cannot work, each refused by validation before a run starts, naming its key.
BAD_VALUES = [
    "model.n_heads=0", "model.n_heads=-2", "model.embed_dim=-64", "model.embed_dim=0",
    "model.n_blocks=0", "model.seq_tokens=0", "model.patch_size=0", "model.dim_ff=-1",
    "model.dropout=1", "model.mf_clip=0", "train.log_every=0", "train.ckpt_every=0",
    "train.keep_checkpoints=0", "train.keep_every=-1", "train.sample_every=-1", "train.steps=0",
    "entropy.update_every=0", "entropy.num_bins=0", "entropy.buffer_size=0",
    "optim.lr=-1", "optim.lr=0", "optim.ema_decay=2", "optim.ema_decay=1", "optim.ema_decay=-0.1",
    "optim.b2=1", "optim.eps=0", "optim.grad_clip=0", "optim.min_lr=-1", "optim.grad_accum=0",
    "optim.warmup_steps=-1", "data.batch_size=0", "data.val_fraction=1", "mesh.data=0",
    "sampler.gamma=inf", "sampler.gamma=-1", "sampler.s_noise=inf", "sampler.terminal_sigma=0",
    "sampler.window_q=0,inf", "sampler.batch_size=0", "sampler.nfe=2",
    "diffusion.sigma_max=inf", "diffusion.sigma_min=0", "diffusion.rho=0",
    "diffusion.self_condition_prob=2", "diffusion.sigma_data=0.4", "diffusion.data_center=0",
]


@pytest.mark.parametrize("override", BAD_VALUES)
def test_values_that_cannot_work_are_refused_by_name(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo_cpu", [override])


def test_train_steps_must_exceed_the_warm_up():
    with pytest.raises(ConfigError, match="train.steps=40 must exceed optim.warmup_steps=40"):
        load_config("demo_cpu", ["train.steps=40"])


def test_a_bad_value_stops_the_cli_before_the_run_directory_exists(tmp_path, capsys):
    from bitgen.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--config", "demo_cpu", "model.n_heads=0", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.n_heads=0" in err and "Traceback" not in err
    assert not run_dir.exists()

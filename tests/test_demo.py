"""`bitgen demo`: the plan, the sampling/scoring/table stage on stand-in runs (training replaced by
tiny random-parameter runs, so it is fast), resuming, and the real quick demo (slow)."""

from __future__ import annotations

import json

import jax
import pytest
from test_eval_cli import _save_run

from bitgen import cli, demo
from bitgen.config import DataConfig, ExperimentConfig, ModelConfig, SamplerConfig


def test_plan_compares_pf_ode_with_churn_over_several_seeds():
    full = demo.plan(False)
    assert str(full.work_dir) == "runs/demo" and len(full.seeds) >= 3 and full.num >= 64
    assert ("sampler.gamma=0",) in full.sampler_points and () in full.sampler_points
    quick = demo.plan(True)
    assert str(quick.work_dir) == "runs/demo_quick" and quick.num < full.num
    # A few training steps learn no entropy table, so the smoke run must not ask for the entropic grid.
    assert all("sampler.grid=karras" in p for p in quick.sampler_points)
    assert demo.plan(False, "elsewhere", seeds=(4,), num=5).work_dir.name == "elsewhere"


def test_families_train_after_the_three_stages_at_the_same_budget(capsys):
    p = demo.plan(True, families=("bitlm_softmax", "bitlm", "bitlm_softmax"))
    stages = p.stages()
    assert [s[0] for s in stages] == ["cobit", "ar", "ar_eval", "bitlm_softmax", "bitlm"]
    for sub, config, overrides, _ in stages:  # every run takes the plan's training overrides
        assert overrides[:len(p.train_overrides)] == p.train_overrides
    assert stages[3][1:3] == ("demo_bitlm_cpu", p.train_overrides + ("family.head=softmax",))
    assert demo.plan(False).stages() == demo.plan(False, families=()).stages()
    assert cli.main(["demo", "--families", "bitlm,gpt5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--families gpt5: not a demo family" in err and "block_cobit" in err and err.count("\n") == 1


@pytest.fixture()
def stand_in_training(tmp_path, monkeypatch):
    """Replace training by writing tiny random-parameter runs with each stage's task."""
    from bitgen.data.corpus import build_corpus_rows
    from bitgen.diffusion.denoiser import init_params
    from bitgen.nn.ar import init_ar_params
    from bitgen.families.ar import ar_config

    (tmp_path / "tiny.txt").write_text("".join(f"a {w} line {i} of text.\n" for i in range(300)
                                               for w in ("x", "y")))
    data = DataConfig(source=str(tmp_path / "tiny.txt"), vocab_size=300, batch_size=4,
                      val_fraction=0.05, cache_dir=str(tmp_path / "cache"))
    model = ModelConfig(patch_size=9, seq_tokens=8, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=32,
                        content_dim=8, head_hidden=8, dropout=0.0)
    calls = []

    def fake_train(config, run_dir, overrides, *, flag, progress):
        calls.append(config)
        if run_dir.exists():
            return True
        if config == "demo_cpu":
            cfg = ExperimentConfig(model=model, data=data,
                                   sampler=SamplerConfig(nfe=4, batch_size=4, grid="karras"))
            _save_run(run_dir, cfg, init_params(jax.random.key(0), model))
        else:
            cfg = ExperimentConfig(task="ar", model=model, data=data, sampler=SamplerConfig(batch_size=4))
            vocab = build_corpus_rows(data, model.seq_tokens).codec.vocab_size
            _save_run(run_dir, cfg, init_ar_params(jax.random.key(1), ar_config(cfg, vocab)))
        return True

    monkeypatch.setattr(demo, "train_stage", fake_train)
    return calls


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_demo_trains_all_stages_then_prints_the_table_and_resumes(stand_in_training, tmp_path, capsys):
    p = demo.DemoPlan(work_dir=tmp_path / "work", train_overrides=(),
                      sampler_points=(("sampler.gamma=0",), ("sampler.gamma=0.3",)), seeds=(0, 1),
                      num=4, ar_temperatures=(1.0,))
    table, signum = demo.run_demo(p, progress=False)
    assert signum is None
    assert stand_in_training == ["demo_cpu", "demo_ar_cpu", "demo_ar_eval_cpu"]
    assert [r["model"] for r in table] == ["real data", "iid unigram", "cobit", "cobit", "ar"]
    assert all(r["seeds"] == [0, 1] for r in table[1:])
    out = capsys.readouterr().out
    assert "[1/5] training" in out and "[5/5] results" in out and "PF-ODE" in out and "γ=0.3" in out
    assert "tokens drawn independently" in out
    # One prompted continuation per model after the table, printed and written, beginning with
    # the prompt's text.
    assert out.index("[5/5] results") < out.index("one prompted continuation per model of 'The'")
    for name in ("cobit", "ar"):
        (record,) = [json.loads(line) for line in
                     (tmp_path / "work" / "eval" / f"prompted_{name}.jsonl").read_text().splitlines()]
        assert record["prompt"] == "The" and record["text"].startswith("The")
        assert f"  {name}: {record['text']!r}" in out
    assert (tmp_path / "work" / "eval" / "frontier.png").is_file()
    results = (tmp_path / "work" / "eval" / "results.jsonl").read_text().splitlines()
    again, _ = demo.run_demo(p, progress=False)  # everything is reused, nothing is redrawn
    assert (tmp_path / "work" / "eval" / "results.jsonl").read_text().splitlines() == results
    assert [r["genppl_mean"] for r in again] == [r["genppl_mean"] for r in table]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    assert cli.main(["demo", "--quick", "--work-dir", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert (tmp_path / "demo" / "eval" / "table.csv").is_file()


@pytest.mark.slow
def test_quick_demo_with_the_block_causal_families(tmp_path, capsys):
    work = tmp_path / "demo"
    families = ",".join(demo.FAMILIES)
    assert cli.main(["demo", "--quick", "--work-dir", str(work), "--families", families,
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    for name in demo.FAMILIES:
        (record,) = [json.loads(line) for line in
                     (work / "eval" / f"prompted_{name}.jsonl").read_text().splitlines()]
        assert record["text"].startswith("The") and f"  {name}: " in out
    table = (work / "eval" / "table.csv").read_text()
    assert "bitlm" in table and "block_cobit" in table


def test_a_run_of_an_earlier_demo_version_names_the_fix(tmp_path, monkeypatch):
    from bitgen.checkpoint import IncompatibleCheckpointError
    from bitgen.train import loop

    def refuse(cfg, run_dir, **kwargs):
        raise IncompatibleCheckpointError("checkpoint x was written with a different config (data.bit_order)")

    monkeypatch.setattr(loop, "train", refuse)
    with pytest.raises(IncompatibleCheckpointError, match=r"earlier demo version .*bit_order.*delete .*work"):
        demo.train_stage("demo_cpu", tmp_path / "work" / "cobit", (), flag=None, progress=False)

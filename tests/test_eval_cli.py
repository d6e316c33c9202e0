"""`bitgen sample` / `bitgen eval`: sweep parsing, aggregation, scoring, tables and plots, and the
commands end to end on tiny randomly initialised runs (no training, so the suite stays fast)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen import cli
from bitgen.checkpoint import Checkpointer
from bitgen.codecs import BitCodec
from bitgen.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    SamplerConfig,
    to_dict,
)
from bitgen.eval import plot, sweep
from bitgen.eval import table as tables
from bitgen.eval.metrics import windowed_sequence_nll
from bitgen.generation import decode_samples
from bitgen.loading import SampleError, load_model
from bitgen.families.ar import ar_config

# --------------------------------------------------------------------------------------------------
# Pure pieces


def test_parse_sweep_is_the_cartesian_product_of_sampler_overrides():
    points = sweep.parse_sweep("name=ddim,heun sampler.nfe=32,64,128 gamma=0,0.2 window_q=0:1,0.1:0.9")
    assert len(points) == 2 * 3 * 2 * 2
    assert points[0] == ["sampler.name=ddim", "sampler.nfe=32", "sampler.gamma=0", "sampler.window_q=0,1"]
    assert len({tuple(p) for p in points}) == len(points)
    assert sweep.parse_sweep("") == [[]]
    union = sweep.parse_sweep("grid=entropic nfe=32,64; grid=karras nfe=32")
    assert union == [["sampler.grid=entropic", "sampler.nfe=32"], ["sampler.grid=entropic", "sampler.nfe=64"],
                     ["sampler.grid=karras", "sampler.nfe=32"]]
    with pytest.raises(ValueError, match="not a sampler field"):
        sweep.parse_sweep("lr=1e-3")
    with pytest.raises(ValueError, match="key=v1,v2"):
        sweep.parse_sweep("gamma")


def _row(seed, genppl, entropy, gamma=0.2, model="cobit", **extra):
    base = {k: None for k in tables.POINT_KEYS}
    base.update(model=model, name="ddim", grid="entropic", nfe=32, gamma=gamma, window_q=[0.0, 1.0],
                seed=seed, n=8, genppl=genppl, entropy=entropy, n_invalid_mean=0.0, seconds=1.0)
    base.update(extra)
    return base


@given(values=st.lists(st.tuples(st.floats(1, 1e4), st.floats(0, 10)), min_size=1, max_size=6))
@settings(max_examples=30, deadline=None)
def test_aggregate_is_mean_and_std_over_seeds(values):
    rows = [_row(i, p, h) for i, (p, h) in enumerate(values)] + [_row(0, 5.0, 1.0, gamma=0.0)]
    table = tables.aggregate(rows)
    assert [t["gamma"] for t in table] == [0.2, 0.0]
    ppl = np.array([v[0] for v in values])
    assert table[0]["genppl_mean"] == pytest.approx(ppl.mean())
    assert table[0]["genppl_std"] == pytest.approx(ppl.std(), abs=1e-9)
    assert table[0]["seeds"] == list(range(len(values)))
    assert table[1]["genppl_mean"] == 5.0 and table[1]["genppl_std"] == 0.0


def test_table_csv_and_frontier_plot(tmp_path):
    rows = [_row(s, 30.0 - 10 * g + s, 3.0 + g + 0.01 * s, gamma=g) for g in (0.0, 0.1, 0.3) for s in (0, 1)]
    rows += [_row(s, 20.0 + s, 3.5, model="ar", name=None, grid=None, nfe=None, gamma=None,
                  window_q=None, temperature=1.0, top_p=1.0) for s in (0, 1)]
    rows.append(_row(0, 12.0, 3.4, model="real data", name=None, grid=None, nfe=None, gamma=None,
                     window_q=None))
    table = tables.aggregate(rows)
    curves = plot.frontier_curves(table)
    assert sorted(len(c) for c in curves.values()) == [1, 1, 3]
    cobit = next(c for c in curves.values() if c[0]["model"] == "cobit")
    assert [r["gamma"] for r in cobit] == [0.0, 0.1, 0.3]  # sorted by entropy
    text = tables.format_table(table)
    assert "PF-ODE" in text and "γ=0.3" in text and "held-out rows" in text and "T=1" in text
    assert "30.50 ± 0.50" in text  # γ=0: seeds give 30 and 31
    csv_path = tables.write_csv(table, tmp_path / "t.csv")
    assert len(csv_path.read_text().strip().splitlines()) == 1 + len(table)
    png = plot.plot_frontier(table, tmp_path / "f" / "frontier.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_sampler_field_that_changes_the_draws_keys_a_point():
    base = _row(0, 1.0, 1.0)
    keys = {tables.point_key(base)}
    for change in ({"terminal_sigma": 2.0}, {"s_noise": 1.0}, {"sc_mode": "refined"},
                   {"ati_eta": 0.5}, {"window_q": [0.2, 0.8]}, {"family": {"block_tokens": 2}}):
        keys.add(tables.point_key({**base, **change}))
    assert len(keys) == 7
    # A key listed later keys at its default, or unset (AR has no terminal σ), as a row cached
    # before it existed.
    for late, default in tables.LATE_KEYS.items():
        before = tables.point_key({k: v for k, v in base.items() if k != late})
        assert tables.point_key({**base, late: default}) == before
        assert tables.point_key({**base, late: None}) == before


def test_families_with_options_get_their_own_curves_and_labels(tmp_path):
    temperature_only = dict(name=None, grid=None, nfe=None, gamma=None, window_q=None, temperature=1.0)
    rows = [_row(0, 900.0, 3.0, model="bitlm", family={"head": "diffusion", "guidance": 9.0},
                 **temperature_only),
            _row(0, 800.0, 3.2, model="bitlm", family={"head": "softmax"}, **temperature_only)]
    rows += [_row(0, 700.0 - g, 3.1 + g, gamma=g, model="block_cobit", family={"block_tokens": 4})
             for g in (0.0, 0.2)]
    table = tables.aggregate(rows)
    curves = plot.frontier_curves(table)
    assert sorted(curves) == ["bitlm (diffusion head)", "bitlm (softmax head)",
                              "block_cobit ddim entropic NFE 32"]
    assert len(curves["block_cobit ddim entropic NFE 32"]) == 2
    text = tables.format_table(table)
    assert "T=1 head=diffusion guidance=9.0" in text and "T=1 head=softmax" in text
    assert "ddim entropic PF-ODE (γ=0) block_tokens=4" in text
    assert len({len(line) for line in text.splitlines()}) == 1  # long labels widen the column
    png = plot.plot_frontier(table, tmp_path / "frontier.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_samples_under_a_uniform_evaluator_is_the_vocabulary_size():
    vocab = 50

    def score(ids, mask):
        uniform = lambda w: jnp.zeros(w.shape + (vocab,))
        return windowed_sequence_nll(uniform, ids, mask, window=16)

    evaluator = sweep.Evaluator("uniform", lambda t: [ord(c) % vocab for c in t], jax.jit(score), 16)
    ppl, entropy = sweep.score_samples(["hello world", "abc"], [[1, 1, 2, 3], [4]], evaluator)
    assert ppl == pytest.approx(vocab, rel=1e-5)  # every scored token costs ln V
    assert entropy == pytest.approx((1.5 * math.log(2) + 0.0) / 2)


# --------------------------------------------------------------------------------------------------
# Tiny runs on disk: random parameters saved the way training saves them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    lines = [f"the {w} cat sat on mat number {i} while {w} dogs ran." for i in range(200)
             for w in ("red", "blue", "green")]
    (root / "tiny.txt").write_text("\n".join(lines) + "\n")
    return DataConfig(source=str(root / "tiny.txt"), vocab_size=300, batch_size=4, val_fraction=0.05,
                      cache_dir=str(root / "cache"))


def _save_run(run_dir, cfg, params):
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=1, keep=1, async_save=False)
    ckpt.save(7, {"params": params, "ema_params": params}, metadata={"config": to_dict(cfg)}, force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def cobit_run(tmp_path_factory, corpus):
    from bitgen.diffusion.denoiser import init_params

    model = ModelConfig(patch_size=9, seq_tokens=8, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=32,
                        content_dim=8, head_hidden=8, dropout=0.0)
    cfg = ExperimentConfig(name="tiny", model=model, data=corpus,
                           sampler=SamplerConfig(nfe=5, gamma=0.2, batch_size=3, grid="karras"))
    run = tmp_path_factory.mktemp("runs") / "cobit"
    _save_run(run, cfg, init_params(jax.random.key(0), model))
    return run


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory, corpus):
    from bitgen.data.corpus import build_corpus_rows
    from bitgen.nn.ar import init_ar_params

    model = ModelConfig(patch_size=9, seq_tokens=8, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=32,
                        dropout=0.0)
    cfg = ExperimentConfig(name="tiny_ar", task="ar", model=model, data=corpus,
                           sampler=SamplerConfig(batch_size=3))
    vocab = build_corpus_rows(corpus, model.seq_tokens).codec.vocab_size
    run = tmp_path_factory.mktemp("runs") / "ar"
    _save_run(run, cfg, init_ar_params(jax.random.key(1), ar_config(cfg, vocab)))
    return run


def test_sample_cli_writes_text_and_jsonl_consistent_with_the_codec(cobit_run, tmp_path):
    out = tmp_path / "s.txt"
    rc = cli.main(["sample", "--run-dir", str(cobit_run), "--num", "4", "--seed", "3", "--out", str(out),
                   "sampler.name=heun", "sampler.nfe=5", "sampler.window_q=0.1,0.9", "--no-progress"])
    assert rc == 0
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3] and out.read_text().count("=== ") == 4
    assert records[0]["settings"]["name"] == "heun" and records[0]["settings"]["window_q"] == [0.1, 0.9]
    codec = BitCodec(300)
    for r in records:
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(r["bits"]), np.uint8))[: 8 * 9]
        assert codec.decode(bits).ids.tolist() == r["ids"] and r["seed"] == 3


def test_first_samples_do_not_depend_on_how_many_are_drawn(cobit_run):
    from bitgen.generation import generate

    model = load_model(str(cobit_run))
    few = generate(model, 2, 5, progress=False)
    many = generate(model, 5, 5, progress=False)  # two micro-batches of 3
    assert [s.bits_hex for s in few] == [s.bits_hex for s in many[:2]]
    assert len({s.bits_hex for s in many}) == 5


def test_sample_cli_errors_name_the_fix(cobit_run, tmp_path, capsys):
    out = str(tmp_path / "x.txt")
    assert cli.main(["sample", "--run-dir", str(tmp_path / "nope"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["sample", "--run-dir", str(cobit_run), "--out", out, "model.embed_dim=8"]) == 2
    assert "only sampler.*" in capsys.readouterr().err
    assert cli.main(["sample", "--run-dir", str(cobit_run), "--out", out, "sampler.grid=entropic"]) == 2
    assert "--table" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    assert cli.main(["sample", "--run-dir", str(empty), "--out", out]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_eval_cli_refuses_a_bad_sweep_and_a_bad_evaluator_in_one_line(cobit_run, tmp_path, capsys):
    run = ["eval", "--run-dir", str(cobit_run), "--out-dir", str(tmp_path / "eval"), "--num", "1"]
    assert cli.main([*run, "--evaluator", "none", "--sweep", "gamma"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key=v1,v2" in err
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    (gpt2_dir / "config.json").write_text("{}")
    assert cli.main([*run, "--evaluator", f"gpt2:{gpt2_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json lacks the GPT-2 fields" in err


def test_ar_run_samples_and_rejects_a_cobit_run_as_evaluator(ar_run, cobit_run):
    from bitgen.generation import generate

    model = load_model(str(ar_run))
    samples = generate(model, 4, 0, progress=False, temperature=0.8, top_p=0.9)
    assert all(len(s.ids) == 8 and s.bits_hex == "" for s in samples)
    redecoded = decode_samples(model, np.asarray([s.ids for s in samples]), seed=0, start=0)
    assert redecoded[1].text == samples[1].text
    with pytest.raises(SampleError, match="must be an AR run"):
        sweep.load_evaluator(str(cobit_run))


def test_eval_cli_sweep_table_plot_and_resume(cobit_run, ar_run, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    argv = ["eval", "--run-dir", str(cobit_run), "--evaluator", str(ar_run), "--sweep",
            "grid=karras nfe=4 gamma=0,0.3", "--seeds", "0,1", "--num", "3", "--ar-run", str(ar_run),
            "--ar-temperatures", "1.0", "--out-dir", str(out_dir), "--no-progress"]
    evaluator_at = argv.index("--evaluator") + 1
    draw_only = argv[:evaluator_at] + ["none"] + argv[evaluator_at + 1:]
    assert cli.main(draw_only) == 0  # draws and caches samples, scores nothing
    assert not sweep.read_rows(out_dir / "results.jsonl")
    drawn = sorted((out_dir / "samples").glob("*.jsonl"))
    assert len(drawn) == 2 * 2 + 2
    stamps = [p.stat().st_mtime_ns for p in drawn]
    assert cli.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in drawn] == stamps  # scored from the cache, not redrawn
    rows = sweep.read_rows(out_dir / "results.jsonl")
    assert len(rows) == 1 + 2 * 2 + 2  # real data + 2 γ × 2 seeds + AR × 2 seeds
    assert all(np.isfinite(r["genppl"]) and r["genppl"] > 1 and r["entropy"] >= 0 for r in rows)
    assert {r["evaluator"] for r in rows} == {f"{ar_run}@7"}
    printed = capsys.readouterr().out
    assert "held-out rows" in printed and "PF-ODE" in printed
    assert (out_dir / "frontier.png").stat().st_size > 0
    assert len((out_dir / "table.csv").read_text().splitlines()) == 1 + 1 + 2 + 1
    assert cli.main(argv) == 0  # a re-run reuses every finished row
    assert len(sweep.read_rows(out_dir / "results.jsonl")) == len(rows)


def test_evaluator_with_a_foreign_tokenizer_is_rejected():
    evaluator_vocab = 10
    with pytest.raises(SampleError, match="do not belong together"):
        sweep._check_tokenizer("x", lambda t: [ord(c) for c in t], evaluator_vocab)


def test_run_entropy_table_is_the_newest_at_the_checkpoint_step_and_tolerates_cdf_rounding(tmp_path):
    from bitgen.diffusion.entropy_schedule import load_entropy_table, save_entropy_table
    from bitgen.loading import latest_entropy_table

    shipped = load_entropy_table("lm1b")
    overshoot = np.asarray(shipped.cdf).copy()
    overshoot[-2] = 1.0000002  # float32 cumsum can pass 1 before the last bin is forced to 1
    save_entropy_table(shipped, tmp_path / "entropy_tables" / "entropy_table_00000100.npz")
    tables = tmp_path / "entropy_tables"
    save_entropy_table(shipped.replace(cdf=overshoot), tables / "entropy_table_00000300.npz")
    assert latest_entropy_table(tmp_path / "missing") is None
    at_200 = latest_entropy_table(tmp_path, 200)
    np.testing.assert_array_equal(at_200.cdf, shipped.cdf)
    newest = latest_entropy_table(tmp_path)
    assert newest.cdf.max() <= 1.0 + 1e-6 and np.all(np.diff(newest.cdf) >= -1e-6)
    assert latest_entropy_table(tmp_path, 50) is None


def test_eval_cli_adds_the_unigram_control_on_request(cobit_run, ar_run, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    argv = ["eval", "--run-dir", str(cobit_run), "--evaluator", str(ar_run), "--sweep",
            "grid=karras nfe=4 gamma=0", "--seeds", "0,1", "--num", "3", "--out-dir", str(out_dir),
            "--no-progress", "--control"]
    assert cli.main(argv) == 0
    rows = sweep.read_rows(out_dir / "results.jsonl")
    control = [r for r in rows if r["model"] == "iid unigram"]
    assert [r["seed"] for r in control] == [0, 1] and all(r["n"] == 3 for r in control)
    assert all(np.isfinite(r["genppl"]) and r["genppl"] > 1 for r in control)
    assert "tokens drawn independently" in capsys.readouterr().out


def test_an_nfe_too_small_for_the_sampler_is_one_line(cobit_run, tmp_path, capsys):
    argv = ["sample", "--run-dir", str(cobit_run), "--out", str(tmp_path / "x.txt"), "--no-progress",
            "sampler.name=heun", "sampler.sc_mode=refined", "sampler.nfe=4", "sampler.grid=karras"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "raise sampler.nfe" in err[-1]  # the "model from" line, then the error


# --------------------------------------------------------------------------------------------------
# --guidance (sampler.guidance) through `bitgen sample` and the generation layer


def test_sample_cli_guidance_one_is_the_conditional_sampler_bit_for_bit(cobit_run, tmp_path, capsys):
    def bits(*extra):
        out = tmp_path / f"s{len(extra)}.txt"
        assert cli.main(["sample", "--run-dir", str(cobit_run), "--prompt", "the red cat", "--num", "3",
                         "--out", str(out), "--no-progress", *extra]) == 0
        return [json.loads(line)["bits"] for line in out.with_suffix(".jsonl").read_text().splitlines()]

    # w = 1 is the plain conditional path (one call per denoise), not the guided sampler at w = 1.
    assert bits("--guidance", "1") == bits()
    assert "two network calls" not in capsys.readouterr().err
    guided = bits("--guidance", "3")
    assert guided != bits()
    assert "guidance w=3: two network calls per denoise" in capsys.readouterr().err


def test_generation_passes_the_guidance_scale_to_the_guided_sampler(cobit_run):
    # The flag's value reaches the sampler: generate(..., w) equals a guided sampler built here and
    # called with Cond(guidance=w) on the same key (micro-batch 0 draws with fold_in(key(seed), 0)).
    # At w = 0 guidance runs only the unconditional branch on the target bits
    # (test_conditioning.test_guidance_scale_one_and_zero_are_the_branches), so the draw must
    # differ from the conditional one.
    import dataclasses

    from bitgen.diffusion.cond import Cond
    from bitgen.generation import generate
    from bitgen.prompts import prefix_prompt
    from bitgen.sampling import build_sampler

    model = load_model(str(cobit_run), overrides=["sampler.guidance=0"])
    layout = prefix_prompt(model.text, "the red cat", model.cfg.model.seq_tokens)
    drawn = generate(model, 3, 4, prompt=layout, progress=False)
    mask, bits = layout.known_bits(model.text, model.cfg.model.seq_bits)
    sampler = build_sampler(model.cfg.model, model.cfg.sampler, model.table, model.cfg.model.seq_bits,
                            model.cfg.diffusion, guided=True)
    cond = Cond.clamped(np.broadcast_to(mask, (3, mask.size)), np.broadcast_to(bits, (3, bits.size)),
                        guidance=jnp.float32(0.0))
    direct = np.asarray(sampler(model.params, jax.random.fold_in(jax.random.key(4), 0), 3, cond=cond).bits)
    assert [s.bits_hex for s in drawn] == [np.packbits(b.astype(np.uint8)).tobytes().hex() for b in direct]
    conditional = generate(dataclasses.replace(model, cfg=dataclasses.replace(
        model.cfg, sampler=dataclasses.replace(model.cfg.sampler, guidance=1.0))), 3, 4, prompt=layout,
        progress=False)
    assert [s.bits_hex for s in drawn] != [s.bits_hex for s in conditional]


def test_guidance_without_a_condition_or_on_an_ar_run_is_one_line(cobit_run, ar_run, tmp_path, capsys):
    out = str(tmp_path / "x.txt")
    for argv, message in (((cobit_run, "--guidance", "2"), "none is given; pass --prompt"),
                          ((ar_run, "--prompt", "the red", "--guidance", "2"),
                           "task=ar runs have no classifier-free guidance"),
                          ((cobit_run, "--prompt", "the red", "--guidance", "-1"),
                           "sampler.guidance=-1.0 cannot work")):
        assert cli.main(["sample", "--run-dir", str(argv[0]), *argv[1:], "--out", out,
                         "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert cli.main(["eval", "--run-dir", str(cobit_run), "--evaluator", "none", "--guidance", "2",
                     "--num", "1", "--out-dir", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "none is given" in capsys.readouterr().err


def test_raw_weights_and_another_table_do_not_reuse_the_default_draws(cobit_run, ar_run, tmp_path):
    """`--weights raw` and `--table` change the draws, so they key points of their own; the default
    load keys as before they were recorded (no `loaded_with`)."""
    out_dir = tmp_path / "eval"
    argv = ["eval", "--run-dir", str(cobit_run), "--evaluator", "none", "--sweep", "grid=karras nfe=4",
            "--num", "2", "--out-dir", str(out_dir), "--no-progress"]
    for extra in ([], ["--weights", "raw"], ["--table", "lm1b"], []):
        assert cli.main(argv + extra) == 0
    drawn = sorted((out_dir / "samples").glob("*.jsonl"))
    assert len(drawn) == 3  # default (drawn once, then reused), raw weights, the lm1b table
    recorded = sorted(json.dumps(json.loads(p.read_text().splitlines()[0])["settings"].get("loaded_with"))
                      for p in drawn)
    assert recorded == sorted(["null", '{"weights": "raw"}', '{"table": "lm1b"}'])
    model = load_model(str(cobit_run), weights="raw")
    row = {k: None for k in tables.POINT_KEYS} | {"model": "cobit", "name": "ddim", "grid": "karras",
                                                 "gamma": 0.2, "window_q": [0.0, 1.0],
                                                 "loaded_with": model.loaded_with}
    assert tables.describe_point(row).endswith("weights=raw")

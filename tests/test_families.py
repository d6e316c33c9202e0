"""The model-family registry: config sections, the seam a new family plugs into, and a run
directory that samples and evaluates without its training corpus."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bitgen import cli, families
from bitgen.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
    validate,
)
from bitgen.families.ar import ARSampling
from conftest import REPO_ROOT

TINY = ["model.seq_tokens=16", "model.embed_dim=32", "model.n_heads=2", "model.n_blocks=1",
        "model.dim_ff=64", "model.content_dim=8", "model.head_hidden=16", "data.batch_size=8",
        "train.steps=6", "train.ckpt_every=3", "train.log_every=1", "optim.warmup_steps=2",
        "sampler.batch_size=4"]


def test_every_registered_family_provides_the_protocol():
    for name in families.names():
        family = families.get(name)
        assert family.name == name
        for method in ("check", "task", "draw", "decode", "settings", "training_samples", "after_step"):
            assert callable(getattr(family, method)), (name, method)


def test_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="model families .*'cobit'"):
        validate(ExperimentConfig(task="diffusion"))
    with pytest.raises(ConfigError, match="model families"):
        from_dict({"task": "nope"})


def test_family_section_round_trips_and_is_checked():
    ar = load_config("demo_ar_cpu", ["family.temperature=0.7"])
    assert ar.family == ARSampling(temperature=0.7)
    assert from_dict(json.loads(json.dumps(to_dict(ar)))) == ar
    assert load_config("demo_ar_cpu").family == ARSampling()  # defaults filled in by validate
    with pytest.raises(ConfigError, match="top_p"):
        load_config("demo_ar_cpu", ["family.top_p=1.5"])
    cobit = load_config("demo_cpu")
    assert cobit.family is None and from_dict(to_dict(cobit)) == cobit
    with pytest.raises(ConfigError, match="family"):
        load_config("demo_cpu", ["family.temperature=0.7"])
    with pytest.raises(ConfigError, match="no family section"):
        from_dict({"task": "cobit", "family": {"temperature": 1.0}})


def test_task_overrides_switch_the_family_section_and_old_configs_get_defaults():
    assert load_config("demo_ar_cpu", ["task=cobit", "model.patch_size=13"]).family is None
    assert load_config("demo_cpu", ["task=ar", "family.top_p=0.9"]).family == ARSampling(top_p=0.9)
    saved = to_dict(load_config("demo_ar_cpu"))
    del saved["family"]  # a config.json written before families had sections
    old = from_dict(saved)
    assert apply_overrides(old, ["family.temperature=0.5"]).family == ARSampling(temperature=0.5)


def test_reading_a_config_loads_no_model_code():
    """The registry imports a family module to read its section; model code loads on use."""
    import os
    import subprocess
    import sys

    code = ("import sys; from bitgen.config import load_config; load_config('demo_cpu'); "
            "load_config('demo_ar_cpu', ['family.temperature=0.5']); "
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert out.stdout.strip() == "[]"


@pytest.fixture()
def standin(monkeypatch):
    monkeypatch.setitem(families._MODULES, "unigram", "family_standin")


def test_a_new_family_is_one_module_and_one_registry_entry(standin, tmp_path):
    """The stand-in module trains, writes training samples, restores and samples through the CLI."""
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "demo_cpu", "--run-dir", str(run), "--no-progress",
                     "task=unigram", "train.sample_every=3", *TINY]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]  # the logits move towards the token frequencies
    drawn = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [d["method"] for d in drawn] == ["unigram", "unigram"] and len(drawn[0]["samples"]) == 4
    out = tmp_path / "s.txt"
    assert cli.main(["sample", "--run-dir", str(run), "--num", "3", "--out", str(out),
                     "--no-progress"]) == 0
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["ids"]) == 16 for r in records)
    assert records[0]["settings"] == {"task": "unigram", "step": 6}


def _fortunes(start: int, stop: int) -> str:
    """Texts ``start:stop`` of the embedded corpus as a .txt source (one line per text)."""
    import itertools

    from bitgen.config import DataConfig
    from bitgen.data.sources import open_source

    docs = itertools.islice(open_source(DataConfig()).documents(), start, stop)
    return "".join(d.replace("\n", " ") + "\n" for d in docs)


def _no_corpus(run, source, cache):
    """Delete the training text and every cache built from it."""
    source.unlink()
    shutil.rmtree(cache)
    assert json.loads((run / "config.json").read_text())["data"]["source"] == str(source)


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
@pytest.mark.parametrize("task", ["cobit", "ar"])
def test_a_run_samples_and_evaluates_without_its_corpus(task, tmp_path, capsys):
    source, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    source.write_text(_fortunes(0, 400))
    run = tmp_path / task
    assert cli.main(["train", "--config", "demo_cpu", "--run-dir", str(run), "--no-progress",
                     f"task={task}", f"data.source={source}", f"data.cache_dir={cache}",
                     "data.vocab_size=512", "model.patch_size=9", "sampler.grid=karras",
                     "sampler.nfe=4", *TINY]) == 0
    assert (run / "tokenizer" / "codec.json").is_file()
    before = tmp_path / "before.txt"
    assert cli.main(["sample", "--run-dir", str(run), "--num", "4", "--out", str(before),
                     "--no-progress"]) == 0
    _no_corpus(run, source, cache)
    after = tmp_path / "after.txt"
    assert cli.main(["sample", "--run-dir", str(run), "--num", "4", "--out", str(after),
                     "--no-progress"]) == 0
    assert after.read_text() == before.read_text()  # same seed: same text, from the saved pipeline
    assert cli.main(["eval", "--run-dir", str(run), "--evaluator", "none", "--num", "2",
                     "--out-dir", str(tmp_path / "eval"), "--no-progress"]) == 0


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_an_ar_run_scores_against_a_test_split_without_its_corpus(tmp_path, capsys):
    """The AR run is its own evaluator: GenPPL of samples and of a test split, no training text."""
    source, test, cache = tmp_path / "corpus.txt", tmp_path / "test.txt", tmp_path / "cache"
    source.write_text(_fortunes(0, 400))
    test.write_text(_fortunes(400, 500))
    run = tmp_path / "ar"
    assert cli.main(["train", "--config", "demo_ar_cpu", "--run-dir", str(run), "--no-progress",
                     f"data.source={source}", f"data.cache_dir={cache}", "data.vocab_size=512",
                     *TINY]) == 0
    _no_corpus(run, source, cache)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--run-dir", str(run), "--evaluator", str(run), "--num", "2",
                     "--reference", "test", "--test-source", str(test), "--out-dir", str(out),
                     "--no-progress"]) == 0
    table = {row["model"] for row in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert table == {"real data", "ar"}
    capsys.readouterr()
    # The held-out reference rows are the corpus's tail: one line naming the missing source.
    assert cli.main(["eval", "--run-dir", str(run), "--evaluator", str(run), "--num", "2",
                     "--out-dir", str(tmp_path / "heldout"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(source) in err[0]


@pytest.mark.slow  # trains a run, then resumes it (16 s)
def test_a_changed_tokenizer_is_refused_on_resume(tmp_path):
    from bitgen.textcodec import TextCodecError, run_text_codec

    run = tmp_path / "run"
    assert cli.main(["train", "--config", "demo_cpu", "--run-dir", str(run), "--no-progress",
                     *TINY]) == 0
    saved = run_text_codec(run)
    assert saved is not None and saved.vocab_size == 8192
    bits = saved.codec.ids_to_bits(np.arange(16)[None])
    assert saved.decode_bits(bits)[0].ids == tuple(range(16))
    from bitgen.train.loop import train

    with pytest.raises(TextCodecError, match="differs"):  # same tokenizer, another codec policy
        train(load_config("demo_cpu", [*TINY, "data.code_policy=nearest"]), run, resume=True,
              progress=False)

"""Params files and model folders (bitgen.modelio) and ``bitgen export`` of a tiny trained run."""

from __future__ import annotations

import json
from dataclasses import replace

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.checkpoint import restore_params
from bitgen.cli import main
from bitgen.config import ModelConfig, load_config
from bitgen.diffusion.denoiser import param_shapes
from bitgen.loading import latest_entropy_table_path
from bitgen.modelio import (
    TABLE_FILE,
    ConversionError,
    flatten_tree,
    is_model_folder,
    open_model_folder,
    read_params_file,
    save_params,
    write_safetensors,
)
from bitgen.train.loop import train
from bitgen.train.task import abstract_params
from test_train_loop import TINY as TRAIN_LOOP_TINY

SMALL = ModelConfig(patch_size=3, seq_tokens=4, embed_dim=8, n_heads=2, n_blocks=2, dim_ff=12,
                    content_dim=2, head_hidden=4)
# The train-loop tests' tiny run, cut to 3 steps with one checkpoint (a key may be given once).
TINY = [o for o in TRAIN_LOOP_TINY if not o.startswith(("train.steps=", "train.ckpt_every="))] + [
    "train.steps=3", "train.ckpt_every=3"]


def random_params(abstract, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), abstract)


def assert_trees_equal(a, b) -> None:
    fa, fb = flatten_tree(a), flatten_tree(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg="/".join(key))


# --------------------------------------------------------------------------------------------------
# Params files


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), suffix=st.sampled_from([".npz", ".safetensors"]))
def test_params_round_trip_bitwise(tmp_path_factory, seed, suffix):
    abstract = param_shapes(SMALL)
    params = random_params(abstract, seed)
    path = tmp_path_factory.mktemp("rt") / f"params{suffix}"
    if suffix == ".npz":
        save_params(path, params, SMALL)
    else:
        write_safetensors(path, params, {"step": 3})
    assert_trees_equal(read_params_file(path, abstract), params)


@pytest.mark.parametrize("other, pattern", [
    (replace(SMALL, n_blocks=3), r"blocks_2/\S+ \(.*\) is missing; check model\.n_blocks"),
    (replace(SMALL, patch_size=4),
     r"patch_(proj|adapter)/\S+ has shape \(.*\), expected \(.*\); check model\.patch_size"),
    (replace(SMALL, dim_ff=24), r"ff/W\S+ has shape .*; check model\.dim_ff"),
])
def test_a_file_for_another_config_names_the_parameter_and_field(tmp_path, other, pattern):
    path = tmp_path / "p.safetensors"
    write_safetensors(path, random_params(param_shapes(SMALL), 0), {})
    with pytest.raises(ConversionError, match=pattern) as info:
        read_params_file(path, param_shapes(other))
    assert "\n" not in str(info.value)


def test_extra_parameters_and_wrong_dtypes_are_refused(tmp_path):
    fewer = replace(SMALL, n_blocks=1)
    path = tmp_path / "p.npz"
    save_params(path, random_params(param_shapes(SMALL), 0), SMALL)
    with pytest.raises(ConversionError, match=r"blocks_1/\S+ .* is not in the config's model .*n_blocks"):
        read_params_file(path, param_shapes(fewer))
    half = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, np.float16), param_shapes(SMALL))
    with pytest.raises(ConversionError, match="is float32, expected float16"):
        read_params_file(path, half)


@pytest.mark.parametrize("name, data, pattern", [
    ("missing.npz", None, "does not exist"),
    ("garbage.safetensors", b"\x00" * 64, "cannot read .* as .safetensors"),
    ("weights.pt", b"torch", "convert official .pt weights first"),
])
def test_unreadable_params_files_are_one_line_errors(tmp_path, name, data, pattern):
    if data is not None:
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ConversionError, match=pattern):
        read_params_file(tmp_path / name, param_shapes(SMALL))


# --------------------------------------------------------------------------------------------------
# bitgen export of a tiny trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step tiny CoBit run (it keeps its text pipeline in <run>/tokenizer/)."""
    cfg = load_config("demo_cpu", TINY)
    run = tmp_path_factory.mktemp("run")
    train(cfg, run, progress=False)
    return cfg, run


def _same_files(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_export_writes_a_folder_whose_weights_equal_the_checkpoint(trained, tmp_path, capsys):
    cfg, run = trained
    target = abstract_params(cfg)
    table = latest_entropy_table_path(run, 3)
    for weights, entry in (("ema", "ema_params"), ("raw", "params")):
        out = tmp_path / weights
        argv = ["export", str(run), str(out)] + ([] if weights == "ema" else ["--weights", "raw"])
        assert main(argv) == 0
        assert is_model_folder(out)
        folder = open_model_folder(out)
        assert folder.config == json.loads((run / "config.json").read_text())
        assert folder.meta["step"] == "3" and folder.meta["task"] == "cobit"
        assert folder.meta["weights"] == weights
        assert _same_files(folder.tokenizer, run / "tokenizer")
        assert (out / TABLE_FILE).is_file() == (table is not None)
        if table is not None:
            assert (out / TABLE_FILE).read_bytes() == table.read_bytes()
        assert "bitgen sample --model-dir" in (out / "README.md").read_text()
        expected = jax.device_get(restore_params(run / "checkpoints", target, which=entry))
        assert_trees_equal(read_params_file(folder.weights, target), expected)
    # EMA and raw differ after 3 steps (decay 0.99): the --weights choice is really applied.
    ema = flatten_tree(read_params_file(tmp_path / "ema" / "model.safetensors", target))
    raw = flatten_tree(read_params_file(tmp_path / "raw" / "model.safetensors", target))
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)


def _one_line_error(capsys, *argv) -> str:
    assert main(["export", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_export_failures_are_one_line(trained, tmp_path, capsys):
    _, run = trained
    assert "does not exist" in _one_line_error(capsys, tmp_path / "nope", tmp_path / "out")
    assert "no checkpoint for step 7" in _one_line_error(capsys, run, tmp_path / "out", "--step", "7")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty directory" in _one_line_error(capsys, run, tmp_path / "full")
    assert "holds one set of weights" in _sample_error(capsys, tmp_path)


def _sample_error(capsys, tmp_path) -> str:
    (tmp_path / "m").mkdir()
    assert main(["sample", "--model-dir", str(tmp_path / "m"), "--step", "3"]) == 2
    return capsys.readouterr().err


def test_a_run_without_a_saved_pipeline_exports_it_rebuilt(trained, tmp_path):
    """Runs trained before runs kept tokenizer/: export rebuilds it from the config (and the
    run's pinned code map), and it equals the one a new run saves."""
    _, run = trained
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    (old_run / "checkpoints").symlink_to(run / "checkpoints")
    assert main(["export", str(old_run), str(tmp_path / "out")]) == 0
    assert _same_files(tmp_path / "out" / "tokenizer", run / "tokenizer")


def test_an_exported_folder_samples_like_its_run(trained, tmp_path):
    _, run = trained
    assert main(["export", str(run), str(tmp_path / "folder")]) == 0
    sampled = {}
    for flag, source in (("--run-dir", run), ("--model-dir", tmp_path / "folder")):
        out = tmp_path / f"{flag[2:]}.txt"
        assert main(["sample", flag, str(source), "--num", "3", "--seed", "1", "--out", str(out),
                     "sampler.grid=karras", "sampler.nfe=4", "--no-progress"]) == 0
        sampled[flag] = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["bits"] for r in sampled["--run-dir"]] == [r["bits"] for r in sampled["--model-dir"]]
    assert [r["text"] for r in sampled["--run-dir"]] == [r["text"] for r in sampled["--model-dir"]]

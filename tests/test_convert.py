"""Official-checkpoint converter: names, round trips, config inference, errors, CLI."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import numpy as np
import pytest

from tokenizers import Tokenizer

from bitgen import cli
from bitgen.codecs import BitCodec
from bitgen.config import ConfigError, ModelConfig
from bitgen.convert import load_official_state_dict
from bitgen.modelio import ConversionError, load_params
from bitgen.official import (
    FREQ_KEY,
    bitgen_to_official_name,
    expected_official_shapes,
    from_official,
    infer_model_config,
    model_config_from_official,
    official_to_bitgen_name,
    to_official,
)
from bitgen.parity import load_json, load_npz

SMALL = ModelConfig(patch_size=3, seq_tokens=4, embed_dim=8, n_heads=2, n_blocks=2, dim_ff=12,
                    content_dim=2, head_hidden=4)


def official_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=shape).astype(np.float32)
             for k, shape in expected_official_shapes(cfg).items()}
    state[FREQ_KEY] = to_official_freq(cfg)
    return state


def to_official_freq(cfg: ModelConfig) -> np.ndarray:
    e = cfg.embed_dim
    return np.repeat(10000.0 ** (-np.arange(0, e, 2) / e), 2)[None].astype(np.float32)


def test_name_mapping_examples_and_inverse():
    assert official_to_bitgen_name("blocks.0.adaln1.mlp.1.weight") == ("blocks_0", "adaln1", "mlp_1", "kernel")
    assert official_to_bitgen_name("head.mixer.3.bias") == ("head", "mixer_3", "bias")
    for key in expected_official_shapes(SMALL):
        assert bitgen_to_official_name(official_to_bitgen_name(key)) == key


def test_round_trip_is_bitwise():
    state = official_state(SMALL)
    params = from_official(state, SMALL)
    assert params["blocks_1"]["attn"]["qkv_proj"]["kernel"].shape == (8, 24)  # [in, out]
    back = to_official(params, SMALL)
    assert set(back) == set(state)
    for key, value in state.items():
        if key == FREQ_KEY:  # a derived constant: equal up to the reference's float32 exp rounding
            np.testing.assert_allclose(back[key], value, rtol=1e-6)
        else:
            np.testing.assert_array_equal(back[key], value)
            assert back[key].dtype == np.float32


def test_fixture_round_trip_and_config_inference(reference_dir):
    state = load_npz(reference_dir, "sdt_params_fanin.npz")
    cfg = model_config_from_official(load_json(reference_dir, "sdt_config.json"))
    inferred = infer_model_config(state, ModelConfig(n_heads=cfg.n_heads, seq_tokens=cfg.seq_tokens))
    for field in ("patch_size", "embed_dim", "n_blocks", "dim_ff", "content_dim", "head_hidden",
                  "n_fourier_global", "n_fourier_local"):
        assert getattr(inferred, field) == getattr(cfg, field), field
    back = to_official(from_official(state, cfg), cfg)
    for key, value in state.items():
        if key != FREQ_KEY:
            assert np.array_equal(back[key], value), key
    np.testing.assert_allclose(back[FREQ_KEY], state[FREQ_KEY], rtol=1e-6)


@pytest.mark.parametrize("break_it, pattern", [
    (lambda s: s.pop("blocks.1.ff.Wb.weight"), r"missing keys: blocks\.1\.ff\.Wb\.weight \(8, 8\)"),
    (lambda s: s.update({"blocks.2.attn.out_proj.weight": np.zeros((8, 8))}),
     r"unexpected keys: blocks\.2\.attn\.out_proj\.weight"),
    (lambda s: s.update({"head.time_proj.weight": np.zeros((5, 8))}),
     r"head\.time_proj\.weight: got \(5, 8\), expected \(4, 8\)"),
    (lambda s: s.update({FREQ_KEY: np.ones((1, 8), np.float32)}), r"time_fn\._freq"),
    (lambda s: s.update({"blocks.0.attn.rope.inv_freq": np.ones(2, np.float32)}),
     r"blocks\.0\.attn\.rope\.inv_freq .* head_dim=4, base=10000"),
])
def test_conversion_errors_name_the_key(break_it, pattern):
    state = official_state(SMALL)
    break_it(state)
    with pytest.raises(ConversionError, match=pattern):
        from_official(state, SMALL)


def test_rope_buffers_are_accepted_and_ignored():
    state = official_state(SMALL)
    state["blocks.1.attn.rope.inv_freq"] = (1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)).astype(np.float32)
    assert "rope" not in from_official(state, SMALL)["blocks_1"]["attn"]


def test_unsupported_official_settings_are_refused():
    config = {"model": {"head_type": "hybrid_attn_v2"}}
    with pytest.raises(ConfigError, match="model.head_type='hybrid_attn_v2'"):
        model_config_from_official(config)


def test_loader_strips_wrapper_prefixes(tmp_path):
    state = official_state(SMALL)
    path = tmp_path / "ddp.npz"
    np.savez(path, **{f"module._orig_mod.{k}": v for k, v in state.items()})
    loaded = load_official_state_dict(path)
    assert set(loaded) == set(state)


def test_pytorch_checkpoint_without_torch_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ConversionError, match=r"bitgen\[torch\]"):
        load_official_state_dict(path)


def test_cli_converts_both_ways(tmp_path, capsys):
    state = official_state(SMALL, seed=3)
    source = tmp_path / "official.npz"
    np.savez(source, **state)
    bitgen_file, official_file = tmp_path / "params.npz", tmp_path / "back.npz"
    assert cli.main(["convert", str(source), str(bitgen_file), "--n-heads", "2", "--seq-tokens", "4"]) == 0
    params, cfg = load_params(bitgen_file)
    assert (cfg.embed_dim, cfg.n_blocks, cfg.patch_size, cfg.dim_ff, cfg.n_heads) == (8, 2, 3, 12, 2)
    assert params["blocks_1"]["ff"]["Wo"]["kernel"].shape == (8, 8)
    assert cli.main(["convert", str(bitgen_file), str(official_file), "--to", "official"]) == 0
    back = dict(np.load(official_file))
    for key, value in state.items():
        if key != FREQ_KEY:
            np.testing.assert_array_equal(back[key], value)
    assert "wrote" in capsys.readouterr().out


def test_pytorch_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    state = official_state(SMALL, seed=1)
    tensors = {f"_orig_mod.{k}": torch.from_numpy(v).to(torch.bfloat16 if "bias" in k else torch.float32)
               for k, v in state.items()}
    torch.save(tensors, tmp_path / "weights.pt")
    loaded = load_official_state_dict(tmp_path / "weights.pt")
    np.testing.assert_array_equal(loaded["head.mixer.0.weight"], state["head.mixer.0.weight"])
    assert loaded["head.mixer.0.bias"].dtype == np.float32
    from_official(loaded, SMALL)

    # A training checkpoint: weights under "model" next to objects that need unpickling.
    torch.save({"model": tensors, "step": 7, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "full.pt")
    with pytest.raises(ConversionError, match="--allow-pickle"):
        load_official_state_dict(tmp_path / "full.pt")
    loaded = load_official_state_dict(tmp_path / "full.pt", allow_pickle=True)
    np.testing.assert_array_equal(loaded["patch_proj.weight"], state["patch_proj.weight"])
    with pytest.raises(ConversionError, match="no entry 'ema'"):
        load_official_state_dict(tmp_path / "full.pt", "ema", allow_pickle=True)


def _one_line_error(capsys, *argv) -> str:
    assert cli.main(["convert", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_unreadable_inputs_are_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip archive" * 8)
    out = tmp_path / "out.npz"
    assert "does not exist" in _one_line_error(capsys, tmp_path / "missing.npz", out)
    assert "cannot read" in _one_line_error(capsys, garbage, out)
    assert "cannot read" in _one_line_error(capsys, garbage, out, "--to", "official")
    np.savez(tmp_path / "official.npz", **official_state(SMALL))
    bad_config = tmp_path / "config.json"
    bad_config.write_text("{oops")
    assert "--official-config" in _one_line_error(capsys, tmp_path / "official.npz", out,
                                                  "--official-config", bad_config)
    assert "cannot write" in _one_line_error(capsys, tmp_path / "official.npz",
                                             tmp_path / "no" / "such" / "dir.npz", "--n-heads", "2")


def test_a_damaged_npz_is_named_damaged(tmp_path):
    path = tmp_path / "official.npz"
    np.savez(path, **official_state(SMALL))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside an array's bytes: its zip CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="damaged"):
        load_official_state_dict(path)


def test_damaged_pytorch_files_are_not_sent_to_allow_pickle(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in official_state(SMALL).items()}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    (tmp_path / "garbage.pt").write_bytes(b"hello garbage" * 10)
    for name in ("truncated.pt", "flipped.pt", "garbage.pt"):
        for allow_pickle in (False, True):
            with pytest.raises(ConversionError, match="damaged") as info:
                load_official_state_dict(tmp_path / name, allow_pickle=allow_pickle)
            assert "--allow-pickle" not in str(info.value)


def test_official_pt_converts_through_the_cli_and_reads_back_against_the_run_config(tmp_path, capsys):
    """A small official-format .pt (official names, PyTorch layouts, top-level EMA state dict as
    released) -> `bitgen convert` -> read_params_file against the abstract params of a full config."""
    torch = pytest.importorskip("torch")
    from bitgen.config import load_config
    from bitgen.modelio import flatten_tree, read_params_file
    from bitgen.train.task import abstract_params
    from test_train_loop import TINY

    cfg = load_config("demo_cpu", TINY)
    state = official_state(cfg.model, seed=5)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "cobit.pt")
    params_file = tmp_path / "cobit.npz"
    assert cli.main(["convert", str(tmp_path / "cobit.pt"), str(params_file),
                     "--n-heads", str(cfg.model.n_heads), "--seq-tokens", str(cfg.model.seq_tokens)]) == 0
    assert "wrote bitgen params" in capsys.readouterr().out
    params = read_params_file(params_file, abstract_params(cfg))
    expected = flatten_tree(from_official(state, cfg.model))
    got = flatten_tree(params)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg="/".join(key))


def _word_tokenizer(path, size: int):
    """A word-level tokenizer of ``size`` ids (``w0`` ... and the words of ``words``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    vocab = {w: i for i, w in enumerate(words)} | {f"w{i}": i for i in range(len(words), size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w8"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_released_weights_sample_and_score_through_the_cli(tmp_path, capsys):
    """The released-checkpoint recipe at toy size: official .pt -> `bitgen convert` -> `bitgen
    sample --params --config` (text pipeline from the files the config names, no corpus) ->
    `bitgen eval --params` scored by a GPT-2 evaluator from local files."""
    torch = pytest.importorskip("torch")
    from bitgen.config import load_config, to_dict
    from bitgen.nn.gpt2 import load_gpt2
    from test_gpt2 import random_state_dict, write_safetensors
    from test_train_loop import TINY

    # 5000 ids -> P = 13, demo_cpu's patch size; raw codes (a frequency map needs the corpus).
    tokenizer = _word_tokenizer(tmp_path / "tokenizer.json", 5000)
    cfg = load_config("demo_cpu", [*TINY, f"data.tokenizer={tokenizer}", "data.bit_order=raw",
                                   "sampler.grid=karras", "sampler.nfe=4", "sampler.batch_size=2"])
    config = tmp_path / "cobit_tiny.json"
    config.write_text(json.dumps(to_dict(cfg)))
    state = official_state(cfg.model, seed=7)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "cobit.pt")
    params = tmp_path / "cobit.npz"
    assert cli.main(["convert", str(tmp_path / "cobit.pt"), str(params), "--n-heads",
                     str(cfg.model.n_heads), "--seq-tokens", str(cfg.model.seq_tokens)]) == 0

    out = tmp_path / "samples.txt"
    assert cli.main(["sample", "--params", str(params), "--config", str(config), "--num", "3",
                     "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[0]["settings"]["grid"] == "karras"
    for r in records:  # each text is the tokenizer's decoding of the sample's own bits
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(r["bits"]), np.uint8))[: 13 * 16]
        ids = BitCodec(5000).decode(bits).ids.tolist()
        assert r["ids"] == ids
        assert r["text"] == Tokenizer.from_file(str(tokenizer)).decode(ids, skip_special_tokens=False)

    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    weights = random_state_dict(seed=3)
    write_safetensors(gpt2_dir, weights | {"lm_head.weight": weights["transformer.wte.weight"]})
    _word_tokenizer(gpt2_dir / "tokenizer.json", load_gpt2(gpt2_dir)[1].vocab_size)
    evaluated = tmp_path / "eval"
    capsys.readouterr()
    assert cli.main(["eval", "--params", str(params), "--config", str(config), "--evaluator",
                     f"gpt2:{gpt2_dir}", "--num", "2", "--reference-num", "0", "--out-dir",
                     str(evaluated), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (evaluated / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["cobit"] and np.isfinite(rows[0]["genppl"])


def test_params_need_a_config_and_a_pipeline_named_by_file(tmp_path, capsys):
    params = tmp_path / "p.safetensors"
    params.write_bytes(b"")
    assert cli.main(["sample", "--params", str(params)]) == 2
    assert "--params needs --config" in capsys.readouterr().err
    assert cli.main(["sample", "--params", str(params), "--config", "demo_cpu"]) == 2
    assert "data.tokenizer=bpe is trained on the corpus" in capsys.readouterr().err
    (tmp_path / "p.npz").write_bytes(b"")
    assert cli.main(["sample", "--params", str(tmp_path / "p.npz"), "--config", "demo_cpu"]) == 2
    assert "the file is damaged" in capsys.readouterr().err


def test_params_converted_for_another_model_are_refused_by_key(tmp_path, capsys):
    """n_heads shows in no parameter shape: the .npz's stored config and --config must agree."""
    from bitgen.config import load_config, to_dict
    from bitgen.modelio import save_params
    from test_train_loop import TINY

    tokenizer = _word_tokenizer(tmp_path / "tokenizer.json", 5000)
    cfg = load_config("demo_cpu", [*TINY, f"data.tokenizer={tokenizer}", "data.bit_order=raw"])
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(to_dict(cfg)))
    other = replace(cfg.model, n_heads=4)
    save_params(tmp_path / "p.npz", from_official(official_state(other), other), other)
    assert cli.main(["sample", "--params", str(tmp_path / "p.npz"), "--config", str(config)]) == 2
    assert "model.n_heads=4 but the config has 2" in capsys.readouterr().err

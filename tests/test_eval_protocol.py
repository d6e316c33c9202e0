"""The paper's evaluation protocol (spec §6): the sampler compiles once per (settings, shapes)
across seeds, scores do not depend on batching, OWT entropy counts base GPT-2 ids (not codes),
reference rows from a test split, a bf16 GPT-2 evaluator from local files, and the paper configs."""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_eval_cli import _save_run, ar_run, cobit_run, corpus  # noqa: F401 (fixtures)

from bitgen import cli
from bitgen.config import EvalConfig, ExperimentConfig, ModelConfig, SamplerConfig, load_config
from bitgen.eval import metrics, sweep
from bitgen.eval.metrics import mean_unigram_entropy, windowed_sequence_nll
from bitgen.eval.reference import entropy_ids
from bitgen.loading import load_model
from bitgen.nn import gpt2

U64 = 2.0**-53  # unit roundoff of float64


def _gamma(k: int, u: float) -> float:
    """Higham's γ_k = k·u / (1 − k·u): the relative error bound of a k-term float sum."""
    return k * u / (1 - k * u)


# --------------------------------------------------------------------------------------------------
# The sampler compiles once per (settings, shapes)


def _count_sampler_compiles(fn) -> int:
    """Run ``fn`` with ``jax.log_compiles`` and count compilations of the jitted ``sample``."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        jax.clear_caches()  # programs other tests compiled would otherwise hide a compilation
        with jax.log_compiles():
            fn()
    finally:
        logger.removeHandler(handler)
    return buf.getvalue().count("Compiling jit(sample)")


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_three_seed_sweep_compiles_the_sampler_once_per_setting(cobit_run, tmp_path):
    """"Once per (settings, shapes)": the seed is a traced key, so every seed of a point reuses one
    program. Points differ in static structure when their per-step γ_i or grid length (NFE)
    differ; those compile once each (two γ values here: two programs for six draws)."""
    model = load_model(str(cobit_run))
    draw = functools.partial(sweep.run_sweep, model, None, progress=False, log=lambda _: None, num=2,
                             seeds=(0, 1, 2))
    one_point = [["sampler.grid=karras", "sampler.nfe=6", "sampler.gamma=0.2"]]
    assert _count_sampler_compiles(lambda: draw(tmp_path / "a" / "r.jsonl", points=one_point)) == 1
    two_gammas = sweep.parse_sweep("grid=karras nfe=6 gamma=0,0.3")
    assert _count_sampler_compiles(lambda: draw(tmp_path / "b" / "r.jsonl", points=two_gammas)) == 2


# --------------------------------------------------------------------------------------------------
# Scores do not depend on how texts are grouped or ordered

TINY_GPT2 = gpt2.GPT2Config(vocab_size=29, n_positions=16, embed_dim=16, n_heads=2, n_blocks=2, dim_ff=32)


@functools.cache
def _tiny_evaluator() -> sweep.Evaluator:
    """A random GPT-2 (weights ×4 so token NLLs vary widely) over characters a-z, space, '.'."""
    params = jax.tree.map(lambda p: 4 * p if p.ndim == 2 else p,
                          gpt2.init_gpt2_params(jax.random.key(3), TINY_GPT2))
    encode = lambda text: [" .abcdefghijklmnopqrstuvwxyz".index(c) + 1 for c in text]
    score = jax.jit(functools.partial(gpt2.sequence_nll, params, cfg=TINY_GPT2))
    return sweep.Evaluator("tiny-gpt2", encode, score, TINY_GPT2.n_positions)


def _texts(n: int, seed: int) -> list[str]:
    """Texts of 1 to 60 characters: one to four windows of 16, several length buckets."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(" .abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(alphabet, rng.integers(1, 61))) for _ in range(n)]


TEXTS = _texts(12, 0)
IDS = [np.random.default_rng(i).integers(0, 9, 1 + i) for i in range(12)]


@settings(max_examples=10, deadline=None)
@given(order=st.permutations(range(12)), cuts=st.lists(st.integers(1, 11), max_size=4, unique=True))
def test_scores_do_not_depend_on_grouping_or_order(order, cuts):
    """The texts are scored in one call, or split into groups (``cuts``) and shuffled (``order``).

    Per-text NLL: ``gen_ppl`` scores each text alone, at a padded length set by its own length, so
    every text runs the same compiled program on the same input whatever the grouping: the same
    float32 operations give the same bits, and the tolerance is zero.

    Corpus GenPPL = exp(Σᵢ ℓᵢ / N) sums the n = 12 per-text NLLs ℓᵢ ≥ 0 in float64, in the given
    order; reordering changes that sum only. Any order's computed sum is within γ_{n−1}·Σℓᵢ of the
    exact sum (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4; u = 2⁻⁵³), so two
    orders differ by ≤ 2γ_{n−1}·Σℓᵢ. With a = Σℓᵢ/N: the division adds ≤ u·a to each, exp's
    rounding (≤ u relative each) adds ≤ 2u to the difference of the logs, and taking ln adds
    ≤ u·a to each, so |Δ ln GenPPL| ≤ (2γ_{n−1} + 4u)·a + 2u. Mean entropy: the per-sample
    entropies are the same numbers; their float64 mean differs between orders by ≤ 2γ_{n−1}·mean
    from the sum and ≤ 2u·mean from the division by n.
    """
    evaluator = _tiny_evaluator()
    whole = metrics.gen_ppl(TEXTS, evaluator.encode, evaluator.score, window=16, min_bucket=4)
    texts = [TEXTS[i] for i in order]
    parts = [metrics.gen_ppl([texts[i] for i in group], evaluator.encode, evaluator.score, window=16,
                             min_bucket=4) for group in np.split(np.arange(12), sorted(cuts))]
    np.testing.assert_array_equal(np.concatenate([p.sample_nll for p in parts]), whole.sample_nll[order])
    np.testing.assert_array_equal(np.concatenate([p.sample_tokens for p in parts]),
                                  whole.sample_tokens[order])

    n, u = len(TEXTS), U64
    ppl_a, ent_a = sweep.score_samples(TEXTS, IDS, evaluator)
    ppl_b, ent_b = sweep.score_samples(texts, [IDS[i] for i in order], evaluator)
    a = math.log(ppl_a)
    assert abs(math.log(ppl_b) - a) <= (2 * _gamma(n - 1, u) + 4 * u) * a + 2 * u
    assert abs(ent_b - ent_a) <= (2 * _gamma(n - 1, u) + 2 * u) * ent_a


def test_padding_content_does_not_change_a_score():
    """Masked padding after a text cannot reach its tokens (causal attention; masked tokens are not
    scored): a text padded with other ids scores the same bits."""
    evaluator = _tiny_evaluator()
    rng = np.random.default_rng(1)
    for length in (1, 5, 16, 17, 32):
        ids = rng.integers(1, 29, (1, 32)).astype(np.int32)
        mask = np.arange(32)[None] < length
        other = np.where(mask, ids, rng.integers(1, 29, ids.shape)).astype(np.int32)
        np.testing.assert_array_equal(np.asarray(evaluator.score(ids, mask)[0]),
                                      np.asarray(evaluator.score(other, mask)[0]))


# --------------------------------------------------------------------------------------------------
# OWT: entropy on base ids decoded from second-stage codes; reference rows from a test split


@pytest.fixture(scope="module")
def code_run(tmp_path_factory, corpus):  # noqa: F811 (fixture from test_eval_cli)
    """A tiny CoBit run on second-stage codes (window packing, a code tokenizer trained on the
    tiny corpus) with an ``eval`` section, and a separate test-split file."""
    from bitgen.data.corpus import build_corpus_rows
    from bitgen.diffusion.denoiser import init_params
    from bitgen.tokenizers import train_code_tokenizer, vocab_size_of

    root = tmp_path_factory.mktemp("code_run")
    window_data = dataclasses.replace(corpus, packing="window")
    base = build_corpus_rows(window_data, 8)
    eos = base.tokenizer.token_to_id("<|endoftext|>")
    base_vocab = vocab_size_of(base.tokenizer)
    code_tok = train_code_tokenizer(base.rows, base_vocab_size=base_vocab,
                                    code_vocab_size=base_vocab + 3 + 60, base_eos_id=eos)
    code_tok.save(root / "codes.json")
    data = dataclasses.replace(window_data, code_tokenizer=str(root / "codes.json"), code_policy="stop")
    test_file = root / "test.txt"
    test_file.write_text("\n".join(f"a {w} bird flew over hill {i} as {w} fish swam." for i in range(40)
                                   for w in ("red", "green")) + "\n")
    width = build_corpus_rows(data, 8).codec.width
    model = ModelConfig(patch_size=width, seq_tokens=8, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=32,
                        content_dim=8, head_hidden=8, dropout=0.0)
    cfg = ExperimentConfig(
        name="tiny_codes", model=model, data=data,
        sampler=SamplerConfig(nfe=4, gamma=0.0, batch_size=3, grid="karras"),
        eval=EvalConfig(num=3, seeds="0,1", reference="test", test_source=str(test_file),
                        sweep="grid=karras nfe=4 gamma=0"))
    run = root / "cobit"
    _save_run(run, cfg, init_params(jax.random.key(2), model))
    return run


def test_entropy_of_code_samples_counts_decoded_base_ids(code_run, tmp_path):
    from bitgen.generation import generate

    model = load_model(str(code_run))
    code_tok = model.text.code_tokenizer
    samples = generate(model, 6, 0, progress=False)
    base = [code_tok.decode_codes(s.ids) for s in samples]
    for s, ids in zip(samples, base):
        np.testing.assert_array_equal(entropy_ids(model.text, s.ids), ids)
    uniform = sweep.Evaluator("uniform", lambda t: [ord(c) % 7 for c in t], jax.jit(
        lambda ids, mask: windowed_sequence_nll(lambda w: jnp.zeros(w.shape + (7,)), ids, mask,
                                                window=16)), 16)
    rows = sweep.run_sweep(model, uniform, tmp_path / "r.jsonl", points=[["sampler.nfe=4"]], seeds=(0,),
                           num=6, progress=False, log=lambda _: None)
    assert rows[0]["entropy"] == mean_unigram_entropy(base)
    assert rows[0]["entropy"] != mean_unigram_entropy([s.ids for s in samples])  # not the codes'


def test_eval_runs_the_config_protocol_with_test_split_reference(code_run, ar_run, tmp_path,  # noqa: F811
                                                                   capsys):
    """``bitgen eval`` with no protocol flags runs the run config's ``eval`` section: its seeds,
    samples per point, sweep and a real-data point from the first rows of the test split packed
    and coded like the training corpus."""
    from bitgen.data.packing import pack
    from bitgen.data.sources import open_source
    from bitgen.tokenizers import separator_id

    out_dir = tmp_path / "eval"
    assert cli.main(["eval", "--run-dir", str(code_run), "--evaluator", str(ar_run), "--out-dir",
                     str(out_dir), "--no-progress"]) == 0
    rows = sweep.read_rows(out_dir / "results.jsonl")
    real = [r for r in rows if r["model"] == "real data"]
    samples = [r for r in rows if r["model"] == "cobit"]
    model = load_model(str(code_run))
    test_source = model.cfg.eval.test_source
    assert len(real) == 1 and real[0]["reference"] == f"test:{test_source}" and real[0]["n"] == 3
    assert sorted(r["seed"] for r in samples) == [0, 1] and {r["n"] for r in samples} == {3}
    assert "test rows" in capsys.readouterr().out
    # The same rows by hand: tokenise the test file, pack, code; score them like samples.
    docs = open_source(dataclasses.replace(model.cfg.data, source=test_source)).documents()
    tok = model.text.tokenizer
    windows = pack([tok.encode(d, add_special_tokens=False).ids for d in docs], 8, "window",
                   separator_id(tok))[:3]
    codes = model.text.code_tokenizer.encode_windows(windows, 8)
    evaluator = sweep.load_evaluator(str(ar_run))
    ppl, entropy = sweep.score_samples([model.text.decode_ids(c) for c in codes],
                                       [entropy_ids(model.text, c) for c in codes], evaluator)
    assert (real[0]["genppl"], real[0]["entropy"]) == (ppl, entropy)


def test_reference_test_without_a_test_source_names_the_fix(cobit_run, ar_run, tmp_path,  # noqa: F811
                                                             capsys):
    assert cli.main(["eval", "--run-dir", str(cobit_run), "--evaluator", str(ar_run), "--reference",
                     "test", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "eval.test_source" in err and "--reference heldout" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# GPT-2 evaluator from local files in bf16; the paper configs


def test_gpt2_evaluator_in_bfloat16_from_local_files(tmp_path):
    from test_gpt2 import HF_CONFIG, random_state_dict, write_safetensors
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir = write_safetensors(tmp_path, random_state_dict(0))
    words = {f"w{i}": i for i in range(HF_CONFIG["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    assert sweep.evaluator_dtype("auto") == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    full = sweep.load_evaluator(f"gpt2:{model_dir}", "float32")
    half = sweep.load_evaluator(f"gpt2:{model_dir}", "bfloat16")
    assert full.name.endswith("@float32") and half.name.endswith("@bfloat16")
    # bf16 weights, as the reference's hf_dtype=bfloat16 evaluator: the float32 weights rounded.
    for w_half, w_full in zip(jax.tree.leaves(half.score.__wrapped__.args[0]),
                              jax.tree.leaves(full.score.__wrapped__.args[0])):
        assert w_half.dtype == jnp.bfloat16
        np.testing.assert_array_equal(w_half, w_full.astype(jnp.bfloat16))
    texts = ["w1 w5 w9 w36 w0 w7 w7 w2", "w3 w3 w20 w11"]
    ppl_full, _ = sweep.score_samples(texts, [[1], [2]], full)
    ppl_half, _ = sweep.score_samples(texts, [[1], [2]], half)
    assert math.isfinite(ppl_half) and ppl_half > 1 and ppl_full > 1


def test_paper_configs_state_the_paper_protocol():
    for name, test_source, gammas in (("cobit_s_lm1b", "hf:lm1b:test", "0,0.185,0.2"),
                                      ("cobit_s_owt", "hf:openwebtext:train[-100000:]", "0,0.13,0.175,0.18"),
                                      ("cobit_m_owt", "hf:openwebtext:train[-100000:]", None)):
        spec = load_config(name).eval
        assert spec.num == 1024 and spec.reference == "test" and spec.test_source == test_source
        assert spec.seeds == ",".join(str(s) for s in range(42, 52))
        assert spec.evaluator_dtype == "auto"
        points = sweep.parse_sweep(spec.sweep)
        assert points and all(any(o.startswith("sampler.nfe=") for o in p) for p in points)
        if gammas:
            assert f"gamma={gammas}" in spec.sweep
    assert load_config("demo_cpu").eval == EvalConfig()

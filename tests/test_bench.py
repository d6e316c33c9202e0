"""Smoke tests of ``bitgen bench`` at toy sizes: report structure and analytic FLOP counts.

No timing assertions: only that every measurement runs, is finite and lands in the report, and that
the analytic FLOP formulas agree with hand counts and with XLA's own cost analysis.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.bench.cli import _tokens_vocab, _trunk_batch
from bitgen.bench.flops import activation_elements, forward_flops, train_step_flops
from bitgen.bench.heads import BitHead, bits_per_token, head_programs, head_train_fn
from bitgen.bench.programs import train_step_program, trunk_config
from bitgen.bench.report import format_table, run_bench
from bitgen.bench.timing import compiled_memory
from bitgen.cli import COMMANDS
from bitgen.diffusion.denoiser import init_params, residual_logits

TINY = trunk_config("tiny", dtype="float32", seq_tokens=8, patch_size=4)


def test_forward_flops_matches_a_hand_count():
    cfg = TINY
    e, t, p, s = cfg.embed_dim, cfg.seq_tokens, cfg.patch_size, cfg.seq_bits
    c, h, ff = cfg.content_dim, cfg.head_hidden, int(2 * cfg.dim_ff / 3)
    patch_in = p * (2 * c + 2 * cfg.n_fourier_global + 2 * cfg.n_fourier_local + 1)
    per_token = patch_in * e + cfg.n_blocks * (4 * e * e + 3 * e * ff) + e * p * c + e * p * h
    per_bit = 2 * c + 3 * c * h + h * h + h  # Linear(1->C) on two channels, adapter, mixer
    per_seq = 2 * e * e + cfg.n_blocks * 2 * 3 * e * e + e * h + 3 * h * h  # σ embed, adaLNs
    want_dense = 2 * (t * per_token + s * per_bit + per_seq)
    got = forward_flops(cfg)
    assert got["dense"] == want_dense
    assert got["attention"] == cfg.n_blocks * 4 * t * t * e
    assert got["total"] == got["dense"] + got["attention"]


def test_forward_flops_agrees_with_xla_cost_analysis():
    # XLA counts every dot at 2 FLOPs per MAC, as the analytic model does, plus one FLOP per
    # element of each non-transcendental elementwise op and reduction (exp, rsqrt, sin/cos and
    # logistic go to "transcendentals", not "flops"). So XLA's total is the analytic count plus
    # the omitted elementwise work, which is bounded per element of a matmul output
    # (``activation_elements``) by the longest chain charged to one element:
    #   trunk residual stream (out_proj / Wo outputs): bias 1 + gate 1 + residual add 1
    #     + the next LayerNorm (mean 1, centre 1, square 1, variance 1, scale 1) + modulation 2 = 10;
    #   head input_adapter output: bias 1 + add of the patch feature 1 + LayerNorm 5
    #     + modulation 2 + gate 1 = 10;
    #   qkv: bias 1 + RoPE on q, k (2 mul, 1 add, ½ negate) + scale 1 ≤ 6 (its cos/sin table is
    #     a constant of the program); scores: mask/scale 1 + softmax (max, subtract, sum, divide) = 5;
    #   SwiGLU Wa/Wb: bias 1 + SiLU mul 1 + product 1 ≤ 3; cont_input_proj: bias 1 + centring
    #     and c_in scaling of its 1-wide input 2 = 3; per-sequence σ embedding / adaLN SiLU ≤ 3.
    omitted_per_element = 10
    cfg = TINY
    params = init_params(jax.random.key(0), cfg)
    x = jnp.zeros((1, cfg.seq_bits))
    sigma = jnp.ones((1,))
    fn = jax.jit(functools.partial(residual_logits, cfg=cfg))
    xla_flops = fn.lower(params, x, sigma, x).compile().cost_analysis()["flops"]
    analytic = forward_flops(cfg)["total"]
    assert analytic <= xla_flops <= analytic + omitted_per_element * activation_elements(cfg)


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_bench_bit_head_is_the_sdt_output_path():
    # Fed the SDT's own trunk output, content features and σ embedding with the SDT's parameters,
    # the benchmarked bit head must return the SDT's f_θ. Both run eagerly, op by op, the same
    # ops on the same float32 inputs: bit-identical, no tolerance.
    cfg = dataclasses.replace(TINY, n_blocks=2)
    fresh = init_params(jax.random.key(0), cfg)
    leaves, treedef = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # Moved off init: the head's adaLN gate starts at 0, which would make f_θ identically 0.
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                          for x, k in zip(leaves, keys)])
    k_x, k_sc = jax.random.split(jax.random.key(2))
    x_t = jax.random.normal(k_x, (2, cfg.seq_bits))
    sigma = jnp.array([0.3, 2.0])
    x0_hat = jax.random.uniform(k_sc, (2, cfg.seq_bits))
    f_theta, sown = residual_logits(params, x_t, sigma, x0_hat, cfg=cfg, capture_intermediates=True)
    (tokens,) = sown[f"blocks_{cfg.n_blocks - 1}_out"]
    (channels,) = sown["cont_input_proj_out"]  # [2, B, S, C]: noisy and SC channels
    (t_emb,) = sown["time_cond_out"]
    content = jnp.concatenate([channels[0], channels[1]], axis=-1)
    head_params = {name: params[name] for name in ("unpatch_proj_content", "head")}
    got = BitHead(cfg).apply({"params": head_params}, tokens, content, t_emb)
    assert float(jnp.abs(f_theta).max()) > 1e-3  # the head is switched on
    np.testing.assert_array_equal(np.asarray(got), np.asarray(f_theta))


def test_train_step_flops_counts_the_self_conditioning_pass():
    fwd = forward_flops(TINY)["total"]
    assert train_step_flops(TINY, 3, self_conditioning=False) == 3 * 3 * fwd
    assert train_step_flops(TINY, 3, self_conditioning=True) == 3 * 4 * fwd


@pytest.mark.parametrize("vocab,bits", [(2, 1), (256, 8), (257, 9), (30522, 15), (128000, 17)])
def test_bits_per_token(vocab, bits):
    assert bits_per_token(vocab) == bits


def test_trunk_specs_are_validated():
    with pytest.raises(ValueError, match="unknown trunk"):
        trunk_config("huge", dtype="float32")
    with pytest.raises(Exception, match="TRUNK:BATCH"):
        _trunk_batch("cobit-s")
    assert _trunk_batch("small:8") == ("small", 8)
    assert _tokens_vocab("16:300") == (16, 300)


@pytest.mark.slow  # the whole report at toy sizes (20 s); each measurement has its own fast test
def test_run_bench_report_structure(tmp_path):
    report = run_bench(
        dtype="float32", matmul_size=64, matmul_chain=2, matmul_repeats=1,
        # 8 fake devices in tests: the train batch must split over the data axis.
        train=[("tiny", 8)], train_repeats=1,
        sampler=[("tiny", 1)], sampler_repeats=1, nfe=8,
        heads=[(8, 300)], head_trunk="tiny", head_batch=1, head_repeats=1, head_time_budget_s=60.0,
        seq_tokens=TINY.seq_tokens, patch_size=TINY.patch_size, log=lambda _: None,
    )
    json.dumps(report)  # the report is plain JSON
    assert report["machine"]["backend"] == jax.default_backend()
    assert report["matmul"]["flops"] == 2 * 2 * 64**3
    assert report["matmul_limit_flops_per_s"] > 0

    (train,) = report["train"]
    assert train["flops_per_step"] == train_step_flops(TINY, 8, self_conditioning=True)
    assert train["tokens_per_step"] == 8 * TINY.seq_tokens
    assert train["matmul_chain"] == max(1, round(train["flops_per_step"] / (2 * 64**3)))
    assert len(train["times_s"]) == 1 and train["median_s"] > 0
    assert math.isclose(train["fraction_of_matmul_limit"],
                        train["achieved_flops_per_s"] / train["matmul_limit_flops_per_s"])

    (sampler,) = report["sampler"]
    assert sampler["model_calls"] == sampler["grid_points"]  # DDIM + carry: one call per point
    assert math.isclose(sampler["bare_total_s"],
                        sampler["model_calls"] * sampler["bare_call"]["median_s"])
    assert sampler["overhead_ratio"] > 0

    (head,) = report["heads"]
    assert head["bits_per_token"] == 9
    for path in ("bit", "token"):
        memory = head[path]["memory"]
        assert memory["peak_bytes"] == (memory["argument_bytes"] + memory["output_bytes"]
                                        + memory["temp_bytes"] - memory["alias_bytes"])
        assert head[path]["forward_memory"]["peak_bytes"] > 0
        assert isinstance(head[path]["time"], dict)
    assert head["memory_ratio"] == head["bit"]["memory"]["peak_bytes"] / head["token"]["memory"]["peak_bytes"]
    assert set(report["targets"]) == {"sampler_overhead_ratio", "sampler_loop_overhead_ratio",
                                      "head_memory_ratio"}
    assert sampler["loop_overhead_ratio"] > 0
    assert "| trunk |" in format_table(report)


def test_head_memory_counts_the_token_logits():
    # The token path must hold at least its [B, T, V] float32 logits; the bit path needs far less
    # at a large vocabulary (its logits are [B, T·P]).
    cfg = dataclasses.replace(TINY, embed_dim=32)
    _, programs = head_programs(cfg, seq_tokens=16, vocab=65536, batch=1)
    (bit_loss, bit_args), (token_loss, token_args) = programs["bit"], programs["token"]
    token_memory = compiled_memory(head_train_fn(token_loss), token_args)
    bit_memory = compiled_memory(head_train_fn(bit_loss), bit_args)
    assert token_memory["peak_bytes"] >= 16 * 65536 * 4
    assert bit_memory["peak_bytes"] < token_memory["peak_bytes"]


def test_cli_registration():
    assert COMMANDS["bench"][0] == "bitgen.bench.cli"


def test_train_step_program_is_the_bench_step_with_its_flops():
    cfg = trunk_config("tiny", dtype="float32")
    step, flops = train_step_program(cfg, 8)
    # The default config self-conditions (p = 0.5), so the bootstrap forward is counted.
    assert flops == train_step_flops(cfg, 8, self_conditioning=True)
    state, data = step.args
    assert data["bits"].shape == (8, cfg.seq_bits)
    assert step.feed_back((state, {})) == (state, data)  # the donated state is fed back

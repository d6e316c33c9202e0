"""The generation section of ``bitgen bench`` at toy sizes: the analytic cost model against hand
counts, every generator of the table through its family, flag errors, and the JSON report.

No timing assertions: only counts, shapes and the structure of what is reported.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.bench import cli
from bitgen.bench.flops import forward_flops
from bitgen.bench.generation import (
    GENERATORS,
    GenSize,
    build_generator,
    generator_config,
    registered,
    synthetic_text,
)
from bitgen.bench.report import format_table, run_bench
from bitgen.diffusion.entropy_schedule import load_entropy_table
from bitgen.errors import BitgenError
from bitgen.sampling import build_sampler

# E = 32, 2 heads, 1 block, dim_ff 48 (SwiGLU hidden F = int(2·48/3) = 32), T = 8, V = 64 (P = 6);
# BitLM's head: width C = 16, depth 1, 2 heads.
TINY = GenSize(("model.embed_dim=32", "model.n_heads=2", "model.n_blocks=1", "model.dim_ff=48",
                "model.seq_tokens=8", "model.content_dim=8", "model.head_hidden=16"), 64,
               (("bitlm", ("family.head_width=16", "family.head_depth=1", "family.head_heads=2")),))
E, F, T, V, P, C = 32, 32, 8, 64, 6, 16


def generator(label: str):
    return next(g for g in GENERATORS if g.label == label)


def cost_of(label: str):
    return generator(label).cost(generator_config(generator(label), TINY, "float32"), V)


def test_ar_cost_by_hand():
    # A row starts from the separator: T − 1 = 7 decode steps of one token, 7 generated tokens.
    # Per token, one block: qkv E·3E + out E·E + SwiGLU Wa, Wb E·F each + Wo F·E; LM head E·V.
    per_token = 2 * (E * 3 * E + E * E + 3 * E * F + E * V)
    # The step at position p (0..6) attends to p + 1 keys: QKᵀ and PV, 2·2·(p + 1)·E each.
    attention = sum(4 * (p + 1) * E for p in range(T - 1))  # = 4·E·28
    cost = cost_of("ar")
    assert (cost.backbone_passes, cost.backbone_tokens, cost.head_passes) == (7, 1, 0)
    assert (cost.given_tokens, cost.generated_tokens) == (1, 7)
    assert cost.flops == 7 * per_token + attention
    assert cost.to_dict()["flops_per_token"] == cost.flops / 7
    assert cost.to_dict()["backbone_passes_per_token"] == 1.0


def test_cobit_cost_by_hand():
    # 256 NFE, DDIM with SC carry: 255 grid points = 254 steps of one call + the final denoise
    # = 255 SDT passes over all T = 8 tokens; nothing given, 8 tokens generated.
    cfg = generator_config(generator("cobit"), TINY, "float32")
    cost = cost_of("cobit")
    assert (cost.backbone_passes, cost.backbone_tokens, cost.head_passes) == (255, 8, 0)
    assert (cost.given_tokens, cost.generated_tokens) == (0, 8)
    # The SDT forward itself is hand-checked in tests/test_bench.py (and its dense part here).
    assert cost.flops == 255 * forward_flops(cfg.model)["total"]
    assert forward_flops(cfg.model)["dense"] == sdt_chunk_by_hand(T, head=True)
    # ... and the sampler the family builds counts the same calls.
    draw = build_sampler(cfg.model, cfg.sampler, load_entropy_table("lm1b"), cfg.model.seq_bits)
    assert draw.settings.nfe == 255
    assert cost.to_dict()["backbone_passes_per_token"] == 255 / 8


@pytest.mark.parametrize("label, branches", [("bitlm_w9", 2), ("bitlm_w1", 1)])
def test_bitlm_cost_by_hand(label, branches):
    # m = 4, T = 8: n = 2 blocks. Backbone: the start block, then one append per block = 3 passes
    # of 4 positions; pass j's 4 queries see the (j + 1)·4 keys of blocks 0..j.
    m, n, k = 4, 2, 15
    backbone_token = 2 * (E * 3 * E + E * E + 3 * E * F)  # one block, no LM head
    backbone = 3 * m * backbone_token + sum(4 * m * (j + 1) * m * E for j in range(3))
    # Head call on one block (one CFG branch): time_in 256·C and time_out C·C once per block;
    # per slot (m rows): cond_in E·C, bits_in P·C, adaLN C·6C, qkv C·3C, out C·C,
    # SwiGLU 3·C·Fh with Fh = 8C/3 = 42 rounded up to a multiple of 64 = 64, final adaLN C·2C,
    # bits_out C·P; attention of the m slots over each other, 2·2·m·m·C.
    fh = 64
    per_slot = E * C + P * C + 6 * C * C + 3 * C * C + C * C + 3 * C * fh + 2 * C * C + C * P
    head_call = 2 * (256 * C + C * C) + 2 * m * per_slot + 4 * m * m * C
    head_passes = n * (k + 1) * branches  # 32 per branch: K = 15 Euler steps + the final jump
    cost = cost_of(label)
    assert (cost.backbone_passes, cost.backbone_tokens) == (3, 4)
    assert (cost.head_passes, cost.head_tokens) == (head_passes, 4) == (32 * branches, 4)
    assert (cost.given_tokens, cost.generated_tokens) == (1, 7)
    assert cost.flops == backbone + head_passes * head_call


def sdt_chunk_by_hand(tokens: int, *, head: bool) -> int:
    """Dense FLOPs of the SDT's kernels over ``tokens`` tokens with one σ level (the hand count of
    tests/test_bench.py at T = tokens): per token the patch projection and the trunk blocks (+ the
    un-patch projection and the head's patch adapter), per bit the shared Linear(1→C') on two
    channels (+ the head's input adapter and mixer), per level the σ embedding and the adaLNs
    (+ the head's time projection and adaLN)."""
    cfg = generator_config(generator("cobit"), TINY, "float32").model
    e, c, h, ff = cfg.embed_dim, cfg.content_dim, cfg.head_hidden, int(2 * cfg.dim_ff / 3)
    patch_in = P * (2 * c + 2 * cfg.n_fourier_global + 2 * cfg.n_fourier_local + 1)
    per_token = patch_in * e + cfg.n_blocks * (4 * e * e + 3 * e * ff)
    per_bit = 2 * c
    per_level = 2 * e * e + cfg.n_blocks * 2 * 3 * e * e
    if head:
        per_token += e * P * c + e * P * h
        per_bit += 3 * c * h + h * h + h
        per_level += e * h + 3 * h * h
    return 2 * (tokens * per_token + tokens * P * per_bit + per_level)


def test_block_cobit_cost_by_hand():
    from bitgen import families

    if "block_cobit" not in families.names():
        pytest.skip("task=block_cobit is not registered in this build")
    # m = 4, T = 8: the separator does not fill a block (⌊1/4⌋ = 0), so both blocks are denoised:
    # 255 block-SDT passes of 4 tokens each (256 NFE) + 1 clean append = 512 passes; block j's
    # 4 queries see (j + 1)·4 keys.
    step, append = sdt_chunk_by_hand(4, head=True), sdt_chunk_by_hand(4, head=False)
    attention = [4 * 4 * (j + 1) * 4 * E for j in range(2)]  # one trunk block
    cost = cost_of("block_cobit")
    assert (cost.backbone_passes, cost.backbone_tokens, cost.head_passes) == (512, 4, 0)
    assert (cost.given_tokens, cost.generated_tokens) == (1, 7)
    assert cost.flops == sum(255 * (step + a) + append + a for a in attention)


def jaxpr_dot_flops(jaxpr) -> int:
    """2 · (contracted size) · (output size) summed over every ``dot_general`` of a jaxpr and the
    jaxprs nested in it (jit, scan, custom_jvp ...): the matmul FLOPs a program executes."""
    from jax.extend import core

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod([lhs[d] for d in contract])) * int(np.prod(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, core.ClosedJaxpr):
                    total += jaxpr_dot_flops(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    total += jaxpr_dot_flops(sub)
    return total


def test_pass_flops_are_the_matmuls_the_programs_run():
    # The per-pass FLOPs of the cost model against the dot_generals of the real calls. A cached
    # call executes attention over the whole cache buffer (masked), so here the keys are the
    # buffer's length, not the visible prefix the cost model counts.
    from bitgen.bench.flops import (
        ar_token_flops,
        attention_flops,
        bit_head_call_flops,
        bitlm_backbone_token_flops,
    )
    from bitgen.families.ar import ar_config
    from bitgen.families.bitlm import bitlm_config
    from bitgen.nn import ar, bitlm

    model = bitlm_config(generator_config(generator("bitlm_w1"), TINY, "float32"), V)
    params = jax.eval_shape(lambda: bitlm.init_bitlm_params(jax.random.key(0), model))
    z, t, states = jnp.zeros((1, 4, P)), jnp.zeros((1,)), jnp.zeros((1, 4, E))
    head = jax.make_jaxpr(lambda p: bitlm.head_predict(p, z, t, states, jnp.zeros((1,), bool),
                                                      cfg=model))(params)
    assert jaxpr_dot_flops(head.jaxpr) == bit_head_call_flops(model)
    cache = bitlm.init_backbone_cache(model, 1)  # T + m = 12 slots
    extend = jax.make_jaxpr(lambda p, c: bitlm.backbone_extend(
        p, c, jnp.zeros((1, 4), jnp.int32), cfg=model, with_start=False))(params, cache)
    assert jaxpr_dot_flops(extend.jaxpr) == 4 * bitlm_backbone_token_flops(model) + attention_flops(
        layers=1, width=E, queries=4, keys=T + 4)

    trunk = ar_config(generator_config(generator("ar"), TINY, "float32"), V)
    ar_params = jax.eval_shape(lambda: ar.init_ar_params(jax.random.key(0), trunk))
    step = jax.make_jaxpr(lambda p, c: ar.ar_decode_step(p, c, jnp.zeros((1, 1), jnp.int32), cfg=trunk))(
        ar_params, ar.init_kv_cache(trunk, 1, T))
    assert jaxpr_dot_flops(step.jaxpr) == ar_token_flops(trunk) + attention_flops(
        layers=1, width=E, queries=1, keys=T)


def test_block_sdt_pass_flops_are_the_matmuls_it_runs():
    from bitgen import families

    if "block_cobit" not in families.names():
        pytest.skip("task=block_cobit is not registered in this build")
    from bitgen.bench.flops import attention_flops, sdt_chunk_dense_flops
    from bitgen.diffusion.denoiser import init_params
    from bitgen.nn.block_sdt import append_clean, block_residual, init_block_cache

    cfg = generator_config(generator("block_cobit"), TINY, "float32").model
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    cache = init_block_cache(cfg, 1)  # T slots: executed attention is over all of them
    bits = jnp.zeros((1, 4 * P))
    step = jax.make_jaxpr(lambda p, c: block_residual(p, c, bits, jnp.ones((1,)), bits, cfg=cfg,
                                                      block_tokens=4))(params, cache)
    append = jax.make_jaxpr(lambda p, c: append_clean(p, c, bits, cfg=cfg, block_tokens=4,
                                                      clean_sigma=0.002))(params, cache)
    attention = attention_flops(layers=1, width=E, queries=4, keys=T)
    assert jaxpr_dot_flops(step.jaxpr) == sdt_chunk_dense_flops(cfg, 4) + attention
    assert jaxpr_dot_flops(append.jaxpr) == sdt_chunk_dense_flops(cfg, 4, head=False) + attention


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_every_registered_generator_makes_full_rows_through_its_family():
    text = synthetic_text(V)
    assert registered(), "the table has generators of registered families"
    for gen in registered():
        built = build_generator(gen, TINY, "float32", text=text)
        options = built.cfg.family
        if options is not None and hasattr(options, "stop_at_separator"):
            assert not options.stop_at_separator, f"{gen.label}: early stop must be off for timing"
        cost = built.cost()
        out = jax.jit(lambda params, key, draw=built.draw: draw(params, key, 3))(
            built.model.params, jax.random.key(5))
        rows = built.family.decode(np.asarray(out), text)
        assert len(rows) == 3, gen.label
        for decoded, _ in rows:
            assert len(decoded.ids) == T == cost.given_tokens + cost.generated_tokens, gen.label


def test_configs_share_the_backbone_size_and_codes():
    shared = ("embed_dim", "n_heads", "n_blocks", "dim_ff", "seq_tokens", "patch_size")
    models = [generator_config(g, TINY, "float32").model for g in registered()]
    for name in shared:
        assert len({getattr(m, name) for m in models}) == 1, name
    assert models[0].patch_size == P


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitgen bench")
    cli.add_arguments(parser)
    return parser


@pytest.mark.parametrize("argv, bad, fix", [
    (["--gen-batches", "1,x"], "'1,x'", "e.g. --gen-batches 1,64"),
    (["--gen-batches", "0"], "'0'", "e.g. --gen-batches 1,64"),
    (["--gen-families", "ar,nope"], "'nope'", "e.g. --gen-families ar,bitlm"),
    (["--gen-size", "huge"], "'huge'", "choose from"),
])
def test_flag_errors_are_one_line_naming_the_fix(argv, bad, fix, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--generation", *argv])
    # argparse prints the usage, then the error as one line.
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"bitgen bench: error: argument {argv[0]}")
    assert bad in message and fix in message


@pytest.mark.parametrize("argv, fix", [
    (["--gen-batches", "1"], "add --generation"),
    (["--generation", "--gen-repeats", "0"], "must be >= 1"),
])
def test_generation_flag_conflicts_are_one_line_errors(argv, fix):
    with pytest.raises(BitgenError, match=fix) as err:
        cli.generation_options(_parser().parse_args(argv))
    assert "\n" not in str(err.value)


def test_families_select_their_generators():
    args = _parser().parse_args(["--generation", "--gen-families", "bitlm,ar", "--gen-batches", "2,4"])
    options = cli.generation_options(args)
    assert options["labels"] == ("bitlm_w9", "bitlm_w1", "ar")
    assert options["batches"] == (2, 4) and options["size"] == "demo" and options["repeats"] == 3
    assert cli.generation_options(_parser().parse_args([])) is None


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_json_report_holds_the_generation_section(tmp_path):
    report = run_bench(dtype="float32", matmul_size=64, matmul_chain=1, matmul_repeats=1, train=[],
                       train_repeats=1, sampler=[], sampler_repeats=1, nfe=8, heads=[],
                       head_trunk="tiny", head_batch=1, head_repeats=1, head_time_budget_s=1.0,
                       generation={"size": TINY, "batches": (1, 2), "labels": ("ar", "bitlm_w1"),
                                   "repeats": 1}, log=lambda _: None)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    section = json.loads(path.read_text())["generation"]
    assert [(r["generator"], r["batch"]) for r in section["rows"]] == [
        ("ar", 1), ("bitlm_w1", 1), ("ar", 2), ("bitlm_w1", 2)]
    assert section["early_stop"] is False and section["vocab_size"] == V
    for row in section["rows"]:
        assert row["cost"] == cost_of(row["generator"]).to_dict()
        assert row["tokens_per_s"] == pytest.approx(
            row["batch"] * row["cost"]["generated_tokens"] / row["median_s"], rel=1e-12)
        assert row["fraction_of_matmul_limit"] > 0 and np.isfinite(row["achieved_flops_per_s"])
        assert len(row["times_s"]) == 1 and row["min_s"] <= row["median_s"] <= row["max_s"]
    table = format_table(report)
    assert "generation: size custom" in table and "| bitlm_w1 | 2 |" in table


def test_the_cli_writes_the_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = _parser().parse_args([
        "--generation", "--gen-families", "ar", "--gen-batches", "1", "--gen-repeats", "1",
        "--train", "--sampler", "--heads", "--matmul-size", "64", "--matmul-chain", "1",
        "--matmul-repeats", "1", "--out", str(out)])
    assert cli.run(args) == 0
    section = json.loads(out.read_text())["generation"]
    assert section["size"] == "demo" and section["vocab_size"] == 8192
    assert [(r["generator"], r["batch"], r["cost"]["generated_tokens"]) for r in section["rows"]] == [
        ("ar", 1, 31)]
    assert "| ar | 1 |" in capsys.readouterr().out

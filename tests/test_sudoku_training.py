"""Sudoku training wiring (issue 12): ``data.source=sudoku`` rows and text pipeline, batches that
carry the prompt bits as ``cond_mask``, conditional CoBit and solution-only AR training runs."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bitgen import parallel
from bitgen.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EntropyScheduleConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    SamplerConfig,
    TrainConfig,
    load_config,
    validate,
)
from bitgen.data import sudoku
from bitgen.data.corpus import build_corpus_rows
from bitgen.data.pipeline import make_batch_dataset, make_batch_iterator
from bitgen.families.ar import given_tokens
from bitgen.nn.ar import ARConfig, ar_logits, ar_loss, init_ar_params
from bitgen.textcodec import TextCodec, run_text_codec
from bitgen.tokenizers import tokenizer_hash

N_TRAIN, N_VALID = 64, 16  # a few puzzles instead of 48k + 2k: generated in well under a second
U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A row cache holding a small Sudoku set; the split sizes stay shrunk for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sudoku, "TRAIN_SIZE", N_TRAIN)
        mp.setattr(sudoku, "VALID_SIZE", N_VALID)
        yield str(tmp_path_factory.mktemp("sudoku-cache"))


@pytest.fixture(scope="module")
def rows(cache_dir):
    return build_corpus_rows(DataConfig(source="sudoku", cache_dir=cache_dir), sudoku.ROW_TOKENS)


def test_rows_are_the_sudoku_splits_with_the_sudoku_codec(rows, cache_dir):
    built = sudoku.sudoku_rows(cache_dir, n_train=N_TRAIN, n_valid=N_VALID)
    assert built.status == "reused"
    np.testing.assert_array_equal(rows.train_rows, built.train)
    np.testing.assert_array_equal(rows.val_rows, built.valid)
    assert (rows.stats.train_rows, rows.stats.val_rows, rows.stats.seq_tokens) == (N_TRAIN, N_VALID, 180)
    assert rows.codec == sudoku.SUDOKU_CODEC and rows.prompt_tokens == sudoku.PROMPT_TOKENS == 91
    # data.seed shuffles batches only; tokenizer / vocabulary settings do not apply.
    other = build_corpus_rows(DataConfig(source="sudoku", cache_dir=cache_dir, seed=5,
                                         tokenizer="/no/such/tokenizer.json", vocab_size=3), 180)
    np.testing.assert_array_equal(other.rows, rows.rows)
    assert other.stats.cache_status == "reused"


def test_text_codec_reads_and_writes_sudoku_rows(rows, tmp_path):
    text = rows.text_codec
    row = np.asarray(rows.val_rows[0])
    written = sudoku.format_row(row)
    assert text.decode_ids(row) == written and len(written) == 180
    np.testing.assert_array_equal(text.encode_text(written), row)
    np.testing.assert_array_equal(text.encode_text(written.replace(".", "0")), row)  # 0 = blank
    np.testing.assert_array_equal(text.encode_text(" ".join(written)), row)  # spaces ignored
    [decoded] = text.decode_bits(sudoku.rows_to_bits(row[None]))
    assert decoded.text == written and decoded.n_invalid == 0
    loaded = TextCodec.load(text.save(tmp_path / "tokenizer"))
    assert loaded.codec == text.codec
    assert tokenizer_hash(loaded.tokenizer) == tokenizer_hash(text.tokenizer)


def test_sudoku_needs_its_row_length_and_codes(cache_dir):
    with pytest.raises(ConfigError, match=r"set model\.seq_tokens=180"):
        build_corpus_rows(DataConfig(source="sudoku", cache_dir=cache_dir), 128)
    with pytest.raises(ConfigError, match=r"data\.bit_order"):
        build_corpus_rows(DataConfig(source="sudoku", cache_dir=cache_dir, bit_order="frequency"), 180)


def test_batches_carry_the_prompt_bits_deterministically(rows):
    def batches(prompt_tokens, start=0, n=3):
        ds = make_batch_dataset(rows.train_rows, rows.codec, global_batch=8, seed=3,
                                prompt_tokens=prompt_tokens)
        it = make_batch_iterator(ds, start_batch=start)
        return [next(it) for _ in range(n)]

    first, again, resumed = batches(91), batches(91), batches(91, start=2, n=1)
    plain = batches(0)
    for k, batch in enumerate(first):
        np.testing.assert_array_equal(batch["cond_mask"], sudoku.prompt_bit_mask(8))
        assert int(batch["cond_mask"].sum()) == 8 * 364
        for key in ("bits", "ids", "cond_mask"):  # same seed, same batches: resume sees batch k
            np.testing.assert_array_equal(again[k][key], batch[key])
        assert "cond_mask" not in plain[k]
        np.testing.assert_array_equal(plain[k]["bits"], batch["bits"])
    for key in ("bits", "ids", "cond_mask"):
        np.testing.assert_array_equal(resumed[0][key], first[2][key])


# -- the AR baseline's solution-only loss --------------------------------------------------------

AR_CFG = ARConfig(vocab_size=12, seq_len=180, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=32,
                  dropout=0.0)


@pytest.fixture(scope="module")
def ar_params():
    return init_ar_params(jax.random.key(0), AR_CFG)


def _ids(seed, n=2):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 12, (n, 180)), jnp.int32)


def _loss(params, ids, target_mask):
    return ar_loss(params, ids, None, cfg=AR_CFG, train=False, target_mask=target_mask)[0]


def test_ar_loss_scores_only_the_masked_targets(ar_params):
    # The last token is a target only (never an input), so changing it changes nothing but its
    # own term: the loss must ignore it when it is masked out and see it when it is scored.
    ids = _ids(0)
    changed = ids.at[:, -1].set((ids[:, -1] + 1) % 12)
    mask = np.ones((2, 180), bool)
    mask[:, -1] = False
    np.testing.assert_array_equal(_loss(ar_params, changed, mask), _loss(ar_params, ids, mask))
    assert _loss(ar_params, changed, ~mask) != _loss(ar_params, ids, ~mask)
    # Token 91, the first solution token, is scored from position 90; token 90 is not scored.
    solution = ~np.asarray(given_tokens(sudoku.prompt_bit_mask(2), 180))
    assert solution[:, 91].all() and not solution[:, :91].any() and solution[:, 91:].all()
    logits = np.asarray(ar_logits(ar_params, ids[:, :-1], cfg=AR_CFG), np.float64)
    nll = -(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    terms = np.take_along_axis(nll, np.asarray(ids)[:, 1:, None], -1)[..., 0][:, 90:]  # t = 91..179
    # float32 CE per term (a few ulp of its size, ~3 nats) summed over 178 terms, then one
    # division: |Δ| ≤ (178 + 8)·u·Σ|terms|/n ≈ 186·u·mean (the float64 reference is exact here).
    np.testing.assert_allclose(_loss(ar_params, ids, solution), terms.mean(),
                               rtol=186 * U, atol=0)


def test_unconditional_ar_loss_is_unchanged(ar_params):
    # No mask: the pre-mask computation op for op, bit for bit.
    ids = _ids(1)
    with jax.disable_jit():
        want = optax.softmax_cross_entropy_with_integer_labels(
            ar_logits(ar_params, ids[:, :-1], cfg=AR_CFG), ids[:, 1:]).mean()
        got = _loss(ar_params, ids, None)
    np.testing.assert_array_equal(got, want)
    # Every token scored: the same terms summed in another order (mean vs sum / count): each sum
    # of n = 2·179 terms is within (n−1)·u relatively, plus one division each: rtol 2(n+1)u.
    everything = _loss(ar_params, ids, np.ones((2, 180), bool))
    np.testing.assert_allclose(everything, want, rtol=2 * (2 * 179 + 1) * U, atol=0)


# -- training runs ------------------------------------------------------------------------------

def _tiny_sudoku(task, cache_dir, run_dir):
    return validate(ExperimentConfig(
        name="sudoku_tiny", task=task,
        model=ModelConfig(patch_size=4, seq_tokens=180, embed_dim=16, n_heads=2, n_blocks=1,
                          dim_ff=32, content_dim=4, head_hidden=8, dropout=0.0),
        diffusion=DiffusionConfig(cond_dropout=0.0),
        entropy=EntropyScheduleConfig(buffer_size=64, num_bins=4, min_per_bin=1, update_every=2,
                                      warmup_steps=2, transition_steps=1),
        data=DataConfig(source="sudoku", cache_dir=cache_dir, batch_size=8, seed=1),
        optim=OptimConfig(lr=1e-3, warmup_steps=1, ema_decay=0.9),
        sampler=SamplerConfig(grid="karras", nfe=8, batch_size=2),
        train=TrainConfig(steps=4, log_every=1, ckpt_every=2, run_dir=str(run_dir))))


def _replayed_losses(cfg, rows, with_mask):
    """The losses of the run's steps recomputed from the pipeline's batches, with or without the
    batches' cond_mask."""
    from bitgen.train.program import build_train_program

    mesh = parallel.make_mesh(cfg.mesh)
    program = build_train_program(cfg, mesh, rows.codec.vocab_size)
    state = program.init_state()
    ds = make_batch_dataset(rows.train_rows, rows.codec, global_batch=cfg.data.batch_size,
                            seed=cfg.data.seed, prompt_tokens=rows.prompt_tokens)
    losses = []
    for k in range(cfg.train.steps):
        local = program.batch_of(ds[k])
        if not with_mask:
            local.pop("cond_mask")
        state, metrics = program.step_fn(state, parallel.global_batch(local, mesh, cfg.data.batch_size))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
@pytest.mark.parametrize("task", ["cobit", "ar"])
def test_a_sudoku_run_trains_on_the_solution_and_saves_a_loadable_run(task, rows, cache_dir, tmp_path):
    from bitgen.loading import load_model
    from bitgen.train.loop import train

    run_dir = tmp_path / "run"
    cfg = _tiny_sudoku(task, cache_dir, run_dir)
    result = train(cfg, run_dir, progress=True)  # the CLI's default: bars on
    assert result.step == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    saved = run_text_codec(run_dir)
    assert saved.codec == sudoku.SUDOKU_CODEC
    assert saved.decode_ids(rows.val_rows[0]) == sudoku.format_row(rows.val_rows[0])
    logged = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The loop handed the step the batches' cond_mask: its losses are the masked replay's, bit for
    # bit (same compiled step, same batches), and not the unmasked one's.
    assert logged == _replayed_losses(cfg, rows, with_mask=True)
    assert all(a != b for a, b in zip(logged, _replayed_losses(cfg, rows, with_mask=False)))
    model = load_model(run_dir=str(run_dir))
    assert model.text.codec == sudoku.SUDOKU_CODEC and model.cfg.data.source == "sudoku"


def test_shipped_sudoku_configs_fit_the_rows():
    for name in ("sudoku_cpu", "sudoku_ar_cpu", "sudoku_ref", "sudoku_ar_ref"):
        cfg = load_config(name)
        assert (cfg.data.source, cfg.model.seq_tokens, cfg.model.patch_size) == ("sudoku", 180, 4)
        assert cfg.sampler.nfe == 180 and cfg.diffusion.cond_dropout == 0.1
    cpu, ar = load_config("sudoku_cpu"), load_config("sudoku_ar_cpu")
    assert ar.task == "ar" and dataclasses.replace(ar, name=cpu.name, task=cpu.task, family=None,
                                                    train=cpu.train) == cpu  # only the task differs
    ref = load_config("sudoku_ref")
    assert (ref.model.n_blocks, ref.model.embed_dim, ref.data.batch_size, ref.train.steps) == (8, 512, 256, 20_000)

"""Conditional training: known bits stay clean and unscored, target-bit normalisation, condition
dropout, and masks carried through the train program."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bitgen.config import (
    DataConfig,
    DiffusionConfig,
    EntropyScheduleConfig,
    ExperimentConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    validate,
)
from bitgen.diffusion.denoiser import denoise, param_shapes
from bitgen.diffusion.loss import diffusion_loss, loss_from_logits
from bitgen.parallel import make_mesh
from bitgen.train.program import build_train_program

CFG = ModelConfig(patch_size=4, seq_tokens=3, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=24,
                  content_dim=4, head_hidden=8, dropout=0.0)
DIFF = DiffusionConfig()
B, S = 4, CFG.seq_bits
LOSS = jax.jit(diffusion_loss, static_argnames=("model_cfg", "diffusion_cfg", "train"))
U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def params():
    """Random params of the right shapes: every gate open, so the network output is live."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3 / np.sqrt(s.shape[0]),
                                              jnp.float32), param_shapes(CFG))


def _batch(seed):
    rng = np.random.default_rng(seed)
    bits = jnp.asarray(rng.integers(0, 2, (B, S)), jnp.uint8)
    sigma = jnp.asarray(np.exp(rng.uniform(-2.0, 2.0, B)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(B, S)), jnp.float32)
    return bits, sigma, noise


def _loss(params, bits, sigma, noise, cond_mask, diff=DIFF, key=1):
    return LOSS(params, bits, sigma, jax.random.key(key), model_cfg=CFG, diffusion_cfg=diff,
                train=False, noise=noise, cond_mask=cond_mask)


@settings(max_examples=8, deadline=None)
@given(mask=hnp.arrays(bool, (B, S)), seed=st.integers(0, 2**16))
def test_loss_ignores_the_noise_at_known_bits(params, mask, seed):
    # (a) known bits are clean in x_t: the noise drawn for them changes nothing, bit for bit.
    bits, sigma, noise = _batch(seed)
    other = jnp.where(mask, noise * 7.0 - 3.0, noise)
    (loss, aux), (loss2, aux2) = (_loss(params, bits, sigma, n, mask) for n in (noise, other))
    np.testing.assert_array_equal(loss, loss2)
    np.testing.assert_array_equal(aux["loss_per_sample"], aux2["loss_per_sample"])


@settings(max_examples=16, deadline=None)
@given(mask=hnp.arrays(bool, (B, S)),
       logits=hnp.arrays(np.float32, (B, S), elements=st.floats(-8, 8, width=32)),
       loss_type=st.sampled_from(["binary_sm", "binary_ce"]))
def test_gradient_at_known_bits_is_exactly_zero(mask, logits, loss_type):
    # (b) d loss / d logit is 0.0 exactly at every known bit (and not identically 0 elsewhere).
    bits = (np.arange(B * S).reshape(B, S) % 3 == 0).astype(np.uint8)
    sigma = jnp.asarray([0.1, 0.5, 2.0, 9.0], jnp.float32)
    def loss(z):
        return loss_from_logits(z, bits, sigma, loss_type=loss_type, weighting="edm",
                                sigma_data=0.5, target_mask=~mask)[0]

    grad = jax.grad(loss)(jnp.asarray(logits))
    grad = np.asarray(grad)
    assert np.all(grad[mask] == 0.0)
    assert np.all(np.isfinite(grad))
    if loss_type == "binary_ce":  # BCE's slope is ≥ 1 - sigmoid(8) ≈ 3e-4 ≫ float32 eps here
        assert np.all(grad[~mask] != 0.0)


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_no_mask_is_the_unmasked_loss(params):
    # (c) without a mask nothing changes: the loss is its pieces recomputed by hand, bit for bit,
    # and the no-key-drawn mask path (all bits target) agrees up to summation order.
    bits, sigma, noise = _batch(3)

    def by_hand(params, bits, sigma, noise):  # the unconditional loss's pieces, as before masks
        x_t = sigma[:, None] * noise + bits.astype(jnp.float32)
        logits = denoise(params, x_t, sigma, jnp.zeros_like(x_t), cfg=CFG)
        return loss_from_logits(logits, bits, sigma, loss_type=DIFF.loss_type,
                                weighting=DIFF.loss_weighting, sigma_data=0.5)[0]

    # Op by op: two compiled programs may contract a multiply-add differently (1 ulp, seen on
    # jax 0.12); evaluated operation by operation the two must agree exactly.
    with jax.disable_jit():
        loss, aux = LOSS(params, bits, sigma, jax.random.key(1), model_cfg=CFG, diffusion_cfg=DIFF,
                         train=False, noise=noise, sc_mask=jnp.zeros(B, bool))
        want = by_hand(params, bits, sigma, noise)
    assert "cond_mask" not in aux
    np.testing.assert_array_equal(loss, want)
    nothing_known, _ = LOSS(params, bits, sigma, jax.random.key(1), model_cfg=CFG,
                            diffusion_cfg=DIFF, train=False, noise=noise,
                            sc_mask=jnp.zeros(B, bool), cond_mask=jnp.zeros((B, S), bool))
    # Same positive terms summed in two orders (all [B,S] at once vs per row then rows): each
    # sum of n terms is within (n-1)·u relatively, the divisions add 2u: |Δ| ≤ 2(BS+2)u·loss.
    np.testing.assert_allclose(nothing_known, loss, rtol=2 * (B * S + 2) * U, atol=0)


def test_loss_is_normalised_over_target_bits():
    # (d) logits 0 -> D = ½ exactly; logit 30 -> D = 1.0 exactly in float32. Unit weighting, MSE:
    # row 0 targets (.25, 0, .25) -> 1/6; row 1 targets (.25, 1) -> 5/8; row 2 all known -> 0.
    logits = jnp.asarray([[30, 0, 30, 0], [0, 30, 30, 30], [0, 0, 0, 0]], jnp.float32)
    bits = np.asarray([[0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], np.uint8)
    known = np.asarray([[1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], bool)
    loss, aux = loss_from_logits(logits, bits, jnp.ones(3), loss_type="binary_sm",
                                 weighting="unit", sigma_data=0.5, target_mask=~known)
    rows = np.asarray([np.float32(0.5) / np.float32(3), 0.625, 0.0], np.float32)
    # Each row: an exact sum of representable values then one division (½ ulp); the batch mean
    # adds two sums and a division: at most 4 roundings, so rtol 4u.
    np.testing.assert_allclose(aux["loss_per_sample"], rows, rtol=4 * U, atol=0)
    np.testing.assert_allclose(loss, rows.sum() / 3, rtol=4 * U, atol=0)
    np.testing.assert_allclose(aux["mse_per_sample"][:2], rows[:2], rtol=4 * U, atol=0)
    assert np.isnan(aux["mse_per_sample"][2])  # no target bits: the schedule skips this row


def test_condition_dropout(params):
    # (e) p = 1 drops every row's condition (= an all-target mask, and the unmasked loss up to
    # summation order); p = 0 keeps the mask; p = ½ drops whole rows and changes nothing else.
    bits, sigma, noise = _batch(7)
    mask = np.zeros((B, S), bool)
    mask[:, : S // 2] = True
    dropped = dataclasses.replace(DIFF, cond_dropout=1.0)
    kept = dataclasses.replace(DIFF, cond_dropout=0.0)
    all_target, aux_t = _loss(params, bits, sigma, noise, np.zeros((B, S), bool), kept)
    masked, aux_m = _loss(params, bits, sigma, noise, mask, kept)
    unmasked, _ = _loss(params, bits, sigma, noise, None, kept)
    p1, aux1 = _loss(params, bits, sigma, noise, mask, dropped)
    np.testing.assert_array_equal(p1, all_target)
    assert not np.any(aux1["cond_mask"])
    np.testing.assert_allclose(p1, unmasked, rtol=2 * (B * S + 2) * U, atol=0)  # as in (c)
    np.testing.assert_array_equal(aux_m["cond_mask"], mask)
    assert masked != all_target
    half = dataclasses.replace(DIFF, cond_dropout=0.5)
    seen = set()
    for key in range(4):
        _, aux = _loss(params, bits, sigma, noise, mask, half, key=key)
        effective = np.asarray(aux["cond_mask"])
        drop = ~effective.any(axis=1)
        seen.update(drop.tolist())
        np.testing.assert_array_equal(effective[~drop], mask[~drop])  # whole rows or nothing
        # Same key, dropout off, the effective mask given: the same loss bit for bit, so the
        # dropout draw changes the mask and nothing else (ε and the SC rows are the same draws).
        # Op by op (no compiler fusion that could differ between the two programs).
        with jax.disable_jit():
            want = _loss(params, bits, sigma, noise, effective, kept, key=key)[0]
            got = _loss(params, bits, sigma, noise, mask, half, key=key)[0]
        np.testing.assert_array_equal(got, want)
    assert seen == {True, False}


def test_cond_dropout_is_validated():
    from bitgen.config import ConfigError

    with pytest.raises(ConfigError, match="cond_dropout"):
        validate(ExperimentConfig(diffusion=DiffusionConfig(cond_dropout=1.5)))


def _tiny_experiment():
    return validate(ExperimentConfig(
        model=dataclasses.replace(CFG, dropout=0.1),
        diffusion=DIFF,  # cond_dropout 0: every known bit stays known (dropout: test above)
        entropy=EntropyScheduleConfig(buffer_size=64, num_bins=4, min_per_bin=1, update_every=2,
                                      warmup_steps=0, transition_steps=1),
        data=DataConfig(batch_size=B), optim=OptimConfig(warmup_steps=1, grad_accum=2),
        mesh=MeshConfig(data=1), train=TrainConfig(steps=10)))


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_train_program_takes_masks():
    # A tiny CoBit trained through build_train_program on batches that carry "cond_mask": an
    # all-known batch has loss 0 and gradient 0 (the known bits contribute nothing, and its rows
    # reach the entropy schedule as NaN, which the table drops); a prefix mask trains normally.
    cfg = _tiny_experiment()
    program = build_train_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = program.init_state()
    rng = np.random.default_rng(0)
    prefix = np.zeros((B, S), bool)
    prefix[:, :5] = True
    losses = {}
    for step, (name, mask) in enumerate([("all_known", np.ones((B, S), bool)), ("prefix", prefix),
                                         ("all_known", np.ones((B, S), bool)), ("prefix", prefix)]):
        bits = rng.integers(0, 2, (B, S)).astype(np.uint8)
        state, metrics = program.step_fn(state, {"bits": bits, "cond_mask": mask})
        assert bool(metrics["finite"])
        losses.setdefault(name, []).append((float(metrics["loss"]), float(metrics["grad_norm"])))
        pushed = np.asarray(jax.device_get(state.schedule.buffer_metric))[step * B:(step + 1) * B]
        if name == "all_known":
            assert losses[name][-1] == (0.0, 0.0)
            assert np.all(np.isnan(pushed))
        else:
            assert np.all(np.isfinite(pushed))
    for loss, grad_norm in losses["prefix"]:
        assert loss > 0 and grad_norm > 0
    assert int(state.step) == 4
    assert bool(jax.device_get(state.schedule.table_ready))
    assert np.all(np.isfinite(np.asarray(jax.device_get(state.schedule.table.pdf))))


def test_the_train_program_reads_the_optional_inputs_the_data_has():
    """The loop hands the step its input and the optional entries a batch carries (cond_mask)."""
    from bitgen.train.program import TrainProgram

    program = TrainProgram(None, None, None, None, None, "bits", ("cond_mask",))
    assert program.batch_of({"bits": 1, "cond_mask": 2, "ids": 3}) == {"bits": 1, "cond_mask": 2}
    assert program.batch_of({"bits": 1, "ids": 3}) == {"bits": 1}

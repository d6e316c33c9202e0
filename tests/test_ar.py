"""AR transformer: causality, KV-cache decoding equals recompute, sampling rules, training signal."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitgen.nn import ar

CFG = ar.ARConfig(vocab_size=23, seq_len=16, embed_dim=32, n_heads=4, n_blocks=2, dim_ff=96, dropout=0.0)


@pytest.fixture(scope="module")
def params():
    return ar.init_ar_params(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def logits_fn():
    return jax.jit(functools.partial(ar.ar_logits, cfg=CFG))


def random_ids(seed: int, shape=(2, CFG.seq_len)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def test_params_carry_logical_axes():
    boxed = jax.eval_shape(ar.ARTransformer(CFG).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert boxed["embed"]["embedding"].names == ("vocab", "embed")
    assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")
    assert boxed["block_0"]["attn"]["qkv_proj"]["kernel"].names == ("embed", "heads")


@settings(max_examples=5, deadline=None)
@given(position=st.integers(0, CFG.seq_len - 1), seed=st.integers(0, 1000))
def test_causality(params, logits_fn, position, seed):
    """Changing token t leaves the logits at positions < t unchanged, and changes position t."""
    ids = random_ids(seed)
    changed = ids.at[:, position].set((ids[:, position] + 1) % CFG.vocab_size)
    a, b = logits_fn(params, ids), logits_fn(params, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :position]), np.asarray(b[:, :position]))
    assert not np.allclose(np.asarray(a[:, position]), np.asarray(b[:, position]))


@pytest.mark.parametrize("chunk", [1, 5])
def test_kv_cache_decoding_equals_full_recompute(params, logits_fn, chunk):
    """Feeding the sequence through the cache (token by token, or a prefill chunk then tokens)
    gives the full-sequence logits at every position."""
    ids = random_ids(1)
    full = logits_fn(params, ids)
    decode = jax.jit(functools.partial(ar.ar_decode_step, cfg=CFG))
    cache = ar.init_kv_cache(CFG, ids.shape[0], CFG.seq_len)
    got, start = [], 0
    for size in [chunk] + [1] * (CFG.seq_len - chunk):
        logits, cache = decode(params, cache, ids[:, start : start + size])
        got.append(logits)
        start += size
    np.testing.assert_allclose(np.asarray(jnp.concatenate(got, axis=1)), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_greedy_sampling_is_deterministic_and_matches_recompute(params, logits_fn):
    prompt = jnp.array([[3, 7, 1], [5, 5, 2]])
    sample = functools.partial(ar.ar_sample, cfg=CFG, length=10)
    greedy = sample(params, jax.random.key(1), prompt, temperature=0.0)
    again = sample(params, jax.random.key(2), prompt, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(again))
    # A vanishing nucleus keeps only the arg-max token, whatever the key.
    tiny_p = sample(params, jax.random.key(3), prompt, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(tiny_p), np.asarray(greedy))
    np.testing.assert_array_equal(np.asarray(greedy[:, :3]), np.asarray(prompt))
    # Every generated token is the arg-max of a full recompute over its prefix.
    full = logits_fn(params, greedy)
    np.testing.assert_array_equal(np.asarray(greedy[:, 3:]), np.asarray(jnp.argmax(full[:, 2:-1], axis=-1)))


def test_ragged_prompts_are_kept_then_continued(params):
    prompt = jnp.array([[4, 9, 9, 9], [6, 8, 0, 0]])
    out = ar.ar_sample(params, jax.random.key(0), prompt, cfg=CFG, length=8,
                       prompt_lengths=jnp.array([4, 2]), temperature=1.0)
    assert out.shape == (2, 8) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[0, :4]), [4, 9, 9, 9])
    np.testing.assert_array_equal(np.asarray(out[1, :2]), [6, 8])
    assert int(out.max()) < CFG.vocab_size


def test_sample_next_token_frequencies_follow_nucleus():
    """top-p keeps the smallest most-likely set reaching p and renormalises (statistical check)."""
    probs = jnp.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(probs), (20000, 1))
    draws = ar.sample_next_token(logits, jax.random.key(0), temperature=1.0, top_p=0.7)
    freq = np.bincount(np.asarray(draws), minlength=4) / draws.shape[0]
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0], atol=0.015)
    untruncated = ar.sample_next_token(logits, jax.random.key(1), temperature=1.0, top_p=1.0)
    np.testing.assert_allclose(np.bincount(np.asarray(untruncated), minlength=4) / 20000, probs, atol=0.015)


def test_loss_decreases_on_repeated_pattern():
    cfg = ar.ARConfig(vocab_size=11, seq_len=12, embed_dim=32, n_heads=2, n_blocks=1, dim_ff=64, dropout=0.1)
    ids = jnp.tile(jnp.array([1, 4, 2, 8, 5, 7]), (4, 2))  # [4, 12]
    params = ar.init_ar_params(jax.random.key(0), cfg)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, step):
        key = jax.random.fold_in(jax.random.key(1), step)
        (loss, _), grads = jax.value_and_grad(
            functools.partial(ar.ar_loss, cfg=cfg, train=True), has_aux=True)(params, ids, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(functools.partial(ar.ar_loss, cfg=cfg, train=False))
    initial, _ = eval_loss(params, ids, None)
    for step in range(50):
        params, opt_state, _ = train_step(params, opt_state, step)
    final, aux = eval_loss(params, ids, None)
    assert float(initial) > 2.0  # ~ln 11 at init
    assert float(final) < 0.3 * float(initial)
    assert float(aux["accuracy"]) > 0.7


def test_sequence_nll_agrees_with_loss(params, logits_fn):
    ids = random_ids(4)
    nll, n = jax.jit(functools.partial(ar.sequence_nll, cfg=CFG))(params, ids, jnp.ones(ids.shape, bool))
    loss, _ = jax.jit(functools.partial(ar.ar_loss, cfg=CFG, train=False))(params, ids, None)
    np.testing.assert_array_equal(np.asarray(n), [CFG.seq_len - 1] * 2)
    np.testing.assert_allclose(float(nll.sum() / n.sum()), float(loss), rtol=1e-5)


def test_dropout_requires_key_and_config_is_validated(params):
    cfg = ar.ARConfig(**(CFG.__dict__ | {"dropout": 0.1}))
    with pytest.raises(ValueError, match="PRNG key"):
        ar.ar_logits(params, random_ids(0), cfg=cfg, train=True)
    with pytest.raises(ValueError, match="n_heads"):
        ar.ARConfig(embed_dim=30, n_heads=4)


def test_sharded_forward_equals_unsharded(params, logits_fn):
    """Params laid out by the logical-axis rules on a (data, fsdp, tensor) = (2, 2, 2) mesh."""
    from bitgen import parallel
    from bitgen.config import MeshConfig

    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = {"vocab": None} | dict(parallel.LOGICAL_RULES)  # vocab 23 does not divide; replicate it
    shardings = parallel.tree_shardings(mesh, params, ar.param_logical_axes(CFG), rules)
    ids = random_ids(5, (4, CFG.seq_len))
    sharded = logits_fn(jax.device_put(params, shardings), jax.device_put(ids, parallel.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(logits_fn(params, ids)), rtol=1e-5, atol=1e-5)

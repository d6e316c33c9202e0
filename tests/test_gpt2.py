"""GPT-2 loader and forward: checkpoints written here in HF key layout, checked against an
independent numpy forward pass (and HF ``transformers`` when installed)."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitgen.nn import gpt2

HF_CONFIG = {
    "model_type": "gpt2",
    "vocab_size": 37,
    "n_positions": 12,
    "n_embd": 16,
    "n_layer": 2,
    "n_head": 2,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
}


def random_state_dict(seed: int = 0, prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """A random GPT-2 in HF key names and Conv1D [in, out] layout."""
    rng = np.random.default_rng(seed)
    e, v, n = HF_CONFIG["n_embd"], HF_CONFIG["vocab_size"], HF_CONFIG["n_positions"]

    def w(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    state = {f"{prefix}wte.weight": w(v, e), f"{prefix}wpe.weight": w(n, e)}
    for i in range(HF_CONFIG["n_layer"]):
        h = f"{prefix}h.{i}."
        state |= {
            h + "ln_1.weight": 1 + w(e, scale=0.1), h + "ln_1.bias": w(e, scale=0.1),
            h + "attn.c_attn.weight": w(e, 3 * e), h + "attn.c_attn.bias": w(3 * e, scale=0.1),
            h + "attn.c_proj.weight": w(e, e), h + "attn.c_proj.bias": w(e, scale=0.1),
            h + "ln_2.weight": 1 + w(e, scale=0.1), h + "ln_2.bias": w(e, scale=0.1),
            h + "mlp.c_fc.weight": w(e, 4 * e), h + "mlp.c_fc.bias": w(4 * e, scale=0.1),
            h + "mlp.c_proj.weight": w(4 * e, e), h + "mlp.c_proj.bias": w(e, scale=0.1),
        }
    state |= {f"{prefix}ln_f.weight": 1 + w(e, scale=0.1), f"{prefix}ln_f.bias": w(e, scale=0.1)}
    return state


def numpy_gpt2_logits(state: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Textbook GPT-2 forward in float64 numpy: ids [B, T] -> logits [B, T, V]."""
    s = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in state.items()}
    n_head, eps = HF_CONFIG["n_head"], HF_CONFIG["layer_norm_epsilon"]

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * s[name + ".weight"] + s[name + ".bias"]

    def conv1d(x, name):
        return x @ s[name + ".weight"] + s[name + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b, t = ids.shape
    x = s["wte.weight"][ids] + s["wpe.weight"][np.arange(t)]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(HF_CONFIG["n_layer"]):
        h = f"h.{i}."
        q, k, v = np.split(conv1d(ln(x, h + "ln_1"), h + "attn.c_attn"), 3, axis=-1)
        heads = lambda a: a.reshape(b, t, n_head, -1).transpose(0, 2, 1, 3)
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        x = x + conv1d(attn, h + "attn.c_proj")
        x = x + conv1d(gelu_tanh(conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return ln(x, "ln_f") @ s["wte.weight"].T


def write_safetensors(tmp_path, state, config=HF_CONFIG):
    from safetensors.numpy import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


IDS = np.array([[1, 5, 9, 36, 0, 7, 7, 2], [3, 3, 3, 20, 11, 4, 30, 1]], np.int32)


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_safetensors_load_matches_numpy_forward(tmp_path, prefix):
    state = random_state_dict(prefix=prefix)
    state[f"{prefix.replace('transformer.', '')}lm_head.weight"] = state[f"{prefix}wte.weight"]
    params, cfg = gpt2.load_gpt2(write_safetensors(tmp_path, state))
    assert (cfg.embed_dim, cfg.n_blocks, cfg.dim_ff, cfg.n_positions) == (16, 2, 64, 12)
    got = np.asarray(gpt2.gpt2_logits(params, jnp.asarray(IDS), cfg=cfg))
    want = numpy_gpt2_logits(state, IDS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pytorch_bin_load_matches_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    state = random_state_dict(seed=1)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(tmp_path / "pytorch_model.bin"))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    params, cfg = gpt2.load_gpt2(tmp_path)
    got = np.asarray(gpt2.gpt2_logits(params, jnp.asarray(IDS), cfg=cfg))
    np.testing.assert_allclose(got, numpy_gpt2_logits(state, IDS), rtol=1e-4, atol=1e-4)


def test_matches_transformers_when_installed(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(**{k: v for k, v in HF_CONFIG.items() if k != "model_type"},
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    model.save_pretrained(str(tmp_path))  # writes model.safetensors + config.json
    params, cfg = gpt2.load_gpt2(tmp_path)
    with torch.no_grad():
        want = model(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
    got = np.asarray(gpt2.gpt2_logits(params, jnp.asarray(IDS), cfg=cfg))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_missing_and_mismatched_keys_are_named(tmp_path):
    state = random_state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.ln_f.weight"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias(.|\n)*ln_f\.weight: checkpoint \(5,\)"):
        gpt2.load_gpt2(write_safetensors(tmp_path, state))


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        gpt2.load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        gpt2.load_gpt2(tmp_path)


def test_unsupported_config_is_rejected():
    with pytest.raises(ValueError, match="activation_function"):
        gpt2.GPT2Config.from_hf(HF_CONFIG | {"activation_function": "relu"})


def test_sequence_nll_scores_windows_independently(tmp_path):
    """Long texts are cut into n_positions windows; each window's first token is unscored."""
    state = random_state_dict(seed=2)
    params, cfg = gpt2.load_gpt2(write_safetensors(tmp_path, state))
    rng = np.random.default_rng(0)
    window = cfg.n_positions
    ids = rng.integers(0, cfg.vocab_size, (2, 2 * window + 5)).astype(np.int32)
    lengths = np.array([ids.shape[1], window + 3])
    mask = np.arange(ids.shape[1])[None] < lengths[:, None]
    score = jax.jit(functools.partial(gpt2.sequence_nll, cfg=cfg))
    nll, n_scored = score(params, jnp.asarray(ids), jnp.asarray(mask))

    want_nll, want_n = np.zeros(2), np.zeros(2, int)
    for row in range(2):
        for start in range(0, lengths[row], window):
            chunk = ids[row : row + 1, start : min(start + window, lengths[row])]
            logits = numpy_gpt2_logits(state, chunk)[0]
            log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            want_nll[row] -= log_probs[np.arange(chunk.shape[1] - 1), chunk[0, 1:]].sum()
            want_n[row] += chunk.shape[1] - 1
    np.testing.assert_array_equal(np.asarray(n_scored), want_n)
    np.testing.assert_allclose(np.asarray(nll), want_nll, rtol=1e-4)


def test_bfloat16_compute_stays_close():
    cfg = gpt2.GPT2Config(vocab_size=37, n_positions=12, embed_dim=16, n_heads=2, n_blocks=1, dim_ff=64)
    params = gpt2.init_gpt2_params(jax.random.key(0), cfg)
    bf16 = gpt2.GPT2Config(**(cfg.__dict__ | {"compute_dtype": "bfloat16"}))
    full = jax.jit(functools.partial(gpt2.gpt2_logits, cfg=cfg))(params, jnp.asarray(IDS))
    low = jax.jit(functools.partial(gpt2.gpt2_logits, cfg=bf16))(params, jnp.asarray(IDS))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), np.asarray(full), atol=5e-2)


def test_bfloat16_safetensors_load(tmp_path):
    """bf16 checkpoints (numpy has no bf16) load as float32 copies of the stored values."""
    from safetensors.flax import save_file

    state = {k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32)) for k, v in random_state_dict(3).items()}
    save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    params, cfg = gpt2.load_gpt2(tmp_path)
    got = np.asarray(jax.jit(functools.partial(gpt2.gpt2_logits, cfg=cfg))(params, jnp.asarray(IDS)))
    np.testing.assert_allclose(got, numpy_gpt2_logits(state, IDS), rtol=1e-4, atol=1e-4)


def test_encoder_adds_no_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({"<bos>": 0, "hello": 1, "world": 2}, unk_token="<bos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer.encode("hello world").ids == [0, 1, 2]
    assert gpt2.load_gpt2_encoder(tmp_path)("hello world") == [1, 2]

"""GPT-2 family causal LM (inference only) and loading of Hugging Face GPT-2 checkpoints.

GPT-2 Large is the GenPPL evaluator of cobit-spec §6.1. The architecture is HF ``GPT2LMHeadModel``:
learned absolute positions (added to the embeddings, outside attention), pre-LayerNorm blocks,
``bitgen.nn.attention.Attention`` (causal, no RoPE, fused qkv ``c_attn``), GELU (tanh
approximation) MLP, final LayerNorm and an LM head tied to the token embedding. HF stores its
``Conv1D`` weights as [in, out], which is exactly a Flax Dense kernel, so loading is a renaming.

Public API:
  GPT2Config, GPT2Config.from_hf(dict)
  init_gpt2_params(key, cfg) -> params
  gpt2_logits(params, ids [B,T], *, cfg) -> logits [B,T,V] float32
  sequence_nll(params, ids [B,T], mask [B,T], *, cfg) -> (nll_sum [B], n_scored [B])
  load_gpt2(model_dir) -> (params, cfg)      # config.json + model.safetensors | pytorch_model.bin
  load_gpt2_encoder(model_dir) -> encode(text) -> list[int]   # tokenizer.json, no special tokens
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from bitgen.nn.nll import windowed_sequence_nll
from bitgen.nn.attention import Attention
from bitgen.nn.layers import dense

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# HF activation names that all mean GELU with the tanh approximation.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Non-parameter buffers some GPT-2 checkpoints carry (causal-mask tables); safe to ignore.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters (HF field names in comments). Defaults: GPT-2 small."""

    vocab_size: int = 50257
    n_positions: int = 1024  # context length; also the GenPPL scoring window
    embed_dim: int = 768  # n_embd
    n_heads: int = 12  # n_head
    n_blocks: int = 12  # n_layer
    dim_ff: int = 3072  # n_inner (None in HF = 4 * n_embd)
    layer_norm_eps: float = 1e-5  # layer_norm_epsilon
    compute_dtype: str = "float32"  # float32 | bfloat16 activations; params stay float32

    def __post_init__(self):
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not one of {tuple(_DTYPES)}")
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by n_heads={self.n_heads}")

    @classmethod
    def from_hf(cls, hf: Mapping, *, compute_dtype: str = "float32") -> GPT2Config:
        """Build from a HF ``config.json`` dict; reject settings this implementation does not model."""
        activation = hf.get("activation_function", "gelu_new")
        if activation not in _TANH_GELU:
            raise ValueError(f"activation_function={activation!r} is not supported; GPT-2 uses "
                             f"one of {_TANH_GELU}")
        for flag, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if hf.get(flag, supported) != supported:
                raise ValueError(f"config.json sets {flag}={hf[flag]!r}; only {supported} is supported")
        missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks the GPT-2 fields {missing}")
        embed_dim = int(hf["n_embd"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            embed_dim=embed_dim,
            n_heads=int(hf["n_head"]),
            n_blocks=int(hf["n_layer"]),
            dim_ff=int(hf.get("n_inner") or 4 * embed_dim),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            compute_dtype=compute_dtype,
        )


def _layer_norm(cfg: GPT2Config, name: str) -> nn.LayerNorm:
    # Statistics in float32 whatever the compute dtype.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class _MLP(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, h_BxTxE: jax.Array) -> jax.Array:
        dtype = _DTYPES[self.cfg.compute_dtype]
        h = dense(self.cfg.dim_ff, ("embed", "mlp"), name="c_fc", dtype=dtype)(h_BxTxE)
        return dense(h_BxTxE.shape[-1], ("mlp", "embed"), name="c_proj", dtype=dtype)(jax.nn.gelu(h, approximate=True))


class _Block(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, x_BxTxE: jax.Array) -> jax.Array:
        dtype = _DTYPES[self.cfg.compute_dtype]
        h = _layer_norm(self.cfg, "ln_1")(x_BxTxE).astype(dtype)
        y, _ = Attention(self.cfg.n_heads, block_size=1, use_rope=False, qkv_name="c_attn",
                         out_name="c_proj", dtype=dtype, name="attn")(h)
        x_BxTxE = x_BxTxE + y.astype(x_BxTxE.dtype)
        h = _layer_norm(self.cfg, "ln_2")(x_BxTxE).astype(dtype)
        return x_BxTxE + _MLP(self.cfg, name="mlp")(h).astype(x_BxTxE.dtype)


class GPT2(nn.Module):
    """ids [B, T] -> logits [B, T, V] (float32)."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, ids_BxT: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = _DTYPES[cfg.compute_dtype]
        wte = nn.Embed(
            cfg.vocab_size, cfg.embed_dim,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="wte",
        )
        wpe = nn.Embed(
            cfg.n_positions, cfg.embed_dim,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
            name="wpe",
        )
        length = ids_BxT.shape[1]
        x_BxTxE = wte(ids_BxT) + wpe(jnp.arange(length))[None]
        for i in range(cfg.n_blocks):
            x_BxTxE = _Block(cfg, name=f"h_{i}")(x_BxTxE)
        x_BxTxE = _layer_norm(cfg, "ln_f")(x_BxTxE).astype(dtype)
        # Tied LM head: logits = x · wteᵀ, in the compute dtype (the residual stream stays float32).
        logits = jnp.einsum("bte,ve->btv", x_BxTxE, wte.embedding.astype(dtype))
        return logits.astype(jnp.float32)


def init_gpt2_params(key: jax.Array, cfg: GPT2Config) -> dict:
    """Randomly initialised parameters (HF initialiser scales), logical-axis boxes removed."""
    ids = jnp.zeros((1, min(8, cfg.n_positions)), jnp.int32)
    # One compiled init instead of op-by-op dispatch of every initialiser.
    return jax.jit(lambda k: nn.unbox(GPT2(cfg).init(k, ids))["params"])(key)


def gpt2_logits(params: dict, ids: jax.Array, *, cfg: GPT2Config) -> jax.Array:
    """ids [B, T] (T <= n_positions) -> next-token logits [B, T, V] float32."""
    if ids.shape[-1] > cfg.n_positions:
        raise ValueError(f"sequence length {ids.shape[-1]} exceeds n_positions={cfg.n_positions}; "
                         "use sequence_nll, which scores long texts in windows")
    return GPT2(cfg).apply({"params": params}, ids)


def sequence_nll(
    params: dict, ids: jax.Array, mask: jax.Array, *, cfg: GPT2Config
) -> tuple[jax.Array, jax.Array]:
    """Per-row NLL sum (nats) and scored-token count, windows of n_positions (spec §6.1)."""
    window = min(cfg.n_positions, ids.shape[1])
    return windowed_sequence_nll(lambda w: gpt2_logits(params, w, cfg=cfg), ids, mask, window=window)


# --------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints


def _hf_name(path: tuple[str, ...]) -> str:
    """Flax parameter path -> HF state-dict key (without the optional ``transformer.`` prefix)."""
    *modules, leaf = path
    names = [m.replace("h_", "h.", 1) if m.startswith("h_") else m for m in modules]
    names.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(names)


def _read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    safetensors_path = model_dir / "model.safetensors"
    torch_path = model_dir / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors import safe_open

        def read(framework: str) -> dict[str, np.ndarray]:
            with safe_open(str(safetensors_path), framework=framework) as f:
                return {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}  # noqa: SIM118 (not iterable)

        try:
            return read("np")
        except TypeError:  # bfloat16 tensors: numpy has no such dtype, JAX arrays do
            return read("flax")
    if torch_path.is_file():
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{torch_path} is a PyTorch pickle and needs torch "
                              "(pip install 'bitgen[torch]'), or convert it to model.safetensors") from err
        state = torch.load(str(torch_path), map_location="cpu", weights_only=True)
        return {name: t.detach().float().numpy() for name, t in state.items()}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {model_dir}")


def params_from_state_dict(state: Mapping[str, np.ndarray], cfg: GPT2Config) -> dict:
    """Map a HF GPT-2 state dict (with or without the ``transformer.`` prefix) onto bitgen params.

    Raises ValueError naming every missing key, unexpected key or shape mismatch.
    """
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    abstract = jax.eval_shape(lambda: init_gpt2_params(jax.random.key(0), cfg))
    flat_abstract = traverse_util.flatten_dict(abstract)
    flat, missing, mismatched, used = {}, [], [], set()
    for path, spec in flat_abstract.items():
        name = _hf_name(path)
        if name not in state:
            missing.append(name)
            continue
        array = np.asarray(state[name], np.float32)
        if array.shape != spec.shape:
            mismatched.append(f"{name}: checkpoint {array.shape}, model {spec.shape}")
            continue
        flat[path] = jnp.asarray(array)
        used.add(name)
    # The tied head is a copy of wte when present; buffers hold no parameters.
    unexpected = sorted(k for k in state if k not in used and k != "lm_head.weight"
                        and not k.endswith(_IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if mismatched:
        problems.append(f"shape mismatches (is config.json the right one?): {mismatched}")
    if unexpected:
        problems.append(f"unexpected keys (not a GPT2LMHeadModel/GPT2Model checkpoint?): {unexpected}")
    if problems:
        raise ValueError("cannot load GPT-2 weights: " + "; ".join(problems))
    head = state.get("lm_head.weight")
    if head is not None and not np.array_equal(np.asarray(head, np.float32), np.asarray(flat[("wte", "embedding")])):
        raise ValueError("lm_head.weight differs from transformer.wte.weight; bitgen's GPT-2 ties them")
    return traverse_util.unflatten_dict(flat)


def load_gpt2(model_dir: str | Path, *, compute_dtype: str = "float32") -> tuple[dict, GPT2Config]:
    """Load a local HF GPT-2 directory: config.json + model.safetensors (or pytorch_model.bin)."""
    model_dir = Path(model_dir).expanduser()
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; a GPT-2 directory needs config.json and "
                                "model.safetensors (e.g. from huggingface-cli download openai-community/gpt2-large)")
    cfg = GPT2Config.from_hf(json.loads(config_path.read_text()), compute_dtype=compute_dtype)
    return params_from_state_dict(_read_state_dict(model_dir), cfg), cfg


def load_gpt2_encoder(model_dir: str | Path) -> Callable[[str], list[int]]:
    """The GPT-2 tokenizer of ``model_dir/tokenizer.json`` as text -> ids, no special tokens (§6.1)."""
    from tokenizers import Tokenizer

    path = Path(model_dir).expanduser() / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; download tokenizer.json alongside the weights")
    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids

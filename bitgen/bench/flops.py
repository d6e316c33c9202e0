"""The analytic FLOP model: matmul FLOPs (2 per MAC) of the SDT forward, a train step, the
head comparison's heads, and the passes of the generation benchmark (AR decode step, BitLM
backbone and diffusion head). Elementwise work is not counted (the usual MFU convention).

Dense FLOPs are read off the parameter shapes (every ``kernel`` leaf [fan_in, fan_out] costs
2·fan_in·fan_out per row it is applied to), so a layer added to a model is counted without
editing this module; only the rows-per-kernel rule is written here, per model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax

from bitgen.config import ModelConfig

if TYPE_CHECKING:
    from bitgen.nn.ar import ARConfig
    from bitgen.nn.bitlm import BitLMConfig


def kernels(shapes: Any) -> list[tuple[tuple[str, ...], int, int]]:
    """``(path, fan_in, fan_out)`` of every Dense kernel in a parameter (shape) pytree."""
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    out = []
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        if path[-1] == "kernel":
            fan_in, fan_out = leaf.shape
            out.append((path, fan_in, fan_out))
    return out


def kernel_flops(shapes: Any, rows: Callable[[tuple[str, ...]], int]) -> float:
    """Σ over Dense kernels of 2·fan_in·fan_out·rows(path)."""
    return sum(2.0 * fan_in * fan_out * rows(path) for path, fan_in, fan_out in kernels(shapes))


def _kernel_rows(path: tuple[str, ...], cfg: ModelConfig) -> int:
    """How many rows per sequence a Dense kernel is applied to in one SDT forward.

    adaLN modulations and the σ embedding act once per sequence; the shared Linear(1→C) acts on
    both input channels of every bit; the head's input adapter and mixer act per bit; everything
    else (patch projection, trunk, un-patch, the head's patch adapter) acts per token.
    """
    module = path[-2]
    if any(part.startswith("adaln") for part in path) or module.startswith("time_"):
        return 1
    if module == "cont_input_proj":
        return 2 * cfg.seq_bits
    if path[0] == "head" and module in ("input_adapter", "mixer_0", "mixer_3"):
        return cfg.seq_bits
    return cfg.seq_tokens


def dense_layers(cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """``(fan_in, fan_out, rows per sequence)`` of every Dense kernel of the SDT."""
    from bitgen.diffusion.denoiser import param_shapes

    return [(fan_in, fan_out, _kernel_rows(path, cfg))
            for path, fan_in, fan_out in kernels(param_shapes(cfg))]


def sdt_chunk_dense_flops(cfg: ModelConfig, tokens: int, *, head: bool = True) -> float:
    """Dense FLOPs of the SDT's kernels over a chunk of ``tokens`` tokens with one σ level (the
    block SDT's pass over one block; ``forward_flops``' dense part when tokens = T).
    ``head=False``: the trunk only, without the un-patch projection and the per-bit head (a
    clean block written to a KV cache)."""
    from bitgen.diffusion.denoiser import param_shapes

    chunk = dataclasses.replace(cfg, seq_tokens=tokens)
    return sum(2.0 * fan_in * fan_out * _kernel_rows(path, chunk)
               for path, fan_in, fan_out in kernels(param_shapes(chunk))
               if head or not (path[0] == "head" or path[-2] == "unpatch_proj_content"))


def forward_flops(cfg: ModelConfig) -> dict[str, float]:
    """FLOPs of one SDT forward for ONE sequence, counting matmuls only (2 FLOPs per MAC).

    ``dense``: Σ over Dense kernels of 2·fan_in·fan_out·rows (rows per ``_kernel_rows``);
    ``attention``: 2 batched matmuls per block (QKᵀ and PV), 2·2·T²·E per block.
    Elementwise work (norms, SiLU, softmax, RoPE, the matched filter) is not counted, as in the
    usual MFU convention; ``activation_elements`` bounds it.
    """
    dense_flops = sum(2.0 * fan_in * fan_out * rows for fan_in, fan_out, rows in dense_layers(cfg))
    attention = cfg.n_blocks * 4.0 * cfg.seq_tokens**2 * cfg.embed_dim
    return {"dense": dense_flops, "attention": attention, "total": dense_flops + attention}


def activation_elements(cfg: ModelConfig) -> int:
    """Elements the matmuls of one SDT forward (ONE sequence) produce: Σ fan_out·rows over the
    Dense kernels plus the H·T² attention scores of every block.

    Every elementwise op ``forward_flops`` leaves out (bias, norm, modulation, gate, residual,
    RoPE, softmax, SiLU) reads a tensor no larger than one of these outputs, so the omitted work
    is at most a fixed number of ops per element (see tests/test_bench.py).
    """
    dense = sum(fan_out * rows for _, fan_out, rows in dense_layers(cfg))
    return dense + cfg.n_blocks * cfg.n_heads * cfg.seq_tokens**2


def train_step_flops(cfg: ModelConfig, batch: int, *, self_conditioning: bool) -> float:
    """Model FLOPs of one training step: (3 + sc)·batch·forward_flops.

    Forward + backward = 3× the forward (the backward computes gradients w.r.t. both activations
    and weights: 2× forward). With self-conditioning the step runs one extra gradient-free forward
    over the whole batch (rows not selected are masked afterwards, but still computed). Remat
    recomputation and the optimizer update are not model FLOPs and are not counted.
    """
    passes = 3 + (1 if self_conditioning else 0)
    return passes * batch * forward_flops(cfg)["total"]


def head_flops(cfg: ModelConfig, vocab: int, batch: int) -> dict[str, float]:
    """Forward+backward matmul FLOPs (3× forward) of each head; used to budget timing runs."""
    t, e, p = cfg.seq_tokens, cfg.embed_dim, cfg.patch_size
    c, h = cfg.content_dim, cfg.head_hidden
    bit_per_seq = 2 * t * e * p * (c + h) + 2 * cfg.seq_bits * (3 * c * h + h * h + h)
    # Chunking recomputes the head's forward in the backward pass: extra work, not model FLOPs.
    return {"bit": 3.0 * batch * bit_per_seq, "bit_unchunked": 3.0 * batch * bit_per_seq,
            "token": 3.0 * batch * 2 * t * e * vocab}



# ----------------------------------------------------------------------------- generation passes


def attention_flops(*, layers: int, width: int, queries: int, keys: int) -> float:
    """QKᵀ and PV of ``queries`` queries over ``keys`` visible keys: 2·2·queries·keys·E per layer.

    Model FLOPs count the keys a query may see (its causal / block-causal prefix); the cached
    programs attend over the whole cache buffer and mask the rest, which is executed but not
    model work.
    """
    return layers * 4.0 * queries * keys * width


@functools.lru_cache(maxsize=None)
def ar_token_flops(cfg: ARConfig) -> float:
    """Dense FLOPs of one token through the AR transformer (every block's kernels and the LM
    head act once per token; the embedding is a lookup, 0 FLOPs). Attention not included."""
    from bitgen.nn.ar import init_ar_params

    shapes = jax.eval_shape(functools.partial(init_ar_params, cfg=cfg), jax.random.key(0))
    return kernel_flops(shapes, lambda path: 1)


@functools.lru_cache(maxsize=None)
def bitlm_backbone_token_flops(cfg: BitLMConfig) -> float:
    """Dense FLOPs of one position through BitLM's backbone (its kernels act once per position;
    embedding and start block are lookups). Attention not included."""
    return kernel_flops(_bitlm_shapes(cfg)["backbone"], lambda path: 1)


@functools.lru_cache(maxsize=None)
def bit_head_call_flops(cfg: BitLMConfig) -> float:
    """FLOPs of one call of BitLM's diffusion head on one block (one CFG branch): the time
    embedding (``time_in``, ``time_out``) acts once per block, every other kernel once per slot
    (m rows: the condition, bit input, adaLN, attention, SwiGLU, output), plus the head's
    bidirectional attention of the m slots (m queries × m keys per head block)."""
    m, width = cfg.block_tokens, cfg.head.width
    dense_flops = kernel_flops(_bitlm_shapes(cfg)["head"],
                               lambda path: 1 if path[0].startswith("time_") else m)
    return dense_flops + attention_flops(layers=cfg.head.depth, width=width, queries=m, keys=m)


def _bitlm_shapes(cfg: BitLMConfig) -> dict:
    from bitgen.nn.bitlm import init_bitlm_params

    return jax.eval_shape(functools.partial(init_bitlm_params, cfg=cfg), jax.random.key(0))

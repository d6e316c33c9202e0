"""The analytic cost model of generation (spec §A.6), counted from each sampler's program.

One ``GenerationCost`` describes ONE row of T tokens: how many backbone passes of how many tokens
and how many separate head passes of how many tokens the sampler runs, and their model FLOPs
(``bitgen.bench.flops``: matmuls at 2 FLOPs per MAC, attention over the visible keys only).

- AR (``bitgen.nn.ar.ar_sample``): the row starts from the separator and runs T − 1 cached decode
  steps of one token (the step at position p attends to p + 1 keys); one pass per generated token.
- CoBit (``bitgen.sampling``): ``model_calls`` SDT passes over all T tokens (the per-bit head is
  part of each pass, so no separate head passes); 256 NFE DDIM + SC carry = 255 passes.
- BitLM (``bitgen.sampling.bitlm_sampler``): the start block is prefilled (one pass of m), then each
  of the n = T/m blocks takes (K + 1) head calls over its m slots (×2 with guidance w ≠ 1: the
  conditional and the unconditional branch) and one backbone pass of its m decoded ids, block j's
  queries seeing the (j + 1)·m keys of blocks 0..j. That is n + 1 backbone passes: spec §A.6's T/m
  plus the start block (the last block's append is computed but not read). The row starts from the
  separator (clamped in the first block), so T − 1 tokens are generated.
- Block CoBit (``bitgen.sampling.block_cobit_sampler``): the row starts from the separator; the
  ⌊1/m⌋ blocks it fills are prefilled as clean context (one trunk pass), then each remaining block
  takes ``model_calls`` block-SDT passes over its m tokens (trunk + per-bit head) and one trunk
  pass appending its decoded codes to the cache; block j's queries see the (j + 1)·m keys of
  blocks 0..j.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from bitgen.bench.flops import (
    ar_token_flops,
    attention_flops,
    bit_head_call_flops,
    bitlm_backbone_token_flops,
    forward_flops,
    sdt_chunk_dense_flops,
)

if TYPE_CHECKING:
    from bitgen.config import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class GenerationCost:
    """One row: T tokens of which ``given_tokens`` are given (the separator the row starts from);
    ``backbone_passes`` of ``backbone_tokens`` tokens each, ``head_passes`` of ``head_tokens``
    (0 when the head is inside the backbone pass); ``flops``: model FLOPs of the whole row."""

    seq_tokens: int
    given_tokens: int
    backbone_passes: int
    backbone_tokens: int
    head_passes: int
    head_tokens: int
    flops: float

    @property
    def generated_tokens(self) -> int:
        return self.seq_tokens - self.given_tokens

    def to_dict(self) -> dict[str, Any]:
        n = self.generated_tokens
        return {**dataclasses.asdict(self), "generated_tokens": n,
                "backbone_passes_per_token": self.backbone_passes / n,
                "head_passes_per_token": self.head_passes / n,
                "flops_per_token": self.flops / n}


def ar_cost(cfg: ExperimentConfig, vocab_size: int) -> GenerationCost:
    """T − 1 cached decode steps of one token (dense + LM head per token, attention to p + 1 keys)."""
    from bitgen.families.ar import ar_config

    model_cfg = ar_config(cfg, vocab_size)
    t = model_cfg.seq_len
    attention = sum(attention_flops(layers=model_cfg.n_blocks, width=model_cfg.embed_dim, queries=1,
                                    keys=p + 1) for p in range(t - 1))
    return GenerationCost(seq_tokens=t, given_tokens=1, backbone_passes=t - 1, backbone_tokens=1,
                          head_passes=0, head_tokens=0,
                          flops=(t - 1) * ar_token_flops(model_cfg) + attention)


def _sampler_calls(cfg: ExperimentConfig) -> int:
    """Network calls of one unguided run of ``cfg.sampler`` (255 at 256 NFE, DDIM + SC carry)."""
    from bitgen.sampling import model_calls, nfe_to_grid_points

    s = cfg.sampler
    return model_calls(nfe_to_grid_points(s.nfe, s.name, s.sc_mode), s.name, s.sc_mode)


def cobit_cost(cfg: ExperimentConfig, vocab_size: int) -> GenerationCost:
    """``model_calls`` full SDT passes over T tokens (unguided: no prompt)."""
    calls = _sampler_calls(cfg)
    t = cfg.model.seq_tokens
    return GenerationCost(seq_tokens=t, given_tokens=0, backbone_passes=calls, backbone_tokens=t,
                          head_passes=0, head_tokens=0, flops=calls * forward_flops(cfg.model)["total"])


def bitlm_cost(cfg: ExperimentConfig, vocab_size: int) -> GenerationCost:
    """n + 1 backbone passes of m tokens, n·(K + 1)·(1 or 2) head calls of m slots (n = T/m)."""
    from bitgen.families.bitlm import bitlm_config

    o = cfg.family
    if o.head != "diffusion":
        raise ValueError(f"family.head={o.head!r}: the cost model covers the diffusion head only")
    model_cfg = bitlm_config(cfg, vocab_size)
    m, n, trunk = o.block_tokens, model_cfg.n_blocks, model_cfg.trunk
    passes = n + 1
    backbone = passes * m * bitlm_backbone_token_flops(model_cfg) + sum(
        attention_flops(layers=trunk.n_blocks, width=trunk.embed_dim, queries=m, keys=(j + 1) * m)
        for j in range(passes))
    head_passes = n * (o.head_steps + 1) * (1 if o.guidance == 1 else 2)
    return GenerationCost(seq_tokens=trunk.seq_len, given_tokens=1, backbone_passes=passes,
                          backbone_tokens=m, head_passes=head_passes, head_tokens=m,
                          flops=backbone + head_passes * bit_head_call_flops(model_cfg))


def block_cobit_cost(cfg: ExperimentConfig, vocab_size: int) -> GenerationCost:
    """Per denoised block: ``model_calls`` block-SDT passes of m tokens + one clean append."""
    model, m = cfg.model, cfg.family.block_tokens
    t, calls = model.seq_tokens, _sampler_calls(cfg)
    prefill = 1 // m  # blocks the separator fills (m = 1: the separator is a whole block)

    def attention(block: int) -> float:  # m queries of block j over the keys of blocks 0..j
        return attention_flops(layers=model.n_blocks, width=model.embed_dim, queries=m,
                               keys=(block + 1) * m)

    denoised = range(prefill, t // m)
    step = sdt_chunk_dense_flops(model, m)
    append = sdt_chunk_dense_flops(model, m, head=False)
    flops = sum(calls * (step + attention(j)) + append + attention(j) for j in denoised)
    if prefill:
        flops += prefill * append + sum(attention(j) for j in range(prefill))
    passes = len(denoised) * (calls + 1) + prefill
    return GenerationCost(seq_tokens=t, given_tokens=1, backbone_passes=passes, backbone_tokens=m,
                          head_passes=0, head_tokens=0, flops=flops)

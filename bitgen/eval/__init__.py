"""Evaluation: GenPPL, unigram entropy and the VLB bound (cobit-spec §6)."""

from bitgen.eval.metrics import (
    GenPPLResult,
    VLBTerms,
    bucket_length,
    gen_ppl,
    mean_unigram_entropy,
    unigram_entropy,
    vlb_bits_per_bit,
    vlb_terms_from_draws,
    windowed_sequence_nll,
)

__all__ = [
    "GenPPLResult",
    "VLBTerms",
    "bucket_length",
    "gen_ppl",
    "mean_unigram_entropy",
    "unigram_entropy",
    "vlb_bits_per_bit",
    "vlb_terms_from_draws",
    "windowed_sequence_nll",
]

"""A 300-document text corpus small enough to tokenise and train on in seconds, for the
block-causal families' end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from bitgen.config import ExperimentConfig, load_config


def tiny_corpus_config(config: str, tmp_path: Path, overrides: list[str]) -> ExperimentConfig:
    """``config`` with its data replaced by the tiny corpus (a 512-id BPE, 9-bit codes) written
    under ``tmp_path``; ``overrides`` (the tiny model and budget) are applied after."""
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(f"fortune number {i}: the cat sat on mat {i % 7}." for i in range(300)))
    return load_config(config, [f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}",
                                "data.vocab_size=512", "model.patch_size=9", *overrides])

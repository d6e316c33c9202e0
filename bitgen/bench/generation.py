"""Generation throughput: generated tokens per second of each model family's own sampler at equal
backbone size, with the analytic cost model (``bitgen.bench.gen_cost``) beside each measurement.

``GENERATORS`` is the one list of benchmarked generators: a label, a registered family, the
config overrides that select its operating point, and its cost model. Every generator goes
through the family registry exactly as ``bitgen sample`` does (``family.task(cfg, V).init_params``
for randomly initialised parameters, ``family.draw(model, cfg.sampler, ...)`` for the sampler),
so a family registered later is benchmarked by adding its entry here. Entries whose family is not
registered in this build are skipped.

Every generator of one size shares ``model.*`` (embed_dim, n_heads, n_blocks, dim_ff, seq_tokens,
P) and the vocabulary / P-bit codes of a synthetic text pipeline (``synthetic_text``: the ids are
all the generators need; speed does not depend on training or on the tokenizer). Early stops are
disabled (``family.stop_at_separator=false``) so every row generates all its tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from bitgen.bench.gen_cost import GenerationCost, ar_cost, bitlm_cost, block_cobit_cost, cobit_cost
from bitgen.bench.timing import Program, Timing, time_interleaved


@dataclasses.dataclass(frozen=True)
class Generator:
    """label: the row name; family: a registered family name; overrides: ``section.key=value``
    strings selecting the operating point; cost: (cfg, vocab size) -> ``GenerationCost``."""

    label: str
    family: str
    overrides: tuple[str, ...]
    cost: Callable[[Any, int], GenerationCost]


_BITLM = ("family.block_tokens=4", "family.head_steps=15", "family.stop_at_separator=false")

GENERATORS: tuple[Generator, ...] = (
    Generator("ar", "ar", (), ar_cost),  # KV cache, one token per decode step
    Generator("cobit", "cobit", ("sampler.nfe=256",), cobit_cost),  # LM1B headline sampler
    Generator("bitlm_w9", "bitlm", (*_BITLM, "family.guidance=9.0"), bitlm_cost),  # spec CFG
    Generator("bitlm_w1", "bitlm", (*_BITLM, "family.guidance=1.0"), bitlm_cost),  # no guidance
    Generator("block_cobit", "block_cobit",  # CoBit's 256-NFE sampler per block of m = 4
              ("family.block_tokens=4", "family.stop_at_separator=false", "sampler.nfe=256"),
              block_cobit_cost),
)


@dataclasses.dataclass(frozen=True)
class GenSize:
    """A shared backbone size: ``model.*`` overrides, the vocabulary V (P = ceil(log2 V)), and
    per-family overrides that have no shared counterpart (e.g. BitLM's head width)."""

    model: tuple[str, ...]
    vocab_size: int
    family: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def family_overrides(self, name: str) -> tuple[str, ...]:
        return dict(self.family).get(name, ())


GEN_SIZES: dict[str, GenSize] = {
    # demo_cpu's trunk and vocabulary (and demo_bitlm_cpu's head): embed 128, 2 blocks, T = 32.
    "demo": GenSize(("model.embed_dim=128", "model.n_heads=4", "model.n_blocks=2", "model.dim_ff=384",
                     "model.seq_tokens=32", "model.content_dim=32", "model.head_hidden=64"), 8192,
                    (("bitlm", ("family.head_width=128", "family.head_depth=2", "family.head_heads=4")),)),
    # CoBit-S on LM1B (BERT vocabulary, P = 15, T = 128); BitLM's head at its defaults.
    "cobit-s": GenSize(("model.embed_dim=768", "model.n_heads=12", "model.n_blocks=12",
                        "model.dim_ff=3072", "model.seq_tokens=128"), 30522),
}


def registered(generators: Sequence[Generator] = GENERATORS) -> list[Generator]:
    """The generators whose family is registered in this build."""
    from bitgen import families

    return [g for g in generators if g.family in families.names()]


def synthetic_text(vocab_size: int):
    """A ``TextCodec`` of V ids with plain binary P-bit codes (P = ceil(log2 V)): a WordPiece
    vocabulary ``[PAD] [UNK] [CLS] [SEP] t4 … t(V−1)`` (separator ``[SEP]`` = id 3)."""
    from tokenizers import Tokenizer, models

    from bitgen.codecs import BitCodec
    from bitgen.textcodec import TextCodec

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(special + [f"t{i}" for i in range(len(special), vocab_size)])}
    return TextCodec(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")), BitCodec(vocab_size))


def generator_config(gen: Generator, size: GenSize, dtype: str):
    """The validated ``ExperimentConfig`` of ``gen`` at ``size`` (dropout off, ``dtype`` compute)."""
    from bitgen.codecs import width_for_vocab
    from bitgen.config import ExperimentConfig, apply_overrides

    return apply_overrides(ExperimentConfig(), [
        f"task={gen.family}", *size.model, f"model.patch_size={width_for_vocab(size.vocab_size)}",
        f"model.compute_dtype={dtype}", "model.dropout=0.0", f"data.vocab_size={size.vocab_size}",
        *size.family_overrides(gen.family), *gen.overrides])


@dataclasses.dataclass(frozen=True)
class BuiltGenerator:
    """A generator ready to run: its config, family, loaded model (random params) and
    ``draw(params, key, batch)`` from the family."""

    gen: Generator
    cfg: Any
    family: Any
    model: Any
    draw: Callable

    def cost(self) -> GenerationCost:
        return self.gen.cost(self.cfg, self.model.text.vocab_size)


def build_generator(gen: Generator, size: GenSize, dtype: str, *, text=None,
                    key: jax.Array | None = None) -> BuiltGenerator:
    """Config, randomly initialised params and the family's sampler for ``gen`` at ``size``."""
    from bitgen import families
    from bitgen.diffusion.entropy_schedule import load_entropy_table
    from bitgen.loading import LoadedModel

    cfg = generator_config(gen, size, dtype)
    text = text or synthetic_text(size.vocab_size)
    family = families.get(gen.family)
    family.check(cfg, text)
    params = family.task(cfg, text.vocab_size).init_params(jax.random.key(0) if key is None else key)
    # The shipped LM1B entropy table: a σ-grid for the CoBit samplers (values, not speed, depend on it).
    model = LoadedModel(cfg=cfg, params=params, text=text, table=load_entropy_table("lm1b"), step=0,
                        source="random init (bitgen bench)")
    draw = family.draw(model, cfg.sampler, temperature=1.0, top_p=1.0)
    return BuiltGenerator(gen, cfg, family, model, draw)


def _timing_stats(timing: Timing) -> dict[str, Any]:
    lo, hi = min(timing.times_s), max(timing.times_s)
    return {**timing.to_dict(), "min_s": lo, "max_s": hi, "spread": (hi - lo) / timing.median_s}


def bench_generation(size: str | GenSize, batches: Sequence[int], *, dtype: str, repeats: int = 3,
                     labels: Sequence[str] | None = None, peak_flops: float | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every selected generator at every batch; returns the report's generation section.

    Per batch the generators' compiled samplers are timed round-robin (``time_interleaved``: one
    warm-up round, then ``repeats`` rounds), so a shared machine's load drifts over all of them
    alike. Each row: the cost model per row and per generated token, the timing (median, min,
    max, spread = (max − min)/median), generated tokens/s = batch·generated tokens/median, the
    achieved model FLOP/s and, with ``peak_flops``, its fraction of that limit.
    """
    shape = GEN_SIZES[size] if isinstance(size, str) else size
    available = registered()
    chosen = [g for g in available if labels is None or g.label in labels]
    skipped = [g.label for g in GENERATORS if g not in available]
    if skipped:
        log(f"generation: skipped {skipped} (family not registered in this build)")
    built = [build_generator(g, shape, dtype) for g in chosen]
    section: dict[str, Any] = {
        "size": size if isinstance(size, str) else "custom", "model": list(shape.model),
        "vocab_size": shape.vocab_size, "compute_dtype": dtype, "repeats": repeats,
        "early_stop": False,  # family.stop_at_separator=false: every row generates all T tokens
        "rows": []}
    for batch in batches:
        programs = {}
        for b in built:
            sample = jax.jit(lambda params, key, draw=b.draw: draw(params, key, batch))
            programs[b.gen.label] = Program(sample, (b.model.params, jax.random.key(1)))
        timings = time_interleaved(programs, rounds=repeats)
        for b in built:
            cost, timing = b.cost(), timings[b.gen.label]
            rate = batch * cost.flops / timing.median_s
            row = {"generator": b.gen.label, "family": b.gen.family, "overrides": list(b.gen.overrides),
                   "batch": batch, "cost": cost.to_dict(), **_timing_stats(timing),
                   "tokens_per_s": batch * cost.generated_tokens / timing.median_s,
                   "achieved_flops_per_s": rate,
                   "fraction_of_matmul_limit": rate / peak_flops if peak_flops else None}
            section["rows"].append(row)
            log(f"generation {b.gen.label} b={batch}: {row['tokens_per_s']:.0f} tok/s "
                f"(median {timing.median_s * 1e3:.1f} ms, spread {row['spread']:.1%})")
    return section

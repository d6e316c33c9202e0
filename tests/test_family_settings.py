"""``Family.settings`` sees the family section a run was loaded with (``family.*`` overrides
included): BitLM's sampling options name its samples and key ``bitgen eval``'s cache, while the
keys of families without such options stay what they were."""

from __future__ import annotations

import json

import jax
import pytest

from bitgen import cli
from bitgen.config import DataConfig, ExperimentConfig, ModelConfig, SamplerConfig, to_dict
from bitgen.eval import sweep
from bitgen.eval import table as tables
from bitgen.families.bitlm import SAMPLING_OPTIONS, BitLMOptions
from test_eval_cli import _save_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A randomly initialised BitLM run and an AR evaluator on one tiny corpus (no training)."""
    from bitgen.data.corpus import build_corpus_rows
    from bitgen.families.ar import ar_config
    from bitgen.families.bitlm import bitlm_config
    from bitgen.nn.ar import init_ar_params
    from bitgen.nn.bitlm import init_bitlm_params

    root = tmp_path_factory.mktemp("settings")
    (root / "tiny.txt").write_text("".join(f"the {w} cat sat on mat number {i}.\n" for i in range(150)
                                           for w in ("red", "blue")))
    data = DataConfig(source=str(root / "tiny.txt"), vocab_size=300, batch_size=4, val_fraction=0.05,
                      cache_dir=str(root / "cache"))
    codec = build_corpus_rows(data, 8).codec
    model = ModelConfig(patch_size=codec.width, seq_tokens=8, embed_dim=16, n_heads=2, n_blocks=1,
                        dim_ff=32, dropout=0.0)
    bitlm = ExperimentConfig(name="tiny_bitlm", task="bitlm", model=model, data=data,
                             family=BitLMOptions(head_width=16, head_depth=1, head_heads=2, head_steps=2),
                             sampler=SamplerConfig(batch_size=3))
    ar = ExperimentConfig(name="tiny_ar", task="ar", model=model, data=data,
                          sampler=SamplerConfig(batch_size=3))
    _save_run(root / "bitlm", bitlm, init_bitlm_params(jax.random.key(0), bitlm_config(bitlm, codec.vocab_size)))
    _save_run(root / "ar", ar, init_ar_params(jax.random.key(1), ar_config(ar, codec.vocab_size)))
    return root / "bitlm", root / "ar"


def test_sample_metadata_names_the_guidance_and_head_steps(runs, tmp_path):
    out = tmp_path / "s.txt"
    assert cli.main(["sample", "--run-dir", str(runs[0]), "--num", "2", "--out", str(out),
                     "--no-progress", "family.guidance=2.5", "family.head_steps=3"]) == 0
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    drawn_with = records[0]["settings"]
    assert drawn_with["task"] == "bitlm" and set(drawn_with["family"]) == {"head", *SAMPLING_OPTIONS}
    assert drawn_with["family"]["guidance"] == 2.5 and drawn_with["family"]["head_steps"] == 3


def test_the_softmax_control_is_named_by_its_head_temperature_and_early_stop():
    from bitgen.families import get

    bitlm = get("bitlm")
    softmax = bitlm.settings(None, options=BitLMOptions(head="softmax"), temperature=0.8, top_p=1.0)
    assert softmax == {"task": "bitlm", "temperature": 0.8,
                       "family": {"head": "softmax", "stop_at_separator": True}}
    no_stop = bitlm.settings(None, options=BitLMOptions(head="softmax", stop_at_separator=False),
                             temperature=0.8, top_p=1.0)
    assert no_stop != softmax  # the early stop changes the draws of either head
    diffusion = bitlm.settings(None, options=BitLMOptions(), temperature=1.0, top_p=1.0)
    assert diffusion["family"]["head"] == "diffusion" and diffusion["family"]["guidance"] == 9.0


@pytest.mark.slow  # 8 s or more: with the slow set, so the default suite keeps to ~10 min on 2 cores
def test_evals_differing_only_in_a_family_option_do_not_share_cached_points(runs, tmp_path):
    bitlm_run, ar_run = runs
    out_dir = tmp_path / "eval"

    def evaluate(guidance: float) -> list[dict]:
        assert cli.main(["eval", "--run-dir", str(bitlm_run), "--evaluator", str(ar_run), "--num", "2",
                         "--reference-num", "0", "--out-dir", str(out_dir), "--no-progress",
                         f"family.guidance={guidance}"]) == 0
        return sweep.read_rows(out_dir / "results.jsonl")

    first = evaluate(2.0)
    assert [r["family"]["guidance"] for r in first] == [2.0]
    second = evaluate(3.0)  # a new point: drawn and scored, not the cached 2.0 row
    assert [r["family"]["guidance"] for r in second] == [2.0, 3.0]
    drawn = sorted((out_dir / "samples").glob("*.jsonl"))
    assert len(drawn) == 2
    stamps = [p.stat().st_mtime_ns for p in drawn]
    assert evaluate(3.0) == second  # the same settings reuse the row and its samples
    assert [p.stat().st_mtime_ns for p in sorted((out_dir / "samples").glob("*.jsonl"))] == stamps


def test_families_without_sampling_options_keep_their_point_keys():
    """Rows cached before ``family`` joined ``POINT_KEYS`` (no such field) keep their key."""
    old = {k: 1 for k in tables.POINT_KEYS if k != "family"}
    assert tables.point_key(old) == tables.point_key({**old, "family": None})
    assert tables.point_key(old) == tuple(json.dumps(1) for _ in range(len(tables.POINT_KEYS) - 1))
    assert tables.point_key({**old, "family": {"guidance": 2.0}}) != tables.point_key(old)

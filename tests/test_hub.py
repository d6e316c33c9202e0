"""Hub specs resolve through huggingface_hub against a fake cache built here (its own layout:
``models--OWNER--NAME/{refs,snapshots}``), offline: these tests never touch the network."""

from __future__ import annotations

import hashlib

import pytest

from bitgen import cli
from bitgen.hub import KNOWN_SHA256, HubError, HubSpec, parse_spec, resolve

pytest.importorskip("huggingface_hub")

REPO = "owner/cobit"
MAIN = "a" * 40  # commit hashes are 40 hex digits
OLD = "b" * 40


def _snapshot(cache, commit: str, files: dict[str, bytes]) -> None:
    root = cache / "models--owner--cobit" / "snapshots" / commit
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A cache holding two commits of REPO (main -> MAIN); offline mode on."""
    cache = tmp_path / "hf" / "hub"
    _snapshot(cache, MAIN, {"weights.pt": b"new weights", "tok/vocab.txt": b"[PAD]\n"})
    _snapshot(cache, OLD, {"weights.pt": b"old weights"})
    refs = cache / "models--owner--cobit" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(MAIN)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("spec, parsed", [
    ("hf:owner/cobit/weights.pt", HubSpec(REPO, "weights.pt", None)),
    ("hf:owner/cobit/sub/dir/f.json@v1.0", HubSpec(REPO, "sub/dir/f.json", "v1.0")),
    ("hf:owner/cobit", HubSpec(REPO, None, None)),
    (f"hf:owner/cobit@{OLD}", HubSpec(REPO, None, OLD)),
])
def test_specs_parse_and_print_back(spec, parsed):
    assert parse_spec(spec) == parsed
    assert str(parsed) == spec


@pytest.mark.parametrize("spec", ["hf:owner", "hf:owner//f", "hf:/cobit", "hf:owner/cobit@", "owner/cobit"])
def test_malformed_specs_name_the_form(spec):
    with pytest.raises(HubError, match=r"hf:OWNER/NAME"):
        parse_spec(spec)


def test_files_resolve_at_main_and_at_a_pinned_commit(hub_cache):
    assert resolve("hf:owner/cobit/weights.pt").read_bytes() == b"new weights"
    assert resolve(f"hf:owner/cobit/weights.pt@{OLD}").read_bytes() == b"old weights"
    assert resolve("hf:owner/cobit/tok/vocab.txt").read_bytes() == b"[PAD]\n"


def test_a_whole_repo_resolves_to_its_snapshot_folder(hub_cache):
    folder = resolve("hf:owner/cobit")
    assert folder == hub_cache / "models--owner--cobit" / "snapshots" / MAIN
    assert (folder / "tok" / "vocab.txt").is_file()


def test_hub_cache_variable_wins_over_hf_home(hub_cache, tmp_path, monkeypatch):
    other = tmp_path / "other"
    _snapshot(other, MAIN, {"weights.pt": b"from HF_HUB_CACHE"})
    (other / "models--owner--cobit" / "refs").mkdir()
    (other / "models--owner--cobit" / "refs" / "main").write_text(MAIN)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve("hf:owner/cobit/weights.pt").read_bytes() == b"from HF_HUB_CACHE"


def test_sha256_is_checked_when_known(hub_cache, monkeypatch):
    good = hashlib.sha256(b"new weights").hexdigest()
    assert resolve("hf:owner/cobit/weights.pt", sha256=good).read_bytes() == b"new weights"
    with pytest.raises(HubError, match="SHA-256"):
        resolve("hf:owner/cobit/weights.pt", sha256=hashlib.sha256(b"other").hexdigest())
    monkeypatch.setitem(KNOWN_SHA256, (REPO, "weights.pt", OLD), good)  # the table is consulted
    with pytest.raises(HubError, match="SHA-256"):
        resolve(f"hf:owner/cobit/weights.pt@{OLD}")
    with pytest.raises(HubError, match="one file"):
        resolve("hf:owner/cobit", sha256=good)


@pytest.mark.parametrize("spec, command", [
    ("hf:owner/cobit/missing.pt", "hf download owner/cobit missing.pt"),
    (f"hf:owner/cobit/weights.pt@{'c' * 40}", f"hf download owner/cobit weights.pt --revision {'c' * 40}"),
    ("hf:other/model", "hf download other/model"),
])
def test_offline_and_not_cached_names_the_local_alternative(hub_cache, spec, command):
    with pytest.raises(HubError) as info:
        resolve(spec)
    message = str(info.value)
    assert "HF_HUB_OFFLINE=1" in message and f"`{command}`" in message and "local path" in message
    assert "\n" not in message


def test_local_paths_pass_through_or_are_named_missing(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"x")
    assert resolve(str(path)) == path
    with pytest.raises(HubError, match="does not exist"):
        resolve(str(tmp_path / "nope.npz"))


def test_convert_reports_an_offline_hub_miss_in_one_line(hub_cache, tmp_path, capsys):
    assert cli.main(["convert", "hf:owner/cobit/missing.pt", str(tmp_path / "p.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf download owner/cobit missing.pt" in err


def test_tokenizers_and_code_tokenizers_resolve_from_hub_specs(hub_cache, tmp_path):
    """A tokenizer.json, and a code tokenizer with its .meta.json fetched beside it, as config
    values (data.tokenizer / data.code_tokenizer) read without the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bitgen.config import load_config
    from bitgen.loading import text_codec_from_config
    from bitgen.tokenizers import CodeTokenizer, load_tokenizer

    base = Tokenizer(models.WordLevel({f"w{i}": i for i in range(40)}, unk_token="w0"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    codes = Tokenizer(models.WordLevel({f"c{i}": i for i in range(20)}, unk_token="c1"))
    local = tmp_path / "local"
    local.mkdir()
    CodeTokenizer(codes, 0, 1, 2, 0xF0000, 40, None).save(local / "codes.json")
    _snapshot(hub_cache, MAIN, {"tok/tokenizer.json": base.to_str().encode(),
                                "tok/codes.json": (local / "codes.json").read_bytes(),
                                "tok/codes.meta.json": (local / "codes.meta.json").read_bytes()})
    assert load_tokenizer("hf:owner/cobit/tok/tokenizer.json").encode("w3 w7").ids == [3, 7]
    code_tokenizer = CodeTokenizer.load(f"hf:owner/cobit/tok/codes.json@{MAIN}")
    assert code_tokenizer.code_vocab_size == 20 and code_tokenizer.eoseq_id == 2
    cfg = load_config("demo_cpu", ["data.tokenizer=hf:owner/cobit/tok/tokenizer.json",
                                   "data.code_tokenizer=hf:owner/cobit/tok/codes.json",
                                   "data.packing=window", "data.bit_order=raw",
                                   "data.code_policy=stop", "model.patch_size=5"])
    text = text_codec_from_config(cfg)
    assert text.vocab_size == 20 and text.codec.width == 5 and text.code_tokenizer is not None

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

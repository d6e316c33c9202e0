"""Name weights, tokenizers and evaluator models by a local path or a Hugging Face Hub spec.

Specs::

    /path/to/file_or_dir          a local path (checked to exist)
    hf:OWNER/NAME/FILE[@REV]      one file of a model repo (FILE may contain "/")
    hf:OWNER/NAME[@REV]           a whole repo snapshot (evaluator models)

``resolve(spec)`` returns a local path. Hub files are fetched with ``huggingface_hub``
(``hf_hub_download`` / ``snapshot_download``) into its usual cache, at revision REV when given
(a commit hash pins the bytes; a branch or tag follows it). A file is checked against a SHA-256
when one is known: passed as ``sha256=`` or listed in ``KNOWN_SHA256``. The cache location and
offline mode follow the library's variables (HF_HUB_CACHE, HF_HOME, HF_HUB_OFFLINE), read at each
call: with ``HF_HUB_OFFLINE=1`` or without a network only cached files resolve, and anything else
stops with one line naming the local-file alternative.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from bitgen.errors import BitgenError, one_line

PREFIX = "hf:"
# (repo, file, revision) -> SHA-256 hex digest of files whose bytes bitgen has checked.
KNOWN_SHA256: dict[tuple[str, str, str | None], str] = {}  # none verified yet
_TRUE = {"1", "on", "yes", "true"}


class HubError(BitgenError, OSError):
    """A spec cannot be resolved to a local file; the message names the local-file alternative."""


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf:`` spec. filename None means the whole repo snapshot."""

    repo: str
    filename: str | None
    revision: str | None

    def __str__(self) -> str:
        name = self.repo if self.filename is None else f"{self.repo}/{self.filename}"
        return f"{PREFIX}{name}" + (f"@{self.revision}" if self.revision else "")


def is_hub_spec(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_spec(spec: str) -> HubSpec:
    """``hf:OWNER/NAME[/FILE][@REV]`` -> HubSpec; HubError for anything else."""
    if not is_hub_spec(spec):
        raise HubError(f"{spec!r} is not a Hub spec; write hf:OWNER/NAME/FILE[@REV] or hf:OWNER/NAME")
    body, _, revision = spec[len(PREFIX):].partition("@")
    parts = body.split("/")
    if len(parts) < 2 or not all(parts) or (revision == "" and spec.endswith("@")):
        raise HubError(f"{spec!r} is not a Hub spec; write hf:OWNER/NAME/FILE[@REV] (a file) or "
                       "hf:OWNER/NAME[@REV] (a whole repo)")
    filename = "/".join(parts[2:]) or None
    return HubSpec("/".join(parts[:2]), filename, revision or None)


def _cache_dir() -> str | None:
    """The Hub cache as the library would choose it now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _local_alternative(spec: HubSpec) -> str:
    """The command that fetches ``spec`` elsewhere, and what to pass instead of it."""
    words = [spec.repo, spec.filename, f"--revision {spec.revision}" if spec.revision else None]
    target = "file" if spec.filename else "folder"
    return (f"download it where a network exists (`hf download {' '.join(w for w in words if w)}`) "
            f"and give the downloaded {target}'s local path instead")


def _fetch(spec: HubSpec) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise HubError(f"{spec} needs huggingface_hub (pip install 'huggingface_hub>=0.34'); or "
                       "give a local path") from None
    offline = _offline()
    try:
        if spec.filename is None:
            return Path(huggingface_hub.snapshot_download(
                spec.repo, revision=spec.revision, cache_dir=_cache_dir(), local_files_only=offline))
        return Path(huggingface_hub.hf_hub_download(
            spec.repo, spec.filename, revision=spec.revision, cache_dir=_cache_dir(),
            local_files_only=offline))
    except errors.LocalEntryNotFoundError as err:  # offline or no network, and not in the cache
        why = "HF_HUB_OFFLINE=1 is set" if offline else f"the Hub cannot be reached ({one_line(err)})"
        raise HubError(f"{spec} is not in the local Hugging Face cache and {why}; "
                       f"{_local_alternative(spec)}") from err
    except errors.RepositoryNotFoundError as err:
        raise HubError(f"{spec}: no Hub repo {spec.repo} (or it is private); check the name") from err
    except errors.RevisionNotFoundError as err:
        raise HubError(f"{spec}: repo {spec.repo} has no revision {spec.revision!r}; check it") from err
    except errors.EntryNotFoundError as err:
        raise HubError(f"{spec}: repo {spec.repo} has no file {spec.filename!r} at that revision; "
                       "check the file name") from err
    except (OSError, ValueError) as err:  # network failures, unwritable cache, bad repo ids
        raise HubError(f"cannot fetch {spec} ({one_line(err)}); {_local_alternative(spec)}") from err


def sibling(spec: str, name: str) -> str:
    """The spec of file ``name`` in the folder of Hub file ``spec``, at the same revision (a
    tokenizer's ``merges.txt`` or ``.meta.json`` beside it)."""
    parsed = parse_spec(spec)
    if parsed.filename is None:
        raise HubError(f"{spec} names a whole repo, not a file; name the file as hf:OWNER/NAME/FILE")
    folder = parsed.filename.rpartition("/")[0]
    return str(HubSpec(parsed.repo, f"{folder}/{name}" if folder else name, parsed.revision))


def resolve(spec: str | Path, *, sha256: str | None = None) -> Path:
    """A local path for ``spec`` (see the module docstring), fetching Hub files as needed.

    sha256: expected hex digest of a single file (local or Hub); default: ``KNOWN_SHA256`` for
    Hub files, else unchecked. Raises HubError (one line) for a missing local path, a spec the
    cache cannot satisfy offline, an unknown repo/revision/file, or a digest mismatch.
    """
    if is_hub_spec(spec):
        parsed = parse_spec(str(spec))
        if sha256 and parsed.filename is None:
            raise HubError(f"sha256 applies to one file, but {parsed} names a whole repo; pin a "
                           "commit with @REV instead")
        path = _fetch(parsed)
        if parsed.filename is not None:
            sha256 = sha256 or KNOWN_SHA256.get((parsed.repo, parsed.filename, parsed.revision))
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise HubError(f"{path} does not exist; check the path (or name a Hub file as "
                           "hf:OWNER/NAME/FILE)")
    if sha256:
        got = sha256_of(path)
        if got != sha256.lower():
            raise HubError(f"{path} has SHA-256 {got[:16]}…, expected {sha256[:16]}…; the file is "
                           "damaged or another version: delete it and fetch it again, or check the "
                           "pinned revision")
    return path

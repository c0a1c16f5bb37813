"""Model sources named on the Hugging Face hub, resolved to local paths through its cache.

Wherever a command takes a ``.nemo``, an ONNX export directory or an MLX artifact directory, it
also takes a hub name:

- ``ORG/NAME``: the repository's default branch;
- ``ORG/NAME@REVISION``: a branch, a tag or a commit;
- ``hf://ORG/NAME[@REVISION]/FILE``: one file (or folder) of the repository.

A local path that exists always wins over the hub reading. Only the files the command needs are
downloaded (``huggingface_hub.snapshot_download`` with the backend's ``hub_patterns``: ``*.nemo``
for a checkpoint, an artifact's files for ``--onnx``/``--mlx``). The cache is huggingface_hub's own
(``HF_HOME``, ``HF_HUB_CACHE``) and ``HF_HUB_OFFLINE=1`` keeps every look-up in it; both are read
when a source is resolved, not when huggingface_hub was imported. A source that is neither cached
nor reachable is bad input: one line naming the repository, the revision and the cache directory.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from streaming_parity.core.errors import InputNotFound, InvalidInput
from streaming_parity.core.system.provenance import HubOrigin, ResolvedSource

SCHEME = "hf://"
# A repository id: ORG/NAME, each part letters, digits, '-', '_', '.'.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
TRUE = {"1", "ON", "YES", "TRUE"}
# Names ending like a local file are local paths (a missing audio file is not a hub repository).
FILE_SUFFIXES = {".nemo", ".wav", ".flac", ".mp3", ".ogg", ".json", ".jsonl", ".npz", ".onnx", ".safetensors",
                 ".toml", ".yaml", ".yml", ".txt", ".model"}

log = logging.getLogger(__name__)


class HubSourceNotFound(InputNotFound):
    """A hub source that is not in the cache and cannot be downloaded (offline, unknown, no such file)."""


@dataclass(frozen=True)
class HubName:
    repo: str
    revision: str | None = None  # None: the default branch
    file: str | None = None  # hf:// names one file or folder

    def __str__(self) -> str:
        text = self.repo + (f"@{self.revision}" if self.revision else "")
        return f"{SCHEME}{text}/{self.file}" if self.file else text


def parse(text: str | Path) -> HubName | None:
    """The hub reading of a source argument, or None when it names a local path.

    An existing path is always local; ``hf://`` is always the hub; ``ORG/NAME[@REVISION]`` is the hub
    unless it exists locally or ends like a file name (``x/model.nemo``, ``x/a.wav``: missing local files).
    """
    text = str(text)
    if Path(text).expanduser().exists():
        return None
    if text.startswith(SCHEME):
        parts = text[len(SCHEME):].split("/", 2)  # ORG, NAME[@REVISION], FILE
        file = parts[2].strip("/") if len(parts) == 3 else ""
        name, at, revision = parts[1].partition("@") if len(parts) > 1 else ("", "", "")
        repo = f"{parts[0]}/{name}"
        if not file or not REPO_ID.fullmatch(repo) or (at and not revision):
            raise InvalidInput(f"{text}: a hub file is named {SCHEME}ORG/NAME[@REVISION]/FILE")
        return HubName(repo, revision or None, file)
    repo, at, revision = text.partition("@")
    if not REPO_ID.fullmatch(repo) or (at and not revision) or Path(repo).suffix.lower() in FILE_SUFFIXES:
        return None
    return HubName(repo, revision or None)


def cache_dir() -> Path:
    """huggingface_hub's cache directory as the environment names it now."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[variable])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def download(name: HubName, patterns: tuple[str, ...]) -> Path:
    """The snapshot folder of ``name`` holding (at least) the files matching ``patterns`` (all: none given)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import utils as hub_utils
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_cached = (LocalEntryNotFoundError, EntryNotFoundError,
                  *([hub_utils.IncompleteSnapshotError] if hasattr(hub_utils, "IncompleteSnapshotError") else []))
    cache, is_offline = cache_dir(), offline()
    revision = name.revision or "main"
    if name.file:
        patterns = (name.file, *(f"{name.file}/{p}" for p in patterns))
    log.debug("resolving %s (%s) in %s%s", name, ", ".join(patterns), cache, ", offline" if is_offline else "")
    try:
        # A backend that declares no patterns gets the whole repository.
        folder = snapshot_download(name.repo, revision=name.revision, allow_patterns=list(patterns) or None,
                                   cache_dir=cache, local_files_only=is_offline)
    except HFValidationError as error:
        raise InvalidInput(f"{name}: not a hub repository name ({error})") from None
    except RevisionNotFoundError:
        raise HubSourceNotFound(f"{name.repo}: no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise HubSourceNotFound(f"{name.repo}: no such hub repository, or a private or gated one "
                                f"(log in with `hf auth login`)") from None
    except not_cached as error:
        # Offline (or the hub unreachable) and not in the cache, or only partly.
        why = ("HF_HUB_OFFLINE is set" if is_offline
               else f"the hub cannot be reached ({type(error).__name__})")
        raise HubSourceNotFound(f"{name.repo} revision {revision} is not in the hub cache {cache} and {why}; "
                                f"download it with network access or point HF_HUB_CACHE at a cache that has it"
                                ) from None
    except HfHubHTTPError as error:
        raise HubSourceNotFound(f"{name.repo} revision {revision}: the hub answered {error}") from None
    return Path(folder)


def resolve(text: str | Path, *, patterns: tuple[str, ...], single_suffix: str | None = None) -> ResolvedSource:
    """``text`` as a local path, or downloaded from the hub.

    ``single_suffix`` (``.nemo``): the source is one file of that suffix, chosen in the snapshot when
    the name does not give it; otherwise the source is the snapshot folder (or the ``hf://`` folder).
    """
    name = parse(text)
    if name is None:
        return ResolvedSource(Path(text).expanduser(), str(text))
    folder = download(name, patterns)
    commit = folder.name  # snapshot_download returns <cache>/models--ORG--NAME/snapshots/<commit>
    if name.file:
        path = folder / name.file
        if not path.exists():
            raise HubSourceNotFound(f"{name}: the snapshot {commit} of {name.repo} has no {name.file}")
    elif single_suffix:
        found = sorted(p for p in folder.rglob(f"*{single_suffix}") if p.is_file())
        if not found:
            raise HubSourceNotFound(f"{name}: no {single_suffix} file in {name.repo} at {commit}")
        if len(found) > 1:
            at = f"@{name.revision}" if name.revision else ""
            choices = ", ".join(f"{SCHEME}{name.repo}{at}/{p.relative_to(folder).as_posix()}" for p in found)
            raise InvalidInput(f"{name}: {len(found)} {single_suffix} files in {name.repo}; name one: {choices}")
        path = found[0]
    else:
        path = folder
    relative = path.relative_to(folder).as_posix()
    origin = HubOrigin(name.repo, commit, requested=name.revision, file=None if relative == "." else relative)
    log.info("%s -> %s", name, path)
    return ResolvedSource(path, str(text), origin)


def resolve_source(text: str | Path, backend: str | None = None) -> ResolvedSource:
    """A source of ``backend``'s format: without it (or for the reference), a checkpoint (one
    ``.nemo``); for another backend, its artifact directory (``BackendEntry.hub_patterns``)."""
    from streaming_parity.interface.registry import REFERENCE, get

    backend = backend or REFERENCE
    return resolve(text, patterns=get(backend).hub_patterns, single_suffix=".nemo" if backend == REFERENCE else None)


def resolve_any(text: str | Path) -> ResolvedSource:
    """A source of any registered format (``parity fingerprint``): the repository's single ``.nemo``
    when it holds one, else the snapshot folder (an artifact)."""
    from streaming_parity.interface.registry import REGISTRY

    patterns = tuple(dict.fromkeys(p for entry in REGISTRY.values() for p in entry.hub_patterns))
    resolved = resolve(text, patterns=patterns)
    if resolved.hub is None or not resolved.path.is_dir():
        return resolved
    checkpoints = sorted(resolved.path.glob("*.nemo"))
    if len(checkpoints) != 1:
        return resolved
    origin = resolved.hub
    file = f"{origin.file}/{checkpoints[0].name}" if origin.file else checkpoints[0].name
    return ResolvedSource(checkpoints[0], resolved.given, HubOrigin(origin.repo, origin.revision, origin.requested, file))

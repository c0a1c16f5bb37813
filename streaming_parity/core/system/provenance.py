"""Provenance: what a file of this project was made from, and with what.

Every export (the ONNX ``export.json``), artifact manifest (the MLX ``artifact.json`` and
``parity.json``) and results file records one ``Provenance``:

- ``source_name``, ``source_sha256``: the checkpoint (or artifact) it was made from;
- ``hub_repo``, ``hub_revision``: the hub repository and the commit the source resolved to, when it
  came from the hub (``parity ... ORG/NAME@REVISION``; the application layer resolves it);
- ``harness_version``: this project's version (the ``streaming-parity`` distribution);
- ``git_commit``: the checkout's commit when running from a git checkout, else ``None``;
- ``versions``: torch, nemo_toolkit, onnx, onnxruntime, mlx and numpy, those installed.

A stale artifact (converted from another checkpoint than the one it is checked against) is caught
by comparing the recorded ``source_sha256`` with the checkpoint's own.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DISTRIBUTION = "streaming-parity"
PACKAGES = ("torch", "nemo_toolkit", "onnx", "onnxruntime", "mlx", "numpy")
GIT_TIMEOUT_SECONDS = 5.0
CHECKOUT = Path(__file__).resolve().parents[3]  # the project root when running from a checkout


@dataclass(frozen=True)
class HubOrigin:
    """Where on the hub a source came from."""

    repo: str
    revision: str | None  # the commit the request resolved to
    requested: str | None = None  # the branch, tag or commit asked for (None: the default branch)
    file: str | None = None  # the file or folder inside the repository, when one was chosen

    def label(self) -> str:
        return f"{self.repo}@{self.revision[:12]}" if self.revision else self.repo


@dataclass(frozen=True)
class ResolvedSource:
    """A model source as the user named it (a path or a hub name), resolved to a local path."""

    path: Path
    given: str
    hub: HubOrigin | None = None


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory: over its files' relative paths and their sha256, sorted."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_path(file)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def harness_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit(root: Path = CHECKOUT) -> str | None:
    """``git rev-parse HEAD`` of the checkout the harness runs from; None outside one (an installed
    package, no git, or git too slow to answer)."""
    if not (root / ".git").exists():  # installed: never report the commit of an unrelated enclosing repository
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def library_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def software() -> dict[str, Any]:
    """What made a file: ``harness_version``, ``git_commit`` and the library ``versions``."""
    return {"harness_version": harness_version(), "git_commit": git_commit(), "versions": library_versions()}


@dataclass(frozen=True)
class Provenance:
    source_name: str | None = None
    source_sha256: str | None = None
    hub_repo: str | None = None
    hub_revision: str | None = None
    harness_version: str | None = None
    git_commit: str | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def collect(cls, source: str | Path | None = None, *, sha256: str | None = None,
                hub: HubOrigin | None = None) -> Provenance:
        """The record for a file made now from ``source`` (``sha256``: its hash, when already known)."""
        if source is not None and sha256 is None:
            sha256 = sha256_path(source)
        return cls(source_name=None if source is None else Path(source).name, source_sha256=sha256,
                   hub_repo=hub.repo if hub else None, hub_revision=hub.revision if hub else None, **software())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Provenance | None:
        """A recorded provenance (unknown keys ignored, missing ones None); None when there is none."""
        if not isinstance(data, dict):
            return None
        known = {name: data.get(name) for name in cls.__dataclass_fields__ if name != "versions"}
        versions = data.get("versions")
        return cls(**known, versions=dict(versions) if isinstance(versions, dict) else {})

    @classmethod
    def from_manifest(cls, manifest: Path) -> Provenance | None:
        """What an artifact's manifest (``artifact.json``, ``export.json``) says it was made from. None
        when there is no readable manifest; an older one without provenance gives its source name and
        sha256 alone (``source.sha256`` or ``source_sha256``)."""
        try:
            data = json.loads(Path(manifest).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        recorded = cls.from_dict(data.get("provenance"))
        if recorded is not None:
            return recorded
        source = data.get("source") if isinstance(data.get("source"), dict) else {}
        sha256 = source.get("sha256") or data.get("source_sha256")
        return cls(source_name=source.get("name"), source_sha256=sha256) if sha256 else None

    def source_label(self) -> str:
        """``sha256 <hex> (ORG/NAME@<commit>)``, the hub part only when known."""
        text = f"sha256 {self.source_sha256 or '?'}"
        if self.hub_repo:
            text += f" ({self.hub_repo}@{self.hub_revision or '?'})"
        return text

    def made_by(self) -> str:
        """``streaming-parity 0.1.0 (commit 1234567890ab)``."""
        text = f"{DISTRIBUTION} {self.harness_version or '?'}"
        return text + (f" (commit {self.git_commit[:12]})" if self.git_commit else "")

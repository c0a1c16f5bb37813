"""A hub cache laid out by hand, in huggingface_hub's format, for tests that never reach the network.

``models--ORG--NAME/blobs/<sha256>`` holds each file once, ``snapshots/<commit>/<path>`` links to
it and ``refs/<branch>`` names the commit a branch points at: what ``snapshot_download`` reads
with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def seed(cache: Path, repo: str, files: dict[str, Path], *, branch: str | None = "main",
         commit: str | None = None) -> str:
    """Put ``files`` ({path in the repository: local file}) into ``cache`` as ``repo`` at ``commit``
    (default: a hash of the content), with ``refs/<branch>`` pointing at it; returns the commit."""
    digests = {name: hashlib.sha256(Path(source).read_bytes()).hexdigest() for name, source in files.items()}
    commit = commit or hashlib.sha1(repr(sorted(digests.items())).encode()).hexdigest()
    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    for name, source in files.items():
        blob = root / "blobs" / digests[name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(Path(source).read_bytes())
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    if branch:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / branch).write_text(commit)
    return commit


def seed_directory(cache: Path, repo: str, directory: Path, **options) -> str:
    """Every file of ``directory`` (an export, an artifact) as the repository's files."""
    files = {p.relative_to(directory).as_posix(): p for p in sorted(Path(directory).rglob("*")) if p.is_file()}
    return seed(cache, repo, files, **options)

"""``parity publish``: upload a verified MLX artifact to the hub.

Only an artifact whose ``parity.json`` records a passed verification of the weights it holds is
published: no ``parity.json`` (converted with ``--skip-verify``), a failed one, or weights changed
since the verification, and nothing is uploaded. The files uploaded are exactly those ``--dry-run``
lists: every file of the artifact directory (hidden ones excepted), with a model card written by
``parity convert --model-card`` written again so that its verify command names the repository.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming_parity.app import model_card
from streaming_parity.backends.mlx.artifact import MODEL_CARD_FILE, PARITY_FILE, is_artifact
from streaming_parity.core.errors import InputNotFound
from streaming_parity.core.system.provenance import sha256_path


class PublishRefused(RuntimeError):
    """The artifact is not one this project vouches for (exit 1, with the reason)."""


@dataclass(frozen=True)
class PlannedFile:
    name: str  # path relative to the artifact directory
    size: int
    sha256: str
    content: bytes | None = None  # what will be written before the upload (the model card), else the file's


def check_publishable(directory: Path) -> dict[str, Any]:
    """The verification record of a publishable artifact; ``PublishRefused`` names why it is not one."""
    directory = Path(directory)
    if not is_artifact(directory):
        raise InputNotFound(f"{directory}: not an MLX artifact directory (parity convert writes one)")
    parity = directory / PARITY_FILE
    if not parity.is_file():
        raise PublishRefused(f"{directory} has no {PARITY_FILE}: it was never verified (converted with "
                             f"--skip-verify); run parity convert without it, or parity verify {directory} --nemo ...")
    try:
        record = json.loads(parity.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PublishRefused(f"{parity}: unreadable ({error})") from None
    if not isinstance(record, dict) or record.get("passed") is not True:
        summary = record.get("summary", "no summary") if isinstance(record, dict) else "not a verification record"
        raise PublishRefused(f"{parity} records a failed verification: {summary}")
    verified = (record.get("artifact") or {}).get("weights_sha256") or {}
    for name, sha256 in verified.items():
        if not (directory / name).is_file() or sha256_path(directory / name) != sha256:
            raise PublishRefused(f"{directory / name} changed after the verification in {PARITY_FILE}; "
                                 f"verify it again (parity verify {directory} --nemo ...)")
    return record


def plan(directory: Path, repo: str, revision: str | None = None) -> list[PlannedFile]:
    """Every file that would be uploaded, with its size and sha256."""
    directory = Path(directory)
    planned = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if any(part.startswith(".") for part in Path(name).parts):
            continue
        content = None
        if name == MODEL_CARD_FILE and model_card.is_generated(path):
            reference = repo + (f"@{revision}" if revision else "")
            content = model_card.render(directory, artifact_ref=reference).encode("utf-8")
        if content is not None:
            planned.append(PlannedFile(name, len(content), hashlib.sha256(content).hexdigest(), content))
        else:
            planned.append(PlannedFile(name, path.stat().st_size, sha256_path(path)))
    return planned


def upload(directory: Path, repo: str, files: Sequence[PlannedFile], *, revision: str | None = None,
           private: bool = False) -> Any:
    """Write the planned model card, then upload exactly ``files`` (``HfApi.upload_folder``)."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    for file in files:
        if file.content is not None:
            (directory / file.name).write_bytes(file.content)
    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo, repo_type="model", branch=revision, exist_ok=True)
    return api.upload_folder(folder_path=str(directory), repo_id=repo, repo_type="model", revision=revision,
                             allow_patterns=[file.name for file in files],
                             commit_message=f"MLX artifact verified against NeMo ({len(files)} files)")

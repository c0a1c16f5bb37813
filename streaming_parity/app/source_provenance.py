"""Provenance of the sources a command ran on, for results files and the report's header.

The record type and the software it names live in ``streaming_parity.core.system.provenance`` (backends write
it into their exports and manifests); here the application adds what only it knows: which hub
repository and commit a source was resolved from, and each backend's artifact manifest read
through the registry (``BackendEntry.manifest``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from streaming_parity.core.system.provenance import HubOrigin, Provenance, ResolvedSource, sha256_path

log = logging.getLogger(__name__)


def manifest_provenance(backend: str, path: Path) -> Provenance | None:
    """The provenance an artifact of ``backend`` records in its manifest (None: no manifest, or an
    older one without it; the source sha256 alone is kept when that is all it records)."""
    from streaming_parity.interface.registry import get

    name = get(backend).manifest
    manifest = Path(path) / name if name and Path(path).is_dir() else None
    if manifest is None or not manifest.is_file():
        return None
    return Provenance.from_manifest(manifest)


def hub_fields(hub: HubOrigin | None) -> dict[str, Any]:
    return {"hub_repo": hub.repo if hub else None, "hub_revision": hub.revision if hub else None}


def reference_record(source: ResolvedSource, sha256: str | None = None) -> dict[str, Any]:
    """The checkpoint every candidate is compared against."""
    return {"backend": "nemo", "path": str(source.path), "sha256": sha256 or sha256_path(source.path),
            **hub_fields(source.hub)}


def artifact_record(backend: str, label: str, source: ResolvedSource, model_sha256: str | None) -> dict[str, Any]:
    """A candidate's artifact: its own hash and hub origin, and what its manifest says made it."""
    made = manifest_provenance(backend, source.path)
    record = {"backend": label, "path": str(source.path), "sha256": sha256_path(source.path),
              **hub_fields(source.hub),
              "source_sha256": made.source_sha256 if made else None,
              "source_hub_repo": made.hub_repo if made else None,
              "source_hub_revision": made.hub_revision if made else None,
              "made_by": made.made_by() if made and made.harness_version else None}
    if made and made.source_sha256 and model_sha256 and made.source_sha256 != model_sha256:
        log.warning("%s %s was made from %s, not from the compared checkpoint (sha256 %s)",
                    label, source.path, made.source_label(), model_sha256)
    return record



def record_reference(reference: Any, nemo_path: Path, utterances: Any, contexts: Any, out: Path, *,
                     hub: HubOrigin | None = None, progress: Any = None, **options: Any) -> Path:
    """Write a recording of ``reference`` (loaded from ``nemo_path``; ``streaming_parity.judge.recording``) with
    what every recording says of its checkpoint: name, sha256 and hub origin, the NeMo config, vocabulary and
    greedy decoding's ``max_symbols`` (a model description rebuilt without NeMo), and how it was made (versions,
    device, int8 kernel path). ``options``: ``write_recording``'s (modes, offline)."""
    from streaming_parity.core.nemo_file import inspect_nemo
    from streaming_parity.core.system.cpu import int8_kernel_path
    from streaming_parity.judge.recording import write_recording

    sha256 = sha256_path(nemo_path)
    model = {"name": Path(nemo_path).name, "sha256": sha256, **hub_fields(hub),
             "config": inspect_nemo(nemo_path).config, "vocabulary": list(reference.info.vocabulary),
             "max_symbols": reference.info.max_symbols}
    provenance = {**Provenance.collect(nemo_path, sha256=sha256, hub=hub).to_dict(),
                  "device": str(getattr(reference, "device", "cpu")), "int8_kernel_path": int8_kernel_path().name}
    return write_recording(reference, utterances, contexts, out, model=model, provenance=provenance,
                           progress=progress, **options)

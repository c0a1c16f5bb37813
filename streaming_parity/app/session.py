"""Library entry point behind ``parity compare``: the reference against open candidate backends.

The CLI only parses and prints; everything it does is reachable from here (and from tests). The
streaming, comparing and recording is ``streaming_parity.judge.loop.stream_and_compare``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from streaming_parity.core.nemo_file import sha256_file
from streaming_parity.core.system.progress import as_progress
from streaming_parity.core.system.provenance import HubOrigin
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.utterance import Utterance
from streaming_parity.judge.loop import Candidate, LoopOutcome, LoopProgress, stream_and_compare
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import Tolerances

# What ``compare_backends`` returns: the results, and the in-memory runs for callers that look further.
ParityReport = LoopOutcome


def fixture_utterances() -> list[Utterance]:
    from streaming_parity.fixtures.models import speech_manifest

    return [Utterance.from_file(entry["audio_filepath"], entry["text"]) for entry in speech_manifest()]


def held_out_utterances(limit: int | None = None) -> list[Utterance]:
    """The trained fixture's evaluation subset (a fixed mix of seen and held-out voices, sentences
    within its vocabulary), so that its WER means something: ``streaming_parity/fixtures/trained/evaluate.py``."""
    from streaming_parity.fixtures.trained.evaluate import subset, test_entries

    entries = subset(test_entries())[:limit] if limit else subset(test_entries())
    return [Utterance.from_file(entry["audio_filepath"], entry["text"]) for entry in entries]


def model_record(model_path: Path | None, hub: HubOrigin | None = None) -> dict:
    """How results name the checkpoint they judged (and the hub repository and commit it came from)."""
    origin = {"hub_repo": hub.repo if hub else None, "hub_revision": hub.revision if hub else None}
    if model_path is None:
        return {"path": None, "sha256": None, "name": None, **origin}
    return {"path": str(model_path), "sha256": sha256_file(model_path), "name": Path(model_path).stem, **origin}


def compare_backends(reference: Backend, candidates: Iterable[Backend], utterances: Sequence[Utterance],
                     att_context_sizes: Sequence[Sequence[int]], tolerances: Tolerances, *,
                     model_path: Path | None = None, model_hub: HubOrigin | None = None,
                     backends: Sequence[dict[str, Any]] | None = None, include_offline: bool = True,
                     progress: Callable[[str], None] | LoopProgress | None = None) -> LoopOutcome:
    """Stream every utterance at every lookahead through the reference and each (open) candidate.

    ``model_hub``: where the checkpoint came from; ``backends``: each backend's provenance record
    (``streaming_parity.app.source_provenance``), kept in the results' ``model``. ``progress``: a line callback, or
    the loop's callbacks (a ``streaming_parity.core.system.progress.ProgressBar``)."""
    results = Results(model=model_record(model_path, model_hub), tolerances=tolerances.source)
    if backends:
        results.model["backends"] = list(backends)
    loop_progress = as_progress(progress) if progress else None
    return stream_and_compare(reference, [Candidate.of(c) for c in candidates], utterances, att_context_sizes,
                              tolerances, include_offline=include_offline, results=results, progress=loop_progress)

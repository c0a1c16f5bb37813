"""The compare session: what ``parity compare``, the nightly's peer check and ``parity verify`` run.

One session loads the reference and the candidates, records their provenance, streams the reference
once (``streaming_parity.judge.loop``), judges every candidate against the stored runs, and, for a peer
runtime that leaves the reference, bisects its stack and diagnoses it while it is still open, from the
same stored runs. It returns one results object. The CLI only parses and prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streaming_parity.core.nemo_file import sha256_file
from streaming_parity.core.system.progress import as_progress
from streaming_parity.core.system.provenance import HubOrigin
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.utterance import Utterance
from streaming_parity.judge.loop import AfterCandidate, Candidate, LoopOutcome, LoopProgress, stream_and_compare
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import Tolerances

if TYPE_CHECKING:
    from streaming_parity.judge.recording import Recording

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


def compare_backends(reference: Backend | Recording, candidates: Iterable[Backend | Candidate],
                     utterances: Sequence[Utterance],
                     att_context_sizes: Sequence[Sequence[int]], tolerances: Tolerances, *,
                     model_path: Path | None = None, model_hub: HubOrigin | None = None,
                     backends: Sequence[dict[str, Any]] | None = None, include_offline: bool = True,
                     peer_sources: Mapping[str, Path] | None = None, diagnose_utterances: int | None = None,
                     progress: Callable[[str], None] | LoopProgress | None = None, **loop_options: Any) -> LoopOutcome:
    """Stream every utterance at every lookahead through the reference and each candidate (an open backend,
    or a ``Candidate`` opened when its turn comes), judged against the reference's stored runs.

    ``reference``: the reference backend, or a recording of it (``streaming_parity.judge.recording``): its runs
    are then read, not streamed, and no peer is bisected (that needs the live front end).

    ``model_hub``: where the checkpoint came from; ``backends``: each backend's provenance record
    (``streaming_parity.app.source_provenance``), kept in the results' ``model``. ``peer_sources``: the files of
    each transcript-level candidate (by its label, ``name:dtype``): a peer that leaves the reference is then
    bisected and diagnosed (on the first ``diagnose_utterances``) while open, from the stored reference runs.
    ``progress``: a line callback, or the loop's callbacks (a ``ProgressBar``). ``loop_options`` go to
    ``stream_and_compare`` (a run store, ``close_reference``, ``on_failure``, ...)."""
    results = Results(model=model_record(model_path, model_hub), tolerances=tolerances.source)
    if backends:
        results.model["backends"] = list(backends)
    loop_progress = as_progress(progress) if progress else None
    candidates = [c if isinstance(c, Candidate) else Candidate.of(c) for c in candidates]
    followup = None
    if peer_sources:
        if not isinstance(reference, Backend):
            raise ValueError("a peer's stack bisection needs the live reference's front end, not a recording")
        if model_path is None:
            raise ValueError("bisecting a peer runtime needs the checkpoint (model_path)")
        # The bisection drives the peer's own files in the first-chunk mode the peer runs (pad-and-drop for every
        # ONNX peer export, plain for transformers' generate()): the reference must have streamed it.
        from streaming_parity.interface.registry import get

        # peer_sources is keyed by candidate label, ``backend:dtype``.
        peer_modes = tuple(get(label.partition(":")[0]).capabilities.first_chunk_modes[0] for label in peer_sources)
        loop_options["reference_modes"] = tuple(dict.fromkeys((*loop_options.get("reference_modes", ()), *peer_modes)))
        followup = peer_followup(reference, peer_sources, utterances, att_context_sizes, tolerances,
                                 nemo_path=model_path, diagnose_utterances=diagnose_utterances,
                                 say=loop_progress.phase if loop_progress else None)
    return stream_and_compare(reference, candidates, utterances, att_context_sizes, tolerances,
                              include_offline=include_offline, results=results, progress=loop_progress,
                              after_candidate=followup, **loop_options)


def peer_followup(reference: Backend, peer_sources: Mapping[str, Path], utterances: Sequence[Utterance],
                  contexts: Sequence[Sequence[int]], tolerances: Tolerances, *, nemo_path: Path,
                  diagnose_utterances: int | None = None, say: Callable[[str], None] | None = None) -> AfterCandidate:
    """The loop's ``after_candidate`` hook: a transcript-level candidate, still open, is bisected against the
    reference's stored runs and diagnosed (``streaming_parity.app.peers``)."""
    from streaming_parity.app.peers import bisect_peer_runs, checkpoint_tensors, diagnose_peer_runtime

    checkpoint = checkpoint_tensors(nemo_path)

    def followup(candidate: Candidate, backend: Backend, outcome: LoopOutcome) -> None:
        if backend.capabilities.input != "audio" or candidate.label not in peer_sources:
            return
        bisect_peer_runs(outcome.reference, peer_sources[candidate.label], backend, utterances, contexts, tolerances,
                         outcome.results, nemo_path=nemo_path, progress=say)
        diagnose_peer_runtime(reference, backend, utterances[:diagnose_utterances], contexts, tolerances,
                              outcome.results, checkpoint=checkpoint, progress=say)

    return followup

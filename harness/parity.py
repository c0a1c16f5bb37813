"""Library entry points behind ``parity compare``, ``parity transcribe`` and ``parity demo``.

The CLI only parses and prints; everything it does is reachable from here (and from tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from harness.audio import load_audio
from harness.chunking import FirstChunkMode
from harness.compare import (
    StreamRun,
    compare_runs,
    compare_streaming_to_offline,
    stream,
)
from harness.metrics import word_error_rate
from harness.nemo_file import sha256_file
from harness.results import Results
from harness.speakers import SpeakerTargets
from harness.streaming import Backend, decode_tokens
from harness.tolerances import Tolerances


@dataclass(frozen=True)
class Utterance:
    name: str
    audio: np.ndarray
    text: str | None = None
    # Multitalker models: who speaks when, per 80 ms encoder frame. None: NeMo's single-speaker mode.
    speaker_targets: SpeakerTargets | None = None

    @property
    def encoder_frames(self) -> int:
        return len(self.audio) // 1280 + 2  # 80 ms frames (8 x 10 ms hops), with room to spare

    def speaker_masks_for(self, backend: Backend, *, probe: bool = True) -> SpeakerTargets | None:
        """The masks this utterance feeds ``backend``'s model.

        Its own masks if it has them (a single-speaker model then refuses them); otherwise none for a
        single-speaker model, and for a multitalker model ``SpeakerTargets.turns`` (drives both
        speaker kernels, for comparisons) or, with ``probe=False``, NeMo's single-speaker mode
        (target all ones, background all zeros, for transcripts).
        """
        if self.speaker_targets is not None or not backend.info.multitalker:
            return self.speaker_targets  # a single-speaker backend refuses masks given with the audio
        if probe:
            return SpeakerTargets.turns(self.encoder_frames)
        return SpeakerTargets.single_speaker(1, self.encoder_frames)

    @classmethod
    def from_file(cls, path: str | Path, text: str | None = None, *, speaker_targets: SpeakerTargets | None = None,
                  **load_options) -> "Utterance":
        return cls(name=Path(path).name, audio=load_audio(path, **load_options), text=text,
                   speaker_targets=speaker_targets)


def long_utterance(utterances: Sequence[Utterance], seconds: float, *, gap_seconds: float = 0.3,
                   sample_rate: int = 16000) -> Utterance:
    """One stream of at least ``seconds``: whole utterances in turn (cycling), ``gap_seconds`` of silence
    between them, texts joined. Long streams saturate the channel cache and keep it moving."""
    if not utterances:
        raise ValueError("no utterances to join")
    parts, texts, total, index = [], [], 0, 0
    gap = np.zeros(int(gap_seconds * sample_rate), np.float32)
    while total < seconds * sample_rate:
        utterance = utterances[index % len(utterances)]
        parts += [gap, utterance.audio] if parts else [utterance.audio]
        texts.append(utterance.text or "")
        total = sum(len(p) for p in parts)
        index += 1
    return Utterance(name=f"fixture-speech-{seconds:g}s", audio=np.concatenate(parts),
                     text=" ".join(t for t in texts if t) or None)


def fixture_utterances() -> list[Utterance]:
    from fixtures.models import speech_manifest

    return [Utterance.from_file(entry["audio_filepath"], entry["text"]) for entry in speech_manifest()]


def shared_mode(*backends: Backend) -> FirstChunkMode:
    """Plain mode where every backend runs it (comparable to offline), else pad-and-drop."""
    for mode in (FirstChunkMode.PLAIN, FirstChunkMode.PAD_AND_DROP):
        if all(mode.value in b.first_chunk_modes for b in backends):
            return mode
    raise ValueError("the backends share no first-chunk mode: "
                     + ", ".join(f"{b.name}: {'/'.join(b.first_chunk_modes)}" for b in backends))


def transcribe(backend: Backend, utterance: Utterance, att_context_size: Sequence[int]) -> tuple[str, list[int]]:
    mel, _ = backend.features(utterance.audio[None])
    mode = shared_mode(backend)
    run = stream(backend, mel, att_context_size, mode, dtype=backend.dtype,
                 speaker_masks=utterance.speaker_masks_for(backend, probe=False))
    return decode_tokens(backend.info.vocabulary, run.tokens), run.tokens


@dataclass
class ParityReport:
    results: Results
    runs: dict[tuple[str, str, tuple[int, int]], StreamRun] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.results.passed


def compare_backends(reference: Backend, candidates: Iterable[Backend], utterances: Sequence[Utterance],
                     att_context_sizes: Sequence[Sequence[int]], tolerances: Tolerances, *,
                     model_path: Path | None = None, include_offline: bool = True,
                     progress: Callable[[str], None] | None = None) -> ParityReport:
    """Stream every utterance at every lookahead through the reference and each candidate.

    The mel is computed once per utterance by the reference front end and the identical chunks go
    to every backend; each candidate's own front end is compared as the ``mel`` tap.
    """
    candidates = list(candidates)
    model = {"path": str(model_path) if model_path else None,
             "sha256": sha256_file(model_path) if model_path else None,
             "name": model_path.stem if model_path else None}
    results = Results(model=model, tolerances=tolerances.source)
    report = ParityReport(results)
    num_layers = reference.info.num_layers
    for utterance in utterances:
        mel, _ = reference.features(utterance.audio[None])
        own_features = {c.name: c.features(utterance.audio[None])[0] for c in candidates}
        masks = utterance.speaker_masks_for(reference)
        for context in att_context_sizes:
            context = (int(context[0]), int(context[1]))
            if progress:
                progress(f"{utterance.name} [{context[0]},{context[1]}]")
            plain_reference = None
            if include_offline:
                plain_reference = stream(reference, mel, context, FirstChunkMode.PLAIN, speaker_masks=masks)
                # NeMo's streaming buffer streams the whole mel tensor, including the frame past
                # seq_len (= samples // hop) that the front end masks to zero; with seq_len as the
                # offline length, the last 1-3 frames differ by ~1e-2 whenever that frame adds an
                # encoder frame. The offline forward therefore sees exactly the streamed input.
                offline = reference.offline(mel, np.array([mel.shape[-1]] * mel.shape[0]), context,
                                            speaker_masks=masks)
                results.comparisons.append(compare_streaming_to_offline(
                    plain_reference, offline, tolerances, num_layers=num_layers, utterance=utterance.name))
                _record(results, report, plain_reference, utterance, reference.info.vocabulary)
            reference_runs: dict[FirstChunkMode, StreamRun] = {}
            if plain_reference is not None:
                reference_runs[FirstChunkMode.PLAIN] = plain_reference
            for candidate in candidates:
                mode = shared_mode(reference, candidate)
                if mode not in reference_runs:
                    reference_runs[mode] = stream(reference, mel, context, mode, features=mel, speaker_masks=masks)
                    _record(results, report, reference_runs[mode], utterance, reference.info.vocabulary)
                ref_run = reference_runs[mode]
                ref_run.features = mel
                cand_run = stream(candidate, mel, context, mode, dtype=candidate.dtype,
                                  features=own_features[candidate.name], speaker_masks=masks)
                _record(results, report, cand_run, utterance, candidate.info.vocabulary)
                results.comparisons.append(compare_runs(ref_run, cand_run, tolerances, num_layers=num_layers,
                                                        utterance=utterance.name))
    return report


def _record(results: Results, report: ParityReport, run: StreamRun, utterance: Utterance,
            vocabulary: Sequence[str]) -> None:
    key = (f"{run.backend}:{run.dtype}", utterance.name, tuple(run.att_context_size))
    if key in report.runs and report.runs[key].mode == run.mode:
        return
    report.runs[key] = run
    text = decode_tokens(vocabulary, run.tokens)
    results.transcripts.append({
        "utterance": utterance.name, "backend": run.backend, "dtype": run.dtype, "mode": run.mode,
        "att_context_size": list(run.att_context_size), "text": text, "reference_text": utterance.text,
        "tokens": run.tokens,
        "wer": word_error_rate([utterance.text], [text]) if utterance.text else None,
    })
    results.timings.append({"backend": run.backend, "dtype": run.dtype, "mode": run.mode,
                            "att_context_size": list(run.att_context_size), "utterance": utterance.name,
                            "step_seconds": run.step_seconds})

"""An utterance: 16 kHz mono audio with its reference text and, for multitalker models, who speaks when;
for prompt-conditioned models, its locale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streaming_parity.interface.audio import load_audio
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.model_info import ModelInfo
from streaming_parity.interface.speakers import SpeakerTargets


@dataclass(frozen=True)
class Utterance:
    name: str
    audio: np.ndarray
    text: str | None = None
    # Multitalker models: who speaks when, per 80 ms encoder frame. None: NeMo's single-speaker mode.
    speaker_targets: SpeakerTargets | None = None
    # Prompt-conditioned models: the locale the stream is given (a key of the model's prompt_dictionary).
    # None: the model's default (``ModelInfo.default_prompt``).
    prompt: str | None = None

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

    def prompt_for(self, info: ModelInfo) -> str | None:
        """The locale this utterance streams with on a model described by ``info``: its own (a model without
        a prompt kernel then refuses it), else the model's default; None for a model without a prompt."""
        if self.prompt is not None:
            info.prompt_index(self.prompt)
            return self.prompt
        return info.default_prompt

    @classmethod
    def from_file(cls, path: str | Path, text: str | None = None, *, speaker_targets: SpeakerTargets | None = None,
                  prompt: str | None = None, **load_options) -> Utterance:
        return cls(name=Path(path).name, audio=load_audio(path, **load_options), text=text,
                   speaker_targets=speaker_targets, prompt=prompt)


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
    prompts = {utterance.prompt for utterance in utterances}
    return Utterance(name=f"fixture-speech-{seconds:g}s", audio=np.concatenate(parts),
                     text=" ".join(t for t in texts if t) or None,
                     prompt=prompts.pop() if len(prompts) == 1 else None)

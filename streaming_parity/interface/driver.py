"""Feeding a chunk schedule through one backend: the only streaming loop of the harness.

``iter_steps`` yields each ``StepOutput`` as it is produced (run stores spool them to disk);
``stream`` keeps them in memory as a ``StreamRun``. Judging two runs is ``streaming_parity.judge``'s job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from streaming_parity.core.errors import InvalidInput
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import ChunkSchedule, FirstChunkMode, shared_first_chunk_mode
from streaming_parity.interface.decoding import decode_tokens
from streaming_parity.interface.speakers import SpeakerTargets
from streaming_parity.interface.taps import TAP_CTC
from streaming_parity.interface.types import StepOutput
from streaming_parity.interface.utterance import Utterance


@dataclass
class StreamRun:
    """One utterance streamed through one backend at one lookahead."""

    backend: str
    dtype: str
    att_context_size: tuple[int, int]
    mode: str
    steps: list[StepOutput]
    features: np.ndarray | None = None  # the backend's own front-end output, when computed

    @property
    def tokens(self) -> list[int]:
        return [t for step in self.steps for t in step.tokens[0]]

    @property
    def ctc_tokens(self) -> list[int] | None:
        """The CTC greedy transcript of a hybrid model (batch item 0); None when a step has none."""
        if not self.steps or any(step.ctc_tokens is None for step in self.steps):
            return None
        return [t for step in self.steps for t in step.ctc_tokens[0]]

    @property
    def encoded(self) -> np.ndarray:
        return np.concatenate([step.encoded[..., : int(step.encoded_len[0])] for step in self.steps], axis=-1)

    @property
    def step_seconds(self) -> list[float]:
        return [step.seconds for step in self.steps]

    def step_taps(self, index: int) -> dict[str, np.ndarray]:
        return self.steps[index].taps_and_caches()


def iter_steps(backend: Backend, mel: np.ndarray, att_context_size: Sequence[int],
               mode: FirstChunkMode | str = FirstChunkMode.PLAIN, *,
               speaker_masks: SpeakerTargets | None = None,
               forced_decisions: Sequence[Sequence[int]] | None = None,
               audio: np.ndarray | None = None, prompt: str | None = None) -> Iterator[StepOutput]:
    """Feed the chunk schedule of ``mel`` ``[1, n_mels, T]`` through ``backend``, yielding each step.

    A backend whose ``Capabilities.input`` is ``"audio"`` (a peer runtime: its own front end and
    chunking) gets the utterance's ``audio`` ``[1, samples]`` instead and yields its own steps.

    ``speaker_masks`` are utterance-level (one value per encoder frame); each step gets the slice
    NeMo's multitalker streaming driver would hand it (``SpeakerTargets.for_step``).
    ``forced_decisions``: teacher forcing, the reference's greedy decision at every joint call, per
    step (``Capabilities.teacher_forcing``). ``prompt``: a prompt-conditioned model's locale for the
    stream (None: never set, NeMo's bypass).
    """
    if forced_decisions is not None and not backend.capabilities.teacher_forcing:
        raise ValueError(f"{backend.name} cannot decode with forced decisions (no teacher forcing)")
    if backend.capabilities.input == "audio":
        if audio is None:
            raise InvalidInput(f"{backend.name} runs its own front end: it needs the utterance's audio, not mel")
        if speaker_masks is not None:
            raise InvalidInput(f"{backend.name} takes no speaker masks")
        yield from backend.stream_audio(np.atleast_2d(np.asarray(audio, np.float32)), att_context_size,
                                        prompt=prompt)
        return
    schedule = ChunkSchedule(backend.streaming_config(att_context_size), mode)
    state = backend.initial_state(att_context_size, batch_size=mel.shape[0], prompt=prompt)
    if speaker_masks is not None:
        speaker_masks.check_batch(mel.shape[0])
    for index, chunk in enumerate(schedule.chunks(mel)):
        kwargs = {} if speaker_masks is None else {
            "speaker_masks": speaker_masks.for_step(index, int(att_context_size[1]))}
        if forced_decisions is not None:
            if index >= len(forced_decisions):
                raise ValueError(f"forced decisions cover {len(forced_decisions)} steps, the stream has more")
            kwargs["forced_decisions"] = forced_decisions[index]
        output = backend.step(chunk, state, **kwargs)
        yield output
        state = output.state


def stream(backend: Backend, mel: np.ndarray, att_context_size: Sequence[int],
           mode: FirstChunkMode | str = FirstChunkMode.PLAIN, *, dtype: str = "float32",
           speaker_masks: SpeakerTargets | None = None, features: np.ndarray | None = None,
           forced_decisions: Sequence[Sequence[int]] | None = None, audio: np.ndarray | None = None,
           prompt: str | None = None) -> StreamRun:
    """``iter_steps`` kept in memory as a ``StreamRun`` (``streaming_parity.judge.spool`` keeps it on disk instead)."""
    steps = list(iter_steps(backend, mel, att_context_size, mode, speaker_masks=speaker_masks,
                            forced_decisions=forced_decisions, audio=audio, prompt=prompt))
    return StreamRun(backend=backend.name, dtype=dtype, att_context_size=tuple(att_context_size),
                     mode=FirstChunkMode(mode).value, steps=steps, features=features)


def shared_mode(*backends: Backend) -> FirstChunkMode:
    """Plain mode where every backend runs it (comparable to offline), else pad-and-drop."""
    try:
        return shared_first_chunk_mode(*(b.capabilities for b in backends))
    except ValueError:
        raise InvalidInput("the backends share no first-chunk mode: "
                         + ", ".join(f"{b.name}: {'/'.join(b.first_chunk_modes)}" for b in backends)) from None


def stream_utterance(backend: Backend, utterance: Utterance, att_context_size: Sequence[int]) -> StreamRun:
    """One utterance through one backend in its own first-chunk mode, with the utterance's speaker masks
    and prompt (what ``transcribe`` and ``transcripts`` decode)."""
    audio_input = backend.capabilities.input == "audio"
    mel = None if audio_input else backend.features(utterance.audio[None])[0]
    mode = shared_mode(backend)
    return stream(backend, mel, att_context_size, mode, dtype=backend.dtype,
                  speaker_masks=None if audio_input else utterance.speaker_masks_for(backend, probe=False),
                  audio=utterance.audio[None], prompt=utterance.prompt_for(backend.info))


def transcribe(backend: Backend, utterance: Utterance, att_context_size: Sequence[int]) -> tuple[str, list[int]]:
    run = stream_utterance(backend, utterance, att_context_size)
    return decode_tokens(backend.info.vocabulary, run.tokens), run.tokens


def transcripts(backend: Backend, utterance: Utterance, att_context_size: Sequence[int]) -> dict[str, str]:
    """Every transcript of one streamed run, by decoder: ``rnnt`` (the transducer's greedy), and ``ctc``
    (the CTC head's greedy, over the same vocabulary) for a hybrid RNNT-CTC model."""
    run = stream_utterance(backend, utterance, att_context_size)
    texts = {"rnnt": decode_tokens(backend.info.vocabulary, run.tokens)}
    # A backend that declares the ``ctc`` tap for this model owes its greedy labels at every step; one that
    # does not (a transcript-level peer running only the transducer) has no CTC transcript to give.
    if TAP_CTC in backend.produced_taps():
        if run.ctc_tokens is None:
            raise InvalidInput(f"{backend.name}: the model has a CTC head but a step of the run carries no "
                               "CTC labels")
        texts["ctc"] = decode_tokens(backend.info.vocabulary, run.ctc_tokens)
    return texts

"""The streaming interface every backend implements: the ``Backend`` ABC, the ``Capabilities`` it declares,
and ``AudioInputBackend``, the base of a peer runtime that takes audio.

Nothing backend-specific lives here. A backend takes identical mel chunks (cut by
``streaming_parity.interface.chunking.ChunkSchedule``) and returns a ``StepOutput`` per chunk; comparison is done
elsewhere (``streaming_parity.judge.compare``) on the returned arrays, so results are data that can be saved
and re-judged.

What crosses the interface lives beside it: the tap names (``streaming_parity.interface.taps``), the state and
output types (``streaming_parity.interface.types``), the model's description (``streaming_parity.interface.model_info``)
and the shared decoding helpers (``streaming_parity.interface.decoding``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from streaming_parity.core.errors import Unsupported
from streaming_parity.interface.chunking import Chunk, StreamingConfig
from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.quantization import Int8Quantization
from streaming_parity.interface.speakers import SpeakerMaskError, SpeakerTargets
from streaming_parity.interface.taps import TAP_CTC, TAP_PROMPT, TENSOR_TAP_KINDS, tap_kind
from streaming_parity.interface.types import OfflineOutput, StepOutput, StreamingState


@dataclass(frozen=True)
class Capabilities:
    """What a backend produces, declared so that suites, the nightly and reports read it instead of
    special-casing backend names.

    - ``first_chunk_modes``: the ``FirstChunkMode`` values it streams (an ONNX export bakes
      pad-and-drop into its graph);
    - ``taps``: the tap kinds it returns (``TENSOR_TAP_KINDS`` or a subset; empty for a
      transcript-level backend, e.g. a peer runtime that only gives tokens); ``ctc`` is returned
      only for a model that has a CTC head and ``prompt`` only for a prompt-conditioned model
      (``Capabilities.for_model``, ``Backend.produced_taps``);
    - ``caches``: whether its ``StreamingState`` carries the encoder caches in canonical layout;
    - ``offline``: whether ``Backend.offline`` is implemented;
    - ``teacher_forcing``: whether ``step`` accepts ``forced_decisions`` (the reference's greedy
      decision at each joint call, fed to its prediction net instead of its own argmax), so that its
      decoder and joint rows stay comparable after a near-tie (``streaming_parity.judge.ties``);
    - ``input``: ``"mel"`` (``step`` takes the harness's mel chunks) or ``"audio"`` (a peer runtime with
      its own front end, chunking and decoding: ``stream_audio`` takes the utterance's samples and
      yields one ``StepOutput`` per chunk it decoded, its tokens only);
    - ``peer``: it runs another project's model (transformers' classes), not this project's artifact: its
      divergences are located and diagnosed, they do not gate a verdict (as a peer runtime's, ``input == "audio"``);
    - ``sample_rate`` and ``channels``: the audio ``features`` and ``stream_audio`` take (16 kHz mono for every
      backend so far). Audio at another rate or with more channels is resampled or mixed down by the
      harness's input stage only when asked (``--resample``, ``--mix-to-mono``), otherwise refused
      (``streaming_parity.interface.audio.conform_samples``).
    """

    first_chunk_modes: tuple[str, ...] = ("plain", "pad-and-drop")
    taps: tuple[str, ...] = TENSOR_TAP_KINDS
    caches: bool = True
    offline: bool = True
    teacher_forcing: bool = False
    input: str = "mel"
    peer: bool = False
    sample_rate: int = 16000
    channels: int = 1

    @property
    def gating(self) -> bool:
        """Whether its failures gate a verdict: this project's artifacts, not peers' models or runtimes."""
        return self.input == "mel" and not self.peer

    @property
    def tensor_level(self) -> bool:
        return bool(self.taps) or self.caches

    def produces(self, tap: str) -> bool:
        return tap_kind(tap) in self.taps

    def for_model(self, info: ModelInfo) -> Capabilities:
        """What the backend produces for one model: ``ctc`` only when the model has a CTC head, ``prompt``
        only when it has a prompt kernel."""
        absent = (() if info.ctc_head else (TAP_CTC,)) + (() if info.prompted else (TAP_PROMPT,))
        return replace(self, taps=tuple(kind for kind in self.taps if kind not in absent))


class Backend(abc.ABC):
    """A runner of one model on one framework, behind the shared streaming interface.

    Backends are registered in ``backends.REGISTRY``; the suites are parametrized over that
    registry, so a new backend appears in every suite by registering. A backend is a context
    manager: ``with entry.load(path) as backend:`` closes it (and frees its model) on exit.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    dtype: str = "float32"
    info: ModelInfo

    @property
    def first_chunk_modes(self) -> tuple[str, ...]:
        return self.capabilities.first_chunk_modes

    def produced_taps(self) -> tuple[str, ...]:
        """The tap kinds this backend returns for the model it runs (``capabilities`` declares what it can
        produce for any model, and is what the registry entry holds)."""
        return self.capabilities.for_model(self.info).taps

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def initial_state(self, att_context_size: Sequence[int], batch_size: int = 1, *,
                      prompt: str | None = None) -> StreamingState:
        return self.info.initial_state(att_context_size, batch_size, prompt=prompt)

    def streaming_config(self, att_context_size: Sequence[int]) -> StreamingConfig:
        return self.info.streaming_config(att_context_size)

    @abc.abstractmethod
    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Front end: float32 audio ``[B, samples]`` at 16 kHz -> (mel ``[B, n_mels, T]``, lengths ``[B]``)."""

    @abc.abstractmethod
    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks: SpeakerTargets | None = None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        """Run one chunk of the schedule; return encoder output, new state, tokens and taps.

        ``speaker_masks`` (multitalker models only) is this step's slice of the utterance masks
        (``SpeakerTargets.for_step``); the backend reconciles it with the chunk's frames as NeMo's
        ``solve_length_mismatch`` does. ``None`` means "not set", NeMo's behaviour without targets.
        ``forced_decisions`` (backends declaring ``teacher_forcing``; batch 1): the decision (blank id
        or label) to take at each joint call of this step instead of the argmax; the joint tap still
        holds the backend's own logits. A backend without teacher forcing refuses it.
        """

    @abc.abstractmethod
    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks: SpeakerTargets | None = None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        """Whole-utterance forward with the attention mask of ``att_context_size``, then greedy decoding;
        ``prompt``: a prompt-conditioned model's locale (None: bypassed, as in streaming).
        ``forced_decisions`` (backends declaring ``teacher_forcing``; batch 1): the decision at every joint call
        of the whole decode, in call order, instead of the argmax, as in ``step``."""

    def close(self) -> None:  # noqa: B027 - optional: a backend without resources need not override it
        """Release the model (the bounded-memory runs load one backend at a time)."""

    def stream_audio(self, audio: np.ndarray, att_context_size: Sequence[int], *,
                     prompt: str | None = None) -> Iterator[StepOutput]:
        """``Capabilities.input == "audio"``: run the utterance ``[1, samples]`` (16 kHz float32) through the
        backend's own front end, chunking and decoding (with ``prompt``, a prompt-conditioned model's
        locale); yield one ``StepOutput`` per chunk with the tokens it added and the taps it exposes."""
        raise Unsupported(f"{self.name} streams the harness's mel chunks (Backend.step), not audio")

    def notes(self) -> list[str]:
        """Lines saying what was loaded (a detected format, taps that could not be exposed)."""
        return []

    def int8_quantization(self) -> Int8Quantization | None:
        """An int8 candidate's quantization scheme, read from its files, so that a failure can be explained by
        the CPU's int8 kernel path (``streaming_parity.judge.int8``); None for a backend that is not int8."""
        return None

    def prompt_kernel(self) -> PromptKernel | None:
        """The model's prompt kernel weights, where the backend can give them (the reference does), so that a
        candidate's ``prompt`` divergence can be explained; None otherwise."""
        return None

    # A peer runtime (``Capabilities.input == "audio"``) says how it runs, so that its stack can be
    # rebuilt piece by piece from the harness's own parts (``streaming_parity.judge.bisect``).
    def input_audio(self, audio: np.ndarray, att_context_size: Sequence[int]) -> np.ndarray:
        """The samples ``stream_audio`` actually decodes for ``audio`` ``[1, samples]`` (its tail padding added)."""
        return audio

    def own_chunks(self, mel: np.ndarray, att_context_size: Sequence[int]) -> list[Chunk] | None:
        """The chunks this backend's own streaming cuts from ``mel`` ``[1, n_mels, T]`` (None: the harness's
        ``ChunkSchedule``)."""
        return None

    def check_speaker_masks(self, speaker_masks: SpeakerTargets | None, batch: int) -> None:
        """Refuse masks for a single-speaker model, and masks of another batch size."""
        if speaker_masks is None:
            return
        if not self.info.multitalker:
            raise SpeakerMaskError(f"{self.name}: this model has no speaker kernels; speaker masks are not accepted")
        if not isinstance(speaker_masks, SpeakerTargets):
            raise SpeakerMaskError(f"{self.name}: speaker masks must be streaming_parity.interface.speakers.SpeakerTargets, "
                                   f"not {type(speaker_masks).__name__}")
        speaker_masks.check_batch(batch)


class AudioInputBackend(Backend):
    """A peer runtime with its own front end, chunking and decoding (``Capabilities.input == "audio"``): it
    implements ``features`` and ``stream_audio``; the harness's mel chunks and an offline forward are refused."""

    def step(self, chunk: Chunk, state: StreamingState, **_options) -> StepOutput:
        raise Unsupported(f"{self.name} runs its own front end and chunking: it takes audio (stream_audio), "
                          "not the harness's mel chunks")

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int],
                **_options) -> OfflineOutput:
        raise Unsupported(f"{self.name} is run as its users run it, streaming audio: no offline forward")

"""What a peer runtime can say about itself beyond its transcripts, so that the harness can name why it
departs from the reference (``streaming_parity.judge.peer_audit``).

A peer runtime loads a checkpoint its own way (its own converter, its own loader) and computes its own
features. Two of its silent failures are only visible from inside it:

- a parameter its loader never assigned (a non-strict load skips a name it does not expect and keeps
  the layer's random initial value): ``LoadedParameters`` lists what its converter wrote and what its
  model holds after loading, in the checkpoint's layout;
- a setting its front end or encoder does not carry over from the checkpoint: the runtime names each
  ``Correction`` it can apply (a setting set as the reference has it), and the harness measures
  which of them accounts for the difference.

A runtime that can say both, and can have its encoder fed a mel from elsewhere, is a ``PeerRuntime``
(it declares so by naming the protocol among its bases); one that cannot (sherpa-onnx's runtime, whose
files the harness's own ONNX driver reads, so that its stack is bisected instead) is not diagnosed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

PART_FRONT_END = "front_end"
PART_ENCODER = "encoder"


@dataclass
class LoadedParameters:
    """A peer's model after its own loader ran, against what its converter wrote.

    - ``artifact``: each tensor of the converted artifact -> the checkpoint tensor(s) it was made from
      (a summed LSTM bias names both);
    - ``parameters``: every parameter of the loaded model, by the runtime's name, converted back to the
      checkpoint's layout (a parameter the load skipped holds its initial value);
    - ``strict``: whether the loader refuses a name it does not know (False: it skips it silently).
    """

    runtime: str
    strict: bool
    artifact: Mapping[str, tuple[str, ...]]
    parameters: Mapping[str, np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class Correction:
    """A setting the peer runs differently from the reference, which it can run the reference's way."""

    name: str
    part: str  # PART_FRONT_END or PART_ENCODER
    runtime_setting: str  # what the runtime does, e.g. "reflect padding of the STFT"
    reference_setting: str  # what the reference does, e.g. "constant (zero) padding"


@runtime_checkable
class PeerRuntime(Protocol):
    """What a transcript-level peer runtime (``Capabilities.input == "audio"``) offers beyond its transcripts,
    so that ``streaming_parity.judge.peer_audit`` can name why it departs from the reference.

    A backend declares it by naming it among its bases (``class MlxAudioBackend(AudioInputBackend,
    PeerRuntime)``); the harness asks ``isinstance(backend, PeerRuntime)``, which checks that every method
    below is there (not their signatures), and skips a peer that cannot describe itself.
    """

    def features(self, audio: np.ndarray, *, corrections: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Its own front end on ``audio`` ``[B, samples]`` -> (mel ``[B, n_mels, T]``, lengths ``[B]``), with the
        named front-end ``corrections`` applied."""
        ...

    def corrections(self) -> list[Correction]:
        """The settings it does not take from the checkpoint, each of which it can run the reference's way."""
        ...

    def loaded_parameters(self) -> LoadedParameters:
        """What its converter wrote against what its loader left in the model."""
        ...

    def encode_mel(self, mel: np.ndarray, att_context_size: Sequence[int], *, offline: bool = False,
                   corrections: Sequence[str] = ()) -> list[np.ndarray]:
        """Its encoder fed ``mel`` ``[1, n_mels, T]`` from elsewhere: one ``[1, D, T_step]`` per chunk of its own
        streaming or, ``offline``, its whole-utterance forward (one array); with the named encoder
        ``corrections`` applied."""
        ...

"""The types that cross the streaming interface: the state a stream carries from step to step, what a
step and an offline run return, and the shape check that guards them.

Canonical layouts (NeMo's internal ones; a backend whose native layout differs converts at its edge):

====================  =====================  ==========================================
tensor                shape                  notes
====================  =====================  ==========================================
cache_last_channel    [L, B, C, D]           C = left attention context (70)
cache_last_time       [L, B, D, K-1]         K = depthwise conv kernel (9)
cache_last_channel_len [B] int64             valid frames in the channel cache
decoder h, c          [layers, B, H]         RNNT prediction-net LSTM state
====================  =====================  ==========================================

A hybrid model's CTC head carries the label of a stream's last frame (``StreamingState.ctc_last_label``)
and a step returns the labels it emitted (``StepOutput.ctc_tokens``; ``streaming_parity.interface.decoding``).

A prompt-conditioned model (Nemotron-3.5, ``EncDecRNNTBPEModelWithPrompt``) takes a locale per stream
(``StreamingState.prompt``, set by ``initial_state(..., prompt=...)``; ``offline(..., prompt=...)``).
Each backend maps it to a one-hot column through its own copy of the model's ``prompt_dictionary``,
so a converted artifact with a shifted dictionary shows at the ``prompt`` tap. ``None`` means the
prompt was never set: NeMo's ``_apply_prompt_to_encoded`` then passes the encoder output through
unchanged (``set_inference_prompt`` skipped), and the ``prompt`` tap equals the ``encoder`` tap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


class ShapeMismatchError(ValueError):
    """A tensor crossing the interface does not have the shape the interface promises."""


def expect_shape(name: str, array: np.ndarray, expected: Sequence[int | None]) -> None:
    """Raise with the tensor name and both shapes when ``array`` does not have ``expected`` shape.

    ``None`` in ``expected`` matches any size on that axis.
    """
    actual = tuple(array.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ShapeMismatchError(f"{name}: expected shape {shown}, got {actual}")


@dataclass
class DecoderState:
    """RNNT greedy-decoding state carried across chunks (one utterance).

    ``last_token`` is the label fed to the prediction net next; the start of a sequence is the
    blank id with zero LSTM states (NeMo's ``blank_as_pad`` makes the blank embedding zero).
    """

    last_token: int
    h: np.ndarray  # [layers, 1, H]
    c: np.ndarray  # [layers, 1, H]
    tokens: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, blank_id: int, layers: int, hidden: int) -> DecoderState:
        zeros = np.zeros((layers, 1, hidden), dtype=np.float32)
        return cls(last_token=blank_id, h=zeros, c=zeros.copy(), tokens=[])


@dataclass
class StreamingState:
    """Everything a backend needs to continue a stream, in the canonical layout.

    ``native`` lets a backend keep its own objects (NeMo's partial ``Hypothesis``) between steps;
    it never crosses to another backend and is not compared.
    """

    att_context_size: tuple[int, int]
    # None for a transcript-level backend (``Capabilities.caches`` false): it exposes no caches.
    cache_last_channel: np.ndarray | None = None  # [L, B, C, D]
    cache_last_time: np.ndarray | None = None  # [L, B, D, K-1]
    cache_last_channel_len: np.ndarray | None = None  # [B] int64
    decoder: list[DecoderState] = field(default_factory=list)  # one per batch item
    step_index: int = 0
    native: Any = None
    # Hybrid RNNT-CTC models: the CTC greedy label of the last frame so far (the blank id at the start),
    # per batch item; None for a model without a CTC head.
    ctc_last_label: list[int] | None = None
    # Prompt-conditioned models: the stream's locale (every batch item's, as NeMo's
    # ``set_inference_prompt`` sets one index per model); None: never set, the prompt is bypassed.
    prompt: str | None = None

    def caches(self) -> dict[str, np.ndarray]:
        caches = {
            "cache_last_channel": self.cache_last_channel,
            "cache_last_time": self.cache_last_time,
            "cache_last_channel_len": self.cache_last_channel_len,
        }
        return {name: value for name, value in caches.items() if value is not None}

    def canonical(self) -> StreamingState:
        """A copy without backend-native objects, safe to hand to another backend."""
        return replace(self, native=None)


@dataclass
class StepOutput:
    encoded: np.ndarray  # [B, D, T_valid]
    encoded_len: np.ndarray  # [B] int64
    state: StreamingState
    tokens: list[list[int]]  # tokens emitted in this step, per batch item
    taps: dict[str, np.ndarray]
    seconds: float = 0.0  # wall time of the step, for benchmarks and the demo table
    # Hybrid RNNT-CTC models: the CTC greedy labels this step emitted, per batch item (``ctc_greedy``).
    ctc_tokens: list[list[int]] | None = None

    def taps_and_caches(self) -> dict[str, np.ndarray]:
        """What a comparison judges of a step: its taps, then the caches it leaves."""
        return {**self.taps, **self.state.caches()}


@dataclass
class OfflineOutput:
    encoded: np.ndarray  # [B, D, T]
    encoded_len: np.ndarray  # [B] int64
    tokens: list[list[int]]
    taps: dict[str, np.ndarray]
    ctc_tokens: list[list[int]] | None = None  # hybrid RNNT-CTC models: the CTC greedy transcript

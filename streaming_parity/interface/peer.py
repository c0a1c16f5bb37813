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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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

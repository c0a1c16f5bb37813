"""Speaker activity masks for multitalker models, and the NeMo rules every backend reproduces.

NeMo's multitalker streaming models (``EncDecMultiTalkerRNNTBPEModel`` with ``SpeakerKernelMixin``,
parts/mixins/multitalker_asr_mixins.py) add ``spk_kernel(x * spk_mask) + bg_spk_kernel(x * bg_mask)``
to the input of the encoder layers named in ``spk_kernel_layers``. The masks hold one value per
80 ms encoder frame ``[B, T_enc]``:

- the *target* mask marks where the speaker being transcribed talks, the *background* mask where
  anyone else does;
- NeMo's streaming driver (``SpeakerTaggedASR.get_diar_pred_out_stream``, utils/multispk_transcribe_utils.py)
  hands step ``n`` the utterance frames ``[n * (R + 1), (n + 1) * (R + 1))``, ``R`` the lookahead;
- inside the model, ``solve_length_mismatch`` reconciles a mask with the layer input of ``T``
  frames: a missing mask becomes ones (target) or zeros (background), a short one is left-padded
  with that default, a long one keeps its last ``T`` frames.

Utterance-level masks travel through the harness as ``SpeakerTargets``; ``for_step`` cuts a step's
slice exactly as NeMo's driver does, and each backend reconciles the slice with ``reconcile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streaming_parity.core.errors import BadInput

TARGET_DEFAULT = 1.0  # solve_length_mismatch's default for spk_targets
BACKGROUND_DEFAULT = 0.0  # ... and for bg_spk_targets (mask_with_speaker_targets(..., default_value=0.0))


class SpeakerMaskError(BadInput, ValueError):
    """Speaker masks that cannot be reconciled with the model or the audio."""


@dataclass(frozen=True)
class SpeakerTargets:
    """Target and background speaker activity ``[B, T]`` (float32, usually 0/1); ``None`` = not set.

    ``None`` is not the same as all-ones/all-zeros in NeMo: with ``spk_targets`` unset, the
    pre-hook of layer 0 uses ones, but the post-hooks that feed later layers skip their kernels.
    """

    target: np.ndarray | None
    background: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, mask in (("spk_targets", self.target), ("bg_spk_targets", self.background)):
            if mask is None:
                continue
            if not isinstance(mask, np.ndarray) or mask.ndim != 2:
                shape = getattr(mask, "shape", type(mask).__name__)
                raise SpeakerMaskError(f"{name}: expected a [batch, frames] array, got shape {shape}")
            if not np.issubdtype(mask.dtype, np.floating) and mask.dtype != np.bool_ and not np.issubdtype(
                    mask.dtype, np.integer):
                raise SpeakerMaskError(f"{name}: expected numbers, got dtype {mask.dtype}")
            if not np.all(np.isfinite(mask.astype(np.float64))):
                raise SpeakerMaskError(f"{name}: contains NaN or infinity")
        if self.target is not None and self.background is not None and self.target.shape[0] != self.background.shape[0]:
            raise SpeakerMaskError(f"spk_targets and bg_spk_targets disagree on the batch size: "
                                   f"{self.target.shape} vs {self.background.shape}")

    @classmethod
    def single_speaker(cls, batch: int, frames: int) -> SpeakerTargets:
        """NeMo's driver in single-speaker mode: target all ones, background all zeros."""
        return cls(np.ones((batch, frames), np.float32), np.zeros((batch, frames), np.float32))

    @classmethod
    def turns(cls, frames: int, *, turn: int = 12, overlap: int = 3, batch: int = 1) -> SpeakerTargets:
        """Two speakers taking turns of ``turn`` frames, talking over each other for ``overlap`` frames
        at every change: the target is active in even turns, the background in odd ones.

        This is the pattern the comparisons use by default: unlike the single-speaker masks (whose
        all-zero background leaves ``bg_spk_kernel`` seeing only zeros, so that only its biases
        matter), it drives both kernels with real activations and with zeros.
        """
        index = np.arange(frames)
        target = (index // turn) % 2 == 0
        background = ~target
        # Around every change the speaker of the previous turn goes on for `overlap` frames.
        into_turn = index % turn
        target = target | ((into_turn < overlap) & (index >= turn) & background)
        background = background | ((into_turn < overlap) & (index >= turn) & ~background)
        shape = (batch, frames)
        return cls(np.broadcast_to(target.astype(np.float32), shape).copy(),
                   np.broadcast_to(background.astype(np.float32), shape).copy())

    @property
    def batch(self) -> int | None:
        for mask in (self.target, self.background):
            if mask is not None:
                return mask.shape[0]
        return None

    def check_batch(self, batch: int) -> None:
        if self.batch is not None and self.batch != batch:
            raise SpeakerMaskError(f"speaker masks have batch {self.batch}, the audio has batch {batch}")

    def for_step(self, step_index: int, lookahead: int) -> SpeakerTargets:
        """The slice NeMo's streaming driver hands step ``step_index``: ``R + 1`` frames per step."""
        frames = lookahead + 1
        start, end = step_index * frames, (step_index + 1) * frames
        cut = lambda m: None if m is None else np.ascontiguousarray(m[:, start:end], np.float32)  # noqa: E731
        return SpeakerTargets(cut(self.target), cut(self.background))


def reconcile(mask: np.ndarray | None, frames: int, batch: int, default: float) -> np.ndarray:
    """``SpeakerKernelMixin.solve_length_mismatch`` for a layer input of ``frames`` frames."""
    if mask is None:
        return np.full((batch, frames), default, np.float32)
    mask = np.asarray(mask, np.float32)
    if mask.shape[0] != batch:
        raise SpeakerMaskError(f"speaker mask has batch {mask.shape[0]}, the layer input has batch {batch} "
                               f"(mask shape {mask.shape})")
    if mask.shape[1] < frames:  # NeMo pads on the left with the default
        pad = np.full((batch, frames - mask.shape[1]), default, np.float32)
        mask = np.concatenate([pad, mask], axis=1)
    elif mask.shape[1] > frames:  # ... and keeps the last frames of a long mask
        mask = mask[:, mask.shape[1] - frames:]
    return np.ascontiguousarray(mask)


def reconciled_pair(targets: SpeakerTargets | None, frames: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Both masks for a layer input of ``frames`` frames (what an explicit-input graph is fed)."""
    targets = targets or SpeakerTargets(None, None)
    return (reconcile(targets.target, frames, batch, TARGET_DEFAULT),
            reconcile(targets.background, frames, batch, BACKGROUND_DEFAULT))


def load_speaker_masks(path: str | Path) -> SpeakerTargets:
    """Masks from an ``.npz`` with ``spk_targets`` (required) and ``bg_spk_targets`` (optional),
    each ``[T]`` or ``[1, T]``, one value per 80 ms encoder frame of the utterance."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        if "spk_targets" not in data:
            raise SpeakerMaskError(f"{path}: no spk_targets array (found: {', '.join(data.files) or 'nothing'})")
        as_rows = lambda a: np.asarray(a, np.float32)[None] if np.ndim(a) == 1 else np.asarray(a, np.float32)  # noqa: E731
        return SpeakerTargets(as_rows(data["spk_targets"]),
                              as_rows(data["bg_spk_targets"]) if "bg_spk_targets" in data else None)

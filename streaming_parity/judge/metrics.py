"""Every numeric comparison metric of the harness, in one place.

All metrics take the reference first. They are computed in float64 so that the metric itself
adds no error to what it measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

_TINY = 1e-30


class _Pair:
    """A reference and a candidate in float64, with the intermediates several metrics share (the difference,
    its magnitude, the reference's magnitude, the norms) computed once: ``all_metrics`` measures a tap with one
    ``_Pair``, each metric alone with its own, by the same operations, so both give the same value to the last bit.
    Plain attributes, not lazy properties: the judge measures thousands of small taps per run, where the lookup
    machinery cost more than the arithmetic."""

    __slots__ = ("ref", "cand", "size", "diff", "abs_diff", "abs_ref", "max_abs_diff", "norm_ref", "norm_diff")

    def __init__(self, reference: np.ndarray, candidate: np.ndarray):
        self.ref = np.asarray(reference, dtype=np.float64)
        self.cand = np.asarray(candidate, dtype=np.float64)
        if self.ref.shape != self.cand.shape:
            raise ValueError(f"shape mismatch: reference {self.ref.shape} vs candidate {self.cand.shape}")
        self.size = self.ref.size
        self.diff = self.ref - self.cand
        self.abs_diff = np.abs(self.diff)
        self.abs_ref = np.abs(self.ref)
        self.max_abs_diff = float(np.max(self.abs_diff)) if self.size else 0.0
        self.norm_ref = float(np.linalg.norm(self.ref))
        self.norm_diff = float(np.linalg.norm(self.diff))


def _max_abs(pair: _Pair) -> float:
    return pair.max_abs_diff if pair.size else 0.0


def _max_rel(pair: _Pair) -> float:
    if not pair.size:
        return 0.0
    return float(np.max(pair.abs_diff / np.maximum(pair.abs_ref, _TINY)))


def _max_abs_scaled(pair: _Pair) -> float:
    if not pair.size:
        return 0.0
    scale = float(np.max(pair.abs_ref))
    error = pair.max_abs_diff
    if scale == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return error / scale


def _power_rel(pair: _Pair) -> float:
    ref, cand = pair.ref, pair.cand
    if not pair.size:
        return 0.0
    if ref.ndim < 2:
        raise ValueError(f"power_rel needs [..., n_mels, T], got shape {ref.shape}")
    peak = ref.max(axis=-2, keepdims=True)  # in the log: exp(x - peak) is power relative to the loudest bin
    with np.errstate(over="ignore"):
        return float(np.max(np.abs(np.exp(ref - peak) - np.exp(cand - peak))))


def _ratio(diff: float, norm: float) -> float:
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def _rel_l2(pair: _Pair) -> float:
    return _ratio(pair.norm_diff, pair.norm_ref)


def _cosine(pair: _Pair) -> float:
    # On the C-order raveled values: np.linalg.norm of an n-d array sums in memory order, which for a transposed
    # tap is another order, and so may differ from this in the last bit.
    ref, cand = pair.ref.ravel(), pair.cand.ravel()
    denom = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    if denom == 0.0:
        return 1.0 if not np.any(ref - cand) else 0.0
    return float(np.dot(ref, cand) / denom)


def _snr_from_norms(noise: float, signal: float) -> float:
    if noise == 0.0:
        return math.inf
    ratio = signal / noise
    if ratio == 0.0:  # a silent reference, or a candidate that overflowed to infinity: no signal over the noise
        return -math.inf
    return 20.0 * math.log10(ratio)


def _snr_db(pair: _Pair) -> float:
    return _snr_from_norms(pair.norm_diff, pair.norm_ref)


def _argmax_agreement(pair: _Pair) -> float:
    if pair.size == 0:
        return 1.0
    return float(np.mean(np.argmax(pair.ref, axis=-1) == np.argmax(pair.cand, axis=-1)))


def max_abs(reference: np.ndarray, candidate: np.ndarray) -> float:
    return _max_abs(_Pair(reference, candidate))


def max_rel(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |ref - x| / max(|ref|, tiny): harsh near zero, so tolerances rarely use it alone."""
    return _max_rel(_Pair(reference, candidate))


def max_abs_scaled(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |ref - x| / max |ref|: the largest error in units of the reference's own range.

    For taps whose magnitude is a property of the model rather than of the conversion: NeMo's
    joint returns log-probabilities (log_softmax on CPU), which reach -100 and below in a
    confident trained model, so float32 summation-order noise of a few ulp reads 1e-4 in
    max_abs there and 1e-6 on a random-weight fixture.
    """
    return _max_abs_scaled(_Pair(reference, candidate))


def power_rel(reference: np.ndarray, candidate: np.ndarray) -> float:
    """For log-mel spectrograms ``[..., n_mels, T]``: the largest difference in mel power, in units of the
    reference frame's loudest bin, max over frames of ``max |e^ref - e^x| / max e^ref``.

    A log-mel's quiet bins sit at NeMo's log guard (``log(p + 2^-24)``, about -16.6), where the log
    amplifies float32 FFT rounding: a pure 7 kHz tone's lowest bins differ by up to 1e-2 between two
    correct front ends, in a power that is 1e-7 of the frame's. In power relative to the frame, rounding
    is rounding; a front-end bug (padding, window, guard) moves whole frames.
    """
    return _power_rel(_Pair(reference, candidate))


def rel_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||ref - x|| / ||ref||."""
    return _rel_l2(_Pair(reference, candidate))


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    return _cosine(_Pair(reference, candidate))


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """20·log10(||ref|| / ||ref - x||); +inf for identical tensors."""
    return _snr_db(_Pair(reference, candidate))


def argmax_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows (last axis = classes) whose argmax agrees; 1.0 for empty tensors."""
    return _argmax_agreement(_Pair(reference, candidate))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "max_abs": max_abs,
    "max_rel": max_rel,
    "max_abs_scaled": max_abs_scaled,
    "rel_l2": rel_l2,
    "cosine": cosine,
    "snr_db": snr_db,
    "argmax_agreement": argmax_agreement,
    "power_rel": power_rel,
}

# Direction of each metric: a limit is an upper bound ("max") or a lower bound ("min").
METRIC_BOUND = {
    "max_abs": "max",
    "max_rel": "max",
    "max_abs_scaled": "max",
    "rel_l2": "max",
    "cosine": "min",
    "snr_db": "min",
    "argmax_agreement": "min",
    "power_rel": "max",
}


# Measured only where they mean something: the argmax of logits, the power of a log-mel spectrogram.
_SPECIFIC = ("argmax_agreement", "power_rel")


# The same metrics over one shared ``_Pair`` (all_metrics): each intermediate computed once per tap.
_ON_PAIR: dict[str, Callable[[_Pair], float]] = {
    "max_abs": _max_abs, "max_rel": _max_rel, "max_abs_scaled": _max_abs_scaled, "rel_l2": _rel_l2,
    "cosine": _cosine, "snr_db": _snr_db, "argmax_agreement": _argmax_agreement, "power_rel": _power_rel,
}


def all_metrics(reference: np.ndarray, candidate: np.ndarray, *, logits: bool = False,
                spectrogram: bool = False) -> dict[str, float]:
    pair = _Pair(reference, candidate)
    values = {name: _ON_PAIR[name](pair) for name in METRICS if name not in _SPECIFIC}
    if logits:
        values["argmax_agreement"] = _argmax_agreement(pair)
    if spectrogram:
        values["power_rel"] = _power_rel(pair)
    return values


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (jiwer), 0.0 when both sides are empty."""
    import jiwer

    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip() or h.strip()]
    if not pairs:
        return 0.0
    refs = [r if r.strip() else "<empty>" for r, _ in pairs]
    hyps = [h if h.strip() else "" for _, h in pairs]
    return float(jiwer.wer(refs, hyps))


def token_edit_distance(reference, candidate) -> int:
    """Levenshtein distance between two token-id sequences."""
    previous = list(range(len(candidate) + 1))
    for i, ref_token in enumerate(reference, 1):
        current = [i]
        for j, cand_token in enumerate(candidate, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_token != cand_token)))
        previous = current
    return previous[-1]


def token_agreement(reference, candidate) -> float:
    """1 - (token edit distance / reference length), floored at 0; 1.0 when both are empty."""
    if not reference:
        return 1.0 if not candidate else 0.0
    return max(0.0, 1.0 - token_edit_distance(reference, candidate) / len(reference))

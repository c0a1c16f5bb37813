"""Greedy decisions that differ at a near-tie, told apart from decisions that differ for a reason.

Two correct float32 implementations of one joint round differently (summation order, fused
kernels): their logits differ by a few ulp. Where the reference's top two logits are closer than
that, each may take a different label, and a free-running decoder then feeds the prediction net
other labels from there on. Such a flip says nothing about the conversion, and over thousands of
utterances a real checkpoint meets them (near-silent frames, blank against a piece).

With teacher forcing (``Capabilities.teacher_forcing``) the candidate decodes with the reference's
decisions fed to its prediction net, so every joint row stays comparable to the reference's, and
the candidate's own choice at each call is the argmax of its row. A call where that choice differs
from the reference's is a *flip*; it is a *near-tie* when the candidate chose the reference's second
choice and the reference's margin between its top two logits is within what the tolerance file
allows the joint to differ: twice the allowed error per logit (each of the two logits may move by
it, in opposite directions). Every other flip is a real disagreement.

A hybrid model's CTC head has no feedback: its greedy label at one frame changes nothing at the
next, so no teacher forcing is needed. Each frame of the ``ctc`` tap whose argmax differs is a flip
of its own, judged by the same rule against the ``ctc`` limits (``find_flips(..., tap=TAP_CTC)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from streaming_parity.interface.taps import TAP_CTC, TAP_JOINT


@dataclass
class TokenFlip:
    """One joint call where the candidate's greedy choice differs from the reference's decision."""

    step: int
    call: int  # the joint call within the step, in NeMo's call order (the frame within the step for ctc)
    reference_label: int  # the reference's decision (argmax)
    reference_second: int  # the reference's second choice
    candidate_label: int  # the candidate's own argmax, with the reference's labels fed to its decoder
    reference_margin: float  # the reference's top-1 minus top-2 logit
    candidate_margin: float  # the candidate's logit of its choice minus its logit of the reference's
    scale: float  # max |reference joint| over the step (what ``max_abs_scaled`` limits are relative to)
    bound: float  # the largest margin that still counts as a tie under the tolerance file
    near_tie: bool
    tap: str = TAP_JOINT  # the logits the decision was taken on: the joint, or a hybrid's CTC head

    def describe(self) -> str:
        kind = ("CTC " if self.tap == TAP_CTC else "") + ("near-tie" if self.near_tie else "label flip")
        where = f"frame {self.call}" if self.tap == TAP_CTC else f"call {self.call}"
        return (f"{kind} at step {self.step}, {where}: reference {self.reference_label} "
                f"(second {self.reference_second}, margin {self.reference_margin:.3g}), candidate "
                f"{self.candidate_label} (margin {self.candidate_margin:.3g}), tie bound {self.bound:.3g}")

    def to_dict(self) -> dict:
        return asdict(self)


def tie_bound(joint_limits: Mapping[str, float], scale: float) -> float:
    """Twice the largest error per logit the joint's limits allow: the tightest of ``max_abs`` and
    ``max_abs_scaled`` x ``scale``. Without either limit, no margin counts as a tie."""
    allowed = [joint_limits[m] for m in ("max_abs",) if m in joint_limits]
    allowed += [joint_limits[m] * scale for m in ("max_abs_scaled",) if m in joint_limits]
    finite = [a for a in allowed if math.isfinite(a)]
    return 2.0 * min(finite) if finite else 0.0


def decisions(joint_rows: np.ndarray) -> list[int]:
    """The greedy decision (blank or label) of each joint call of a step."""
    return [int(i) for i in np.argmax(joint_rows, axis=-1)] if len(joint_rows) else []


def top_two(row: np.ndarray) -> tuple[int, int]:
    """The greedy choice (``argmax``: the first index on an exact tie, as every backend's argmax) and
    the runner-up."""
    first = int(np.argmax(row))
    rest = np.array(row, dtype=np.float64, copy=True)
    rest[first] = -np.inf
    return first, int(np.argmax(rest))


def find_flips(reference_steps: Sequence, candidate_steps: Sequence, joint_limits: Mapping[str, float], *,
               tap: str = TAP_JOINT) -> list[TokenFlip]:
    """Every joint call where the teacher-forced candidate's own choice differs from the reference's
    (``tap="ctc"``: every frame where a hybrid's CTC head takes another greedy label; ``joint_limits``
    are then the ``ctc`` limits)."""
    flips: list[TokenFlip] = []
    for index, (reference, candidate) in enumerate(zip(reference_steps, candidate_steps, strict=False)):
        ref_rows, cand_rows = reference.taps.get(tap), candidate.taps.get(tap)
        if ref_rows is None or cand_rows is None or ref_rows.shape != cand_rows.shape or not ref_rows.size:
            continue  # a missing or misshapen tap is a tap violation of its own
        ref_rows, cand_rows = ref_rows.reshape(-1, ref_rows.shape[-1]), cand_rows.reshape(-1, cand_rows.shape[-1])
        scale = float(np.max(np.abs(ref_rows)))
        bound = tie_bound(joint_limits, scale)
        for call, (ref_row, cand_row) in enumerate(zip(ref_rows, cand_rows, strict=True)):
            first, second = top_two(ref_row)
            chosen = int(np.argmax(cand_row))
            if chosen == first:
                continue
            margin = float(ref_row[first] - ref_row[second])
            flips.append(TokenFlip(
                step=index, call=call, reference_label=first, reference_second=second, candidate_label=chosen,
                reference_margin=margin, candidate_margin=float(cand_row[chosen] - cand_row[first]), scale=scale,
                bound=bound, near_tie=chosen == second and margin <= bound, tap=tap))
    return flips


def rebound(flips: Sequence[TokenFlip], joint_limits: Mapping[str, float]) -> list[TokenFlip]:
    """The same flips judged against another tolerance file's joint limits (``parity judge``)."""
    judged = []
    for flip in flips:
        bound = tie_bound(joint_limits, flip.scale)
        near_tie = flip.candidate_label == flip.reference_second and flip.reference_margin <= bound
        judged.append(TokenFlip(**{**flip.to_dict(), "bound": bound, "near_tie": near_tie}))
    return judged

"""One rule for every comparison of a candidate with the reference: compare, and where the candidate's
greedy decisions left the reference's, decode again with the reference's decisions and judge that.

Streaming runs in every first-chunk mode and the offline forwards go through here, from the loop
(``parity compare``, ``verify``, ``convert``, the nightly) and from the suites alike, so that a near-tie
is classified wherever it is met (``streaming_parity.judge.ties``) and never reads as a conversion error in one
place while another place calls it a tie.

Running stays with the caller: ``rerun(forced_decisions=...)`` is given the reference's decisions and
returns the candidate's teacher-forced run (or offline output), as ``streaming_parity.interface.driver.stream``
and ``Backend.offline`` take them; it is called only when the free decode took another decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from streaming_parity.interface.taps import TAP_ENCODER, TAP_JOINT
from streaming_parity.interface.types import OfflineOutput
from streaming_parity.judge.compare import (
    PairComparison,
    compare_offline_outputs,
    compare_runs,
    judge_teacher_forced,
    judge_teacher_forced_offline,
)
from streaming_parity.judge.ties import decisions
from streaming_parity.judge.tolerances import Tolerances


def reference_decisions(run: Any) -> list[list[int]]:
    """The reference's greedy decision at every joint call, per step (from its joint tap)."""
    return [decisions(step.taps[TAP_JOINT]) if TAP_JOINT in step.taps else [] for step in run.steps]


def offline_decisions(output: OfflineOutput) -> list[int] | None:
    """An offline forward's greedy decision at every joint call (None without a joint tap, or for a batch)."""
    joint = output.taps.get(TAP_JOINT)
    return None if joint is None or len(output.tokens) != 1 else decisions(joint)


def same_joint_decisions(reference_step: Any, candidate_step: Any) -> bool:
    """Whether two steps took the same greedy decision at every joint call (true where a side has no joint tap):
    equal tokens are not enough, a near-tie can move an emission by a frame within a step (blank-then-label vs
    label-then-blank), after which the rows no longer correspond."""
    ref_joint, cand_joint = reference_step.taps.get(TAP_JOINT), candidate_step.taps.get(TAP_JOINT)
    if ref_joint is None or cand_joint is None:
        return True
    return ref_joint.shape == cand_joint.shape and decisions(ref_joint) == decisions(cand_joint)


def same_decisions(reference_run: Any, candidate_run: Any) -> bool:
    """Whether both runs emitted the same tokens and took the same greedy decision at every joint call."""
    if reference_run.tokens != candidate_run.tokens or len(reference_run.steps) != len(candidate_run.steps):
        return False
    return all(same_joint_decisions(r, c) for r, c in zip(reference_run.steps, candidate_run.steps, strict=True))


def same_frames(reference_run: Any, candidate_run: Any) -> bool:
    """Whether both runs have the same steps with the same encoder frames each: otherwise the reference's
    decisions cannot be fed to the candidate call for call (a step with another frame count makes other joint
    calls), and the comparison's shape violation is the verdict."""
    if len(reference_run.steps) != len(candidate_run.steps):
        return False
    for ref_step, cand_step in zip(reference_run.steps, candidate_run.steps):
        ref_encoded, cand_encoded = ref_step.taps.get(TAP_ENCODER), cand_step.taps.get(TAP_ENCODER)
        if ref_encoded is not None and cand_encoded is not None and ref_encoded.shape != cand_encoded.shape:
            return False
    return True


def judge_stream(reference_run: Any, candidate_run: Any, tolerances: Tolerances, *, num_layers: int,
                 utterance: str = "", pair: str | None = None, tokens_only: bool = False,
                 rerun: Callable[..., Any] | None = None) -> tuple[PairComparison, Any]:
    """``compare_runs``, then, for a candidate that can be teacher-forced (``rerun`` given) and whose free run
    took another decision somewhere, the verdict on its forced run (``judge_teacher_forced``): its taps judged
    on the forced run, its flips classified, its transcript the free run's. Returns the comparison and the run
    the taps were judged on (the forced one, or ``candidate_run``)."""
    comparison = compare_runs(reference_run, candidate_run, tolerances, num_layers=num_layers, utterance=utterance,
                              pair=pair, tokens_only=tokens_only)
    return force_where_decisions_differ(comparison, reference_run, candidate_run, tolerances, num_layers=num_layers,
                                        tokens_only=tokens_only, rerun=rerun)


def needs_teacher_forcing(reference_run: Any, candidate_run: Any, *, tokens_only: bool = False) -> bool:
    """Whether the candidate took another greedy decision somewhere and can be fed the reference's, call for call
    (the same steps with the same frames): then its taps are judged on a teacher-forced run."""
    return not tokens_only and not same_decisions(reference_run, candidate_run) \
        and same_frames(reference_run, candidate_run)


def force_where_decisions_differ(comparison: PairComparison, reference_run: Any, candidate_run: Any,
                                 tolerances: Tolerances, *, num_layers: int, tokens_only: bool = False,
                                 rerun: Callable[..., Any] | None = None) -> tuple[PairComparison, Any]:
    """``judge_stream`` after its ``compare_runs``: the comparison as it is, or, where a teacher-forceable candidate
    took another decision, the verdict on its forced run."""
    if rerun is None or not needs_teacher_forcing(reference_run, candidate_run, tokens_only=tokens_only):
        return comparison, candidate_run
    forced = rerun(forced_decisions=reference_decisions(reference_run))
    return judge_teacher_forced(comparison, reference_run, forced, tolerances, num_layers=num_layers), forced


def judge_offline(reference: OfflineOutput, candidate: OfflineOutput, tolerances: Tolerances, *,
                  reference_name: str, candidate_name: str, dtype: str, context: Sequence[int], utterance: str,
                  num_layers: int, rerun: Callable[..., OfflineOutput] | None = None) -> PairComparison:
    """``compare_offline_outputs``, then the same rule as ``judge_stream`` for the whole-utterance decode."""
    comparison = compare_offline_outputs(reference, candidate, tolerances, reference_name=reference_name,
                                         candidate_name=candidate_name, dtype=dtype, context=context,
                                         utterance=utterance, num_layers=num_layers)
    wanted, taken = offline_decisions(reference), offline_decisions(candidate)
    if rerun is None or wanted is None or taken is None or taken == wanted:
        return comparison
    return judge_teacher_forced_offline(comparison, reference, rerun(forced_decisions=wanted), tolerances,
                                        reference_name=reference_name, candidate_name=candidate_name,
                                        num_layers=num_layers)

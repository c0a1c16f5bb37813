"""Comparing two runs tap by tap, step by step.

Running and comparing are separate (as in Polygraphy): ``streaming_parity.interface.driver.stream``
produces a ``StreamRun`` from any backend; ``compare_runs`` turns two runs into a
``PairComparison``: plain data that ``streaming_parity.judge.results`` saves and ``parity judge``
re-judges against another tolerance file.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from streaming_parity.interface.driver import StreamRun
from streaming_parity.interface.taps import (
    CACHE_TAPS,
    TAP_CTC,
    TAP_DECODER,
    TAP_ENCODER,
    TAP_JOINT,
    TAP_MEL,
    TAP_PRE_ENCODE,
    TAP_PROMPT,
    layer_tap,
)
from streaming_parity.interface.types import OfflineOutput
from streaming_parity.judge.metrics import all_metrics, token_agreement, token_edit_distance
from streaming_parity.judge.ties import TokenFlip, find_flips, rebound
from streaming_parity.judge.tolerances import TOKENS, MissingToleranceError, Tolerances

# Taps whose rows are logits or log-probabilities over the vocabulary + blank: argmax agreement is measured.
LOGIT_TAPS = (TAP_JOINT, TAP_CTC)
AGREEMENT = "argmax_agreement"


def comparison_order(num_layers: int) -> list[str]:
    """Taps in model order; the first divergence is the first failing entry of the earliest step."""
    return [TAP_MEL, TAP_PRE_ENCODE, *(layer_tap(i) for i in range(num_layers)), TAP_ENCODER,
            *CACHE_TAPS, TAP_PROMPT, TAP_CTC, TAP_DECODER, TAP_JOINT]


@dataclass
class TapResult:
    step: int  # -1 for utterance-level taps (mel, offline encoder)
    tap: str
    metrics: dict[str, float]
    limits: dict[str, float]
    violations: list[str]
    reference_shape: list[int] = field(default_factory=list)
    candidate_shape: list[int] = field(default_factory=list)
    # Violations no tolerance file can change (a shape, a step count, a frame count): kept by ``rejudge``.
    structural: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations


@dataclass
class PairComparison:
    """Two runs of the same utterance and lookahead, judged tap by tap against the tolerances."""

    reference: str
    candidate: str
    pair: str  # tolerance key, e.g. "nemo~onnx" or "streaming~offline@70,0"
    dtype: str
    att_context_size: tuple[int, int]
    utterance: str
    taps: list[TapResult]
    reference_tokens: list[int]
    candidate_tokens: list[int]
    order: list[str]
    # Streaming decodes 1-2 fewer tail frames than offline, so its tokens are recorded, not required equal.
    require_token_match: bool = True
    mode: str = ""  # the first-chunk mode streamed ("plain", "pad-and-drop"), or "offline"
    # Teacher forcing (streaming_parity.judge.ties): the taps come from a run decoding with the reference's
    # decisions; ``candidate_tokens`` stay the free-running transcript; ``flips`` are the calls where
    # the candidate's own choice differed, each a near-tie or a real disagreement.
    teacher_forced: bool = False
    flips: list[TokenFlip] = field(default_factory=list)
    # Hybrid RNNT-CTC models: both CTC greedy transcripts (None where a side has no CTC head), and every
    # frame where the candidate's CTC head took another greedy label (``ties.find_flips(tap="ctc")``).
    reference_ctc_tokens: list[int] | None = None
    candidate_ctc_tokens: list[int] | None = None
    ctc_flips: list[TokenFlip] = field(default_factory=list)
    # Token-level comparisons (a transcript-level candidate): the first step whose tokens differ, with the
    # tokens lost and added there (``streaming_parity.judge.transcripts.token_divergence``); None when they agree.
    token_divergence: dict | None = None
    # False for a transcript-level candidate (a peer runtime): judged and reported with the bisection of its
    # stack, but its failures do not gate the fp32 verdict of a nightly run (it is not this project's artifact).
    gating: bool = True
    # Causes named beyond the tolerance verdict (``streaming_parity.judge.prompts``: a bypassed prompt, a prompt index
    # off by one), each a sentence; they explain a failure, never change the verdict.
    causes: list[str] = field(default_factory=list)

    @property
    def tokens_equal(self) -> bool:
        return self.reference_tokens == self.candidate_tokens

    @property
    def near_ties(self) -> list[TokenFlip]:
        return [f for f in self.flips if f.near_tie]

    @property
    def tokens_agree(self) -> bool:
        """Identical tokens, or (teacher-forced) every decision that differed was a near-tie."""
        if self.tokens_equal:
            return True
        return self.teacher_forced and bool(self.flips) and all(f.near_tie for f in self.flips)

    @property
    def ctc_compared(self) -> bool:
        return self.reference_ctc_tokens is not None and self.candidate_ctc_tokens is not None

    @property
    def ctc_tokens_equal(self) -> bool:
        """Identical CTC transcripts (true when they are not compared: a side has no CTC head)."""
        return not self.ctc_compared or self.reference_ctc_tokens == self.candidate_ctc_tokens

    @property
    def ctc_tokens_agree(self) -> bool:
        """Identical CTC transcripts, or every frame whose greedy label differed was a near-tie."""
        if self.ctc_tokens_equal:
            return True
        return bool(self.ctc_flips) and all(f.near_tie for f in self.ctc_flips)

    @property
    def tokens_judged_in_aggregate(self) -> bool:
        """The tolerance file bounds this pair's tokens by their agreement over the run (a ``tokens`` tap,
        ``verdict``): differing tokens do not fail this comparison alone (``token_agreement_failures``)."""
        return any(t.tap == TOKENS for t in self.taps)

    @property
    def passed(self) -> bool:
        tokens = self.tokens_agree and self.ctc_tokens_agree
        required = self.require_token_match and not self.tokens_judged_in_aggregate
        return (tokens or not required) and all(t.passed for t in self.taps)

    def first_divergence(self) -> TapResult | None:
        """The earliest failing tap: earliest step first, then model order within the step."""
        rank = {name: i for i, name in enumerate(self.order)}
        failing = [t for t in self.taps if not t.passed]
        if not failing:
            return None
        return min(failing, key=lambda t: (t.step, rank.get(t.tap, len(rank))))

    def worst(self, metric: str = "max_abs") -> dict[str, float]:
        """Worst value of ``metric`` per tap name over all steps."""
        worst: dict[str, float] = {}
        for result in self.taps:
            if metric in result.metrics:
                value = result.metrics[metric]  # a NaN is the worst value of all (max() would drop it)
                worst[result.tap] = value if math.isnan(value) else max(worst.get(result.tap, 0.0), value)
        return worst

    def describe_failure(self) -> str:
        divergence = self.first_divergence()
        head = (f"{self.pair} [{self.att_context_size[0]},{self.att_context_size[1]}] {self.utterance}: ")
        if divergence is not None:
            where = "utterance" if divergence.step < 0 else f"step {divergence.step}"
            return head + (f"first divergent tap {divergence.tap} at {where}: "
                           + "; ".join(divergence.violations)) + "".join(f"; cause: {c}" for c in self.causes)
        required = self.require_token_match and not self.tokens_judged_in_aggregate
        if required and not self.tokens_agree:
            real = [f for f in self.flips if not f.near_tie]
            if real:
                return head + real[0].describe()
            if self.token_divergence is not None:
                from streaming_parity.judge.transcripts import describe_divergence

                return head + describe_divergence(self.token_divergence)
            index = next((i for i, (a, b) in enumerate(zip(self.reference_tokens, self.candidate_tokens)) if a != b),
                         min(len(self.reference_tokens), len(self.candidate_tokens)))
            return head + (f"token sequences differ at position {index} "
                           f"({len(self.reference_tokens)} vs {len(self.candidate_tokens)} tokens)")
        if required and not self.ctc_tokens_agree:
            real = [f for f in self.ctc_flips if not f.near_tie]
            if real:
                return head + real[0].describe()
            ref, cand = self.reference_ctc_tokens or [], self.candidate_ctc_tokens or []
            index = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
            return head + f"CTC token sequences differ at position {index} ({len(ref)} vs {len(cand)} tokens)"
        return head + "passed"


def measure_tap(step: int, tap: str, reference: np.ndarray, candidate: np.ndarray) -> TapResult:
    """One tap's metrics (``streaming_parity.judge.metrics``), or its shape violation: nothing judged yet."""
    ref_shape, cand_shape = list(reference.shape), list(candidate.shape)
    if ref_shape != cand_shape:
        shape = [f"shape {ref_shape} vs {cand_shape}"]
        return TapResult(step, tap, {}, {}, list(shape), ref_shape, cand_shape, structural=list(shape))
    metrics = all_metrics(reference, candidate, logits=tap in LOGIT_TAPS, spectrogram=tap == TAP_MEL)
    return TapResult(step, tap, metrics, {}, [], ref_shape, cand_shape)


def judge_taps(taps: Sequence[TapResult], flips: Sequence[TokenFlip], tolerances: Tolerances, pair: str,
               dtype: str) -> list[TapResult]:
    """The one verdict on measured taps, the same for a fresh comparison and a re-judged one (``rejudge``).

    Ties are classified first (``flips``, each judged by the tie rule of ``streaming_parity.judge.ties``), then
    every tap is judged once against its limits from the tolerance file:

    - the ``argmax_agreement`` limit of the joint (or of a hybrid's ``ctc`` tap) counts every flip; at a step
      whose flips on that tap are all near-ties it does not apply (every other limit of the tap does);
    - the ``tokens`` tap (a token sequence's agreement) is judged on the aggregate over the run
      (``token_agreement_failures``), never alone: one flipped decision in a three-token utterance scores 0;
    - structural violations (a shape, a step or frame count) stand whatever the limits.
    """
    tied: dict[str, set[int]] = {}
    for tap in {f.tap for f in flips}:
        of_tap = [f for f in flips if f.tap == tap]
        tied[tap] = {f.step for f in of_tap if f.near_tie} - {f.step for f in of_tap if not f.near_tie}
    judged = []
    for result in taps:
        limits = tolerances.limits(pair, dtype, result.tap)
        applied: Mapping[str, float] = limits
        if result.tap == TOKENS:
            applied = {}
        elif result.step in tied.get(result.tap, ()) and AGREEMENT in limits:
            applied = {k: v for k, v in limits.items() if k != AGREEMENT}
        violations = list(result.structural)
        if result.reference_shape == result.candidate_shape:
            violations += [v.describe() for v in tolerances.check(result.metrics, applied)]
        judged.append(TapResult(result.step, result.tap, result.metrics, limits, violations, result.reference_shape,
                                result.candidate_shape, structural=list(result.structural)))
    return judged


def judge_tap(step: int, tap: str, reference: np.ndarray, candidate: np.ndarray,
              tolerances: Tolerances, pair: str, dtype: str) -> TapResult:
    """``measure_tap`` and ``judge_taps`` for one tap met without flips."""
    return judge_taps([measure_tap(step, tap, reference, candidate)], [], tolerances, pair, dtype)[0]


def tokens_by_agreement(tolerances: Tolerances, pair: str, dtype: str) -> bool:
    """Whether the tolerance file bounds the pair's token sequences by their agreement (a ``tokens`` table):
    then differing tokens are judged on the run's aggregate agreement instead of being required equal."""
    try:
        return bool(tolerances.limits(pair, dtype, TOKENS))
    except MissingToleranceError:
        return False


def verdict(comparison: PairComparison, tolerances: Tolerances) -> PairComparison:
    """The one judging policy, applied last by every comparison and by ``rejudge``: the token rule of the
    tolerance file (``tokens_by_agreement``: a ``tokens`` tap recording this comparison's agreement), then
    ``judge_taps`` over the comparison's flips."""
    taps = [t for t in comparison.taps if t.tap != TOKENS]
    if tokens_by_agreement(tolerances, comparison.pair, comparison.dtype):
        agreement = token_agreement(comparison.reference_tokens, comparison.candidate_tokens)
        taps.append(TapResult(-1, TOKENS, {AGREEMENT: agreement}, {}, []))
    judged = judge_taps(taps, [*comparison.flips, *comparison.ctc_flips], tolerances, comparison.pair,
                        comparison.dtype)
    return replace(comparison, taps=judged)


def token_agreement_failures(comparisons: Sequence[PairComparison], tolerances: Tolerances) -> list[str]:
    """The run-level half of the token rule: for every candidate, dtype and pair whose tokens the tolerance
    file bounds by agreement, ``1 - sum(edit distances) / sum(reference tokens)`` over its comparisons
    against the ``tokens`` limits."""
    groups: dict[tuple[str, str], list[PairComparison]] = {}
    for comparison in comparisons:
        if comparison.tokens_judged_in_aggregate:  # streams and offline forwards of a pair together
            groups.setdefault((comparison.pair.partition("@")[0], comparison.dtype), []).append(comparison)
    failures = []
    for (pair, dtype), group in groups.items():
        metrics = {AGREEMENT: aggregate_token_agreement(group)}
        for violation in tolerances.check(metrics, tolerances.limits(pair, dtype, TOKENS)):
            failures.append(f"{pair} at {dtype}: token agreement over {len(group)} comparisons: "
                            f"{violation.describe()}")
    return failures


def aggregate_token_agreement(comparisons: Sequence[PairComparison]) -> float:
    """``1 - sum(edit distances) / sum(reference lengths)`` over the comparisons."""
    reference_tokens = sum(len(c.reference_tokens) for c in comparisons)
    edits = sum(token_edit_distance(c.reference_tokens, c.candidate_tokens) for c in comparisons)
    return 1.0 - edits / max(reference_tokens, 1)


def rejudge(comparison: PairComparison, tolerances: Tolerances) -> PairComparison:
    """Apply another tolerance file to saved metrics without re-running anything: the flips' tie bounds
    from its joint (and CTC) limits, then the same ``verdict`` as a fresh comparison."""
    flips, ctc_flips = comparison.flips, comparison.ctc_flips
    if flips:
        flips = rebound(flips, tolerances.limits(comparison.pair, comparison.dtype, TAP_JOINT))
    if ctc_flips:
        ctc_flips = rebound(ctc_flips, tolerances.limits(comparison.pair, comparison.dtype, TAP_CTC))
    return verdict(replace(comparison, flips=flips, ctc_flips=ctc_flips), tolerances)


def _common_taps(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Iterable[str]:
    return [name for name in reference if name in candidate]


def compare_runs(reference: StreamRun, candidate: StreamRun, tolerances: Tolerances, *, num_layers: int,
                 utterance: str = "", pair: str | None = None, tokens_only: bool = False) -> PairComparison:
    """Compare every shared tap and cache after every step; a differing step count is a violation.

    ``tokens_only`` (a transcript-level candidate, ``Capabilities.tensor_level`` false): the tokens alone,
    step by step (``compare_tokens``).
    """
    pair = pair or f"{reference.backend}~{candidate.backend}"
    if tokens_only:
        return compare_tokens(reference, candidate, tolerances, num_layers=num_layers, utterance=utterance, pair=pair)
    results: list[TapResult] = []
    if reference.features is not None and candidate.features is not None:
        results.append(measure_tap(-1, TAP_MEL, reference.features, candidate.features))
    if len(reference.steps) != len(candidate.steps):
        count = [f"step count {len(reference.steps)} vs {len(candidate.steps)}"]
        results.append(TapResult(-1, TAP_ENCODER, {}, {}, count, structural=count))
    ctc_flips: list[TokenFlip] = []
    for index in range(min(len(reference.steps), len(candidate.steps))):
        ref_taps, cand_taps = reference.step_taps(index), candidate.step_taps(index)
        for tap in _common_taps(ref_taps, cand_taps):
            results.append(measure_tap(index, tap, ref_taps[tap], cand_taps[tap]))
        if TAP_CTC in ref_taps and TAP_CTC in cand_taps:
            ctc_flips += _ctc_flips(index, ref_taps[TAP_CTC], cand_taps[TAP_CTC], tolerances, pair, candidate.dtype)
    return verdict(PairComparison(
        reference=reference.backend, candidate=candidate.backend, pair=pair, dtype=candidate.dtype,
        att_context_size=tuple(reference.att_context_size), utterance=utterance, taps=results,
        reference_tokens=reference.tokens, candidate_tokens=candidate.tokens, order=comparison_order(num_layers),
        mode=candidate.mode, reference_ctc_tokens=_ctc_tokens(reference), candidate_ctc_tokens=_ctc_tokens(candidate),
        ctc_flips=ctc_flips), tolerances)


def compare_tokens(reference, candidate, tolerances: Tolerances, *, num_layers: int, utterance: str,
                   pair: str) -> PairComparison:
    """A transcript-level candidate against the reference: identical tokens are required unless the
    tolerance file bounds the pair's ``tokens`` agreement (``verdict``: then the run's aggregate agreement is
    the verdict); the first step whose tokens differ is kept either way (``PairComparison.token_divergence``)."""
    from streaming_parity.judge.transcripts import step_tokens, token_divergence

    return verdict(PairComparison(
        reference=reference.backend, candidate=candidate.backend, pair=pair, dtype=candidate.dtype,
        att_context_size=tuple(reference.att_context_size), utterance=utterance, taps=[],
        reference_tokens=reference.tokens, candidate_tokens=candidate.tokens, order=comparison_order(num_layers),
        mode=candidate.mode, token_divergence=token_divergence(step_tokens(reference), step_tokens(candidate)),
        gating=False), tolerances)


def _ctc_tokens(run) -> list[int] | None:
    """A run's CTC transcript (``StreamRun.ctc_tokens``); None for a run, or a saved run, without one."""
    return getattr(run, "ctc_tokens", None)


class _Rows:
    """One step's tap rows, as ``ties.find_flips`` reads a step."""

    def __init__(self, tap: str, rows: np.ndarray):
        self.taps = {tap: rows}


def _ctc_flips(step: int, reference: np.ndarray, candidate: np.ndarray, tolerances: Tolerances, pair: str,
               dtype: str) -> list[TokenFlip]:
    """The frames of one step where the CTC head's greedy label differs, each judged by the tie rule
    against the ``ctc`` limits (no feedback: a flip changes only its own frame)."""
    if reference.shape != candidate.shape or not reference.size:
        return []  # a shape violation of the tap itself
    flips = find_flips([_Rows(TAP_CTC, reference)], [_Rows(TAP_CTC, candidate)],
                       tolerances.limits(pair, dtype, TAP_CTC), tap=TAP_CTC)
    return [replace(flip, step=step) for flip in flips]


def compare_streaming_to_offline(run: StreamRun, offline: OfflineOutput, tolerances: Tolerances, *,
                                 num_layers: int, utterance: str = "") -> PairComparison:
    """Streaming encoder output (valid frames, concatenated) against the offline forward.

    Streaming yields 1-2 fewer final frames than offline (NeMo's buffer drops a tail shorter than
    the subsampling factor), so the offline output is cut to the streamed length; more than 2 frames
    missing is itself a violation.
    """
    context = run.att_context_size
    pair = f"streaming~offline@{context[0]},{context[1]}"
    streamed = run.encoded
    offline_frames = int(offline.encoded_len[0])
    reference = offline.encoded[..., : streamed.shape[-1]]
    result = measure_tap(-1, TAP_ENCODER, reference, streamed)
    missing = offline_frames - streamed.shape[-1]
    if not 0 <= missing <= 2:
        result.structural.append(f"streaming produced {streamed.shape[-1]} frames, offline {offline_frames}")
    return verdict(PairComparison(
        reference=f"{run.backend}-offline", candidate=f"{run.backend}-streaming", pair=pair, dtype=run.dtype,
        att_context_size=tuple(context), utterance=utterance, taps=[result],
        reference_tokens=offline.tokens[0], candidate_tokens=run.tokens, order=comparison_order(num_layers),
        require_token_match=False, mode=run.mode,
        reference_ctc_tokens=None if offline.ctc_tokens is None else offline.ctc_tokens[0],
        candidate_ctc_tokens=_ctc_tokens(run)), tolerances)


def compare_offline_outputs(reference: OfflineOutput, candidate: OfflineOutput, tolerances: Tolerances, *,
                            reference_name: str, candidate_name: str, dtype: str, context: Sequence[int],
                            utterance: str, num_layers: int) -> PairComparison:
    """Both offline forwards (``Backend.offline``), every shared tap judged; step -1 marks utterance level."""
    pair = f"{reference_name}~{candidate_name}"
    taps = [measure_tap(-1, name, reference.taps[name], candidate.taps[name])
            for name in reference.taps if name in candidate.taps]
    ctc_flips = (_ctc_flips(-1, reference.taps[TAP_CTC], candidate.taps[TAP_CTC], tolerances, pair, dtype)
                 if TAP_CTC in reference.taps and TAP_CTC in candidate.taps else [])
    first = lambda tokens: None if tokens is None else tokens[0]  # noqa: E731
    return verdict(PairComparison(reference=f"{reference_name}-offline", candidate=f"{candidate_name}-offline",
                          pair=pair, dtype=dtype, att_context_size=tuple(context), utterance=utterance, taps=taps,
                          reference_tokens=reference.tokens[0], candidate_tokens=candidate.tokens[0],
                          order=comparison_order(num_layers), mode="offline",
                          reference_ctc_tokens=first(reference.ctc_tokens), candidate_ctc_tokens=first(candidate.ctc_tokens),
                          ctc_flips=ctc_flips), tolerances)


def judge_teacher_forced(free: PairComparison, reference_run, forced_run, tolerances: Tolerances, *,
                         num_layers: int) -> PairComparison:
    """The verdict on a candidate whose free-running decisions left the reference's: its taps from
    ``forced_run`` (decoded with the reference's decisions, so every decoder and joint row stays
    comparable), its flips classified against the joint's limits, its transcript from ``free``."""
    forced = compare_runs(reference_run, forced_run, tolerances, num_layers=num_layers, utterance=free.utterance,
                          pair=free.pair)
    flips = find_flips(reference_run.steps, forced_run.steps, tolerances.limits(free.pair, free.dtype, TAP_JOINT))
    return verdict(replace(forced, candidate_tokens=free.candidate_tokens, teacher_forced=True, flips=flips,
                           candidate_ctc_tokens=free.candidate_ctc_tokens), tolerances)


def judge_teacher_forced_offline(free: PairComparison, reference: OfflineOutput, forced: OfflineOutput,
                                 tolerances: Tolerances, *, reference_name: str, candidate_name: str,
                                 num_layers: int) -> PairComparison:
    """``judge_teacher_forced`` for the offline forwards: a candidate whose offline greedy decode left the
    reference's at some joint call is judged on its decode with the reference's decisions (every decoder and
    joint row comparable), its flips classified by the tie rule, its transcript kept from ``free``."""
    judged = compare_offline_outputs(reference, forced, tolerances, reference_name=reference_name,
                                     candidate_name=candidate_name, dtype=free.dtype, context=free.att_context_size,
                                     utterance=free.utterance, num_layers=num_layers)
    flips = [replace(flip, step=-1) for flip in find_flips(
        [_Rows(TAP_JOINT, reference.taps[TAP_JOINT])], [_Rows(TAP_JOINT, forced.taps[TAP_JOINT])],
        tolerances.limits(free.pair, free.dtype, TAP_JOINT))]
    return verdict(replace(judged, candidate_tokens=free.candidate_tokens, teacher_forced=True, flips=flips,
                           candidate_ctc_tokens=free.candidate_ctc_tokens), tolerances)

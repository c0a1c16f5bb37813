"""The judge at its edges: empty and zero tensors, float32 inputs, shapes, multi-step flips, the exact
tie bound, and every field and message a comparison hands to results, reports and ``parity judge``.

Everything here is synthetic (small arrays, in-memory tolerance tables), so each expectation is
worked out by hand or by an independent computation in this file.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from functools import cache
from types import SimpleNamespace

import numpy as np
import pytest
from builders import pair_comparison, step_output, stream_run
from hypothesis import given
from hypothesis import strategies as st

from streaming_parity.interface.driver import StreamRun
from streaming_parity.interface.taps import (
    CACHE_TAPS,
    TAP_CTC,
    TAP_DECODER,
    TAP_ENCODER,
    TAP_JOINT,
    TAP_MEL,
    TAP_PRE_ENCODE,
)
from streaming_parity.interface.types import OfflineOutput
from streaming_parity.judge import metrics
from streaming_parity.judge.compare import (
    PairComparison,
    TapResult,
    compare_offline_outputs,
    compare_runs,
    compare_streaming_to_offline,
    comparison_order,
    judge_tap,
    judge_taps,
    judge_teacher_forced,
    rejudge,
    token_agreement_failures,
    verdict,
)
from streaming_parity.judge.metrics import METRIC_BOUND
from streaming_parity.judge.ties import TokenFlip, decisions, find_flips, rebound, top_two
from streaming_parity.judge.tolerances import (
    TAP_KINDS,
    MissingToleranceError,
    ToleranceFileError,
    Tolerances,
    Violation,
)

# Limits chosen so that every value below is exact in binary floating point: a joint or CTC logit may
# move by 0.25, so two logits within 0.5 of each other are tied (ties.tie_bound: twice the allowed error).
TABLE = {"float32": {
    "*": {
        TAP_MEL: {"max_abs": 1e-3},
        TAP_ENCODER: {"max_abs": 1e-3},
        TAP_DECODER: {"max_abs": 1e-3},
        TAP_JOINT: {"max_abs": 0.25, "argmax_agreement": 1.0},
        TAP_CTC: {"max_abs": 0.25, "argmax_agreement": 1.0},
    },
    "ref~cand": {TAP_MEL: {"max_abs": 0.5}},
    "streaming~offline@70,0": {TAP_ENCODER: {"max_abs": 0.5}},
    "nemo~peer": {"tokens": {"argmax_agreement": 0.5}},
}}
TOL = Tolerances(TABLE)
# The same file with the joint and CTC allowed 32x less (tie bound 1/64).
STRICT = Tolerances({"float32": {"*": {**TABLE["float32"]["*"],
                                       TAP_JOINT: {"max_abs": 2 ** -7, "argmax_agreement": 1.0},
                                       TAP_CTC: {"max_abs": 2 ** -7, "argmax_agreement": 1.0}}}})
V = 4  # labels 0..2, blank 3


def _flip(step=0, call=0, *, near_tie=True, tap=TAP_JOINT, margin=0.25, label=0, second=1, chosen=1,
          scale=1.0) -> TokenFlip:
    return TokenFlip(step=step, call=call, reference_label=label, reference_second=second, candidate_label=chosen,
                     reference_margin=margin, candidate_margin=0.125, scale=scale, bound=0.5, near_tie=near_tie,
                     tap=tap)


# -- metrics: edge values, float64 and axes --------------------------------------------------------------

def test_metrics_of_empty_tensors_are_those_of_identical_tensors():
    empty = np.zeros((0, V))
    assert metrics.max_abs(empty, empty) == 0.0
    assert metrics.max_rel(empty, empty) == 0.0
    assert metrics.max_abs_scaled(empty, empty) == 0.0
    assert metrics.rel_l2(empty, empty) == 0.0
    assert metrics.cosine(empty, empty) == 1.0
    assert metrics.snr_db(empty, empty) == math.inf
    assert metrics.argmax_agreement(empty, empty) == 1.0
    assert not Tolerances({}).check(metrics.all_metrics(empty, empty, logits=True),
                                    {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "argmax_agreement": 1.0})


def test_metrics_against_an_all_zero_reference():
    zeros, ones = np.zeros(3), np.ones(3)
    assert metrics.rel_l2(zeros, zeros) == 0.0
    assert metrics.rel_l2(zeros, ones) == math.inf  # any error on a zero reference is infinitely large
    assert metrics.snr_db(zeros, zeros) == math.inf
    assert metrics.snr_db(zeros, ones) == -math.inf  # no signal, only noise
    assert metrics.cosine(zeros, zeros) == 1.0
    assert metrics.cosine(zeros, ones) == 0.0
    assert metrics.cosine(ones, zeros) == 0.0
    assert metrics.max_rel(zeros, np.full(3, 1e-3)) == pytest.approx(1e-3 / 1e-30)


def test_cosine_when_the_norms_multiply_to_one():
    assert metrics.cosine(np.array([1.0, 0.0]), np.array([0.6, 0.8])) == pytest.approx(0.6)
    assert metrics.cosine(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0


def test_float32_tensors_are_measured_in_float64():
    # float32 squares of 1e-30 underflow to 0 and the difference of +-3e38 overflows: float64 holds both.
    tiny_ref = np.array([1e-30, 2e-30], np.float32)
    tiny_cand = np.array([2e-30, 1e-30], np.float32)
    assert metrics.cosine(tiny_ref, tiny_cand) == pytest.approx(0.8)  # (2 + 2) / 5
    assert metrics.rel_l2(tiny_ref, tiny_cand) == pytest.approx(math.sqrt(2 / 5), rel=1e-6)
    assert metrics.snr_db(tiny_ref, tiny_cand) == pytest.approx(20 * math.log10(math.sqrt(5 / 2)), rel=1e-6)
    huge = np.array([3e38], np.float32)
    assert metrics.max_abs(huge, -huge) == pytest.approx(2 * float(huge[0]))
    assert math.isfinite(metrics.max_abs(huge, -huge))


def test_argmax_agreement_counts_rows_along_the_last_axis():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((2, 3, V))
    cand = ref.copy()
    cand[0, 1] = -cand[0, 1]  # two of six rows moved away from their argmax
    cand[1, 2] = -cand[1, 2]
    rows = [int(np.argmax(r)) == int(np.argmax(c)) for r, c in zip(ref.reshape(-1, V), cand.reshape(-1, V),
                                                                         strict=True)]
    assert metrics.argmax_agreement(ref, cand) == pytest.approx(sum(rows) / 6) == pytest.approx(4 / 6)


def test_all_metrics_measure_argmax_agreement_on_logits_only():
    ref, cand = np.eye(3), np.eye(3)[::-1]
    assert "argmax_agreement" not in metrics.all_metrics(ref, cand)
    assert metrics.all_metrics(ref, cand, logits=True)["argmax_agreement"] == pytest.approx(1 / 3)
    encoder = judge_tap(0, TAP_ENCODER, ref, ref, TOL, "a~b", "float32")
    assert set(encoder.metrics) == set(METRIC_BOUND) - {"argmax_agreement", "power_rel"}
    for logits in (TAP_JOINT, TAP_CTC):
        assert judge_tap(0, logits, ref, cand, TOL, "a~b", "float32").metrics["argmax_agreement"] == pytest.approx(1 / 3)


def test_power_rel_is_measured_on_the_mel_only_and_sees_frames_not_the_log_guard():
    """A log-mel's quiet bins (near NeMo's log guard, 2^-24) differ in the log by rounding; in power relative to
    the frame's loudest bin they do not. A frame whose loud bins move is seen at once."""
    loud, quiet = 10.0, np.log(2.0 ** -24)
    reference = np.array([[[loud, loud], [quiet, quiet]]])  # [B, n_mels, T]
    rounding = reference + np.array([[[0.0, 0.0], [5e-3, -5e-3]]])  # 5e-3 at the guard, as float32 FFT noise
    moved = reference + np.array([[[0.1, 0.0], [0.0, 0.0]]])  # one loud bin of one frame moved by 10 %
    assert metrics.max_abs(reference, rounding) == pytest.approx(5e-3)
    assert metrics.power_rel(reference, rounding) < 1e-12
    assert metrics.power_rel(reference, moved) == pytest.approx(np.exp(0.1) - 1)
    assert "power_rel" in judge_tap(-1, TAP_MEL, reference, rounding, TOL, "a~b", "float32").metrics
    with pytest.raises(ToleranceFileError, match="power_rel is never measured for encoder"):
        Tolerances({"float32": {"*": {"encoder": {"power_rel": 1.0}}}})
    with pytest.raises(ValueError, match="power_rel needs"):
        metrics.power_rel(np.zeros(3), np.zeros(3))


@cache
def _levenshtein(a: tuple, b: tuple) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_levenshtein(a[1:], b) + 1, _levenshtein(a, b[1:]) + 1, _levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


def test_token_edit_distance_cases():
    assert metrics.token_edit_distance([], []) == 0
    assert metrics.token_edit_distance([], [4, 5]) == 2
    assert metrics.token_edit_distance([4, 5, 6], []) == 3
    assert metrics.token_edit_distance([1, 2, 3], [1, 3]) == 1  # one deletion
    assert metrics.token_edit_distance([1, 3], [1, 2, 3]) == 1  # one insertion
    assert metrics.token_edit_distance([1, 2, 3], [1, 9, 3]) == 1  # one substitution
    assert metrics.token_edit_distance([1, 2, 3], [2, 3, 1]) == 2
    assert metrics.token_edit_distance(list("kitten"), list("sitting")) == 3


@given(st.lists(st.integers(0, 3), max_size=7), st.lists(st.integers(0, 3), max_size=7))
def test_token_edit_distance_is_levenshtein(reference, candidate):
    assert metrics.token_edit_distance(reference, candidate) == _levenshtein(tuple(reference), tuple(candidate))


def test_token_agreement_with_an_empty_reference():
    assert metrics.token_agreement([], []) == 1.0
    assert metrics.token_agreement([], [7]) == 0.0
    assert metrics.token_agreement([1, 2], [3, 4, 5, 6]) == 0.0  # floored at 0
    assert metrics.token_agreement([1, 2, 3, 4], [1, 2, 3]) == pytest.approx(0.75)


def test_word_error_rate_with_empty_sides():
    assert metrics.word_error_rate([], []) == 0.0
    assert metrics.word_error_rate(["", " "], ["", ""]) == 0.0
    assert metrics.word_error_rate(["a b"], [""]) == 1.0  # every word deleted
    assert metrics.word_error_rate(["a b"], ["   "]) == 1.0
    assert metrics.word_error_rate([""], ["x"]) == 1.0  # a word where the reference is silent is an error
    # An empty reference counts as one placeholder word (jiwer 3 refuses empty references): against it
    # "x y" is 2 errors, over the 2 + 1 reference words of the corpus.
    assert metrics.word_error_rate(["a b", ""], ["a b", "x y"]) == pytest.approx(2 / 3)


# -- tolerances: messages, quoting and lookup --------------------------------------------------------------

def test_violation_names_the_direction_of_its_bound():
    assert Violation("max_abs", 2e-3, 1e-3, "max").describe() == "max_abs = 0.002 > limit 0.001"
    assert Violation("cosine", 0.9, 0.99, "min").describe() == "cosine = 0.9 < limit 0.99"
    (violation,) = TOL.check({"cosine": 0.5}, {"cosine": 0.75})
    assert violation.describe() == "cosine = 0.5 < limit 0.75"


def _load_error(table) -> str:
    with pytest.raises(ToleranceFileError) as raised:
        Tolerances(table)
    return str(raised.value)


def test_tolerance_errors_in_memory_name_the_table_and_the_known_names():
    assert _load_error({"float32": {"*": 1}}) == (
        '<memory>: [float32]: * = 1 where a pair table belongs (layout: [dtype."pair".tap_kind] metric = limit)')
    assert _load_error({"float32": {"*": {"layrs": {"max_abs": 1.0}}}}) == (
        f"<memory>: [float32.\"*\".layrs]: unknown tap kind 'layrs' (known: {', '.join(TAP_KINDS)})")
    assert ", layers, " in ", ".join(TAP_KINDS)
    assert _load_error({"float32": {"*": {"encoder": {"max_absolute": 1.0}}}}) == (
        f"<memory>: [float32.\"*\".encoder]: unknown metric 'max_absolute' (known: {', '.join(METRIC_BOUND)})")
    assert _load_error({"float32": {"*": {"decoder": {"argmax_agreement": 1.0}}}}).endswith(
        "argmax_agreement is never measured for decoder (only for joint and ctc and tokens)")


@pytest.mark.parametrize("dtype", ['fl"oat', "fl\\oat", 'a"b\\c"', "float 32"])
def test_a_table_name_in_an_error_is_spelled_as_toml_spells_it(dtype):
    message = _load_error({dtype: {"*": {"encoder": {"max_abs": 1.0}}}})
    where = message.split(": ", 2)[1]
    assert where.startswith('["') and where.endswith('"."*".encoder]'), where
    assert tomllib.loads(where + "\nmax_abs = 1.0\n") == {dtype: {"*": {"encoder": {"max_abs": 1.0}}}}


def test_limits_take_the_wildcard_then_the_pair_then_its_lookahead_metric_by_metric():
    tol = Tolerances({"float32": {
        "*": {"encoder": {"max_abs": 1.0, "rel_l2": 1.0, "cosine": 0.5}},
        "a~b": {"encoder": {"max_abs": 2.0}},
        "a~b@70,0": {"encoder": {"rel_l2": 3.0}},
    }})
    assert tol.limits("c~d", "float32", "encoder") == {"max_abs": 1.0, "rel_l2": 1.0, "cosine": 0.5}
    assert tol.limits("a~b", "float32", "encoder") == {"max_abs": 2.0, "rel_l2": 1.0, "cosine": 0.5}
    assert tol.limits("a~b@70,1", "float32", "encoder") == {"max_abs": 2.0, "rel_l2": 1.0, "cosine": 0.5}
    assert tol.limits("a~b@70,0", "float32", "encoder") == {"max_abs": 2.0, "rel_l2": 3.0, "cosine": 0.5}
    with pytest.raises(MissingToleranceError, match=r"no limit for tap 'encoder' of a~b at int8"):
        tol.limits("a~b", "int8", "encoder")


# -- ties ----------------------------------------------------------------------------------------------------

def test_flip_descriptions_name_the_kind_the_tap_and_the_position():
    joint = _flip(step=2, call=3, near_tie=False, margin=1.0, label=0, second=1, chosen=2)
    assert joint.describe() == ("label flip at step 2, call 3: reference 0 (second 1, margin 1), candidate 2 "
                                "(margin 0.125), tie bound 0.5")
    assert _flip(step=1, call=0).describe().startswith("near-tie at step 1, call 0: reference 0 (second 1, margin 0.25)")
    ctc = _flip(step=4, call=5, tap=TAP_CTC)
    assert ctc.describe().startswith("CTC near-tie at step 4, frame 5: reference 0 (second 1")
    assert _flip(tap=TAP_CTC, near_tie=False).describe().startswith("CTC label flip at step 0, frame 0: ")


def test_decisions_are_the_argmax_of_each_call():
    rows = np.array([[0.0, 2.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert decisions(rows) == [1, 0, 3]
    assert decisions(np.zeros((0, V))) == []
    assert all(type(d) is int for d in decisions(rows))


def test_top_two_leaves_the_row_alone_and_takes_any_numeric_row():
    row = np.array([0.5, 2.0, 1.0, 2.0])
    assert top_two(row) == (1, 3)  # an exact tie: the first index is the choice, the other the runner-up
    assert row.tolist() == [0.5, 2.0, 1.0, 2.0]
    assert top_two(np.array([3, 9, 7], np.int64)) == (1, 2)
    assert top_two(np.array([1.0, -1.0], np.float16)) == (0, 1)


def _rows(*rows) -> np.ndarray:
    return np.array(rows, np.float64)


JOINT_LIMITS = {"max_abs": 0.25}  # tie bound 0.5


def test_find_flips_over_steps_calls_and_a_misshapen_step():
    agree = _rows([2.0, 0.0, 0.0, 0.0])
    reference = [
        step_output({TAP_JOINT: _rows([2.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0])}),  # call 1: a tie at the bound
        step_output({TAP_JOINT: _rows([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0])}),  # misshapen in the candidate
        step_output({TAP_JOINT: agree}),  # missing in the candidate
        step_output({}),  # missing in the reference
        step_output({TAP_JOINT: _rows([0.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0])}),
    ]
    candidate = [
        step_output({TAP_JOINT: _rows([2.0, 0.0, 0.0, 0.0], [0.75, 1.0, 0.0, 0.0])}),
        step_output({TAP_JOINT: _rows([0.0, 1.0, 0.0, 0.0])}),
        step_output({}),
        step_output({TAP_JOINT: agree}),
        step_output({TAP_JOINT: _rows([0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0])}),
        step_output({TAP_JOINT: _rows([0.0, 0.0, 0.0, 5.0])}),  # a step the reference does not have
    ]
    flips = find_flips(reference, candidate, JOINT_LIMITS)
    assert [(f.step, f.call) for f in flips] == [(0, 1), (4, 1)]
    tie, real = flips
    assert (tie.reference_label, tie.reference_second, tie.candidate_label) == (0, 1, 1)
    assert tie.reference_margin == 0.5 == tie.bound and tie.near_tie  # exactly at the bound: still a tie
    assert tie.candidate_margin == 0.25  # the candidate's own choice leads the reference's label by 0.25
    assert tie.scale == 2.0 and tie.tap == TAP_JOINT
    assert (real.reference_label, real.reference_second, real.candidate_label) == (1, 0, 3)
    assert real.reference_margin == 2.0 and real.candidate_margin == 5.0 and not real.near_tie
    assert real.scale == 3.0 and real.bound == 0.5


def test_find_flips_reads_batched_rows_and_the_ctc_tap():
    reference = _rows([2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.75, 0.0], [0.0, 0.0, 0.0, 1.0])[None]  # [1, 3, V]
    candidate = reference.copy()
    candidate[0, 1, 2] = 1.25
    (flip,) = find_flips([step_output({TAP_CTC: reference})], [step_output({TAP_CTC: candidate})], JOINT_LIMITS,
                         tap=TAP_CTC)
    assert (flip.step, flip.call, flip.reference_label, flip.candidate_label) == (0, 1, 1, 2)
    assert flip.tap == TAP_CTC and flip.near_tie and flip.candidate_margin == 0.25
    assert find_flips([step_output({TAP_CTC: reference})], [step_output({TAP_CTC: candidate})],
                      JOINT_LIMITS) == []  # joint


def test_a_margin_just_above_the_bound_is_a_real_flip():
    reference = [step_output({TAP_JOINT: _rows([1.0, 0.5 - 2 ** -20, 0.0, 0.0])})]
    candidate = [step_output({TAP_JOINT: _rows([0.5, 1.0, 0.0, 0.0])})]
    (flip,) = find_flips(reference, candidate, JOINT_LIMITS)
    assert flip.reference_margin > flip.bound == 0.5 and not flip.near_tie


def test_rebound_judges_saved_flips_by_the_new_bound():
    saved = [_flip(margin=0.5, scale=8.0, near_tie=False), _flip(call=1, margin=0.5, chosen=2, scale=8.0),
             _flip(call=2, margin=0.5 + 2 ** -20, scale=8.0)]
    rebounded = rebound(saved, {"max_abs_scaled": 2 ** -5})  # 1/32 of the scale 8: bound 0.5
    assert [f.bound for f in rebounded] == [0.5, 0.5, 0.5]
    assert [f.near_tie for f in rebounded] == [True, False, False]  # at the bound; not the runner-up; above it
    assert [(f.call, f.reference_margin, f.scale) for f in rebounded] == [(0, 0.5, 8.0), (1, 0.5, 8.0),
                                                                         (2, 0.5 + 2 ** -20, 8.0)]
    assert [f.near_tie for f in rebound(saved, {"rel_l2": 1.0})] == [False, False, False]


# -- PairComparison: order, messages, worst -------------------------------------------------------------------

def test_comparison_order_is_model_order():
    # The prompt kernel fuses the encoder output before the CTC head, the decoder and the joint read it.
    assert comparison_order(2) == [TAP_MEL, TAP_PRE_ENCODE, "layers.0", "layers.1", TAP_ENCODER, *CACHE_TAPS,
                                   "prompt", TAP_CTC, TAP_DECODER, TAP_JOINT]


def _tap(step: int, tap: str, violations=(), **metric_values) -> TapResult:
    return TapResult(step, tap, dict(metric_values), {"max_abs": 1e-3}, list(violations), [1, 2], [1, 2])


def test_a_tap_outside_the_model_order_diverges_after_every_known_tap_of_its_step():
    comparison = pair_comparison([_tap(1, "extra", ["x"]), _tap(1, TAP_JOINT, ["y"]), _tap(2, "layers.0", ["z"])])
    assert comparison.first_divergence().tap == TAP_JOINT
    only = pair_comparison([_tap(1, "extra", ["x"]), _tap(2, "layers.0", ["z"])])
    assert only.first_divergence().tap == "extra"


def test_failure_message_names_lookahead_place_and_every_violation():
    at_step = pair_comparison([_tap(0, TAP_ENCODER, ["max_abs = 1 > limit 0.001", "rel_l2 = 1 > limit 1e-05"])])
    assert at_step.describe_failure() == ("nemo~mlx [70,13] utt: first divergent tap encoder at step 0: "
                                          "max_abs = 1 > limit 0.001; rel_l2 = 1 > limit 1e-05")
    at_utterance = pair_comparison([_tap(-1, TAP_MEL, ["max_abs = 1 > limit 0.001"]), _tap(0, TAP_ENCODER, ["e"])])
    assert at_utterance.describe_failure() == ("nemo~mlx [70,13] utt: first divergent tap mel at utterance: "
                                               "max_abs = 1 > limit 0.001")
    assert pair_comparison([_tap(1, TAP_ENCODER, ["e"])]).describe_failure().endswith("encoder at step 1: e")


def test_a_passing_comparison_says_so():
    assert pair_comparison([_tap(0, TAP_ENCODER)]).describe_failure() == "nemo~mlx [70,13] utt: passed"
    hybrid = pair_comparison([_tap(0, TAP_ENCODER)], reference_ctc_tokens=[1, 2], candidate_ctc_tokens=[1, 2])
    assert hybrid.passed and hybrid.describe_failure() == "nemo~mlx [70,13] utt: passed"
    recorded = pair_comparison([], candidate_tokens=[1, 2], require_token_match=False, reference_ctc_tokens=[1],
                               candidate_ctc_tokens=[2])
    assert recorded.passed and recorded.describe_failure().endswith(": passed")


def test_token_difference_is_located_where_the_sequences_part():
    assert pair_comparison(candidate_tokens=[1, 2]).describe_failure() == (
        "nemo~mlx [70,13] utt: token sequences differ at position 2 (3 vs 2 tokens)")
    assert pair_comparison(candidate_tokens=[1, 5, 3, 4]).describe_failure().endswith(
        "token sequences differ at position 1 (3 vs 4 tokens)")
    assert pair_comparison(reference_tokens=[], candidate_tokens=[7]).describe_failure().endswith(
        "token sequences differ at position 0 (0 vs 1 tokens)")


def test_a_real_flip_is_named_before_any_near_tie():
    flips = [_flip(step=0, near_tie=True), _flip(step=1, call=2, near_tie=False, margin=1.0),
             _flip(step=2, near_tie=False, margin=3.0)]
    comparison = pair_comparison(candidate_tokens=[1, 9, 3], teacher_forced=True, flips=flips)
    assert not comparison.passed
    assert comparison.describe_failure() == "nemo~mlx [70,13] utt: " + flips[1].describe()
    tied = pair_comparison(candidate_tokens=[1, 9, 3], teacher_forced=True, flips=[_flip()])
    assert tied.passed and tied.describe_failure().endswith(": passed")


def test_a_token_divergence_is_described_by_its_step():
    divergence = {"step": 3, "reference_step_tokens": [2], "candidate_step_tokens": [5], "lost": [2], "added": [5],
                  "reference_steps": 4, "candidate_steps": 4, "total_lost": 1, "total_added": 1}
    comparison = pair_comparison(candidate_tokens=[1, 5, 3], token_divergence=divergence)
    assert comparison.describe_failure() == (
        "nemo~mlx [70,13] utt: tokens leave the reference's at step 3: lost [2], added [5] "
        "(whole run: 1 lost, 1 added; 4 vs 4 steps)")


def test_ctc_transcript_differences_are_described():
    differ = pair_comparison(reference_ctc_tokens=[4, 5, 6], candidate_ctc_tokens=[4, 7, 6])
    assert not differ.passed
    assert differ.describe_failure() == "nemo~mlx [70,13] utt: CTC token sequences differ at position 1 (3 vs 3 tokens)"
    shorter = pair_comparison(reference_ctc_tokens=[4, 5, 6], candidate_ctc_tokens=[4, 5])
    assert shorter.describe_failure().endswith("CTC token sequences differ at position 2 (3 vs 2 tokens)")
    longer = pair_comparison(reference_ctc_tokens=[4], candidate_ctc_tokens=[4, 5])
    assert longer.describe_failure().endswith("CTC token sequences differ at position 1 (1 vs 2 tokens)")
    ctc_flips = [_flip(step=0, tap=TAP_CTC), _flip(step=1, call=4, tap=TAP_CTC, near_tie=False, margin=1.0),
                 _flip(step=2, tap=TAP_CTC, near_tie=False)]
    flipped = pair_comparison(reference_ctc_tokens=[4, 5], candidate_ctc_tokens=[4, 6], ctc_flips=ctc_flips)
    assert flipped.describe_failure() == "nemo~mlx [70,13] utt: " + ctc_flips[1].describe()
    assert "CTC label flip at step 1, frame 4" in flipped.describe_failure()
    tied = pair_comparison(reference_ctc_tokens=[4, 5], candidate_ctc_tokens=[4, 6], ctc_flips=ctc_flips[:1])
    assert tied.passed and tied.describe_failure().endswith(": passed")


def test_worst_is_the_largest_value_of_each_tap_over_steps():
    comparison = pair_comparison([_tap(0, TAP_ENCODER, max_abs=1e-6, rel_l2=3.0), _tap(1, TAP_ENCODER, max_abs=4e-6),
                                  _tap(2, TAP_ENCODER, max_abs=2e-6), _tap(0, "layers.0", max_abs=5e-7),
                                  _tap(0, TAP_JOINT, rel_l2=1e-7), _tap(-1, TAP_MEL, max_abs=0.0)])
    assert comparison.worst() == {TAP_ENCODER: 4e-6, "layers.0": 5e-7, TAP_MEL: 0.0}
    assert comparison.worst("max_abs") == comparison.worst()
    assert comparison.worst("rel_l2") == {TAP_ENCODER: 3.0, TAP_JOINT: 1e-7}
    assert pair_comparison([]).worst() == {}


def test_worst_keeps_a_nan_wherever_it_comes():
    for values in ((math.nan, 1e-6), (1e-6, math.nan), (math.nan,)):
        comparison = pair_comparison([_tap(i, TAP_ENCODER, max_abs=v) for i, v in enumerate(values)])
        assert math.isnan(comparison.worst()[TAP_ENCODER]), values


# -- judge_tap, judge_taps (the one policy), rejudge ----------------------------------------------------------

def test_a_shape_mismatch_keeps_both_shapes_and_the_limits():
    result = judge_tap(2, TAP_ENCODER, np.zeros((1, 2, 3)), np.zeros((1, 2, 4)), TOL, "a~b", "float32")
    assert (result.step, result.tap, result.metrics) == (2, TAP_ENCODER, {})
    assert result.limits == {"max_abs": 1e-3}
    assert (result.reference_shape, result.candidate_shape) == ([1, 2, 3], [1, 2, 4])
    assert result.violations == result.structural == ["shape [1, 2, 3] vs [1, 2, 4]"]


def _measured(step: int, tap: str = TAP_JOINT, **metric_values) -> TapResult:
    """A tap as ``measure_tap`` leaves it: metrics and shapes, nothing judged."""
    return TapResult(step, tap, metric_values, {}, [], [2, V], [2, V])


def test_near_ties_exempt_only_the_agreement_limit_of_their_own_tap_and_step():
    taps = [_measured(0, max_abs=0.125, argmax_agreement=0.5),  # near-tie only: passes
            _measured(1, max_abs=0.5, argmax_agreement=0.5),  # near-tie, but another limit fails
            _measured(2, max_abs=0.125, argmax_agreement=0.5),  # a near-tie and a real flip
            _measured(3, max_abs=0.125, argmax_agreement=0.5),  # no flip recorded here
            _measured(4, max_abs=0.125, argmax_agreement=0.5),  # a CTC near-tie does not excuse the joint
            _measured(0, TAP_ENCODER, max_abs=1.0),  # taps without a tie rule: judged as they are
            _measured(0, TAP_DECODER, max_abs=1e-4)]
    flips = [_flip(0), _flip(1), _flip(2), _flip(2, call=1, near_tie=False), _flip(4, tap=TAP_CTC)]
    judged = judge_taps(taps, flips, TOL, "a~b", "float32")
    assert [t.passed for t in judged] == [True, False, False, False, False, False, True]
    assert judged[1].violations == ["max_abs = 0.5 > limit 0.25"]
    assert judged[2].violations == judged[3].violations == ["argmax_agreement = 0.5 < limit 1"]
    exempted = judged[0]
    assert (exempted.step, exempted.tap, exempted.limits) == (0, TAP_JOINT, {"max_abs": 0.25, "argmax_agreement": 1.0})
    assert (exempted.reference_shape, exempted.candidate_shape, exempted.structural) == ([2, V], [2, V], [])
    assert judged[5].violations == ["max_abs = 1 > limit 0.001"]


def test_an_exempted_tap_keeps_its_structural_violations():
    tap = TapResult(0, TAP_CTC, {"argmax_agreement": 0.5}, {}, ["frames"], [3, V], [3, V], structural=["frames"])
    (judged,) = judge_taps([tap], [_flip(0, tap=TAP_CTC)], TOL, "a~b", "float32")
    assert judged.violations == ["frames"] and judged.structural == ["frames"]


def test_a_fresh_verdict_and_a_rejudged_one_take_the_same_path():
    """The verdict on a comparison with flips equals the verdict ``rejudge`` gives its saved form."""
    comparison = pair_comparison([_measured(0, max_abs=0.125, argmax_agreement=0.5),
                                  _measured(1, max_abs=0.125, argmax_agreement=0.5)],
                                 flips=[_flip(0), _flip(1, near_tie=False, margin=0.75)], teacher_forced=True)
    fresh = verdict(comparison, TOL)
    assert [t.passed for t in fresh.taps] == [True, False]
    again = rejudge(fresh, TOL)
    assert [(t.limits, t.violations) for t in again.taps] == [(t.limits, t.violations) for t in fresh.taps]


def test_a_tokens_table_judges_the_run_not_the_comparison():
    """A pair whose tokens the file bounds by agreement: a comparison with other tokens passes on its own, and
    the aggregate over the pair's comparisons is the verdict (``token_agreement_failures``)."""
    def peer(candidate_tokens) -> PairComparison:
        return replace(pair_comparison(reference_tokens=(1, 2, 3), candidate_tokens=candidate_tokens), pair="nemo~peer")

    differing = verdict(peer((1, 2, 0)), TOL)
    assert differing.tokens_judged_in_aggregate and differing.passed
    assert token_agreement_failures([differing], TOL) == []  # 2/3 >= 0.5
    worse = verdict(peer((0, 0, 0)), TOL)
    assert worse.passed  # alone it scores 0, and is still not failed alone
    (failure,) = token_agreement_failures([differing, worse], TOL)  # 2 edits + 3 edits over 6 tokens
    assert "nemo~peer at float32: token agreement over 2 comparisons" in failure
    exact = verdict(pair_comparison(reference_tokens=(1, 2, 3), candidate_tokens=(1, 2, 0)), TOL)  # no tokens table
    assert not exact.tokens_judged_in_aggregate and not exact.passed


def test_rejudging_keeps_metrics_shapes_and_structure_and_applies_the_new_limits():
    taps = [TapResult(0, TAP_ENCODER, {"max_abs": 0.01}, {"max_abs": 1.0}, [], [1, 2], [1, 2]),
            TapResult(1, TAP_ENCODER, {}, {"max_abs": 1.0}, ["shape [1, 2] vs [1, 3]"], [1, 2], [1, 3],
                      structural=["shape [1, 2] vs [1, 3]"])]
    comparison = pair_comparison(taps)
    once = rejudge(comparison, TOL)
    for _ in range(2):  # a re-judged comparison is re-judged the same way
        assert [t.metrics for t in once.taps] == [{"max_abs": 0.01}, {}]
        assert [t.limits for t in once.taps] == [{"max_abs": 1e-3}, {"max_abs": 1e-3}]
        assert [(t.reference_shape, t.candidate_shape) for t in once.taps] == [([1, 2], [1, 2]), ([1, 2], [1, 3])]
        assert [t.structural for t in once.taps] == [[], ["shape [1, 2] vs [1, 3]"]]
        assert [t.violations for t in once.taps] == [["max_abs = 0.01 > limit 0.001"], ["shape [1, 2] vs [1, 3]"]]
        once = rejudge(once, TOL)
    loose = rejudge(once, Tolerances({"float32": {"*": {TAP_ENCODER: {"max_abs": 1.0}}}}))
    assert [t.violations for t in loose.taps] == [[], ["shape [1, 2] vs [1, 3]"]]


def test_rejudging_re_exempts_joint_near_ties_and_rebounds_ctc_flips():
    joint = pair_comparison([_measured(0, max_abs=0.125, argmax_agreement=0.5)], candidate_tokens=[1, 9, 3],
                            teacher_forced=True, flips=[_flip(0, margin=0.25)])
    same = rejudge(joint, TOL)
    assert same.passed and same.flips[0].near_tie and same.taps[0].violations == []
    strict = rejudge(joint, STRICT)
    assert not strict.passed and not strict.flips[0].near_tie

    ctc_tap = TapResult(0, TAP_CTC, {"max_abs": 2 ** -8, "argmax_agreement": 0.5},
                        {"max_abs": 0.25, "argmax_agreement": 1.0}, [], [2, V], [2, V])
    hybrid = pair_comparison([ctc_tap], reference_ctc_tokens=[1, 2], candidate_ctc_tokens=[1, 3],
                             ctc_flips=[_flip(0, tap=TAP_CTC, margin=0.25)])
    assert rejudge(hybrid, TOL).passed
    rejudged = rejudge(hybrid, STRICT)
    assert [f.bound for f in rejudged.ctc_flips] == [2 ** -6] and not rejudged.ctc_flips[0].near_tie
    assert rejudged.ctc_flips[0].tap == TAP_CTC
    assert rejudged.taps[0].violations == ["argmax_agreement = 0.5 < limit 1"] and not rejudged.passed
    assert rejudged.describe_failure().endswith("first divergent tap ctc at step 0: argmax_agreement = 0.5 < limit 1")


def test_rejudging_looks_up_the_ctc_limits_of_the_comparisons_pair():
    hybrid = pair_comparison([], reference_ctc_tokens=[1, 2], candidate_ctc_tokens=[1, 3],
                             ctc_flips=[_flip(0, tap=TAP_CTC, margin=0.25)])
    only_joint = Tolerances({"float32": {"nemo~mlx": {TAP_JOINT: {"max_abs": 1.0}}}})
    with pytest.raises(MissingToleranceError, match=r"tap 'ctc' of nemo~mlx at float32"):
        rejudge(hybrid, only_joint)


# -- compare_runs and the teacher-forced verdict ------------------------------------------------------------

def test_front_end_features_are_judged_once_per_utterance_with_the_pairs_limits():
    steps = [step_output({TAP_ENCODER: np.zeros((1, 2))})]
    mel = np.zeros((1, 3, 5), np.float32)
    off = mel + 0.25
    within_pair = compare_runs(stream_run("nemo", steps, features=mel), stream_run("onnx", steps, features=off), TOL,
                               num_layers=1, pair="ref~cand")
    (mel_tap, encoder) = within_pair.taps
    assert (mel_tap.step, mel_tap.tap, mel_tap.limits) == (-1, TAP_MEL, {"max_abs": 0.5})
    assert mel_tap.metrics["max_abs"] == 0.25 and within_pair.passed
    assert (encoder.step, encoder.tap) == (0, TAP_ENCODER)
    default = compare_runs(stream_run("nemo", steps, features=mel), stream_run("onnx", steps, features=off), TOL,
                           num_layers=1)
    assert default.pair == "nemo~onnx" and default.utterance == ""
    assert not default.passed
    assert default.describe_failure() == ("nemo~onnx [70,13] : first divergent tap mel at utterance: "
                                          "max_abs = 0.25 > limit 0.001")
    for one_sided in ((mel, None), (None, mel)):
        reference = stream_run("nemo", steps, features=one_sided[0])
        candidate = stream_run("onnx", steps, features=one_sided[1])
        assert [t.tap for t in compare_runs(reference, candidate, TOL, num_layers=1).taps] == [TAP_ENCODER]


def test_a_differing_step_count_is_a_structural_utterance_level_violation():
    encoder = {TAP_ENCODER: np.zeros((1, 2))}
    comparison = compare_runs(stream_run("nemo", [step_output(encoder)] * 3),
                              stream_run("onnx", [step_output(encoder)] * 2), TOL, num_layers=1, utterance="u")
    count = next(t for t in comparison.taps if t.structural)
    # Judged on the one path: the tap's limits are recorded, as a re-judged comparison records them.
    assert (count.step, count.tap, count.metrics, count.limits) == (-1, TAP_ENCODER, {}, {"max_abs": 1e-3})
    assert rejudge(comparison, TOL).taps == comparison.taps
    assert count.violations == count.structural == ["step count 3 vs 2"]
    assert [t.step for t in comparison.taps if not t.structural] == [0, 1]
    assert comparison.describe_failure() == "nemo~onnx [70,13] u: first divergent tap encoder at utterance: step count 3 vs 2"


def test_compare_runs_records_names_mode_and_transcripts():
    reference = stream_run("nemo", [step_output({}, tokens=[1], ctc_tokens=[4]),
                                    step_output({}, tokens=[2], ctc_tokens=[])], context=(70, 1))
    candidate = stream_run("mlx", [step_output({}, tokens=[1, 2], ctc_tokens=[4, 5]),
                                   step_output({}, tokens=[], ctc_tokens=[6])], mode="pad-and-drop")
    comparison = compare_runs(reference, candidate, TOL, num_layers=2, utterance="utt07")
    assert (comparison.reference, comparison.candidate, comparison.pair, comparison.dtype) == (
        "nemo", "mlx", "nemo~mlx", "float32")
    assert (comparison.att_context_size, comparison.utterance, comparison.mode) == ((70, 1), "utt07", "pad-and-drop")
    assert (comparison.reference_tokens, comparison.candidate_tokens) == ([1, 2], [1, 2])
    assert (comparison.reference_ctc_tokens, comparison.candidate_ctc_tokens) == ([4], [4, 5, 6])
    assert comparison.order == comparison_order(2) and comparison.require_token_match
    assert not comparison.passed and "CTC token sequences differ at position 1 (1 vs 3 tokens)" in (
        comparison.describe_failure())
    plain = compare_runs(stream_run("nemo", [step_output({})]), stream_run("mlx", [step_output({})]), TOL, num_layers=1)
    assert plain.reference_ctc_tokens is None and plain.candidate_ctc_tokens is None and plain.passed


def test_ctc_flips_are_found_at_every_step_and_a_near_tie_is_exempted():
    # Step 0: frame 1 a near-tie (label 2 over 1 by 0.25, the candidate moved each by 0.125).
    ref0 = _rows([0.0, 0.0, 0.0, 1.0], [0.0, 0.75, 1.0, 0.0])
    cand0 = _rows([0.0, 0.0, 0.0, 1.0], [0.0, 0.875, 0.875, 0.0])  # equal: argmax takes label 1
    # Step 1: frame 0 flipped by a real margin (2 over 0.5).
    ref1 = _rows([0.0, 0.5, 2.0, 0.0])
    cand1 = _rows([0.0, 2.0, 0.5, 0.0])
    reference = stream_run("nemo", [step_output({TAP_CTC: ref0}), step_output({TAP_CTC: ref1})])
    candidate = stream_run("mlx", [step_output({TAP_CTC: cand0}), step_output({TAP_CTC: cand1})])
    comparison = compare_runs(reference, candidate, TOL, num_layers=1, utterance="u")
    assert [(f.step, f.call, f.tap, f.near_tie) for f in comparison.ctc_flips] == [(0, 1, TAP_CTC, True),
                                                                                   (1, 0, TAP_CTC, False)]
    step0, step1 = comparison.taps
    assert step0.metrics["argmax_agreement"] == 0.5 and step0.passed  # judged by the tie rule
    assert step1.violations == ["max_abs = 1.5 > limit 0.25", "argmax_agreement = 0 < limit 1"]
    strict = compare_runs(reference, candidate, STRICT, num_layers=1, utterance="u")
    assert not any(f.near_tie for f in strict.ctc_flips) and not strict.taps[0].passed


def test_ctc_flips_need_the_tap_on_both_sides_of_the_same_shape():
    ctc = _rows([0.0, 0.5, 2.0, 0.0])
    flipped = _rows([0.0, 2.0, 0.5, 0.0])
    for reference_taps, candidate_taps in (({TAP_CTC: ctc}, {}), ({}, {TAP_CTC: flipped}),
                                           ({TAP_CTC: ctc}, {TAP_CTC: np.concatenate([flipped, flipped])}),
                                           ({TAP_CTC: ctc[:0]}, {TAP_CTC: flipped[:0]})):
        comparison = compare_runs(stream_run("nemo", [step_output(reference_taps)]),
                                  stream_run("mlx", [step_output(candidate_taps)]), TOL, num_layers=1)
        assert comparison.ctc_flips == []


def test_a_teacher_forced_verdict_keeps_the_free_runs_pair_and_utterance():
    reference_rows = _rows([1.0, 0.75, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0])
    forced_rows = _rows([0.875, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0])
    reference = stream_run("nemo", [step_output({TAP_JOINT: reference_rows}, tokens=[0])])
    forced = stream_run("mlx", [step_output({TAP_JOINT: forced_rows}, tokens=[0])])
    free = stream_run("mlx", [step_output({TAP_JOINT: forced_rows}, tokens=[1], ctc_tokens=[2])])
    tol = Tolerances({"float32": {"nemo~mlx@70,13": {TAP_JOINT: {"max_abs": 0.25, "argmax_agreement": 1.0}}}})
    first = compare_runs(reference, free, tol, num_layers=1, utterance="utt03", pair="nemo~mlx@70,13")
    comparison = judge_teacher_forced(first, reference, forced, tol, num_layers=1)
    assert (comparison.pair, comparison.utterance) == ("nemo~mlx@70,13", "utt03")
    assert comparison.teacher_forced and comparison.candidate_tokens == [1] and comparison.candidate_ctc_tokens == [2]
    (flip,) = comparison.flips
    assert flip.near_tie and comparison.passed, comparison.describe_failure()


# -- transcript-level candidates, streaming against offline, offline against offline -------------------------

def _peer(tokens_per_step: list[list[int]]) -> StreamRun:
    return stream_run("peer", [step_output({}, tokens=tokens) for tokens in tokens_per_step], mode="own")


def test_a_transcript_level_candidate_is_judged_on_its_tokens():
    reference = stream_run("nemo", [step_output({TAP_ENCODER: np.ones((1, 2))}, tokens=t) for t in ([1, 2], [3], [4])])
    candidate = _peer([[1, 2], [5], [4]])
    bounded = compare_runs(reference, candidate, TOL, num_layers=1, utterance="u", pair="nemo~peer", tokens_only=True)
    (tokens,) = bounded.taps
    assert (tokens.step, tokens.tap, tokens.limits) == (-1, "tokens", {"argmax_agreement": 0.5})
    assert tokens.metrics == {"argmax_agreement": 0.75} and tokens.violations == []
    # Judged on the run's aggregate (token_agreement_failures): the comparison alone does not fail, and a tolerance
    # file without the tokens table would require its tokens equal again (rejudge).
    assert bounded.passed and bounded.tokens_judged_in_aggregate and not bounded.tokens_equal
    assert not rejudge(bounded, Tolerances({"float32": {"*": {TAP_ENCODER: {"max_abs": 1.0}}}})).passed
    assert (bounded.reference, bounded.candidate, bounded.pair, bounded.dtype, bounded.utterance, bounded.mode) == (
        "nemo", "peer", "nemo~peer", "float32", "u", "own")
    assert bounded.att_context_size == (70, 13) and bounded.order == comparison_order(1)
    assert bounded.token_divergence["step"] == 1
    assert (bounded.token_divergence["lost"], bounded.token_divergence["added"]) == ([3], [5])
    assert (bounded.reference_tokens, bounded.candidate_tokens) == ([1, 2, 3, 4], [1, 2, 5, 4])

    worse = compare_runs(reference, _peer([[9, 9], [9], [4]]), TOL, num_layers=1, pair="nemo~peer", tokens_only=True)
    assert worse.taps[0].violations == [] and worse.passed  # alone, never failed by its agreement
    (failure,) = token_agreement_failures([worse], TOL)
    assert failure.endswith("token agreement over 1 comparisons: argmax_agreement = 0.25 < limit 0.5")
    assert token_agreement_failures([bounded, worse], TOL) == []  # 1 + 3 edits over 8 tokens: 0.5, at the limit

    by_names = compare_runs(reference, candidate, TOL, num_layers=1, utterance="u", tokens_only=True)
    assert by_names.pair == "nemo~peer" and by_names.taps[0].metrics == {"argmax_agreement": 0.75}
    unbounded = compare_runs(reference, candidate, TOL, num_layers=1, utterance="u", pair="nemo~other",
                             tokens_only=True)
    assert unbounded.taps == [] and unbounded.require_token_match and not unbounded.passed
    assert unbounded.describe_failure() == ("nemo~other [70,13] u: tokens leave the reference's at step 1: lost [3], "
                                            "added [5] (whole run: 1 lost, 1 added; 3 vs 3 steps)")
    same = compare_runs(reference, _peer([[1, 2], [3], [4]]), TOL, num_layers=1, pair="nemo~other", tokens_only=True)
    assert same.passed and same.token_divergence is None


def _offline(frames: int, *, tokens=(1, 2), ctc_tokens=None, taps=None, value: float = 0.0) -> OfflineOutput:
    encoded = np.full((1, 2, frames), value, np.float32)
    return OfflineOutput(encoded=encoded, encoded_len=np.array([frames], np.int64), tokens=[list(tokens)],
                         taps=taps or {}, ctc_tokens=None if ctc_tokens is None else [list(ctc_tokens)])


def _streamed(frames_per_step: list[int], *, context=(70, 13), ctc_tokens=None) -> StreamRun:
    steps = [step_output({}, tokens=[1] if i == 0 else [],
                         ctc_tokens=ctc_tokens if i == 0 else ([] if ctc_tokens else None),
                         encoded=np.zeros((1, 2, n), np.float32)) for i, n in enumerate(frames_per_step)]
    return stream_run("nemo", steps, context=context, mode="plain")


@pytest.mark.parametrize(("offline_frames", "passes"), [(6, True), (7, True), (8, True), (9, False), (5, False)])
def test_streaming_may_miss_up_to_two_tail_frames_of_offline(offline_frames, passes):
    run = _streamed([2, 3, 1])  # 6 frames streamed
    comparison = compare_streaming_to_offline(run, _offline(offline_frames), TOL, num_layers=1, utterance="u")
    (result,) = comparison.taps
    assert (result.step, result.tap) == (-1, TAP_ENCODER)
    assert comparison.passed == passes
    frames = f"streaming produced 6 frames, offline {offline_frames}"
    if offline_frames >= 6:
        assert result.reference_shape == result.candidate_shape == [1, 2, 6]
        assert result.violations == result.structural == ([] if passes else [frames])
    else:
        assert result.violations == ["shape [1, 2, 5] vs [1, 2, 6]", frames]
        assert result.structural == result.violations
    if not passes:
        assert comparison.describe_failure() == (
            f"streaming~offline@70,13 [70,13] u: first divergent tap encoder at utterance: {'; '.join(result.violations)}")


def test_streaming_against_offline_records_names_pair_tokens_and_transcripts():
    run = _streamed([3, 3], context=(70, 0), ctc_tokens=[7, 8])
    offline = _offline(7, tokens=[1, 5], ctc_tokens=[7, 9], value=0.25)  # within the @70,0 limit only
    comparison = compare_streaming_to_offline(run, offline, TOL, num_layers=3, utterance="utt02")
    assert (comparison.reference, comparison.candidate, comparison.pair) == (
        "nemo-offline", "nemo-streaming", "streaming~offline@70,0")
    assert (comparison.dtype, comparison.att_context_size, comparison.utterance, comparison.mode) == (
        "float32", (70, 0), "utt02", "plain")
    assert comparison.taps[0].limits == {"max_abs": 0.5} and comparison.taps[0].metrics["max_abs"] == 0.25
    assert (comparison.reference_tokens, comparison.candidate_tokens) == ([1, 5], [1])
    assert (comparison.reference_ctc_tokens, comparison.candidate_ctc_tokens) == ([7, 9], [7, 8])
    assert comparison.order == comparison_order(3) and comparison.require_token_match is False
    assert comparison.passed  # streaming tokens are recorded, not required equal
    other = compare_streaming_to_offline(_streamed([3, 3], context=(70, 1)), _offline(6, value=0.25), TOL,
                                         num_layers=1)
    assert other.pair == "streaming~offline@70,1" and other.utterance == "" and not other.passed
    assert other.reference_ctc_tokens is None and other.candidate_ctc_tokens is None


def test_streaming_against_offline_accepts_a_run_without_a_ctc_transcript():
    run = _streamed([2])
    bare = SimpleNamespace(backend="peer", dtype="float32", att_context_size=(70, 13), mode="own", tokens=[1],
                           encoded=run.encoded)
    comparison = compare_streaming_to_offline(bare, _offline(2), TOL, num_layers=1)
    assert comparison.candidate_ctc_tokens is None and comparison.passed


def test_offline_forwards_are_compared_tap_by_tap_with_ctc_ties():
    ctc_ref = _rows([0.0, 0.75, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0])
    ctc_cand = _rows([0.0, 0.875, 0.875, 0.0], [0.0, 0.0, 0.0, 1.0])  # frame 0: a near-tie
    reference = _offline(4, tokens=[1, 2], ctc_tokens=[2],
                         taps={TAP_ENCODER: np.zeros((1, 2)), TAP_CTC: ctc_ref, TAP_DECODER: np.zeros(3)})
    candidate = _offline(4, tokens=[1, 3], ctc_tokens=[1],
                         taps={TAP_ENCODER: np.zeros((1, 2)), TAP_CTC: ctc_cand, TAP_JOINT: np.zeros(3)})
    comparison = compare_offline_outputs(reference, candidate, TOL, reference_name="nemo", candidate_name="onnx",
                                         dtype="float32", context=[70, 6], utterance="utt01", num_layers=2)
    assert (comparison.reference, comparison.candidate, comparison.pair, comparison.dtype) == (
        "nemo-offline", "onnx-offline", "nemo~onnx", "float32")
    assert (comparison.att_context_size, comparison.utterance, comparison.mode) == ((70, 6), "utt01", "offline")
    assert [(t.step, t.tap) for t in comparison.taps] == [(-1, TAP_ENCODER), (-1, TAP_CTC)]  # shared taps only
    assert (comparison.reference_tokens, comparison.candidate_tokens) == ([1, 2], [1, 3])
    assert (comparison.reference_ctc_tokens, comparison.candidate_ctc_tokens) == ([2], [1])
    assert comparison.order == comparison_order(2)
    (flip,) = comparison.ctc_flips
    assert (flip.step, flip.call, flip.tap, flip.near_tie) == (-1, 0, TAP_CTC, True)
    assert comparison.taps[1].passed and comparison.ctc_tokens_agree
    assert not comparison.passed and comparison.describe_failure().endswith(
        "token sequences differ at position 1 (2 vs 2 tokens)")
    strict = compare_offline_outputs(reference, candidate, STRICT, reference_name="nemo", candidate_name="onnx",
                                     dtype="float32", context=(70, 6), utterance="utt01", num_layers=2)
    assert not strict.ctc_flips[0].near_tie and not strict.taps[1].passed
    plain = compare_offline_outputs(_offline(4, taps={TAP_CTC: ctc_ref}), _offline(4), TOL, reference_name="nemo",
                                    candidate_name="onnx", dtype="float32", context=(70, 6), utterance="u",
                                    num_layers=1)
    assert plain.taps == [] and plain.ctc_flips == [] and plain.reference_ctc_tokens is None and plain.passed
    with pytest.raises(MissingToleranceError, match=r"of nemo~onnx at int8"):
        compare_offline_outputs(reference, candidate, TOL, reference_name="nemo", candidate_name="onnx",
                                dtype="int8", context=(70, 6), utterance="u", num_layers=1)

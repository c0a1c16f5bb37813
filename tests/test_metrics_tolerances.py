"""Metrics, the tolerance file and re-judging saved results."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builders import pair_comparison
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_parity.judge import metrics
from streaming_parity.judge.compare import PairComparison, judge_tap, rejudge
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import (
    DEFAULT_TOLERANCES,
    MissingToleranceError,
    ToleranceFileError,
    Tolerances,
    tap_kind,
)


def test_metric_definitions():
    ref = np.array([3.0, 4.0])
    cand = np.array([3.0, 4.5])
    assert metrics.max_abs(ref, cand) == pytest.approx(0.5)
    assert metrics.max_rel(ref, cand) == pytest.approx(0.125)
    assert metrics.max_abs_scaled(ref, cand) == pytest.approx(0.5 / 4.0)
    assert metrics.max_abs_scaled(ref * 100, cand * 100) == pytest.approx(0.5 / 4.0)  # scale-free
    assert metrics.max_abs_scaled(np.zeros(2), np.zeros(2)) == 0.0
    assert metrics.max_abs_scaled(np.zeros(2), np.ones(2)) == math.inf
    assert metrics.rel_l2(ref, cand) == pytest.approx(0.5 / 5.0)
    assert metrics.snr_db(ref, cand) == pytest.approx(20 * math.log10(5.0 / 0.5))
    assert metrics.cosine(ref, ref * 2) == pytest.approx(1.0)
    assert metrics.cosine(ref, -ref) == pytest.approx(-1.0)
    assert metrics.snr_db(ref, ref) == math.inf
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert metrics.argmax_agreement(logits, logits[:, ::-1]) == 0.0
    assert metrics.argmax_agreement(logits, logits + 0.01) == 1.0
    with pytest.raises(ValueError, match=r"shape mismatch"):
        metrics.max_abs(np.zeros(3), np.zeros(4))


def test_metrics_are_float64_exact_for_float32_inputs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(1000).astype(np.float32)
    assert metrics.max_abs(ref, ref.copy()) == 0.0
    cand = ref.copy()
    cand[7] = np.nextafter(cand[7], np.float32(np.inf))  # one float32 ulp
    ulp = float(cand[7]) - float(ref[7])
    assert metrics.max_abs(ref, cand) == ulp  # the metric adds no rounding of its own


def test_word_error_rate():
    assert metrics.word_error_rate(["a b c d"], ["a x c d"]) == pytest.approx(0.25)
    assert metrics.word_error_rate([""], [""]) == 0.0


def test_tolerance_lookup_wildcard_pair_and_lookahead_override():
    tol = Tolerances.load()
    assert tap_kind("layers.11") == "layers"
    assert tol.limits("nemo~anything", "float32", "layers.3")["max_abs"] == pytest.approx(1e-4)
    assert tol.limits("streaming~offline@70,13", "float32", "encoder")["max_abs"] == pytest.approx(1e-4)
    zero_lookahead = tol.limits("streaming~offline@70,0", "float32", "encoder")
    assert zero_lookahead["max_abs"] == math.inf and zero_lookahead["max_abs_scaled"] == pytest.approx(0.1)
    assert zero_lookahead["rel_l2"] == pytest.approx(0.05)


def test_tolerance_file_rejects_unknown_metric(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[float32."*".encoder]\nmax_absolute = 1e-4\n')
    with pytest.raises(ValueError, match="unknown metric 'max_absolute'"):
        Tolerances.load(bad)


def test_violation_names_metric_value_and_limit():
    tol = Tolerances.load()
    result = judge_tap(3, "layers.1", np.zeros((1, 2, 4)), np.full((1, 2, 4), 1e-3), tol, "a~b", "float32")
    assert not result.passed
    assert any("max_abs = 0.001 > limit 0.0001" in v for v in result.violations)
    mismatch = judge_tap(0, "joint", np.zeros((3, 5)), np.zeros((4, 5)), tol, "a~b", "float32")
    assert mismatch.violations == ["shape [3, 5] vs [4, 5]"]


def _judged_comparison(values: dict[tuple[int, str], float]) -> PairComparison:
    """nemo~x, each ``(step, tap)`` judged by the shipped file on a candidate off by its value."""
    tol = Tolerances.load()
    taps = [judge_tap(step, tap, np.full(4, 10.0), np.full(4, 10.0 + value), tol, "nemo~x", "float32")
            for (step, tap), value in values.items()]
    return pair_comparison(taps, [1, 2], [1, 2], pair="nemo~x",
                           order=["mel", "pre_encode", "layers.0", "layers.1", "encoder"])


def test_first_divergence_is_earliest_step_then_model_order():
    comparison = _judged_comparison({(0, "encoder"): 0.0, (1, "encoder"): 1.0, (1, "layers.1"): 1.0,
                              (1, "layers.0"): 0.0, (2, "pre_encode"): 1.0})
    first = comparison.first_divergence()
    assert (first.step, first.tap) == (1, "layers.1")
    assert "first divergent tap layers.1 at step 1" in comparison.describe_failure()


def test_results_round_trip_and_rejudge(tmp_path):
    comparison = _judged_comparison({(0, "layers.0"): 5e-5, (1, "encoder"): 1e-6})
    assert comparison.passed
    results = Results(model={"path": None, "sha256": None, "name": "m"}, tolerances=str(DEFAULT_TOLERANCES),
                      comparisons=[comparison])
    saved = Results.load(results.save(tmp_path / "results.json"))
    assert saved.passed and saved.comparisons[0].taps[0].metrics == comparison.taps[0].metrics

    strict = tmp_path / "strict.toml"
    strict.write_text('[float32."*".layers]\nmax_abs = 1e-5\n\n[float32."*".encoder]\nmax_abs = 1e-5\n')
    rejudged = rejudge(saved.comparisons[0], Tolerances.load(strict))
    assert not rejudged.passed
    assert rejudged.first_divergence().tap == "layers.0"

    # A file that bounds the layers but not the encoder would let the encoder pass whatever it holds.
    partial = tmp_path / "partial.toml"
    partial.write_text('[float32."*".layers]\nmax_abs = 1e-5\n')
    with pytest.raises(MissingToleranceError, match=r"tap 'encoder' of nemo~x at float32"):
        rejudge(saved.comparisons[0], Tolerances.load(partial))


# -- the tolerance file is checked as it loads ------------------------------------------------------

def test_shipped_tolerance_file_loads_and_bounds_every_tap_kind_it_names():
    tol = Tolerances.load()
    assert tol.source == str(DEFAULT_TOLERANCES)
    for dtype, pairs in tol.table.items():
        for pair, kinds in pairs.items():
            for kind in kinds:
                lookup = "ref~cand" if pair == "*" else pair
                assert tol.limits(lookup, dtype, kind), (dtype, pair, kind)


@pytest.mark.parametrize(("text", "table", "message"), [
    ('[flaot32."nemo~onnx".layers]\nmax_abs = 1e-4\n', '[flaot32."nemo~onnx".layers]',
     "unknown dtype 'flaot32' (known: float32, int8, bfloat16, float16)"),
    ('[float32."nemo~onnx".layrs]\nmax_abs = 1e-4\n', '[float32."nemo~onnx".layrs]',
     "unknown tap kind 'layrs'"),
    ('[float32."nemo~onnx"."layers.3"]\nmax_abs = 1e-4\n', '[float32."nemo~onnx"."layers.3"]',
     "unknown tap kind 'layers.3'"),
    ('[float32."*".encoder]\nmax_absolute = 1e-4\n', '[float32."*".encoder]', "unknown metric 'max_absolute'"),
    ('[float32."nemo-onnx".encoder]\nmax_abs = 1e-4\n', '[float32."nemo-onnx".encoder]', "malformed pair 'nemo-onnx'"),
    ('[float32."streaming~offline@70".encoder]\nmax_abs = 1e-4\n', '[float32."streaming~offline@70".encoder]',
     "malformed pair"),
    ('[float32."*".encoder]\nargmax_agreement = 1.0\n', '[float32."*".encoder]',
     "argmax_agreement is never measured for encoder"),
    ('[bfloat16."nemo~mlx".tokens]\ncosine = 0.9\n', '[bfloat16."nemo~mlx".tokens]',
     "cosine is never measured for tokens"),
    ('[float32."*".encoder]\nmax_abs = "1e-4"\n', '[float32."*".encoder]', "max_abs = '1e-4' is not a number"),
    ('[float32."*".encoder]\nmax_abs = nan\n', '[float32."*".encoder]', "max_abs = nan is not a number"),
    ('[float32."*"]\nencoder = 1e-4\n', '[float32."*"]', "encoder = 0.0001 where a tap kind table belongs"),
    ('float32 = 1\n', "top level", "float32 = 1 where a dtype table belongs"),
])
def test_tolerance_file_typos_are_errors_naming_the_table(tmp_path, text, table, message):
    from streaming_parity.core.errors import BadInput
    from streaming_parity.judge.tolerances import ToleranceFileError

    path = tmp_path / "tolerances.toml"
    path.write_text(text)
    with pytest.raises(ToleranceFileError) as raised:
        Tolerances.load(path)
    assert str(raised.value).startswith(f"{path}: {table}: {message}"), str(raised.value)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, BadInput)  # parity compare/judge exit 2 on it


def test_a_typo_no_longer_leaves_a_tap_passing_silently(tmp_path):
    """Before: ``[float32."*".layrs]`` loaded, ``limits`` returned {} for every layer and they passed."""
    path = tmp_path / "tolerances.toml"
    path.write_text('[float32."*".layers]\nmax_abs = 1e-4\n')
    tol = Tolerances.load(path)
    failing = judge_tap(0, "layers.0", np.zeros(4), np.full(4, 1.0), tol, "a~b", "float32")
    assert failing.violations
    with pytest.raises(MissingToleranceError, match=r"no limit for tap 'encoder' of a~b at float32 \(looked in "
                                                     r"\[float32\.\"\*\"\.encoder\], \[float32\.\"a~b\"\.encoder\]\)"):
        judge_tap(0, "encoder", np.zeros(4), np.zeros(4), tol, "a~b", "float32")
    with pytest.raises(MissingToleranceError, match=r"of a~b at flaot32"):
        tol.limits("a~b", "flaot32", "layers.0")


def test_lookahead_pair_lookup_names_every_table_searched():
    tol = Tolerances({"float32": {"streaming~offline": {"encoder": {"max_abs": 1.0}}}})
    assert tol.limits("streaming~offline@70,0", "float32", "encoder") == {"max_abs": 1.0}
    with pytest.raises(MissingToleranceError, match=r'\[float32\."\*"\.mel\], \[float32\."streaming~offline"\.mel\], '
                                                     r'\[float32\."streaming~offline@\*,0"\.mel\], '
                                                     r'\[float32\."streaming~offline@70,0"\.mel\]'):
        tol.limits("streaming~offline@70,0", "float32", "mel")


def test_right_context_table_applies_at_any_left_context_below_an_exact_one():
    """``@*,0`` (lookahead 0 at any left context: Nemotron-3.5's 56 frames as well as 70) overrides the plain
    pair, and an exact ``@L,R`` table overrides it in turn."""
    tol = Tolerances({"float32": {"streaming~offline": {"encoder": {"max_abs": 1.0, "rel_l2": 1.0}},
                                  "streaming~offline@*,0": {"encoder": {"max_abs": 2.0}},
                                  "streaming~offline@70,0": {"encoder": {"rel_l2": 3.0}}}})
    assert tol.limits("streaming~offline@56,0", "float32", "encoder") == {"max_abs": 2.0, "rel_l2": 1.0}
    assert tol.limits("streaming~offline@70,0", "float32", "encoder") == {"max_abs": 2.0, "rel_l2": 3.0}
    assert tol.limits("streaming~offline@56,13", "float32", "encoder") == {"max_abs": 1.0, "rel_l2": 1.0}
    with pytest.raises(ToleranceFileError, match="malformed pair"):
        Tolerances({"float32": {"streaming~offline@*,*": {"encoder": {"max_abs": 1.0}}}})


def test_tolerance_file_missing_or_not_toml_is_bad_input(tmp_path):
    from streaming_parity.core.errors import BadInput

    with pytest.raises(BadInput, match="tolerance file not found"):
        Tolerances.load(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[float32\n")
    with pytest.raises(BadInput, match="not valid TOML"):
        Tolerances.load(broken)


def test_cache_tap_names_agree_between_interface_and_judge():
    from streaming_parity.interface.taps import CACHE_TAPS
    from streaming_parity.interface.types import StreamingState
    from streaming_parity.judge import compare

    assert tuple(compare.CACHE_TAPS) == CACHE_TAPS
    state = StreamingState((70, 13), np.zeros(1), np.zeros(1), np.zeros(1), [])
    assert tuple(state.caches()) == CACHE_TAPS


def test_known_dtypes_are_the_registered_backends_dtypes():
    """The judge may not import the registry; this keeps its list of dtypes in step with it."""
    from streaming_parity.interface.registry import REGISTRY
    from streaming_parity.judge.tolerances import DTYPES

    assert set(DTYPES) == {dtype for entry in REGISTRY.values() for dtype in entry.dtypes}


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 9), cols=st.integers(1, 12), transposed=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_all_metrics_equal_each_metric_alone_to_the_last_bit(rows, cols, transposed, seed):
    """``all_metrics`` shares the float64 copies, the difference and the norms between metrics; every value is the
    one the metric computes alone (the judge's figures do not move with how they are computed)."""
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((2, rows, cols)).astype(np.float32)
    candidate = (reference + 1e-5 * rng.standard_normal(reference.shape)).astype(np.float32)
    if transposed:  # a tap handed over in another memory order
        reference, candidate = reference.transpose(2, 1, 0), candidate.transpose(2, 1, 0)
    together = metrics.all_metrics(reference, candidate, logits=True, spectrogram=reference.size > 0)
    for name, value in together.items():
        alone = metrics.METRICS[name](reference, candidate)
        assert value == alone or (math.isnan(value) and math.isnan(alone)), (name, value, alone)



def test_a_candidate_that_overflowed_reads_minus_infinity_db_and_does_not_stop_the_judge():
    reference = np.ones((2, 3), np.float32)
    candidate = reference.copy()
    candidate[0, 0] = np.inf
    assert metrics.snr_db(reference, candidate) == -math.inf
    assert metrics.all_metrics(reference, candidate)["snr_db"] == -math.inf
    assert metrics.snr_db(np.zeros(3, np.float32), np.ones(3, np.float32)) == -math.inf
    assert metrics.snr_db(reference, reference) == math.inf

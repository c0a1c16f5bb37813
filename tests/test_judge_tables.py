"""The judge tested against the tolerance file itself.

Every limit of the shipped ``streaming_parity/judge/tolerances.toml``, one row each (dtype, pair, tap kind,
metric and its bound direction), is exceeded on its own, and held just inside:

- as metric values handed to ``Tolerances.check``: exactly that metric is a violation, and nothing is
  one just inside the limit;
- as reference/candidate arrays judged by ``streaming_parity.judge.compare.judge_tap`` (metrics computed by
  ``streaming_parity.judge.metrics``): the arrays are built so that, by an independent computation in this
  file, only that metric crosses its limit; the judge must name exactly it, and pass the arrays built
  just inside. A limit that cannot be crossed alone (a cosine bound implied by the table's rel_l2
  bound) must be named together with the limit that implies it;
- ``tokens`` rows: token sequences whose agreement lies just beyond and just inside the bound.

A row added to the tolerance file is tested without touching this file. Deleting a metric's check,
a metric, or a tolerance row's effect makes one of these fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
from builders import pair_comparison, tap_result
from hypothesis import given
from hypothesis import strategies as st

from streaming_parity.interface.taps import TAP_CTC, TAP_JOINT, TAP_LAYERS
from streaming_parity.judge import metrics
from streaming_parity.judge.compare import PairComparison, TapResult, judge_tap
from streaming_parity.judge.metrics import METRIC_BOUND
from streaming_parity.judge.tolerances import TOKENS, WILDCARD, Tolerances

SHIPPED = Tolerances.load()
PERFECT = {"max_abs": 0.0, "max_rel": 0.0, "max_abs_scaled": 0.0, "rel_l2": 0.0, "cosine": 1.0,
           "snr_db": math.inf, "argmax_agreement": 1.0, "power_rel": 0.0}


def rows(kinds: Callable[[str], bool] = lambda kind: True) -> list:
    """One ``pytest.param`` per limit of the shipped file."""
    params = []
    for dtype, pairs in SHIPPED.table.items():
        for pair, by_kind in pairs.items():
            for kind, limits in by_kind.items():
                if not kinds(kind):
                    continue
                for metric in limits:
                    params.append(pytest.param(dtype, pair, kind, metric,
                                               id=f"{dtype}-{pair}-{kind}-{metric}-{METRIC_BOUND[metric]}"))
    return params


def lookup(dtype: str, pair: str, kind: str) -> dict[str, float]:
    """The limits the judge applies to a tap of this row's kind for this row's pair."""
    return SHIPPED.limits("reference~candidate" if pair == WILDCARD else pair, dtype, tap_name(kind))


def tap_name(kind: str) -> str:
    return "layers.0" if kind == TAP_LAYERS else kind


def beyond(limit: float, bound: str) -> float:
    """The nearest value on the wrong side of ``limit``; NaN for an infinite limit (nothing else fails it)."""
    if math.isinf(limit):
        return math.nan
    return math.nextafter(limit, math.inf if bound == "max" else -math.inf)


def test_every_metric_has_a_perfect_value():
    assert set(PERFECT) == set(METRIC_BOUND)
    assert not SHIPPED.check(PERFECT, {m: PERFECT[m] for m in METRIC_BOUND})


def test_the_shipped_file_has_rows_of_both_bound_directions():
    directions = {METRIC_BOUND[param.values[3]] for param in rows()}
    assert directions == {"max", "min"} and len(rows()) > 40


# -- every limit as metric values -------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "pair", "kind", "metric"), rows())
def test_each_limit_alone_is_a_violation_and_its_edge_passes(dtype, pair, kind, metric):
    limits = lookup(dtype, pair, kind)
    limit, bound = SHIPPED.table[dtype][pair][kind][metric], METRIC_BOUND[metric]
    assert limits[metric] == limit  # the row is what the judge applies to its own pair

    violations = SHIPPED.check({**PERFECT, metric: beyond(limit, bound)}, limits)
    assert [(v.metric, v.limit, v.bound) for v in violations] == [(metric, limit, bound)]
    assert violations[0].describe().startswith(f"{metric} = ")

    assert SHIPPED.check({**PERFECT, metric: limit}, limits) == []  # the limit itself is allowed
    if not math.isinf(limit):
        far = limit * 10 + 1 if bound == "max" else limit - abs(limit) * 10 - 1
        assert [v.metric for v in SHIPPED.check({**PERFECT, metric: far}, limits)] == [metric]


# -- every limit as arrays through judge_tap ----------------------------------------------------------

ROWS, COLS = 16, 256


def reference(scale: float) -> np.ndarray:
    """Positive rows rising to a single largest entry in the last column (a clear argmax per row)."""
    return np.tile((np.arange(COLS) + 1.0) / COLS, (ROWS, 1)) * scale


def oracle(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """The metrics, computed here independently of streaming_parity.judge.metrics."""
    diff = cand - ref
    with np.errstate(over="ignore"):  # a candidate far above its frame: power_rel is inf, as the judge's
        power = [float(np.max(np.abs(np.exp(ref[:, j] - ref[:, j].max()) - np.exp(cand[:, j] - ref[:, j].max()))))
                 for j in range(ref.shape[1])]
    noise, signal = math.sqrt(float(np.sum(diff * diff))), math.sqrt(float(np.sum(ref * ref)))
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "max_rel": float(np.max(np.abs(diff) / np.abs(ref))),
        "max_abs_scaled": float(np.max(np.abs(diff)) / np.max(np.abs(ref))),
        "rel_l2": noise / signal,
        "cosine": float(np.sum(ref * cand)) / (signal * math.sqrt(float(np.sum(cand * cand)))),
        "snr_db": math.inf if noise == 0 else 20 * math.log10(signal / noise),
        "argmax_agreement": float(np.mean(np.argmax(ref, -1) == np.argmax(cand, -1))),
        # a log-mel [n_mels, T]: power relative to each frame's (column's) loudest bin
        "power_rel": max(power),
    }


def _orthogonal(ref: np.ndarray) -> np.ndarray:
    """A direction orthogonal to ``ref``, of the same norm, spread over every entry."""
    signs = np.where(np.arange(ref.size).reshape(ref.shape) % 2 == 0, 1.0, -1.0) * np.abs(ref)
    direction = signs - np.sum(signs * ref) / np.sum(ref * ref) * ref
    return direction * np.linalg.norm(ref) / np.linalg.norm(direction)


def _quiet(scale: float) -> np.ndarray:
    """A log-mel whose first bin (row) sits 40 below every frame's loudest, as bins at NeMo's log guard do."""
    ref = reference(scale)
    ref[0] = ref.min() - 40.0
    return ref


def _near_ties(scale: float) -> np.ndarray:
    ref = reference(scale)
    ref[:, -2] = ref[:, -1] * (1 - 1e-9)  # every row's runner-up within 1e-9 of its argmax
    return ref


def _flip_rows(scale: float, rows_flipped: float) -> tuple[np.ndarray, np.ndarray]:
    ref = _near_ties(scale)
    cand = ref.copy()
    flipped = int(round(rows_flipped))
    cand[:flipped, [-2, -1]] = cand[:flipped, [-1, -2]]
    return ref, cand


# Ways to make a candidate differ from a reference by an amount t (t = 0: identical).
RECIPES: dict[str, Callable[[float, float], tuple[np.ndarray, np.ndarray]]] = {
    # every entry scaled: rel_l2 = max_abs_scaled = t, cosine 1, argmax kept
    "scale": lambda s, t: (reference(s), reference(s) * (1 + t)),
    # one entry (a row's largest) raised: max_abs = t, tiny relative to the whole tensor
    "spike": lambda s, t: (reference(s), reference(s) + np.pad([[t]], ((0, ROWS - 1), (COLS - 1, 0)))),
    # every entry shifted: rel_l2 = 1.7 x max_abs_scaled, argmax kept
    "shift": lambda s, t: (reference(s), reference(s) + t),
    # turned away from the reference: cosine = 1 / sqrt(1 + t^2), rel_l2 = t
    "orthogonal": lambda s, t: (reference(s), reference(s) + t * _orthogonal(reference(s))),
    # near-tied rows whose two largest entries swap: argmax agreement 1 - t / rows, errors ~1e-9
    "flip": _flip_rows,
    # a log-mel's quiet bins moved (rounding at the log guard): max_abs or rel_l2 = t, power_rel ~ e^-40 t
    "guard-spike": lambda s, t: (_quiet(s), _quiet(s) + np.pad([[t]], ((0, ROWS - 1), (0, COLS - 1)))),
    "guard-shift": lambda s, t: (_quiet(s), _quiet(s) + np.pad(np.full((1, COLS), t), ((0, ROWS - 1), (0, 0)))),
}
SCALES = (1e-3, 1.0, 1e3)


def _crossing(recipe, scale: float, metric: str, limit: float) -> tuple[float, float] | None:
    """Amounts just inside and just beyond ``limit`` for ``metric`` under ``recipe`` (None: never crossed)."""
    bound = METRIC_BOUND[metric]

    def crossed(t: float) -> bool:
        value = oracle(*recipe(scale, t))[metric]
        return value > limit if bound == "max" else value < limit

    if recipe is _flip_rows:
        flips = next((k for k in range(ROWS + 1) if crossed(k)), None)
        return None if flips is None else (flips - 1, flips)
    high = 1e-12
    while not crossed(high):
        high *= 4
        if high > 1e3:
            return None
    low = 0.0
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (low, middle) if crossed(middle) else (middle, high)
    return low * (1 - 1e-7), high * (1 + 1e-7)  # clear of the rounding of either computation


def _outside(values: dict[str, float], limits: dict[str, float]) -> set[str]:
    return {v.metric for v in Tolerances({}).check(values, limits)}


def _judged(dtype: str, pair: str, kind: str, ref: np.ndarray, cand: np.ndarray) -> TapResult:
    lookup_pair = "reference~candidate" if pair == WILDCARD else pair
    result = judge_tap(0, tap_name(kind), ref, cand, SHIPPED, lookup_pair, dtype)
    expected = oracle(ref, cand)
    for name, value in result.metrics.items():  # the judge measured what this file computes
        assert value == pytest.approx(expected[name], rel=1e-9, abs=1e-15, nan_ok=True), name
    return result


def _dominating(metric: str, limits: dict[str, float]) -> set[str]:
    """Limits that make crossing ``metric`` alone impossible for any arrays.

    ``cosine >= sqrt(1 - rel_l2^2)`` always (the angle between ref and ref + d is at most
    asin(||d|| / ||ref||)), so a cosine bound at or below ``sqrt(1 - rel_l2 limit^2)`` is implied.
    """
    if metric == "cosine" and "rel_l2" in limits and math.sqrt(max(0.0, 1 - limits["rel_l2"] ** 2)) >= limits["cosine"]:
        return {"rel_l2"}
    return set()


def _violated(result: TapResult) -> list[str]:
    return [v.split(" = ", 1)[0] for v in result.violations]


@pytest.mark.parametrize(("dtype", "pair", "kind", "metric"), rows(lambda kind: kind != TOKENS))
def test_arrays_crossing_one_limit_are_judged_by_that_limit(dtype, pair, kind, metric):
    limits = lookup(dtype, pair, kind)
    limit = limits[metric]
    if math.isinf(limit):
        # Only NaN fails an infinite bound, and NaN fails every metric: shown for values above.
        ref = reference(1.0)
        cand = ref.copy()
        cand[0, 0] = np.nan
        assert metric in _violated(_judged(dtype, pair, kind, ref, cand))
        return
    if metric == "argmax_agreement" and kind not in (TAP_JOINT, TAP_CTC):
        pytest.fail(f"{kind}: argmax_agreement is measured on the joint and the CTC head only")
    dominating = _dominating(metric, limits)
    for name, recipe in RECIPES.items():
        if name == "flip" and metric != "argmax_agreement":
            continue
        for scale in SCALES:
            crossing = _crossing(recipe, scale, metric, limit)
            if crossing is None:
                continue
            inside, outside = (recipe(scale, t) for t in crossing)
            # Usable when, by this file's own computation, the arrays beyond cross this limit and
            # nothing else (but the limits implying it), and the arrays inside cross nothing (but those).
            if (_outside(oracle(*outside), limits) != {metric} | dominating
                    or not _outside(oracle(*inside), limits) <= dominating):
                continue
            judged = _judged(dtype, pair, kind, *outside)
            assert sorted(_violated(judged)) == sorted({metric} | dominating), (name, scale, judged.violations)
            judged_inside = _judged(dtype, pair, kind, *inside)
            assert set(_violated(judged_inside)) <= dominating, (name, scale, judged_inside.violations)
            return
    pytest.fail(f"no construction here crosses {metric} alone for {limits}: add a recipe for it")


def test_dominated_limits_are_the_known_ones():
    """Limits no arrays can cross on their own, listed so that a new one is noticed (they are
    harmless, but a reader of the file should know that rel_l2 decides these rows)."""
    dominated = sorted(f"{p.values[0]}.{p.values[1]}.{p.values[2]}.{p.values[3]}" for p in rows()
                       if _dominating(p.values[3], lookup(*p.values[:3])))
    assert dominated == ["float16.nemo~mlx.decoder.cosine", "int8.nemo~onnx.encoder.cosine"]


# -- token sequences ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "pair", "kind", "metric"), rows(lambda kind: kind == TOKENS))
def test_token_agreement_just_beyond_and_inside_its_bound(dtype, pair, kind, metric):
    limits = lookup(dtype, pair, kind)
    limit = Fraction(limits[metric])
    length = 997  # prime: no agreement k / length lands exactly on a decimal bound
    reference_tokens = list(range(length))

    def candidate(substitutions: int) -> list[int]:
        return [-1] * substitutions + reference_tokens[substitutions:]

    allowed = max(k for k in range(length + 1) if Fraction(length - k, length) >= limit)
    for substitutions, passes in ((allowed, True), (allowed + 1, False)):
        agreement = metrics.token_agreement(reference_tokens, candidate(substitutions))
        assert agreement == pytest.approx((length - substitutions) / length)
        violations = SHIPPED.check({metric: agreement}, limits)
        assert [v.metric for v in violations] == ([] if passes else [metric]), substitutions


# -- the judge's own rules, for any values --------------------------------------------------------------

metric_names = st.sampled_from(sorted(METRIC_BOUND))
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.dictionaries(metric_names, finite, min_size=1),
       st.dictionaries(metric_names, st.one_of(finite, st.just(math.nan), st.just(math.inf), st.just(-math.inf))))
def test_check_flags_exactly_the_values_on_the_wrong_side(limits, values):
    flagged = {v.metric for v in Tolerances({}).check(values, limits)}
    expected = {m for m, limit in limits.items() if m in values and (
        math.isnan(values[m]) or (values[m] > limit if METRIC_BOUND[m] == "max" else values[m] < limit))}
    assert flagged == expected


def _tokens_comparison(reference_tokens, candidate_tokens, *, require: bool = True,
                       tap_passes: bool = True) -> PairComparison:
    """nemo~x with these transcripts and one encoder tap, passing or not."""
    tap = tap_result("encoder", metrics={"max_abs": 0.0}, limits={"max_abs": 1e-4},
                     violations=[] if tap_passes else ["max_abs = 1 > limit 1e-4"])
    return pair_comparison([tap], reference_tokens, candidate_tokens, pair="nemo~x", order=["encoder"],
                           require_token_match=require)


def test_differing_tokens_fail_a_comparison_that_requires_them_equal():
    comparison = _tokens_comparison([5, 9, 7], [5, 9, 8])
    assert not comparison.tokens_equal and not comparison.passed
    assert "token sequences differ at position 2 (3 vs 3 tokens)" in comparison.describe_failure()
    assert not _tokens_comparison([5, 9, 7], [5, 9]).passed
    assert not _tokens_comparison([], [1]).passed
    assert _tokens_comparison([5, 9, 7], [5, 9, 8], require=False).passed  # streaming~offline records them only
    assert _tokens_comparison([5, 9, 7], [5, 9, 7]).passed
    assert not _tokens_comparison([5, 9, 7], [5, 9, 7], tap_passes=False).passed


@given(st.lists(st.integers(0, 5), max_size=6), st.lists(st.integers(0, 5), max_size=6), st.booleans())
def test_comparison_verdict_for_any_token_sequences(reference_tokens, candidate_tokens, require):
    comparison = _tokens_comparison(reference_tokens, candidate_tokens, require=require)
    assert comparison.tokens_equal == (reference_tokens == candidate_tokens)
    assert comparison.passed == (reference_tokens == candidate_tokens or not require)

"""The judge's mutation tests: mutmut's results parsed, and the survivors listed in the report."""

from __future__ import annotations

import pytest

from streaming_parity.app.mutation import load_mutants, parse_results, run_mutation_tests, write_mutants
from streaming_parity.judge.compare import PairComparison, TapResult
from streaming_parity.judge.results import Results
from streaming_parity.report import render_html, render_markdown


def test_mutmut_result_lines_are_parsed():
    text = ("    streaming_parity.judge.compare.x_comparison_order__mutmut_1: survived\n"
            "    streaming_parity.judge.ties.x_tie_bound__mutmut_3: killed\n"
            "    streaming_parity.judge.compare.xǁPairComparisonǁworst__mutmut_2: no tests\n")
    assert parse_results(text) == {"streaming_parity.judge.compare.x_comparison_order__mutmut_1": "survived",
                                   "streaming_parity.judge.ties.x_tie_bound__mutmut_3": "killed",
                                   "streaming_parity.judge.compare.xǁPairComparisonǁworst__mutmut_2": "no tests"}


def test_survivors_are_listed_in_the_report(tmp_path):
    outcome = {"tool": "mutmut", "seconds": 181.0, "mutants": 3, "totals": {"killed": 2, "survived": 1},
               "survived": [{"name": "streaming_parity.judge.ties.x_tie_bound__mutmut_7",
                             "diff": "-    return 2.0 * min(finite)\n+    return 3.0 * min(finite)"}],
               "no_tests": []}
    write_mutants(outcome, tmp_path)
    assert load_mutants(tmp_path) == outcome
    results = Results(model={"name": "m"}, tolerances="t", comparisons=[PairComparison(
        "nemo", "mlx", "nemo~mlx", "float32", (70, 13), "u", [TapResult(0, "encoder", {"max_abs": 1e-6},
                                                                         {"max_abs": 1e-4}, [])], [1], [1], [])])
    page = render_html([results], mutants=outcome)
    assert "Judge mutation tests" in page and "x_tie_bound__mutmut_7" in page
    assert "3.0 * min(finite)" in page
    assert "**Judge mutation tests:** 3 mutants, 2 killed, 1 survived." in render_markdown([results], mutants=outcome)
    assert "Judge mutation tests" not in render_html([results])


@pytest.mark.nightly
def test_mutation_testing_the_judge_kills_most_mutants():
    pytest.importorskip("mutmut", reason="mutmut is not installed (the dev extra)")
    outcome = run_mutation_tests()
    assert outcome["mutants"] > 500
    assert outcome["totals"].get("killed", 0) > 0.6 * outcome["mutants"]

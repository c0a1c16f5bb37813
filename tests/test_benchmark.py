"""bench/benchmark.py's bookkeeping (its figures themselves are printed, never asserted): which compare runs
``--overhead`` times, and which figures it flags against an earlier run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "bench" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_times_the_reference_against_each_candidate_backend_with_all_its_dtypes(benchmark):
    specs = benchmark.parse_backends("nemo,onnx,onnx:int8,mlx")
    assert benchmark.overhead_groups(specs) == {
        "onnx,onnx:int8": [("nemo", "float32"), ("onnx", "float32"), ("onnx", "int8")],
        "mlx": [("nemo", "float32"), ("mlx", "float32")]}


def _run(share: float, onnx_phase: float) -> dict:
    return {"harness_share": share, "backend_seconds": {"nemo": 6.0, "onnx": 1.2, "onnx:int8": 1.6},
            "phases": {"onnx": {"harness_share": onnx_phase}}}


def test_a_harness_share_25_percent_worse_is_flagged_per_run_and_per_phase(benchmark):
    previous = {"backends": [], "overhead": {"runs": {"onnx,onnx:int8": _run(0.09, 0.20), "mlx": _run(0.07, 0.1)}}}
    figures = {"backends": [], "overhead": {"runs": {"onnx,onnx:int8": _run(0.12, 0.21), "mlx": _run(0.07, 0.1)}}}
    flagged = benchmark.regressions(previous, figures)
    assert len(flagged) == 1 and flagged[0].startswith("harness share against onnx,onnx:int8: 0.09 -> 0.12")
    figures["overhead"]["runs"]["mlx"] = _run(0.07, 0.2)
    assert any(line.startswith("mlx: onnx phase harness share: 0.1 -> 0.2") for line in
               benchmark.regressions(previous, figures))


def test_an_earlier_file_with_one_run_of_every_backend_is_read_as_one_group(benchmark):
    earlier = {"backends": [], "overhead": _run(0.09, 0.2)}
    assert list(benchmark.overhead_runs(earlier)) == ["onnx,onnx:int8"]
    figures = {"backends": [], "overhead": {"runs": {"onnx,onnx:int8": _run(0.2, 0.2)}}}
    assert benchmark.regressions(earlier, figures) == ["harness share against onnx,onnx:int8: 0.09 -> 0.2 (+122 %)"]


def test_a_backends_speed_and_memory_25_percent_worse_are_flagged(benchmark):
    def entry(rtf: float, peak: float) -> dict:
        return {"label": "onnx", "peak_rss_mb": peak, "peak_over_weights": 1.0, "prepare_seconds": 1.0,
                "prepare_peak_rss_mb": 100.0, "lookaheads": [{"att_context_size": [70, 13], "rtf": rtf,
                                                              "median_ms": 1.0, "p95_ms": 2.0}]}
    previous = {"backends": [entry(0.10, 1000.0)]}
    assert benchmark.regressions(previous, {"backends": [entry(0.12, 1200.0)]}) == []
    assert benchmark.regressions(previous, {"backends": [entry(0.13, 1300.0)]}) == [
        "onnx peak_rss_mb: 1000 -> 1300 (+30 %)", "onnx [70,13] rtf: 0.1 -> 0.13 (+30 %)"]

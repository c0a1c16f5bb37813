"""``parity nightly`` and ``parity demo``: the matrix plan, one broken candidate, and short real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends import REGISTRY, BackendEntry
from harness.cli import EXIT_OK, main
from harness.nightly import (
    Candidate,
    MatrixProgress,
    _merge,
    _run_candidate,
    fp32_failures,
    plan_candidates,
    results_file_names,
)
from harness.results import Results


def test_plan_takes_every_dtype_of_the_chosen_backends_and_never_nemo_as_candidate():
    assert plan_candidates(["nemo"]).candidates == []
    plan = plan_candidates()
    expected = [Candidate(name, dtype) for name, entry in REGISTRY.items() if name != "nemo" and entry.available()
                for dtype in entry.dtypes]
    assert plan.candidates == expected
    with pytest.raises(KeyError, match="unknown backend"):
        plan_candidates(["nemo", "tensorrt"])


def test_an_unavailable_backend_is_listed_with_its_missing_modules(monkeypatch):
    monkeypatch.setitem(REGISTRY, "ghost", BackendEntry("ghost", "backends.ghost", ("no_such_module_xyz",),
                                                        ("float32", "int8"), "ghost", "test"))
    plan = plan_candidates(["ghost"])
    assert plan.candidates == []
    assert [(u["dtype"], u["error"]) for u in plan.unavailable] == [("float32", "missing no_such_module_xyz"),
                                                                    ("int8", "missing no_such_module_xyz")]


def test_a_candidate_that_cannot_prepare_is_recorded_and_fails_the_fp32_gate(monkeypatch, tmp_path):
    entry = BackendEntry("broken", "backends.broken", (), ("float32",), "broken", "test")
    monkeypatch.setitem(REGISTRY, "broken", entry)
    monkeypatch.setattr(BackendEntry, "prepare", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("no export")))
    results = Results(model={"name": "m"}, tolerances="t")
    record = _run_candidate(None, Candidate("broken", "float32"), tmp_path / "m.nemo", [], [(70, 13)], None,
                            tmp_path, results, MatrixProgress())
    assert record["status"] == "error" and "RuntimeError: no export" in record["error"]
    results.extra["candidates"] = [record]
    assert fp32_failures([results]) == ["broken:float32 could not run: RuntimeError: no export"]


def test_merge_keeps_each_run_once():
    row = {"backend": "nemo", "dtype": "float32", "mode": "plain", "utterance": "u", "att_context_size": [70, 13]}
    into = Results(model={}, tolerances="t", transcripts=[dict(row, text="a")], timings=[dict(row, step_seconds=[1])])
    part = Results(model={}, tolerances="t", transcripts=[dict(row, text="a"), dict(row, backend="onnx", text="b")],
                   timings=[dict(row, step_seconds=[1])])
    _merge(into, part)
    assert [t["backend"] for t in into.transcripts] == ["nemo", "onnx"] and len(into.timings) == 1


def test_one_model_writes_results_json_several_write_one_file_each():
    assert results_file_names(["tiny-streaming"]) == ["results.json"]
    assert results_file_names(["a", "/m/b.nemo"]) == ["results-a.json", "results-b.json"]


@pytest.mark.nemo
def test_nightly_cli_writes_the_night_and_reads_history(tiny_nemo, tmp_path, capsys):
    reports = tmp_path / "reports"
    args = ["nightly", "--models", str(tiny_nemo), "--out", str(reports), "--backends", "nemo",
            "--att-context", "70,13", "--utterances", "1", "--work-dir", str(tmp_path / "work")]
    assert main([*args, "--date", "2025-01-01"]) == EXIT_OK
    night = reports / "2025-01-01"
    data = json.loads((night / "results.json").read_text())
    assert data["passed"] and data["extra"]["kind"] == "nightly" and data["extra"]["lookaheads"] == [[70, 13]]
    assert [c["pair"] for c in data["comparisons"]] == ["streaming~offline@70,13"]
    assert (night / "report.md").read_text().startswith("# Nightly parity 2025-01-01")
    assert "report.html" in capsys.readouterr().out

    # A second night sees the first in its history (the report reads results only).
    Results.load(night / "results.json").save(reports / "2025-01-02" / "results.json")
    from harness.report import load_results, write_report

    files = write_report(load_results([reports / "2025-01-02" / "results.json"]), reports / "2025-01-02",
                         reports_dir=reports, date="2025-01-02")
    assert "**Against 2025-01-01:** no regressions" in files.markdown.read_text()


@pytest.mark.nemo
def test_demo_prints_the_table_and_the_report_path(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--utterances", "1", "--att-context", "70,13", "--backends", "nemo"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "lookahead [70,13]" in out and "ms/chunk" in out and "nemo (vs offline)" in out
    assert str((tmp_path / "demo" / "report.html").resolve()) in out.replace("\n", "")
    assert Path(tmp_path / "demo" / "results.json").is_file()


@pytest.mark.nightly
def test_full_nightly_matrix(tmp_path):
    """Every default fixture × every lookahead × every available backend and dtype (the nightly job's run)."""
    from harness.nightly import run_nightly

    outcome = run_nightly(out_root=tmp_path / "reports")
    assert outcome.report.html.is_file()
    assert outcome.fp32_passed, "\n".join(fp32_failures(outcome.results))

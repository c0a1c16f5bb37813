"""``parity nightly`` and ``parity demo``: the matrix plan, one broken candidate, and short real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming_parity.app.cli import EXIT_OK, main
from streaming_parity.app.nightly import (
    PlannedCandidate,
    fp32_failures,
    matrix_candidate,
    plan_candidates,
    record_failure,
    results_file_names,
)
from streaming_parity.interface.registry import REGISTRY, BackendEntry
from streaming_parity.judge.loop import LoopProgress
from streaming_parity.judge.results import Results


def test_plan_takes_every_dtype_of_the_chosen_backends_and_never_nemo_as_candidate():
    assert plan_candidates(["nemo"]).candidates == []
    plan = plan_candidates()
    expected = [PlannedCandidate(name, dtype) for name, entry in REGISTRY.items() if name != "nemo" and entry.available()
                for dtype in entry.dtypes]
    assert plan.candidates == expected
    with pytest.raises(KeyError, match="unknown backend"):
        plan_candidates(["nemo", "tensorrt"])


def test_plan_takes_one_dtype_when_named():
    plan = plan_candidates(["onnx:int8", "mlx:float32", "onnx:int8"])
    assert [(c.backend, c.dtype) for c in plan.candidates + [PlannedCandidate(u["backend"], u["dtype"])
                                                              for u in plan.unavailable]] == [
        ("onnx", "int8"), ("mlx", "float32")]
    with pytest.raises(KeyError, match="backend onnx runs float32, int8, not float16"):
        plan_candidates(["onnx:float16"])


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
    candidate = matrix_candidate(PlannedCandidate("broken", "float32"), tmp_path / "m.nemo", tmp_path, [(70, 13)],
                                 in_subprocess=False)
    with pytest.raises(RuntimeError, match="no export") as raised:
        candidate.open()
    record_failure(LoopProgress())(candidate, raised.value)
    assert candidate.record["status"] == "error" and "RuntimeError: no export" in candidate.record["error"]
    results = Results(model={"name": "m"}, tolerances="t", extra={"candidates": [candidate.record]})
    assert fp32_failures([results]) == ["broken:float32 could not run: RuntimeError: no export"]


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
    from streaming_parity.report import load_results, write_report

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


def _demo_sample() -> Results:
    """A demo run's results, as the matrix records them: NeMo against offline, a float32 candidate whose
    name is wider than NeMo's row, and an int8 candidate over its limits (degraded)."""
    from streaming_parity.judge.compare import PairComparison, TapResult

    def comparison(candidate, pair, dtype, value, mode):
        taps = [TapResult(0, tap, {"max_abs": value}, {"max_abs": 1e-4}, [] if value <= 1e-4 else [f"{tap} over"])
                for tap in ("layers.0", "encoder")]
        return PairComparison("nemo", candidate, pair, dtype, (70, 13), "utt01", taps, [1, 2], [1, 2], [], mode=mode)

    runs = (("nemo", "float32", "plain"), ("nemo", "float32", "pad-and-drop"),
            ("sherpa_onnx", "float32", "pad-and-drop"), ("onnx", "int8", "pad-and-drop"))
    return Results(model={"name": "sample"}, tolerances="t", comparisons=[
        comparison("nemo", "streaming~offline@70,13", "float32", 1e-6, "plain"),
        comparison("sherpa_onnx", "nemo~sherpa_onnx", "float32", 2e-6, "pad-and-drop"),
        comparison("onnx", "nemo~onnx", "int8", 3e-1, "pad-and-drop")],
        transcripts=[{"backend": b, "dtype": d, "att_context_size": [70, 13], "mode": m, "utterance": "utt01",
                      "text": "the cat sat down", "reference_text": "the cat sat on it", "tokens": [1, 2]}
                     for b, d, m in runs],
        timings=[{"backend": b, "dtype": d, "att_context_size": [70, 13], "step_seconds": [0.0123, 0.0456]}
                 for b, d, m in runs if (b, m) != ("nemo", "pad-and-drop")])


def test_demo_table_piped_to_a_file_keeps_every_cell_whole(monkeypatch, tmp_path):
    """Not a terminal (``make demo > log``): no column is cut, however wide the table."""
    import io

    from rich.console import Console

    from streaming_parity.app import demo

    results = _demo_sample()
    monkeypatch.setattr(demo, "run_matrix", lambda *args, **kwargs: [results])
    console = Console(file=io.StringIO(), width=80, highlight=False)
    assert not console.is_terminal
    demo.run_demo(out_dir=tmp_path, model="sample", console=console)
    out = console.file.getvalue()
    assert "…" not in out, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and ":" in line.split()[0]}
    assert rows["sherpa_onnx:float32"][-1] == "pass" and rows["onnx:int8"][-1] == "degraded", out
    assert "nemo (vs offline)" in out and "encoder err" in out and "ms/chunk" in out

    # A terminal keeps its own width: the reader can widen the window.
    terminal = Console(file=io.StringIO(), width=80, force_terminal=True)
    demo.print_tables(terminal, demo.demo_tables(results))
    assert terminal.width == 80


@pytest.mark.nightly
def test_full_nightly_matrix(tmp_path):
    """Every default fixture × every lookahead × every available backend and dtype (the nightly job's run)."""
    from streaming_parity.app.nightly import run_nightly

    outcome = run_nightly(out_root=tmp_path / "reports")
    assert outcome.report.html.is_file()
    assert outcome.fp32_passed, "\n".join(fp32_failures(outcome.results))


@pytest.mark.onnx
@pytest.mark.mlx
def test_bounded_memory_matrix_equals_the_in_memory_one(tiny_nemo, tolerances, tmp_path):
    """Spooling every run to disk, one model in memory at a time and preparation in a subprocess,
    gives exactly the comparisons, metrics and transcripts of the in-memory matrix."""
    from streaming_parity.app.nightly import MatrixPlan, run_model_matrix
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.interface.utterance import long_utterance

    for name in ("onnx", "mlx"):
        if not REGISTRY[name].available():
            pytest.skip(f"{name} is not installed")
    utterances = fixture_utterances()
    chosen = [utterances[1], long_utterance(utterances[:3], 5.0)]
    plan = MatrixPlan([PlannedCandidate("onnx", "float32"), PlannedCandidate("mlx", "float32")], [])
    contexts = [(70, 13), (70, 0)]
    work = tmp_path / "work"
    in_memory = run_model_matrix(tiny_nemo, plan, chosen, contexts, tolerances, work_dir=work,
                                 single_reference_pass=True)
    spool = tmp_path / "spool"
    bounded = run_model_matrix(tiny_nemo, plan, chosen, contexts, tolerances, work_dir=work, bounded=True,
                               spool_dir=spool)

    assert [c["status"] for c in bounded.extra["candidates"]] == ["ok", "ok"], bounded.extra["candidates"]
    assert not any(spool.iterdir()), "spooled runs were left behind"

    def key(comparison):
        return (comparison.pair, comparison.dtype, comparison.att_context_size, comparison.utterance)

    expected = {key(c): c for c in in_memory.comparisons}
    actual = {key(c): c for c in bounded.comparisons}
    assert sorted(actual) == sorted(expected), (sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual)))
    for name, comparison in actual.items():
        reference = expected[name]
        assert comparison.reference_tokens == reference.reference_tokens, name
        assert comparison.candidate_tokens == reference.candidate_tokens, name
        assert [(t.step, t.tap, t.metrics, t.violations) for t in comparison.taps] == \
               [(t.step, t.tap, t.metrics, t.violations) for t in reference.taps], name
    texts = lambda results: sorted((t["backend"], t["mode"], t["utterance"], tuple(t["att_context_size"]), t["text"])  # noqa: E731
                                   for t in results.transcripts)
    assert texts(bounded) == texts(in_memory)
    assert bounded.passed and bounded.extra["bounded_memory"] is True
    # One reference pass: every candidate in pad-and-drop, NeMo streaming~offline at the fewest-step lookahead.
    assert {c.mode for c in bounded.comparisons if not c.pair.startswith("streaming~offline")} == {"pad-and-drop"}
    assert {c.att_context_size for c in bounded.comparisons if c.pair.startswith("streaming~offline")} == {(70, 13)}
    assert {(t["backend"], t["mode"]) for t in bounded.transcripts if t["backend"] == "nemo"} == {
        ("nemo", "plain"), ("nemo", "pad-and-drop")}
    plain = {tuple(t["att_context_size"]) for t in bounded.transcripts if t["mode"] == "plain"}
    assert plain == {(70, 13)}, "NeMo streamed plain mode where no comparison needed it"
    assert set(bounded.extra["peak_rss_mb"]) == {"nemo", "onnx:float32", "mlx:float32"}


@pytest.mark.mlx
def test_verify_and_the_nightly_judge_one_bfloat16_artifact_alike(tiny_nemo, tolerances, tmp_path):
    """One policy: ``parity verify`` and the nightly give every comparison of the same bfloat16 artifact the same
    verdict (teacher forcing, ties classified by the tolerance file), and the same run-level token verdict."""
    from streaming_parity.app.nightly import MatrixPlan, run_model_matrix
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.app.verify import verify_artifact
    from streaming_parity.interface.registry import REFERENCE, get
    from streaming_parity.judge.compare import token_agreement_failures

    if not REGISTRY["mlx"].available():
        pytest.skip("mlx is not installed")
    utterances = fixture_utterances()[:4]
    contexts = [(70, 1)]  # the lookahead whose bfloat16 decisions leave NeMo's most often
    nightly = run_model_matrix(tiny_nemo, MatrixPlan([PlannedCandidate("mlx", "bfloat16")], []), utterances, contexts,
                               tolerances, work_dir=tmp_path / "work", single_reference_pass=False, full_plan=True)
    (record,) = nightly.extra["candidates"]
    assert record["status"] == "ok", record
    reference = get(REFERENCE).load(tiny_nemo)
    try:
        verification = verify_artifact(record["artifact"], tiny_nemo, reference=reference, utterances=utterances,
                                       att_context_sizes=contexts, tolerances_path=tolerances.source,
                                       modes=("plain", "pad-and-drop"), include_offline=False)
    finally:
        reference.close()

    def verdicts(comparisons):
        return {(c.utterance, c.att_context_size, c.mode): (c.passed, c.describe_failure()) for c in comparisons}

    from_nightly = [c for c in nightly.comparisons if c.candidate == "mlx"]
    from_verify = [entry.comparison for entry in verification.entries]
    assert from_nightly and all(c.dtype == "bfloat16" for c in from_nightly)
    assert verdicts(from_verify) == verdicts(from_nightly)
    assert token_agreement_failures(from_verify, tolerances) == token_agreement_failures(from_nightly, tolerances)
    nightly_passed = all(c.passed for c in from_nightly) and not token_agreement_failures(from_nightly, tolerances)
    assert verification.passed == nightly_passed


@pytest.mark.mlx
def test_a_night_with_a_cached_recording_runs_no_nemo(tiny_nemo, tolerances, tmp_path, monkeypatch):
    """The first night records NeMo's runs; the next, with nothing changed, judges against the recording without
    loading NeMo, and gives the same comparisons."""
    import streaming_parity.backends.nemo as nemo_backend_module
    from streaming_parity.app.nightly import MatrixPlan, run_model_matrix
    from streaming_parity.app.session import fixture_utterances

    if not REGISTRY["mlx"].available():
        pytest.skip("mlx is not installed")
    utterances, contexts = fixture_utterances()[:2], [(70, 13)]
    plan = MatrixPlan([PlannedCandidate("mlx", "float32")], [])
    recordings = tmp_path / "recordings"
    first = run_model_matrix(tiny_nemo, plan, utterances, contexts, tolerances, work_dir=tmp_path / "work",
                             recordings=recordings)
    assert first.extra["reference"]["cached"] is False and first.comparisons

    def no_nemo(*_args, **_kwargs):
        raise AssertionError("NeMo was loaded although the recording is cached")

    monkeypatch.setattr(nemo_backend_module, "load", no_nemo)
    second = run_model_matrix(tiny_nemo, plan, utterances, contexts, tolerances, work_dir=tmp_path / "work",
                              recordings=recordings)
    assert second.extra["reference"] == {"recording": first.extra["reference"]["recording"], "cached": True}
    assert [(c.pair, c.utterance, c.mode, c.passed, [t.metrics for t in c.taps]) for c in second.comparisons] == \
           [(c.pair, c.utterance, c.mode, c.passed, [t.metrics for t in c.taps]) for c in first.comparisons]


@pytest.mark.mlx
def test_a_nights_recording_holds_what_its_single_pass_compares_and_judges_as_nemo_does(tiny_nemo, tolerances,
                                                                                       tmp_path):
    """The full-size plan (every candidate in pad-and-drop, NeMo's streaming~offline in plain at the lookahead with
    the most frames per step) is what the cached recording holds, no more, and the comparisons against it are the
    live reference's."""
    from streaming_parity.app.nightly import MatrixPlan, run_model_matrix
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.judge.recording import Recording

    if not REGISTRY["mlx"].available():
        pytest.skip("mlx is not installed")
    utterances, contexts = fixture_utterances()[:1], [(70, 13), (70, 1)]
    plan = MatrixPlan([PlannedCandidate("mlx", "float32")], [])
    options = dict(work_dir=tmp_path / "work", single_reference_pass=True)
    recorded = run_model_matrix(tiny_nemo, plan, utterances, contexts, tolerances, recordings=tmp_path / "rec",
                                **options)
    manifest = Recording(recorded.extra["reference"]["recording"]).manifest
    assert manifest["plan"]["modes_by_lookahead"] == {"70,13": ["plain", "pad-and-drop"], "70,1": ["pad-and-drop"]}
    assert manifest["plan"]["offline_lookaheads"] == [[70, 13]] and manifest["plan"]["offline_lengths"] == ["tensor"]
    assert sorted((o["context"], o["length"]) for o in manifest["offline"]) == [
        ([70, 13], Recording(recorded.extra["reference"]["recording"]).mel(utterances[0].name).shape[-1])]
    live = run_model_matrix(tiny_nemo, plan, utterances, contexts, tolerances, **options)

    def judged(results):
        return [(c.pair, c.utterance, c.att_context_size, c.mode, c.passed, [(t.tap, t.metrics) for t in c.taps])
                for c in results.comparisons]

    assert judged(recorded) == judged(live) and len(judged(live)) == 3


@pytest.mark.mlx
def test_a_dtype_without_a_fast_path_is_judged_on_a_reduced_plan_and_the_report_says_so(tiny_nemo, tolerances,
                                                                                         tmp_path, monkeypatch):
    from streaming_parity.app.nightly import REDUCED_PLAN_UTTERANCES, MatrixPlan, run_model_matrix
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.interface.registry import BackendEntry
    from streaming_parity.report import render_markdown

    if not REGISTRY["mlx"].available():
        pytest.skip("mlx is not installed")
    monkeypatch.setattr(BackendEntry, "slow_dtype_reason",
                        lambda self, dtype: "no fast path in this test" if self.name == "mlx" else None)
    utterances, contexts = fixture_utterances()[:3], [(70, 1), (70, 13)]
    results = run_model_matrix(tiny_nemo, MatrixPlan([PlannedCandidate("mlx", "float32")], []), utterances, contexts,
                               tolerances, work_dir=tmp_path / "work", single_reference_pass=True)
    judged = {(c.utterance, tuple(c.att_context_size)) for c in results.comparisons if c.pair == "nemo~mlx"}
    assert judged == {(u.name, (70, 13)) for u in utterances[:REDUCED_PLAN_UTTERANCES]}
    [record] = results.extra["candidates"]
    assert record["reduced_plan"] == {"reason": "no fast path in this test", "lookaheads": [[70, 13]],
                                      "utterances": REDUCED_PLAN_UTTERANCES}
    assert "Judged on a reduced plan:" in render_markdown([results]) and "no fast path in this test" in \
        render_markdown([results])


@pytest.mark.mlx
def test_mlx_half_precision_is_slow_on_a_cpu_and_not_on_a_gpu(monkeypatch):
    if not REGISTRY["mlx"].available():
        pytest.skip("mlx is not installed")
    import mlx.core as mx

    from streaming_parity.backends.mlx import backend as mlx_backend

    monkeypatch.setattr(mlx_backend, "default_device", lambda choice="auto": mx.Device(mx.cpu))
    assert set(mlx_backend.slow_dtypes()) == {"bfloat16", "float16"}
    assert REGISTRY["mlx"].slow_dtype_reason("float32") is None
    monkeypatch.setattr(mlx_backend, "default_device", lambda choice="auto": mx.Device(mx.gpu))
    assert mlx_backend.slow_dtypes() == {}


def test_a_spooled_run_stores_its_caches_as_new_frames_and_reads_back_bit_for_bit(nemo_backend, tmp_path, monkeypatch):
    """The spool writes both caches as the frames that entered (whole at a keyframe): every step, read in order or
    out of order, is the step streamed."""
    import numpy as np

    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.interface.driver import stream
    from streaming_parity.judge import spool

    monkeypatch.setattr(spool, "KEYFRAME_STEPS", 5)
    utterance = fixture_utterances()[0]
    mel, _ = nemo_backend.features(utterance.audio[None])
    live = stream(nemo_backend, mel, (70, 0), "plain")
    spooled = spool.record(nemo_backend, mel, (70, 0), "plain", tmp_path / "run")
    assert len(live.steps) > 12
    stored = [np.load(tmp_path / "run" / spool.STEP_FILE.format(index=i)).files for i in range(len(live.steps))]
    assert all("cache/cache_last_channel" in files for files in stored[::5])
    assert all("cache_new/cache_last_channel" in files for i, files in enumerate(stored) if i % 5)
    for index in [*range(len(live.steps)), 12, 3, len(live.steps) - 1, 0]:  # in order, then out of order
        ours, theirs = spooled.steps[index], live.steps[index]
        assert ours.tokens == theirs.tokens
        for name, value in {**theirs.taps, **theirs.state.caches()}.items():
            assert np.array_equal({**ours.taps, **ours.state.caches()}[name], value), (index, name)


def test_a_spooled_run_where_the_system_does_not_say_its_memory_records_none(nemo_backend, tmp_path, monkeypatch):
    """Without /proc (macOS) a spooled run records no memory and says none, rather than 0 MiB at every step."""
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.judge import spool

    monkeypatch.setattr(spool, "resident_mb", lambda: None)
    monkeypatch.setattr(spool, "PROGRESS_SECONDS", 0.0)
    said = []
    mel, _ = nemo_backend.features(fixture_utterances()[0].audio[None])
    run = spool.record(nemo_backend, mel, (70, 13), "plain", tmp_path / "run", progress=said.append)
    assert run.step_count > 1 and run.step_rss_mb == []
    assert len(said) == run.step_count and not any("resident" in line for line in said)
    assert said[-1].endswith(f"{len(run.tokens)} labels")

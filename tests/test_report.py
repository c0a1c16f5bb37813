"""Reports from results data: summary, degradation, word alignment, history and regressions, and the
rendered page in headless Chromium (from real results)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from streaming_parity.app.cli import EXIT_OK, main
from streaming_parity.judge.compare import PairComparison, TapResult
from streaming_parity.judge.results import Results
from streaming_parity.report import (
    find_regressions,
    key_metrics,
    overall_passed,
    pair_summaries,
    render_html,
    render_markdown,
    token_agreement,
    word_alignment_html,
    write_report,
)

ORDER = ["mel", "pre_encode", "layers.0", "layers.1", "encoder", "cache_last_channel", "cache_last_time", "joint"]


def comparison(candidate: str, dtype: str, context=(70, 13), *, error: float = 1e-6, limit: float = 1e-4,
               steps: int = 3, utterance: str = "utt01.wav", tokens=(5, 6, 7), candidate_tokens=None) -> PairComparison:
    taps = []
    for step in range(steps):
        for tap in ORDER[1:-1]:
            value = error * (1 + step)
            violations = [] if value <= limit else [f"max_abs = {value:.3g} > limit {limit:.3g}"]
            taps.append(TapResult(step, tap, {"max_abs": value, "cosine": 1 - value}, {"max_abs": limit}, violations,
                                  [1, 4], [1, 4]))
    return PairComparison(reference="nemo", candidate=candidate, pair=f"nemo~{candidate}", dtype=dtype,
                          att_context_size=context, utterance=utterance, taps=taps, reference_tokens=list(tokens),
                          candidate_tokens=list(candidate_tokens if candidate_tokens is not None else tokens),
                          order=ORDER)


def transcript(backend: str, dtype: str, text: str, context=(70, 13), utterance: str = "utt01.wav",
               mode: str = "plain") -> dict:
    return {"utterance": utterance, "backend": backend, "dtype": dtype, "mode": mode,
            "att_context_size": list(context), "text": text, "reference_text": "the quick brown fox"}


def synthetic_results(*, onnx_error: float = 1e-6, int8_error: float = 3e-2) -> Results:
    results = Results(model={"name": "tiny-streaming", "sha256": "ab" * 32, "path": "/tmp/tiny.nemo"},
                      tolerances="streaming_parity/judge/tolerances.toml")
    results.comparisons = [
        comparison("onnx", "float32", error=onnx_error),
        comparison("onnx", "int8", error=int8_error, limit=1.0, candidate_tokens=(5, 9, 7)),
    ]
    results.transcripts = [transcript("nemo", "float32", "the quick brown fox"),
                           transcript("onnx", "float32", "the quick brown fox"),
                           transcript("onnx", "int8", "the quack brown fox jumps")]
    results.timings = [{"backend": b, "dtype": d, "mode": "plain", "att_context_size": [70, 13],
                        "utterance": "utt01.wav", "step_seconds": [0.01, 0.02, 0.03]}
                       for b, d in (("nemo", "float32"), ("onnx", "float32"), ("onnx", "int8"))]
    return results


def test_token_agreement_counts_edits_against_the_reference_length():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4, 5, 6]) == 0.0
    assert token_agreement([], []) == 1.0


def test_word_alignment_marks_substitutions_insertions_and_deletions():
    marked = word_alignment_html("the quick brown fox", "the quack brown fox jumps")
    assert "<del>quick</del> <ins>quack</ins>" in marked and "<ins>jumps</ins>" in marked
    assert "<del>fox</del>" in word_alignment_html("the fox", "the")
    assert word_alignment_html("", "hello") == "<ins>hello</ins>"


def test_only_fp32_failures_fail_the_run_and_the_first_divergence_is_shown():
    results = synthetic_results(onnx_error=1e-6)
    assert not results.passed  # the int8 tokens differ
    assert overall_passed([results], fp32_only=True)

    failing = synthetic_results(onnx_error=1e-3)
    assert not overall_passed([failing], fp32_only=True)
    markdown = render_markdown([failing])
    assert "**fp32: FAIL**" in markdown
    assert "first divergent tap pre_encode at step 0" in markdown
    page = render_html([failing])
    assert 'id="summary-table"' in page and "first divergent tap pre_encode at step 0" in page


def test_degradation_of_reduced_precision_is_reported_against_fp32():
    results = synthetic_results()
    summaries = {(s.candidate, s.dtype): s for s in pair_summaries([results])}
    assert summaries[("onnx", "int8")].token_agreement == pytest.approx(2 / 3)
    markdown = render_markdown([results])
    assert "**Reduced precision**" in markdown and "onnx:int8" in markdown
    # int8 WER 0.5 (one substitution, one insertion over four words), fp32 WER 0.
    assert "+0.500" in markdown


def test_html_is_self_contained_with_embedded_plots():
    page = render_html([synthetic_results()])
    assert page.count("data:image/png;base64,") >= 3  # heat maps, cache drift, timing
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load anything remotely"
    assert "<script" not in page


def test_html_escapes_markup_from_the_results():
    markup = "<script>alert(1)</script>"
    results = synthetic_results()
    results.model["name"] = "a & b"
    # The utterance name reaches the summary's first divergence and the transcripts table, the error message
    # the list of candidates that could not run.
    results.comparisons.append(comparison("onnx", "float32", context=(70, 6), error=1e-3, utterance=markup))
    results.transcripts += [transcript(backend, "float32", "x < y", context=(70, 6), utterance=markup)
                            for backend in ("nemo", "onnx")]
    results.extra["candidates"] = [{"backend": "mlx", "dtype": "float32", "status": "error", "error": markup}]
    page = render_html([results])
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3
    assert "a &amp; b" in page and "a & b" not in page
    assert "x &lt; y" in page
    assert word_alignment_html("a & b", "a < b") == 'a <span class="sub"><del>&amp;</del> <ins>&lt;</ins></span> b'


def night(reports: Path, date: str, results: Results) -> None:
    results.extra["date"] = date
    results.save(reports / date / "results.json")


def test_history_flags_regressions_against_the_previous_night_only(tmp_path):
    reports = tmp_path / "reports"
    night(reports, "2025-01-01", synthetic_results(onnx_error=1e-7))
    night(reports, "2025-01-02", synthetic_results(onnx_error=1e-6))
    night(reports, "2025-01-09", synthetic_results(onnx_error=1e-2))  # a later night is not history
    (reports / "2025-01-02" / "results-broken.json").write_text("{not json")
    tonight = synthetic_results(onnx_error=5e-6)
    files = write_report([tonight], reports / "2025-01-03", reports_dir=reports, date="2025-01-03")

    markdown = files.markdown.read_text()
    assert "**Against 2025-01-02:** 1 regression(s)" in markdown
    assert "nemo~onnx (float32): error grew more than 2x" in markdown
    page = files.html.read_text()
    assert "2025-01-01" in page and "2025-01-09" not in page
    assert "Skipped unreadable history file" in page and "results-broken.json" in page


def test_regressions_cover_pass_rate_agreement_and_missing_series():
    before = key_metrics([synthetic_results()])
    after = key_metrics([synthetic_results(onnx_error=1e-3)])
    found = {(r.series.split(" · ")[1], r.metric) for r in find_regressions(after, before)}
    assert ("nemo~onnx (float32)", "pass_rate") in found and ("nemo~onnx (float32)", "worst_max_abs") in found
    missing = find_regressions({}, before)
    assert {r.metric for r in missing} == {"present"}
    assert not find_regressions(before, before)


def test_parity_report_renders_saved_results(tmp_path, capsys):
    path = synthetic_results().save(tmp_path / "results.json")
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == EXIT_OK
    assert (tmp_path / "out" / "report.html").is_file() and "report.md" in capsys.readouterr().out


# -- the rendered page, from real results, in headless Chromium -----------------------------------------

def chromium_binary() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.nemo
def test_real_report_renders_in_headless_chromium(tiny_nemo, nemo_backend, backend_pool, utterances, tolerances,
                                                  tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    # NeMo against its own offline forward and against every other available backend (the sessions'
    # prepared exports and artifacts), or a second stream of itself when none is installed: every
    # per-step tap and cache is compared, so every section of the page has real data.
    from streaming_parity.app.session import compare_backends
    from streaming_parity.interface.registry import REGISTRY

    candidates = [backend_pool.get(name) for name, entry in REGISTRY.items()
                  if name != "nemo" and entry.available()] or [nemo_backend]
    short = min(utterances, key=lambda u: u.audio.shape[-1])
    report = compare_backends(nemo_backend, candidates, [short], [(70, 13), (70, 6)], tolerances,
                              model_path=tiny_nemo)
    reports = tmp_path / "reports"
    night(reports, "2025-01-01", report.results)
    files = write_report([report.results], reports / "2025-01-02", reports_dir=reports, date="2025-01-02")

    url = files.html.resolve().as_uri()
    screenshot = tmp_path / "report.png"
    shot = chromium(binary, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000", url)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = chromium(binary, tmp_path / "profile", "--dump-dom", url).stdout
    assert 'id="summary-table"' in dom and 'id="verdict"' in dom
    assert "PASS" in dom
    images = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', dom)
    assert len(images) >= 4, "heat maps, cache drift, timing and history plots"
    for section in ("layers", "cache", "transcripts", "wer", "history", "environment"):
        assert f'<section id="{section}">' in dom


def test_the_int8_kernel_path_heads_the_report_and_its_provenance():
    """Each run names the CPU's int8 kernel path (an int8 figure depends on it); a results file from before it
    was recorded renders without the line."""
    from streaming_parity.core.system.cpu import int8_kernel_path
    from streaming_parity.report import render_html, render_markdown

    results = synthetic_results()
    path = int8_kernel_path()
    assert results.environment["int8_kernel_path"]["name"] == path.name  # recorded by Results' environment
    for page in (render_markdown([results]), render_html([results])):
        assert f"int8 kernel path: {path.name} (" in page
    assert "int8 kernel path</td><td>" + path.name in render_html([results])
    results.environment.pop("int8_kernel_path")
    assert "int8 kernel path" not in render_markdown([results])


def test_a_candidate_compared_in_both_first_chunk_modes_has_a_row_for_each():
    from dataclasses import replace

    from streaming_parity.report.data import pair_summaries

    results = synthetic_results()
    plain, = (c for c in results.comparisons if c.dtype == "float32")
    plain.mode = "plain"
    results.comparisons.append(replace(plain, mode="pad-and-drop", taps=list(plain.taps)))
    labels = [s.label for s in pair_summaries([results]) if s.dtype == "float32"]
    assert labels == ["nemo~onnx (float32)", "nemo~onnx (float32, pad-and-drop)"]

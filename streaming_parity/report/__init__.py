"""Parity reports: saved results in, a compact Markdown summary and one self-contained HTML page out.

The report reads results JSON only (``streaming_parity.judge.results``); it never runs a model, so any saved run,
tonight's or last month's, renders the same way. The package, bottom to top:

- ``data``: plain rows derived from ``Results`` (summary per pair and lookahead, transcripts, WER,
  degradation, time per chunk, per-step error grids, provenance);
- ``history``: key metrics per night, earlier nights read from the reports folder, regressions against
  the previous night;
- ``plots``: matplotlib figures embedded as base64 PNG (no network, no side files);
- ``templates/``: the Markdown and the HTML (Jinja2). The HTML templates escape every value they insert,
  so names, transcripts and error messages from a results file never become markup.

``render_markdown`` and ``render_html`` fill the templates; ``write_report`` writes both.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from streaming_parity.core.errors import InvalidInput
from streaming_parity.judge.metrics import token_agreement
from streaming_parity.judge.results import Results
from streaming_parity.report.data import (
    FP32,
    OFFLINE_PAIR,
    REFERENCE_BACKEND,
    backend_origins,
    candidate_errors,
    context_label,
    covers_several_models,
    degradation_rows,
    fmt_error,
    fmt_percent,
    fmt_ratio,
    fmt_signed,
    harness_origin,
    int8_paths,
    model_fingerprints,
    overall_passed,
    pair_summaries,
    probe_sections,
    provenance,
    reduced_plan_candidates,
    results_date,
    timing_rows,
    transcript_groups,
    unavailable_candidates,
    wer_rows,
    word_alignment,
)
from streaming_parity.report.history import History, build_history, find_regressions, fmt_metric, key_metrics
from streaming_parity.report.plots import cache_drift_figures, history_figure, layer_figures, timing_figure

__all__ = [
    "FP32", "OFFLINE_PAIR", "REFERENCE_BACKEND", "History", "ReportFiles", "context_label", "find_regressions",
    "fmt_error", "fmt_percent", "key_metrics", "load_results", "overall_passed", "pair_summaries", "render_html",
    "render_markdown", "timing_rows", "token_agreement", "wer_rows", "word_alignment_html", "write_report",
]


@functools.cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("streaming_parity.report", "templates"),
        # Every *.html.j2 escapes what it inserts; the Markdown template and the style sheet are plain text.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the render instead of leaving a blank
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters.update(error=fmt_error, ratio=fmt_ratio, percent=fmt_percent, signed=fmt_signed,
                               lookahead=context_label, metric=fmt_metric)
    return environment


def _summary_context(results_list: Sequence[Results], history: History | None, title: str,
                     mutants: dict | None = None) -> dict[str, Any]:
    """What the Markdown summary and the HTML page both show."""
    summaries = pair_summaries(results_list)
    return {
        "title": title,
        "mutants": mutants,
        "models": model_fingerprints(results_list),
        "origins": backend_origins(results_list),
        "origins_by_model": covers_several_models(results_list),
        "harness": harness_origin(results_list),
        "int8_paths": int8_paths(results_list),
        "fp32_passed": overall_passed(results_list, fp32_only=True),
        "passed": sum(s.passed_count for s in summaries),
        "total": sum(len(s.comparisons) for s in summaries),
        "summaries": summaries,
        "candidate_errors": candidate_errors(results_list),
        # A peer runtime's stack bisection (streaming_parity.judge.bisect), as parity compare recorded it.
        "peer_bisections": [row for r in results_list for row in (r.extra or {}).get("peer_bisection", [])],
        # A peer runtime's diagnosis (streaming_parity.judge.peer_audit): what it did not load, its front end and encoder.
        "peer_diagnoses": [row for r in results_list for row in (r.extra or {}).get("peer_diagnosis", [])],
        "degradation_rows": degradation_rows(results_list),
        # A probe run's verdicts per probe and backend (streaming_parity.judge.probes), derived from the saved results.
        "probe_sections": probe_sections(results_list),
        "reduced_plans": reduced_plan_candidates(results_list),
        "history": history,
    }


def render_markdown(results_list: Sequence[Results], history: History | None = None, *,
                    title: str = "Parity report", html_name: str | None = "report.html",
                    mutants: dict | None = None) -> str:
    return _templates().get_template("report.md.j2").render(
        _summary_context(results_list, history, title, mutants), html_name=html_name)


def render_html(results_list: Sequence[Results], history: History | None = None, *,
                title: str = "Parity report", mutants: dict | None = None) -> str:
    """``mutants``: the judge's mutation-test outcome (``streaming_parity.app.mutation``), listed when given."""
    context = _summary_context(results_list, history, title, mutants)
    timings = timing_rows(results_list)
    return _templates().get_template("report.html.j2").render(
        context,
        created=max((r.created for r in results_list), default=""),
        several_models=covers_several_models(results_list),
        unavailable_candidates=unavailable_candidates(results_list),
        layer_figures=layer_figures(context["summaries"]),
        cache_figures=cache_drift_figures(context["summaries"]),
        transcript_groups=transcript_groups(results_list),
        wer_rows=wer_rows(results_list),
        timing_rows=timings,
        timing_figure=timing_figure(timings) if timings else None,
        history_figure=history_figure(history) if history is not None else None,
        provenance=[provenance(r) for r in results_list],
    )


def word_alignment_html(reference: str, hypothesis: str) -> str:
    """``hypothesis`` with its word differences from ``reference`` marked, as the transcripts table shows it."""
    macros = _templates().get_template("macros.html.j2").module
    return str(macros.word_alignment(word_alignment(reference, hypothesis)))


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path


def load_results(paths: Sequence[str | Path]) -> list[Results]:
    return [Results.load(path) for path in paths]


def write_report(results_list: Sequence[Results], out_dir: str | Path, *, reports_dir: str | Path | None = None,
                 date: str | None = None, title: str | None = None, mutants: dict | None = None) -> ReportFiles:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; history from ``reports_dir`` before ``date``."""
    if not results_list:
        raise InvalidInput("no results to report")
    date = date or max(results_date(r) for r in results_list) or _dt.date.today().isoformat()
    title = title or f"Parity report {date}"
    history = build_history(results_list, reports_dir, date) if reports_dir is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "report.md"
    page = out / "report.html"
    markdown.write_text(render_markdown(results_list, history, title=title, mutants=mutants), encoding="utf-8")
    page.write_text(render_html(results_list, history, title=title, mutants=mutants), encoding="utf-8")
    return ReportFiles(markdown, page)

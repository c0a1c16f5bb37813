"""Parity reports: saved results in, a compact Markdown summary and one self-contained HTML page out.

The report reads results JSON only (``harness.results``); it never runs a model, so any saved run,
tonight's or last month's, renders the same way. Three layers, top to bottom:

- *digest*: plain rows derived from ``Results`` (summary per pair and lookahead, WER, degradation,
  per-step error grids, key metrics per night and regressions against the previous night);
- *plots*: matplotlib figures embedded as base64 PNG (no network, no side files);
- *rendering*: ``render_markdown`` and ``render_html``; ``write_report`` writes both.

History: every ``reports/<YYYY-MM-DD>/results*.json`` of an earlier night is read for the history
section, and tonight's key metrics are compared with the most recent earlier night.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from harness.compare import PairComparison
from harness.metrics import token_agreement, word_error_rate
from harness.results import Results

REFERENCE_BACKEND = "nemo"
FP32 = "float32"
OFFLINE_PAIR = "streaming~offline"
DATE_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Taps shown as rows of the per-step error heat maps, in model order (layers.N in between).
HEATMAP_HEAD, HEATMAP_TAIL = ("pre_encode",), ("encoder",)
CACHE_DRIFT_TAPS = ("cache_last_channel", "cache_last_time")
# A night regresses against the previous one when a key metric moves past these margins.
ERROR_GROWTH_FACTOR = 2.0
ERROR_FLOOR = 1e-7  # errors below this are summation noise; growth among them is not a regression
AGREEMENT_DROP = 0.01
WER_RISE = 0.01


# -- small helpers ------------------------------------------------------------------------------------

def context_label(context: Sequence[int]) -> str:
    return f"[{int(context[0])},{int(context[1])}]"


def base_pair(pair: str) -> str:
    """``streaming~offline@70,0`` -> ``streaming~offline``."""
    return pair.split("@", 1)[0]


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fmt_error(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    return f"{value:.2e}"


def fmt_ratio(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not is_finite(value) else f"{value:.{digits}f}"


def fmt_percent(value: float | None) -> str:
    return "–" if value is None or not is_finite(value) else f"{100 * value:.1f}%"


def model_name(results: Results) -> str:
    return (results.model or {}).get("name") or "model"


def results_date(results: Results) -> str:
    return (results.extra or {}).get("date") or (results.created or "")[:10]


# -- digest: summary rows --------------------------------------------------------------------------------

@dataclass
class PairSummary:
    """Every comparison of one model, pair, candidate dtype and lookahead, condensed to one row."""

    model: str
    pair: str  # without the lookahead suffix
    candidate: str
    dtype: str
    context: tuple[int, int]
    comparisons: list[PairComparison] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.pair if self.pair == OFFLINE_PAIR else f"{self.pair} ({self.dtype})"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def passed_count(self) -> int:
        return sum(c.passed for c in self.comparisons)

    @property
    def is_fp32(self) -> bool:
        return self.dtype == FP32

    def _worst(self, prefix: str) -> float | None:
        values = [v for c in self.comparisons for tap, v in c.worst("max_abs").items()
                  if tap == prefix or tap.startswith(prefix + ".")]
        return max(values) if values else None

    @property
    def worst_layer(self) -> float | None:
        return self._worst("layers")

    @property
    def worst_encoder(self) -> float | None:
        return self._worst("encoder")

    def min_cosine(self, tap: str) -> float | None:
        values = [t.metrics["cosine"] for c in self.comparisons for t in c.taps
                  if t.tap == tap and "cosine" in t.metrics]
        return min(values) if values else None

    @property
    def token_agreement(self) -> float | None:
        if not self.comparisons:
            return None
        return sum(token_agreement(c.reference_tokens, c.candidate_tokens) for c in self.comparisons) / len(
            self.comparisons)

    @property
    def first_failure(self) -> PairComparison | None:
        return next((c for c in self.comparisons if not c.passed), None)


def pair_summaries(results_list: Sequence[Results]) -> list[PairSummary]:
    groups: dict[tuple, PairSummary] = {}
    for results in results_list:
        for comparison in results.comparisons:
            context = tuple(int(v) for v in comparison.att_context_size)
            key = (model_name(results), base_pair(comparison.pair), comparison.candidate, comparison.dtype, context)
            if key not in groups:
                groups[key] = PairSummary(*key)
            groups[key].comparisons.append(comparison)
    # Offline checks first, then candidates by name and dtype (fp32 first), lookaheads as recorded.
    return sorted(groups.values(), key=lambda s: (s.model, s.pair != OFFLINE_PAIR, s.candidate,
                                                  s.dtype != FP32, s.dtype))


def overall_passed(results_list: Sequence[Results], *, fp32_only: bool = False) -> bool:
    return all(c.passed for r in results_list for c in r.comparisons if not fp32_only or c.dtype == FP32) and not (
        candidate_errors(results_list, fp32_only=fp32_only))


def candidate_errors(results_list: Sequence[Results], *, fp32_only: bool = False) -> list[dict[str, Any]]:
    """Candidates the run could not prepare or load (recorded by the nightly run in ``extra``)."""
    errors = []
    for results in results_list:
        for entry in (results.extra or {}).get("candidates", []):
            if entry.get("status") == "error" and (not fp32_only or entry.get("dtype") == FP32):
                errors.append({"model": model_name(results), **entry})
    return errors


# -- digest: transcripts and WER ---------------------------------------------------------------------------

def _transcript_key(row: dict[str, Any]) -> tuple:
    return (row["utterance"], tuple(row["att_context_size"]), row.get("mode", "plain"))


def reference_transcripts(results: Results) -> dict[tuple, dict[str, Any]]:
    """NeMo's transcript per (utterance, lookahead, first-chunk mode)."""
    return {_transcript_key(r): r for r in results.transcripts if r["backend"] == REFERENCE_BACKEND}


@dataclass
class WerRow:
    model: str
    backend: str
    dtype: str
    context: tuple[int, int]
    utterances: int
    wer_vs_text: float | None  # against the utterances' reference text
    wer_vs_nemo: float | None  # against NeMo's transcript of the same chunks


def wer_rows(results_list: Sequence[Results]) -> list[WerRow]:
    rows = []
    for results in results_list:
        nemo = reference_transcripts(results)
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for row in results.transcripts:
            groups[(row["backend"], row["dtype"], tuple(row["att_context_size"]), row.get("mode", "plain"))].append(row)
        seen: set[tuple] = set()
        for (backend, dtype, context, _mode), rows_of in groups.items():
            # One row per backend, dtype and lookahead; NeMo's plain-mode run stands for NeMo.
            if (backend, dtype, context) in seen:
                continue
            seen.add((backend, dtype, context))
            with_text = [r for r in rows_of if r.get("reference_text")]
            vs_text = (word_error_rate([r["reference_text"] for r in with_text], [r["text"] for r in with_text])
                       if with_text else None)
            paired = [(nemo[_transcript_key(r)]["text"], r["text"]) for r in rows_of if _transcript_key(r) in nemo]
            vs_nemo = word_error_rate([a for a, _ in paired], [b for _, b in paired]) if paired else None
            rows.append(WerRow(model_name(results), backend, dtype, context, len(rows_of), vs_text, vs_nemo))
    return sorted(rows, key=lambda r: (r.model, r.backend != REFERENCE_BACKEND, r.backend, r.dtype != FP32,
                                       r.dtype, -r.context[1]))


@dataclass
class Degradation:
    """A reduced-precision candidate against NeMo, next to the same backend at fp32."""

    model: str
    backend: str
    dtype: str
    context: tuple[int, int]
    encoder_cosine: float | None
    joint_cosine: float | None
    token_agreement: float | None
    wer: float | None
    wer_fp32: float | None

    @property
    def wer_delta(self) -> float | None:
        return None if self.wer is None or self.wer_fp32 is None else self.wer - self.wer_fp32


def degradation_rows(results_list: Sequence[Results]) -> list[Degradation]:
    wer = {(r.model, r.backend, r.dtype, r.context): r.wer_vs_text for r in wer_rows(results_list)}
    rows = []
    for summary in pair_summaries(results_list):
        if summary.is_fp32 or summary.pair == OFFLINE_PAIR:
            continue
        key = (summary.model, summary.candidate)
        rows.append(Degradation(
            summary.model, summary.candidate, summary.dtype, summary.context,
            summary.min_cosine("encoder"), summary.min_cosine("joint"), summary.token_agreement,
            wer.get((*key, summary.dtype, summary.context)), wer.get((*key, FP32, summary.context))))
    return rows


@dataclass
class TimingRow:
    model: str
    backend: str
    dtype: str
    context: tuple[int, int]
    steps: int
    mean_ms: float
    p95_ms: float


def timing_rows(results_list: Sequence[Results]) -> list[TimingRow]:
    grouped: dict[tuple, list[float]] = defaultdict(list)
    for results in results_list:
        for row in results.timings:
            key = (model_name(results), row["backend"], row["dtype"], tuple(row["att_context_size"]))
            grouped[key].extend(row["step_seconds"])
    rows = []
    for key, seconds in grouped.items():
        ordered = sorted(seconds)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")
        rows.append(TimingRow(*key, len(seconds), 1000 * sum(seconds) / max(len(seconds), 1), 1000 * p95))
    return sorted(rows, key=lambda r: (r.model, r.backend != REFERENCE_BACKEND, r.backend, r.dtype, -r.context[1]))


# -- digest: per-step grids ---------------------------------------------------------------------------------

@dataclass
class StepGrid:
    """Worst value over utterances of ``max_abs`` per tap (rows) and streaming step (columns)."""

    title: str
    rows: list[str]
    values: list[list[float | None]]  # [row][step]


def _per_step_worst(comparisons: Iterable[PairComparison], taps: Sequence[str]) -> list[list[float | None]]:
    worst: dict[tuple[str, int], float] = {}
    steps = 0
    for comparison in comparisons:
        for result in comparison.taps:
            if result.step < 0 or result.tap not in taps or "max_abs" not in result.metrics:
                continue
            key = (result.tap, result.step)
            worst[key] = max(worst.get(key, 0.0), result.metrics["max_abs"])
            steps = max(steps, result.step + 1)
    return [[worst.get((tap, step)) for step in range(steps)] for tap in taps]


def layer_grid(summary: PairSummary) -> StepGrid | None:
    layer_taps = sorted({t.tap for c in summary.comparisons for t in c.taps if t.tap.startswith("layers.")},
                        key=lambda name: int(name.split(".")[1]))
    taps = [*HEATMAP_HEAD, *layer_taps, *HEATMAP_TAIL]
    values = _per_step_worst(summary.comparisons, taps)
    present = [(tap, row) for tap, row in zip(taps, values) if any(v is not None for v in row)]
    if not present or not layer_taps:
        return None
    return StepGrid(f"{summary.label} {context_label(summary.context)}", [t for t, _ in present],
                    [row for _, row in present])


def cache_drift(summary: PairSummary) -> StepGrid | None:
    values = _per_step_worst(summary.comparisons, CACHE_DRIFT_TAPS)
    if not any(v is not None for row in values for v in row):
        return None
    return StepGrid(f"{summary.label} {context_label(summary.context)}", list(CACHE_DRIFT_TAPS), values)


# -- digest: history -----------------------------------------------------------------------------------------

KEY_METRICS = ("worst_max_abs", "token_agreement", "pass_rate")
METRIC_TITLES = {"worst_max_abs": "worst max_abs (layers, encoder)", "token_agreement": "token agreement",
                 "pass_rate": "comparisons passed", "wer": "WER vs reference text"}


def key_metrics(results_list: Sequence[Results]) -> dict[str, dict[str, float]]:
    """A night's headline numbers per series (model · pair · dtype), each lookahead folded into its worst."""
    series: dict[str, dict[str, float]] = {}
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wer_by_run: dict[tuple[str, str, str], float] = {}
    for row in wer_rows(results_list):
        if row.wer_vs_text is not None:
            run = (row.model, row.backend, row.dtype)
            wer_by_run[run] = max(wer_by_run.get(run, 0.0), row.wer_vs_text)
    for summary in pair_summaries(results_list):
        name = f"{summary.model} · {summary.label}"
        entry = series.setdefault(name, {"worst_max_abs": 0.0, "token_agreement": 1.0})
        errors = [v for v in (summary.worst_layer, summary.worst_encoder) if v is not None]
        entry["worst_max_abs"] = max([entry["worst_max_abs"], *errors])
        if summary.pair != OFFLINE_PAIR and summary.token_agreement is not None:
            entry["token_agreement"] = min(entry["token_agreement"], summary.token_agreement)
            run = (summary.model, summary.candidate, summary.dtype)
            if run in wer_by_run:
                entry["wer"] = wer_by_run[run]
        counts[name][0] += summary.passed_count
        counts[name][1] += len(summary.comparisons)
    for name, (passed, total) in counts.items():
        series[name]["pass_rate"] = passed / max(total, 1)
    return series


@dataclass
class Night:
    date: str
    metrics: dict[str, dict[str, float]]
    source: str


def read_history(reports_dir: str | Path, before: str) -> tuple[list[Night], list[str]]:
    """Earlier nights under ``reports_dir/<YYYY-MM-DD>/results*.json``, oldest first, and what could not be read."""
    nights, problems = [], []
    root = Path(reports_dir)
    if not root.is_dir():
        return nights, problems
    for night_dir in sorted(p for p in root.iterdir() if p.is_dir() and DATE_DIR.match(p.name) and p.name < before):
        loaded = []
        for path in sorted(night_dir.glob("results*.json")):
            try:
                loaded.append(Results.load(path))
            except (ValueError, KeyError, TypeError) as error:
                problems.append(f"{path}: {error}")
        if loaded:
            nights.append(Night(night_dir.name, key_metrics(loaded), str(night_dir)))
    return nights, problems


@dataclass
class Regression:
    series: str
    metric: str
    previous: float | None
    current: float | None
    note: str


def find_regressions(current: dict[str, dict[str, float]], previous: dict[str, dict[str, float]]) -> list[Regression]:
    found = []
    for series, before in previous.items():
        now = current.get(series)
        if now is None:
            found.append(Regression(series, "present", None, None, "ran on the previous night, missing tonight"))
            continue
        if now["pass_rate"] < before["pass_rate"]:
            found.append(Regression(series, "pass_rate", before["pass_rate"], now["pass_rate"], "fewer comparisons pass"))
        error_before, error_now = before["worst_max_abs"], now["worst_max_abs"]
        if error_now > ERROR_FLOOR and error_now > ERROR_GROWTH_FACTOR * max(error_before, ERROR_FLOOR):
            found.append(Regression(series, "worst_max_abs", error_before, error_now,
                                    f"error grew more than {ERROR_GROWTH_FACTOR:g}x"))
        if now["token_agreement"] < before["token_agreement"] - AGREEMENT_DROP:
            found.append(Regression(series, "token_agreement", before["token_agreement"], now["token_agreement"],
                                    "token agreement dropped"))
        if "wer" in now and "wer" in before and now["wer"] > before["wer"] + WER_RISE:
            found.append(Regression(series, "wer", before["wer"], now["wer"], "WER rose"))
    return found


@dataclass
class History:
    nights: list[Night]  # earlier nights, oldest first
    tonight: Night
    regressions: list[Regression]
    problems: list[str]

    @property
    def previous(self) -> Night | None:
        return self.nights[-1] if self.nights else None


def build_history(results_list: Sequence[Results], reports_dir: str | Path | None, date: str) -> History:
    nights, problems = read_history(reports_dir, date) if reports_dir else ([], [])
    tonight = Night(date, key_metrics(results_list), "")
    regressions = find_regressions(tonight.metrics, nights[-1].metrics) if nights else []
    return History(nights, tonight, regressions, problems)


# -- plots -------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False, "figure.dpi": 100})
    return plt


def _png_data_uri(figure) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _log10_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    return math.log10(max(value, 1e-12))


def heatmap_image(grid: StepGrid) -> str:
    """Rows = taps in model order, columns = steps, colour = log10 max_abs (grey where not compared)."""
    import numpy as np

    plt = _pyplot()
    data = np.array([[np.nan if (v := _log10_or_none(x)) is None else v for x in row] for row in grid.values])
    steps = data.shape[1]
    figure, axis = plt.subplots(figsize=(min(2.2 + 0.12 * steps, 9.0), 0.9 + 0.26 * len(grid.rows)))
    cmap = plt.get_cmap("magma_r").with_extremes(bad="#e5e7eb")
    image = axis.imshow(data, aspect="auto", cmap=cmap, vmin=-12, vmax=0, interpolation="nearest")
    axis.set_yticks(range(len(grid.rows)), grid.rows)
    axis.set_xlabel("step")
    axis.set_xticks(range(0, steps, max(1, math.ceil(steps / 12))))
    axis.set_title(grid.title, loc="left")
    colorbar = figure.colorbar(image, ax=axis, pad=0.02)
    colorbar.set_label("log10 max_abs")
    return _png_data_uri(figure)


def cache_drift_image(grids: Sequence[StepGrid], title: str) -> str:
    """One panel per cache tensor, one line per lookahead: does the error grow as the cache fills?"""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(CACHE_DRIFT_TAPS), figsize=(9.0, 2.7), sharey=True, layout="constrained")
    for index, tap in enumerate(CACHE_DRIFT_TAPS):
        axis = axes[index]
        for grid in grids:
            row = grid.values[grid.rows.index(tap)]
            points = [(step, max(v, 1e-12)) for step, v in enumerate(row) if v is not None]
            if points:
                axis.plot(*zip(*points), marker=".", linewidth=1.2, label=grid.title.rsplit(" ", 1)[-1])
        axis.set_yscale("log")
        axis.set_title(tap, loc="left", fontsize=9)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("max_abs (worst utterance)")
    axes[-1].legend(title="lookahead", fontsize=8, frameon=False)
    figure.suptitle(title, x=0.0, ha="left", fontsize=10, fontweight="bold")
    return _png_data_uri(figure)


def timing_image(rows: Sequence[TimingRow]) -> str:
    plt = _pyplot()
    labels = [f"{r.backend}:{r.dtype} {context_label(r.context)}" for r in rows]
    figure, axis = plt.subplots(figsize=(9.0, 0.8 + 0.24 * len(rows)))
    axis.barh(range(len(rows)), [r.mean_ms for r in rows], color="#3b82f6")
    axis.set_yticks(range(len(rows)), labels)
    axis.invert_yaxis()
    axis.set_xlabel("mean time per chunk (ms)")
    axis.grid(True, axis="x", alpha=0.3)
    return _png_data_uri(figure)


def history_image(history: History) -> str:
    plt = _pyplot()
    nights = [*history.nights, history.tonight]
    dates = [n.date for n in nights]
    series = sorted({name for n in nights for name in n.metrics})
    metrics = [m for m in (*KEY_METRICS, "wer") if any(m in n.metrics.get(s, {}) for n in nights for s in series)]
    figure, axes = plt.subplots(len(metrics), 1, figsize=(10.0, 2.0 * len(metrics)), sharex=True, squeeze=False,
                                layout="constrained")
    for axis, metric in zip(axes[:, 0], metrics):
        for name in series:
            points = [(i, n.metrics[name][metric]) for i, n in enumerate(nights)
                      if metric in n.metrics.get(name, {})]
            if points:
                xs, ys = zip(*points)
                if metric == "worst_max_abs":
                    ys = [max(y, 1e-12) for y in ys]
                axis.plot(xs, ys, marker="o", linewidth=1.2, label=name)
        if metric == "worst_max_abs":
            axis.set_yscale("log")
        axis.set_title(METRIC_TITLES[metric], loc="left")
        axis.grid(True, alpha=0.3)
    axes[-1, 0].set_xticks(range(len(dates)), dates, rotation=30, ha="right")
    axes[-1, 0].set_xlim(-0.5, len(dates) - 0.5)
    axes[0, 0].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png_data_uri(figure)


# -- rendering: Markdown ------------------------------------------------------------------------------------------

def _status(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def render_markdown(results_list: Sequence[Results], history: History | None = None, *,
                    title: str = "Parity report", html_name: str | None = "report.html") -> str:
    summaries = pair_summaries(results_list)
    fp32_passed = overall_passed(results_list, fp32_only=True)
    lines = [f"# {title}", ""]
    failing = [s for s in summaries if not s.passed]
    lines.append(f"**fp32: {_status(fp32_passed)}** · {sum(s.passed_count for s in summaries)}/"
                 f"{sum(len(s.comparisons) for s in summaries)} comparisons passed · "
                 + ", ".join(f"{model_name(r)} `{((r.model or {}).get('sha256') or '?')[:12]}`" for r in results_list))
    lines.append("")
    lines += ["| model | pair | lookahead | passed | worst layer max_abs | encoder max_abs | token agreement | result |",
              "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        agreement = "n/a" if s.pair == OFFLINE_PAIR else fmt_percent(s.token_agreement)
        lines.append(f"| {s.model} | {s.label} | {context_label(s.context)} | {s.passed_count}/{len(s.comparisons)} | "
                     f"{fmt_error(s.worst_layer)} | {fmt_error(s.worst_encoder)} | {agreement} | "
                     f"{'✅' if s.passed else ('❌' if s.is_fp32 else '⚠️')} |")
    if failing or candidate_errors(results_list):
        lines += ["", "**First divergence per failing pair**", ""]
        for s in failing:
            lines.append(f"- {s.model}: {s.first_failure.describe_failure()}"
                         + ("" if s.is_fp32 else " _(reduced precision: reported, not gating)_"))
        for error in candidate_errors(results_list):
            lines.append(f"- {error['model']}: {error['backend']}:{error['dtype']} could not run: {error.get('error')}")
    degradation = degradation_rows(results_list)
    if degradation:
        lines += ["", "**Reduced precision**", "", "| model | backend | lookahead | encoder cosine | token agreement | ΔWER vs fp32 |",
                  "|---|---|---|---|---|---|"]
        for d in degradation:
            lines.append(f"| {d.model} | {d.backend}:{d.dtype} | {context_label(d.context)} | "
                         f"{fmt_ratio(d.encoder_cosine, 5)} | {fmt_percent(d.token_agreement)} | "
                         f"{_signed(d.wer_delta)} |")
    if history is not None and history.previous is not None:
        lines += ["", f"**Against {history.previous.date}:** "
                  + (f"{len(history.regressions)} regression(s)" if history.regressions else "no regressions")]
        for regression in history.regressions:
            lines.append(f"- {regression.series}: {regression.note} ({_metric_change(regression)})")
    if html_name:
        lines += ["", f"Full report: `{html_name}` (plots, transcripts, WER, history)."]
    return "\n".join(lines) + "\n"


def _signed(value: float | None) -> str:
    return "–" if value is None or not is_finite(value) else f"{value:+.3f}"


def _metric_change(regression: Regression) -> str:
    if regression.previous is None:
        return "missing"
    if regression.metric == "worst_max_abs":
        return f"{fmt_error(regression.previous)} → {fmt_error(regression.current)}"
    return f"{fmt_ratio(regression.previous)} → {fmt_ratio(regression.current)}"


# -- rendering: HTML -------------------------------------------------------------------------------------------------

STYLE = """
:root { --ok: #15803d; --bad: #b91c1c; --warn: #b45309; --muted: #6b7280; --line: #e5e7eb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #111827;
       margin: 0 auto; max-width: 1180px; padding: 24px 28px 64px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 36px 0 10px; padding-bottom: 4px;
  border-bottom: 2px solid var(--line); } h3 { font-size: 15px; margin: 20px 0 8px; }
.meta { color: var(--muted); margin: 0 0 16px; }
.verdict { display: flex; gap: 14px; align-items: center; padding: 14px 18px; border-radius: 8px;
           margin: 12px 0 18px; font-size: 15px; }
.verdict.pass { background: #f0fdf4; border: 1px solid #bbf7d0; }
.verdict.fail { background: #fef2f2; border: 1px solid #fecaca; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-weight: 600; font-size: 12px;
         color: #fff; white-space: nowrap; }
.badge.pass { background: var(--ok); } .badge.fail { background: var(--bad); } .badge.warn { background: var(--warn); }
.verdict .badge { font-size: 16px; padding: 4px 14px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
table.transcripts { table-layout: fixed; } table.transcripts td { overflow-wrap: anywhere; }
table.transcripts th:nth-child(1) { width: 9%; } table.transcripts th:nth-child(2) { width: 21%; }
table.transcripts th:nth-child(3) { width: 28%; }
table.transcripts td div { margin-bottom: 4px; }
th { background: #f9fafb; font-weight: 600; white-space: nowrap; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
tr.failed td { background: #fff7f7; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
ul.divergences li { margin: 4px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px 18px; }
.grid figure { margin: 0; }
img { max-width: 100%; height: auto; }
.note { color: var(--muted); font-size: 13px; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
del { background: #fee2e2; color: #991b1b; text-decoration: line-through; padding: 0 2px; }
ins { background: #dcfce7; color: #166534; text-decoration: none; padding: 0 2px; }
.sub { background: #fef3c7; padding: 0 2px; }
nav { margin: 6px 0 0; color: var(--muted); } nav a { color: #2563eb; text-decoration: none; margin-right: 12px; }
"""

SECTIONS = (("summary", "Summary"), ("layers", "Per-layer error"), ("cache", "Cache drift"),
            ("transcripts", "Transcripts"), ("wer", "WER"), ("degradation", "Reduced precision"),
            ("timing", "Time per chunk"), ("history", "History"), ("environment", "Environment"))


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Sequence[int] = (),
           row_classes: Sequence[str] | None = None, table_id: str | None = None,
           table_class: str | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        cls = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        cells = "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                        for i, cell in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    attributes = (f' id="{table_id}"' if table_id else "") + (f' class="{table_class}"' if table_class else "")
    return f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _model_table(results_list: Sequence[Results], headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                 numeric: Sequence[int] = (), **options) -> str:
    """A table whose first column is the model, dropped when the results cover a single model."""
    if len({model_name(r) for r in results_list}) > 1:
        return _table(headers, rows, numeric=numeric, **options)
    return _table(headers[1:], [row[1:] for row in rows], numeric=[i - 1 for i in numeric if i > 0], **options)


def _badge(summary_passed: bool, gating: bool = True) -> str:
    if summary_passed:
        return '<span class="badge pass">pass</span>'
    return '<span class="badge fail">FAIL</span>' if gating else '<span class="badge warn">degraded</span>'


def _figure(data_uri: str, alt: str) -> str:
    return f'<figure><img src="{data_uri}" alt="{_e(alt)}"></figure>'


def _summary_section(results_list: Sequence[Results], summaries: Sequence[PairSummary]) -> str:
    fp32_passed = overall_passed(results_list, fp32_only=True)
    total = sum(len(s.comparisons) for s in summaries)
    passed = sum(s.passed_count for s in summaries)
    verdict = ("All fp32 comparisons are within tolerance." if fp32_passed
               else "At least one fp32 comparison is out of tolerance.")
    parts = [f'<div class="verdict {"pass" if fp32_passed else "fail"}" id="verdict">'
             f'<span class="badge {"pass" if fp32_passed else "fail"}">{_status(fp32_passed)}</span>'
             f"<span>{verdict} {passed} of {total} comparisons passed.</span></div>"]
    rows, classes = [], []
    for s in summaries:
        failure = s.first_failure
        agreement = "n/a" if s.pair == OFFLINE_PAIR else fmt_percent(s.token_agreement)
        rows.append([_e(s.model), _e(s.label), context_label(s.context), f"{s.passed_count}/{len(s.comparisons)}",
                     fmt_error(s.worst_layer), fmt_error(s.worst_encoder), agreement,
                     _badge(s.passed, s.is_fp32),
                     "" if failure is None else f'<span class="mono">{_e(_divergence_text(failure))}</span>'])
        classes.append("" if s.passed else "failed")
    parts.append(_model_table(
        results_list, ["model", "pair", "lookahead", "passed", "worst layer max_abs", "encoder max_abs", "token agreement",
         "result", "first divergence"], rows, numeric=(3, 4, 5, 6), row_classes=classes, table_id="summary-table"))
    errors = candidate_errors(results_list)
    if errors:
        parts.append("<h3>Candidates that could not run</h3><ul class=\"divergences\">" + "".join(
            f"<li><b>{_e(e['model'])}</b> {_e(e['backend'])}:{_e(e['dtype'])}: <code>{_e(e.get('error'))}</code></li>"
            for e in errors) + "</ul>")
    skipped = [(model_name(r), c) for r in results_list for c in (r.extra or {}).get("candidates", [])
               if c.get("status") == "unavailable"]
    if skipped:
        parts.append('<p class="note">Not run (backend unavailable here): ' + "; ".join(
            f"{_e(c['backend'])}:{_e(c['dtype'])} ({_e(c.get('error', ''))})" for _m, c in skipped) + "</p>")
    return "".join(parts)


def _divergence_text(comparison: PairComparison) -> str:
    """``describe_failure`` without the pair/lookahead prefix the table already shows."""
    text = comparison.describe_failure()
    return f"{comparison.utterance}: {text.split(': ', 1)[1]}" if ": " in text else text


def _layers_section(summaries: Sequence[PairSummary]) -> str:
    figures = [(_figure(heatmap_image(grid), f"per-layer max_abs heat map {grid.title}"))
               for grid in (layer_grid(s) for s in summaries if s.pair != OFFLINE_PAIR) if grid is not None]
    if not figures:
        return '<p class="note">No per-step layer taps in these results (only NeMo streaming against offline).</p>'
    return ('<p class="note">Worst max_abs over utterances per tap (rows, model order) and streaming step '
            '(columns), log scale; grey = not compared.</p><div class="grid">' + "".join(figures) + "</div>")


def _cache_section(summaries: Sequence[PairSummary]) -> str:
    by_pair: dict[tuple[str, str], list[StepGrid]] = defaultdict(list)
    for s in summaries:
        grid = cache_drift(s)
        if grid is not None:
            by_pair[(s.model, s.label)].append(grid)
    if not by_pair:
        return '<p class="note">No per-step cache comparisons in these results.</p>'
    return '<div class="grid">' + "".join(
        _figure(cache_drift_image(grids, f"{model} · {label}"), f"cache drift {label}")
        for (model, label), grids in by_pair.items()) + "</div>"


def word_alignment_html(reference: str, hypothesis: str) -> str:
    """``hypothesis`` with its word differences from ``reference`` marked (jiwer's alignment)."""
    import jiwer

    ref_words, hyp_words = reference.split(), hypothesis.split()
    if not ref_words or not hyp_words:
        return ("".join(f"<del>{_e(w)}</del> " for w in ref_words) + "".join(f"<ins>{_e(w)}</ins> " for w in hyp_words)
                ).strip() or '<span class="note">(empty)</span>'
    alignment = jiwer.process_words(reference, hypothesis).alignments[0]
    parts = []
    for chunk in alignment:
        ref_part = ref_words[chunk.ref_start_idx:chunk.ref_end_idx]
        hyp_part = hyp_words[chunk.hyp_start_idx:chunk.hyp_end_idx]
        if chunk.type == "equal":
            parts.append(_e(" ".join(hyp_part)))
        elif chunk.type == "substitute":
            parts.append(f'<span class="sub"><del>{_e(" ".join(ref_part))}</del> <ins>{_e(" ".join(hyp_part))}</ins></span>')
        elif chunk.type == "delete":
            parts.append(f"<del>{_e(' '.join(ref_part))}</del>")
        else:
            parts.append(f"<ins>{_e(' '.join(hyp_part))}</ins>")
    return " ".join(parts)


SAME_BADGE = '<span class="badge pass">same</span>'


def _transcripts_section(results_list: Sequence[Results]) -> str:
    parts = ['<p class="note">Each candidate\'s transcript against NeMo\'s on the same chunks and first-chunk '
             'mode (the NeMo column shows plain mode): <del>NeMo only</del> <ins>candidate only</ins>.</p>']
    for results in results_list:
        nemo = reference_transcripts(results)
        by_context: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for row in results.transcripts:
            if row["backend"] != REFERENCE_BACKEND:
                by_context[tuple(row["att_context_size"])].append(row)
        contexts = sorted({k[1] for k in nemo} | set(by_context), key=lambda c: -c[1])
        for context in contexts:
            rows, differing = [], 0
            utterances = sorted({k[0] for k in nemo if k[1] == context} | {r["utterance"] for r in by_context[context]})
            for utterance in utterances:
                nemo_row = nemo.get((utterance, context, "plain")) or next(
                    (r for k, r in nemo.items() if k[0] == utterance and k[1] == context), None)
                truth = (nemo_row or {}).get("reference_text") or ""
                nemo_text = (nemo_row or {}).get("text", "")
                candidates = [r for r in by_context[context] if r["utterance"] == utterance]
                cells = []
                for row in candidates:
                    against = nemo.get(_transcript_key(row), nemo_row) or {}
                    same = row["text"] == against.get("text")
                    differing += not same
                    marker = SAME_BADGE if same else ""
                    mode = row.get("mode", "plain")
                    mode_note = "" if mode == "plain" else f' <span class="note">vs NeMo {_e(mode)}</span>'
                    cells.append(f"<div><b>{_e(row['backend'])}:{_e(row['dtype'])}</b>{mode_note} {marker} "
                                 f"{word_alignment_html(against.get('text', ''), row['text'])}</div>")
                rows.append([_e(utterance), _e(truth), _e(nemo_text) or '<span class="note">(empty)</span>',
                             "".join(cells) or '<span class="note">no candidate</span>'])
            summary = (f"{_e(model_name(results))} {context_label(context)}: {len(utterances)} utterance(s), "
                       f"{differing} candidate transcript(s) differ from NeMo")
            parts.append(f"<details{' open' if differing else ''}><summary>{summary}</summary>"
                         + _table(["utterance", "reference text", "NeMo", "candidates vs NeMo"], rows,
                                  table_class="transcripts") + "</details>")
    return "".join(parts)


def _wer_section(results_list: Sequence[Results]) -> str:
    rows = wer_rows(results_list)
    if not rows:
        return '<p class="note">No transcripts in these results.</p>'
    return _model_table(results_list,
                        ["model", "backend", "dtype", "lookahead", "utterances", "WER vs reference text", "WER vs NeMo"],
                  [[_e(r.model), _e(r.backend), _e(r.dtype), context_label(r.context), str(r.utterances),
                    fmt_percent(r.wer_vs_text), fmt_percent(r.wer_vs_nemo)] for r in rows], numeric=(4, 5, 6))


def _degradation_section(results_list: Sequence[Results]) -> str:
    rows = degradation_rows(results_list)
    if not rows:
        return '<p class="note">No reduced-precision (int8, bf16) candidates in these results.</p>'
    return ('<p class="note">Judged against the tolerance table of their own dtype; they do not gate the run. '
            'ΔWER is against the same backend at fp32.</p>'
            + _model_table(results_list, ["model", "backend", "dtype", "lookahead", "min encoder cosine", "min joint cosine",
                      "token agreement", "WER", "ΔWER vs fp32"],
                     [[_e(d.model), _e(d.backend), _e(d.dtype), context_label(d.context), fmt_ratio(d.encoder_cosine, 5),
                       fmt_ratio(d.joint_cosine, 5), fmt_percent(d.token_agreement), fmt_percent(d.wer),
                       _signed(d.wer_delta)] for d in rows], numeric=(4, 5, 6, 7, 8)))


def _timing_section(results_list: Sequence[Results]) -> str:
    rows = timing_rows(results_list)
    if not rows:
        return '<p class="note">No timings in these results.</p>'
    table = _model_table(results_list, ["model", "backend", "dtype", "lookahead", "steps", "mean ms/chunk",
                                        "p95 ms/chunk"],
                   [[_e(r.model), _e(r.backend), _e(r.dtype), context_label(r.context), str(r.steps),
                     f"{r.mean_ms:.1f}", f"{r.p95_ms:.1f}"] for r in rows], numeric=(4, 5, 6))
    return _figure(timing_image(rows), "time per chunk") + table


def _history_section(history: History | None) -> str:
    if history is None:
        return '<p class="note">No reports folder given: history not shown.</p>'
    parts = []
    if history.previous is None:
        parts.append('<p class="note">No earlier night in the reports folder: this is the first point of the history.</p>')
    elif history.regressions:
        parts.append(f'<p><span class="badge fail">{len(history.regressions)} regression(s)</span> against '
                     f"{_e(history.previous.date)}</p>" + _table(
                         ["series", "metric", history.previous.date, history.tonight.date, "why"],
                         [[_e(r.series), _e(r.metric), *_before_after(r), _e(r.note)] for r in history.regressions]))
    else:
        parts.append(f'<p><span class="badge pass">no regressions</span> against {_e(history.previous.date)}</p>')
    if history.nights:
        parts.append(f'<p class="note">{len(history.nights)} earlier night(s) read: '
                     + ", ".join(_e(n.date) for n in history.nights) + "</p>")
    parts.append(_figure(history_image(history), "key metrics over time"))
    for problem in history.problems:
        parts.append(f'<p class="note">Skipped unreadable history file: {_e(problem)}</p>')
    return "".join(parts)


def _before_after(regression: Regression) -> tuple[str, str]:
    if regression.previous is None:
        return "ran", "missing"
    before, after = _metric_change(regression).split(" → ", 1)
    return before, after


def _environment_section(results_list: Sequence[Results]) -> str:
    parts = []
    for results in results_list:
        env = results.environment or {}
        model = results.model or {}
        rows = [["model", _e(model.get("name"))], ["model sha256", f"<code>{_e(model.get('sha256'))}</code>"],
                ["model path", f"<code>{_e(model.get('path'))}</code>"], ["created", _e(results.created)],
                ["device", _e(env.get("device"))], ["platform", _e(env.get("platform"))],
                ["python", _e(env.get("python"))], ["threads", _e(env.get("threads"))], ["CPUs", _e(env.get("cpus"))],
                ["tolerances", f"<code>{_e(results.tolerances)}</code>"]]
        rows += [[_e(package), _e(version)] for package, version in (env.get("versions") or {}).items()]
        for entry in (results.extra or {}).get("candidates", []):
            if entry.get("artifact_sha256"):
                rows.append([f"{_e(entry['backend'])}:{_e(entry['dtype'])} artifact",
                             f"<code>{_e(entry['artifact_sha256'])}</code>"])
        parts.append(_table(["", ""], rows))
    return "".join(parts)


def render_html(results_list: Sequence[Results], history: History | None = None, *,
                title: str = "Parity report") -> str:
    summaries = pair_summaries(results_list)
    created = max((r.created for r in results_list), default="")
    models = ", ".join(f"{model_name(r)} ({((r.model or {}).get('sha256') or '?')[:12]})" for r in results_list)
    body = {
        "summary": _summary_section(results_list, summaries),
        "layers": _layers_section(summaries),
        "cache": _cache_section(summaries),
        "transcripts": _transcripts_section(results_list),
        "wer": _wer_section(results_list),
        "degradation": _degradation_section(results_list),
        "timing": _timing_section(results_list),
        "history": _history_section(history),
        "environment": _environment_section(results_list),
    }
    nav = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in SECTIONS)
    sections = "".join(
        (f'<section id="{key}">' + ("" if key == "summary" else f"<h2>{_e(name)}</h2>") + body[key] + "</section>")
        for key, name in SECTIONS)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>'
            f"<h1>{_e(title)}</h1><p class=\"meta\">{_e(models)} · {_e(created)}</p><nav>{nav}</nav>"
            f"{sections}</body></html>")


# -- writing ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path


def load_results(paths: Sequence[str | Path]) -> list[Results]:
    return [Results.load(path) for path in paths]


def write_report(results_list: Sequence[Results], out_dir: str | Path, *, reports_dir: str | Path | None = None,
                 date: str | None = None, title: str | None = None) -> ReportFiles:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; history from ``reports_dir`` before ``date``."""
    if not results_list:
        raise ValueError("no results to report")
    date = date or max(results_date(r) for r in results_list) or _dt.date.today().isoformat()
    title = title or f"Parity report {date}"
    history = build_history(results_list, reports_dir, date) if reports_dir is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "report.md"
    page = out / "report.html"
    markdown.write_text(render_markdown(results_list, history, title=title), encoding="utf-8")
    page.write_text(render_html(results_list, history, title=title), encoding="utf-8")
    return ReportFiles(markdown, page)

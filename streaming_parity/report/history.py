"""History: key metrics per night, earlier nights read back from the reports folder, and regressions.

Every ``reports/<YYYY-MM-DD>/results*.json`` of an earlier night is read, and tonight's key metrics
are compared with the most recent earlier night only.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from streaming_parity.judge.results import Results
from streaming_parity.report.data import REFERENCE_BACKEND, fmt_error, fmt_ratio, pair_summaries, wer_rows

DATE_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")
KEY_METRICS = ("worst_max_abs", "token_agreement", "pass_rate")
METRIC_TITLES = {"worst_max_abs": "worst max_abs (layers, encoder)", "token_agreement": "token agreement",
                 "pass_rate": "comparisons passed", "wer": "WER vs reference text"}
# A night regresses against the previous one when a key metric moves past these margins.
ERROR_GROWTH_FACTOR = 2.0
ERROR_FLOOR = 1e-7  # errors below this are summation noise; growth among them is not a regression
AGREEMENT_DROP = 0.01
WER_RISE = 0.01


def fmt_metric(value: float | None, metric: str) -> str:
    """Errors in scientific notation, rates and agreements as plain ratios."""
    return fmt_error(value) if metric == "worst_max_abs" else fmt_ratio(value)


def key_metrics(results_list: Sequence[Results]) -> dict[str, dict[str, float]]:
    """A night's headline numbers per series (model · pair · dtype), each lookahead folded into its worst."""
    series: dict[str, dict[str, float]] = {}
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    wer_by_run: dict[tuple[str, str, str], float] = {}
    for row in wer_rows(results_list):
        if (row.backend == REFERENCE_BACKEND and row.mode != "plain") or row.decoder != "rnnt":
            continue  # NeMo's own series is its plain-mode streaming (RNNT), night after night
        if row.wer_vs_text is not None:
            run = (row.model, row.backend, row.dtype)
            wer_by_run[run] = max(wer_by_run.get(run, 0.0), row.wer_vs_text)
    for summary in pair_summaries(results_list):
        name = f"{summary.model} · {summary.label}"
        entry = series.setdefault(name, {"worst_max_abs": 0.0, "token_agreement": 1.0})
        errors = [v for v in (summary.worst_layer, summary.worst_encoder) if v is not None]
        entry["worst_max_abs"] = max([entry["worst_max_abs"], *errors])
        if not summary.is_offline and summary.token_agreement is not None:
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
    previous: float | None  # None: the series ran on the previous night and is missing tonight
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

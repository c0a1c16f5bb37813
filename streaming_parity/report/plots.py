"""The report's plots: matplotlib figures as base64 PNG data URIs, so the page needs no network and no side files.

matplotlib is imported only when a plot is drawn (the Markdown summary needs none), with the Agg backend
so that no display is needed.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from streaming_parity.report.data import (
    CACHE_DRIFT_TAPS,
    PairSummary,
    StepGrid,
    TimingRow,
    cache_drift_by_pair,
    context_label,
    layer_grid,
)
from streaming_parity.report.history import KEY_METRICS, METRIC_TITLES, History


@dataclass(frozen=True)
class Figure:
    image: str  # data URI of the PNG
    alt: str


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False, "figure.dpi": 100})
    return plt


def _embedded(figure, alt: str) -> Figure:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(figure)
    return Figure("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), alt)


def _log10_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    return math.log10(max(value, 1e-12))


def heatmap_figure(grid: StepGrid) -> Figure:
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
    return _embedded(figure, f"per-layer max_abs heat map {grid.title}")


def cache_drift_figure(grids: Sequence[StepGrid], model: str, label: str) -> Figure:
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
    figure.suptitle(f"{model} · {label}", x=0.0, ha="left", fontsize=10, fontweight="bold")
    return _embedded(figure, f"cache drift {label}")


def timing_figure(rows: Sequence[TimingRow]) -> Figure:
    plt = _pyplot()
    labels = [f"{r.backend}:{r.dtype} {context_label(r.context)}" for r in rows]
    figure, axis = plt.subplots(figsize=(9.0, 0.8 + 0.24 * len(rows)))
    axis.barh(range(len(rows)), [r.mean_ms for r in rows], color="#3b82f6")
    axis.set_yticks(range(len(rows)), labels)
    axis.invert_yaxis()
    axis.set_xlabel("mean time per chunk (ms)")
    axis.grid(True, axis="x", alpha=0.3)
    return _embedded(figure, "time per chunk")


def history_figure(history: History) -> Figure | None:
    """The key metrics night by night; None when no night has any (every candidate failed to run)."""
    nights = [*history.nights, history.tonight]
    dates = [n.date for n in nights]
    series = sorted({name for n in nights for name in n.metrics})
    metrics = [m for m in (*KEY_METRICS, "wer") if any(m in n.metrics.get(s, {}) for n in nights for s in series)]
    if not metrics:
        return None
    plt = _pyplot()
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
    return _embedded(figure, "key metrics over time")


def layer_figures(summaries: Sequence[PairSummary]) -> list[Figure]:
    """A heat map per candidate pair and lookahead; NeMo's offline check has no per-step layer taps."""
    grids = (layer_grid(s) for s in summaries if not s.is_offline)
    return [heatmap_figure(grid) for grid in grids if grid is not None]


def cache_drift_figures(summaries: Sequence[PairSummary]) -> list[Figure]:
    return [cache_drift_figure(grids, model, label) for (model, label), grids in cache_drift_by_pair(summaries).items()]

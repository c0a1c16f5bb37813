"""``parity demo``: the main job on a fresh clone.

Takes the trained fixture (``trained-streaming``, committed), prepares every registered, available
backend through the registry (MLX conversion, ONNX export in fp32 and int8, ...), streams its own
evaluation subset (20 utterances of the held-out set, sentences within its vocabulary, so the WER
column means something: about 5-8 %) at every lookahead through NeMo and each candidate, prints one
compact table per lookahead (errors, token agreement, WER, the reduced-precision deltas) and writes
the results and the HTML report. Another model streams the generic fixture speech.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from streaming_parity.app.nightly import fp32_failures, run_matrix
from streaming_parity.app.session import held_out_utterances
from streaming_parity.judge.results import Results
from streaming_parity.report import (
    FP32,
    OFFLINE_PAIR,
    REFERENCE_BACKEND,
    context_label,
    fmt_error,
    fmt_percent,
    pair_summaries,
    timing_rows,
    wer_rows,
    write_report,
)

DEMO_MODEL = "trained-streaming"
# The width a table is measured at when nothing bounds it (its content's natural width is far below).
UNBOUNDED_WIDTH = 1 << 14


def demo_tables(results: Results):
    """One rich table per lookahead: per backend, worst error against NeMo, tokens, WER and time per chunk.

    ``layer err``/``encoder err``: worst max_abs over layers and of the encoder output against NeMo
    (NeMo's own row: streaming against offline); ``tokens``: token agreement with NeMo.
    """
    from rich import box
    from rich.table import Table

    summaries = pair_summaries([results])
    wer = {(r.backend, r.dtype, r.context, r.mode): r for r in wer_rows([results])}
    timing = {(r.backend, r.dtype, r.context): r for r in timing_rows([results])}
    contexts = sorted({s.context for s in summaries}, key=lambda c: -c[1])
    tables = []
    for context in contexts:
        table = Table(title=f"lookahead {context_label(context)}", title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        for column in ("backend", "first chunk", "layer err", "encoder err", "tokens", "WER", "WER/NeMo",
                       "ms/chunk", "result"):
            table.add_column(column, justify="left" if column in ("backend", "first chunk", "result") else "right",
                             no_wrap=True)
        for summary in (s for s in summaries if s.context == context):
            offline = summary.pair == OFFLINE_PAIR
            backend, dtype = (REFERENCE_BACKEND, FP32) if offline else (summary.candidate, summary.dtype)
            mode = "plain" if offline or summary.mode in ("", "offline") else summary.mode
            wer_row = wer.get((backend, dtype, context, mode))
            time_row = timing.get((backend, dtype, context))
            result = ("[green]pass[/]" if summary.passed
                      else "[red]FAIL[/]" if summary.is_fp32 else "[yellow]degraded[/]")
            table.add_row(
                "nemo (vs offline)" if offline else f"{backend}:{dtype}", mode, fmt_error(summary.worst_layer),
                fmt_error(summary.worst_encoder), "n/a" if offline else fmt_percent(summary.token_agreement),
                fmt_percent(wer_row.wer_vs_text if wer_row else None),
                "n/a" if offline else fmt_percent(wer_row.wer_vs_nemo if wer_row else None),
                f"{time_row.mean_ms:.1f}" if time_row else "–", result)
        # NeMo in each other first-chunk mode its candidates streamed in: their WER's baseline.
        for row in (r for r in wer.values() if r.backend == REFERENCE_BACKEND and r.context == context
                    and r.mode != "plain"):
            table.add_row("nemo", row.mode, "–", "–", "n/a", fmt_percent(row.wer_vs_text), "n/a", "–", "")
        tables.append(table)
    return tables


def print_tables(console, tables) -> None:
    """Each table whole: a console that is not a terminal (a file, a CI log) is widened to the widest
    table's content, since there no reader can widen a window and rich would cut the columns that do not
    fit (the result column first: "degraded" printed as "degrad…")."""
    from rich.measure import Measurement

    if not console.is_terminal and tables:
        unbounded = console.options.update(width=UNBOUNDED_WIDTH, max_width=UNBOUNDED_WIDTH)
        widest = max(Measurement.get(console, unbounded, table).maximum for table in tables)
        console.width = max(console.width, widest)
    for table in tables:
        console.print(table)


def run_demo(out_dir: Path = Path("reports"), model: str = DEMO_MODEL, *, utterances: int | None = None,
             att_contexts: Sequence[Sequence[int]] | None = None, backends: Sequence[str] | None = None,
             console=None) -> int:
    from rich.console import Console

    console = console or Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 110)  # logs and CI: no wrapping of the table or the report path
    started = time.perf_counter()
    # The trained model's WER means something only on sentences within its vocabulary.
    chosen = held_out_utterances(utterances) if model == DEMO_MODEL else None
    [results] = run_matrix([model], backends=backends, att_contexts=att_contexts, utterance_limit=utterances,
                           utterances=chosen, console=console, title=f"parity demo ({model})")
    for record in results.extra.get("candidates", []):
        if record["status"] == "ok":
            console.print(f"prepared {record['backend']}:{record['dtype']} in {record.get('prepare_seconds', 0):.1f} s: "
                          f"{record.get('artifact')}")
    print_tables(console, demo_tables(results))
    demo_dir = Path(out_dir) / "demo"
    results_path = results.save(demo_dir / "results.json")
    report = write_report([results], demo_dir, title=f"Parity demo ({model})")
    failures = fp32_failures([results])
    for line in failures:
        console.print(f"[red]FAIL[/] {line}")
    console.print(f"results: {results_path}")
    console.print(f"report:  {report.html.resolve()}  ({time.perf_counter() - started:.0f} s)")
    return 1 if failures else 0

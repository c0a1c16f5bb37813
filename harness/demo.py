"""``parity demo``: the main job on a fresh clone.

Builds ``tiny-streaming``, streams every fixture utterance at every lookahead through every
available backend, and prints the parity table and the transcripts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness.parity import compare_backends, fixture_utterances
from harness.tolerances import Tolerances


def run_demo(out_dir: Path = Path("reports"), model: str = "tiny-streaming") -> int:
    from rich.console import Console
    from rich.table import Table

    from backends import get
    from fixtures.models import build
    from harness.cli import print_comparisons

    out = Console(highlight=False)
    started = time.perf_counter()
    nemo_path = build(model, progress=lambda m: print(m, file=sys.stderr))
    reference = get("nemo").load(nemo_path)
    utterances = fixture_utterances()
    contexts = list(reference.info.att_context_sizes)
    out.print(f"[bold]{model}[/]: {len(utterances)} utterances x {len(contexts)} lookaheads")
    report = compare_backends(reference, [], utterances, contexts, Tolerances.load(), model_path=nemo_path,
                              progress=lambda m: print(f"  {m}", file=sys.stderr))
    print_comparisons(report, out)

    table = Table(title="transcripts (NeMo streaming, random-weight fixture: gibberish by design)")
    for column in ("utterance", "context", "reference", "hypothesis"):
        table.add_column(column, overflow="fold")
    for row in report.results.transcripts:
        context = row["att_context_size"]
        table.add_row(row["utterance"], f"{context[0]},{context[1]}", row["reference_text"] or "", row["text"][:60])
    out.print(table)

    path = report.results.save(Path(out_dir) / "demo" / "results.json")
    failed = [c for c in report.results.comparisons if not c.passed]
    for comparison in failed:
        out.print(f"[red]FAIL[/] {comparison.describe_failure()}")
    out.print(f"results: {path}  ({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0

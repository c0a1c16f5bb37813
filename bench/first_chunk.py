"""What the first chunk costs: WER and latency in NeMo's plain mode beside pad-and-drop, per backend and lookahead.

    python bench/first_chunk.py                              # trained-streaming, all test utterances, nemo/onnx/mlx
    python bench/first_chunk.py --subset --backends onnx:float32,onnx:int8
    python bench/first_chunk.py --json out.json

NeMo's default streaming gives the first chunk its own size and keeps every pre-encoded frame (plain);
pad-and-drop pads it with the pre-encode cache's zeros and drops the extra frames, so every chunk has
one shape, which is what every peer ONNX export bakes in. This runs the parity matrix
(``streaming_parity.app.nightly.run_matrix``) on the trained fixture in both modes for every candidate and
prints, per lookahead, each backend's WER against the reference texts in each mode, and the time of
the first chunk beside the median of the later ones (ms; ``StepOutput.seconds``: encoder step and
greedy decoding, measured inside the backend). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from streaming_parity.core.system.threads import limit_threads  # noqa: E402

MODEL = "trained-streaming"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="onnx:float32,onnx:int8,mlx:float32",
                        help="candidates, NAME or NAME:DTYPE, comma-separated (default onnx fp32 and int8, mlx fp32)")
    parser.add_argument("--subset", action="store_true",
                        help="the demo's 20-utterance subset instead of every test utterance of the fixture")
    parser.add_argument("--att-context", action="append", default=None, metavar="L,R", help="lookahead(s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser.parse_args(argv)


def utterances(subset: bool):
    from streaming_parity.app.session import held_out_utterances
    from streaming_parity.fixtures.trained.evaluate import test_entries
    from streaming_parity.interface.utterance import Utterance

    if subset:
        return held_out_utterances()
    return [Utterance.from_file(e["audio_filepath"], e["text"]) for e in test_entries()]


def figures(results) -> dict:
    from streaming_parity.report import wer_rows

    wer = {}
    for row in wer_rows([results]):
        if row.decoder == "rnnt":
            wer[f"{row.backend}:{row.dtype} [{row.context[0]},{row.context[1]}] {row.mode}"] = row.wer_vs_text
    first, later = defaultdict(list), defaultdict(list)
    for row in results.timings:
        key = f"{row['backend']}:{row['dtype']} [{row['att_context_size'][0]},{row['att_context_size'][1]}] {row['mode']}"
        if row["step_seconds"]:
            first[key].append(1e3 * row["step_seconds"][0])
            later[key].extend(1e3 * s for s in row["step_seconds"][1:])
    latency = {key: {"first_ms": statistics.median(first[key]),
                     "later_ms": statistics.median(later[key]) if later[key] else None} for key in first}
    return {"wer": wer, "latency": latency}


def print_table(found: dict, contexts) -> None:
    rows = sorted({key.split(" [")[0] for key in found["wer"]}, key=lambda name: (not name.startswith("nemo"), name))
    for context in contexts:
        tag = f"[{context[0]},{context[1]}]"
        print(f"\nlookahead {tag}: WER plain / pad-and-drop; first chunk ms / later chunks ms (median), each mode")
        for name in rows:
            cells = []
            for mode in ("plain", "pad-and-drop"):
                key = f"{name} {tag} {mode}"
                wer = found["wer"].get(key)
                cells.append("  n/a " if wer is None else f"{100 * wer:5.1f}%")
            timing = []
            for mode in ("plain", "pad-and-drop"):
                t = found["latency"].get(f"{name} {tag} {mode}")
                timing.append("n/a" if t is None else f"{t['first_ms']:.1f} / {t['later_ms'] or float('nan'):.1f}")
            print(f"  {name:<16} WER {cells[0]} / {cells[1]}    ms plain {timing[0]:<14} pad-and-drop {timing[1]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_threads(args.threads)
    from streaming_parity.app.nightly import run_matrix

    chosen = utterances(args.subset)
    contexts = [tuple(int(v) for v in c.split(",")) for c in args.att_context] if args.att_context else None
    [results] = run_matrix([MODEL], backends=args.backends.split(","), att_contexts=contexts, utterances=chosen,
                           title=f"first chunk ({len(chosen)} utterances)")
    found = figures(results)
    contexts = sorted({tuple(c["att_context_size"]) for c in results.transcripts}, key=lambda c: -c[1])
    print(f"{MODEL}: {len(chosen)} utterances")
    print_table(found, contexts)
    if args.json:
        Path(args.json).write_text(json.dumps({"utterances": len(chosen), **found}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often do correct float32 conversions take another greedy decision at a near-tie?

Streams each model's utterances through NeMo and every fp32 candidate (teacher-forced where the
free-running decisions differ, ``streaming_parity.judge.ties``) and counts, per model and pair, the joint
calls where the candidate chose differently: near-ties (within the tolerance file's bound) and real
flips. Prints a table and writes JSON.

    python bench/near_ties.py [--models tiny-streaming,trained-streaming] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_parity.app.session import fixture_utterances  # noqa: E402
from streaming_parity.core.system.threads import limit_threads  # noqa: E402
from streaming_parity.fixtures.models import build  # noqa: E402
from streaming_parity.interface.registry import REFERENCE, get  # noqa: E402
from streaming_parity.judge.loop import Candidate, stream_and_compare  # noqa: E402
from streaming_parity.judge.tolerances import Tolerances  # noqa: E402

FP32_CANDIDATES = ("onnx", "mlx")


def utterances_for(model: str):
    # The trained model is judged on its whole held-out set; the random fixtures on the fixture speech.
    if model == "trained-streaming":
        from streaming_parity.fixtures.trained.evaluate import test_entries
        from streaming_parity.interface.utterance import Utterance

        return [Utterance.from_file(e["audio_filepath"], e["text"]) for e in test_entries()]
    return fixture_utterances()


def count(model: str, work_dir: Path, tolerances: Tolerances) -> dict:
    nemo_path = build(model, progress=lambda _m: None)
    utterances = utterances_for(model)
    reference = get(REFERENCE).load(nemo_path)
    candidates = []
    for name in FP32_CANDIDATES:
        entry = get(name)
        if not entry.available():
            continue
        source = entry.prepare(nemo_path, work_dir, dtype="float32")
        candidates.append(Candidate(label=f"{name}:float32", capabilities=entry.capabilities,
                                    open=lambda entry=entry, source=source: entry.load(source, dtype="float32",
                                                                                        nemo_path=nemo_path)))
    started = time.perf_counter()
    outcome = stream_and_compare(reference, candidates, utterances, reference.info.att_context_sizes, tolerances,
                                 include_offline=False)
    per_pair: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for comparison in outcome.results.comparisons:
        tally = per_pair[comparison.pair]
        tally["comparisons"] += 1
        tally["joint calls"] += sum(t.reference_shape[0] for t in comparison.taps
                                    if t.tap == "joint" and t.reference_shape)
        tally["teacher-forced"] += int(comparison.teacher_forced)
        tally["near-ties"] += len(comparison.near_ties)
        tally["real flips"] += sum(not f.near_tie for f in comparison.flips)
        tally["failed"] += int(not comparison.passed)
    return {"model": model, "utterances": len(utterances), "lookaheads": [list(c) for c in reference.info.att_context_sizes],
            "seconds": round(time.perf_counter() - started, 1),
            "pairs": {pair: dict(tally) for pair, tally in per_pair.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-streaming,tiny-multitalker,unseen-4x96,trained-streaming")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/artifacts"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    tolerances = Tolerances.load()
    rows = []
    for model in args.models.split(","):
        row = count(model, args.work_dir, tolerances)
        rows.append(row)
        for pair, tally in row["pairs"].items():
            print(f"{model:20s} {pair:10s} {row['utterances']:4d} utt  " + "  ".join(f"{k} {v}" for k, v in tally.items()),
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

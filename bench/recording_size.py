"""What a reference recording costs: its size on disk and the time to record it, per lookahead.

    python bench/recording_size.py                                   # tiny-streaming, the fixture speech
    python bench/recording_size.py --model full-0.6b --seconds 60 --plan night

The recording (``streaming_parity.judge.recording``) holds every tap, both caches (as the frames that
entered) and the decoder state at every step, and offline forwards. ``--plan everything`` (the default of
``parity record``): plain and pad-and-drop at every lookahead, the offline forward over both lengths at
every lookahead. ``--plan night``: what a full-size night compares (``parity nightly``'s single reference
pass, the plan its cached recording holds): pad-and-drop at every lookahead, plain and the offline forward
(over the streamed tensor) at the lookahead with the most frames per step only. One recording is written
per lookahead, so that each line is that lookahead's share; the total is their sum. Nothing is asserted;
the figures go to the notes (the budget is 1 GB for 60 s of speech at all four lookaheads at full size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-streaming", help="a fixture name or a .nemo path")
    parser.add_argument("--seconds", type=float, default=None,
                        help="the fixture speech joined into one stream of this length (default: the utterances)")
    parser.add_argument("--att-context", action="append", default=None, metavar="L,R", help="lookahead(s)")
    parser.add_argument("--plan", choices=("everything", "night"), default="everything",
                        help="what is recorded (see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.app.source_provenance import record_reference
    from streaming_parity.core.system.memory import peak_rss_mb
    from streaming_parity.core.system.threads import limit_threads
    from streaming_parity.fixtures.models import build
    from streaming_parity.interface.chunking import parse_att_context
    from streaming_parity.interface.registry import REFERENCE, get
    from streaming_parity.interface.utterance import long_utterance
    from streaming_parity.judge.recording import Recording

    if args.threads:
        limit_threads(args.threads)
    nemo_path = Path(args.model) if args.model.endswith(".nemo") else build(args.model, progress=print)
    utterances = fixture_utterances()
    if args.seconds:
        utterances = [long_utterance(utterances, args.seconds)]
    reference = get(REFERENCE).load(nemo_path)
    contexts = [parse_att_context(c) for c in args.att_context] if args.att_context else list(
        reference.info.att_context_sizes)
    audio_seconds = sum(len(u.audio) for u in utterances) / 16000
    print(f"{nemo_path.name}: {len(utterances)} utterance(s), {audio_seconds:.1f} s of audio")
    rows = []
    with tempfile.TemporaryDirectory(prefix="recording-size-") as scratch:
        for context in contexts:
            out = Path(scratch) / f"{context[0]}_{context[1]}"
            started = time.perf_counter()
            if args.plan == "night":
                widest = max(contexts, key=lambda c: c[1])
                options = {"modes": ["plain", "pad-and-drop"] if context == widest else ["pad-and-drop"],
                           "offline": context == widest, "offline_lengths": ["tensor"]}
            else:
                options = {}
            record_reference(reference, nemo_path, utterances, [context], out, **options)
            seconds = time.perf_counter() - started
            recording = Recording(out)
            by_kind: dict[str, int] = {}
            for name, shard in recording.manifest["shards"].items():
                kind = name.split("-")[0].split(".")[0]
                by_kind[kind] = by_kind.get(kind, 0) + shard["bytes"]
            steps = sum(len(run["steps"]) for run in recording.manifest["runs"])
            whole = sum(1 for run in recording.manifest["runs"] for step in run["steps"]
                        if step["cache_shift"].get("cache_last_channel") is None)
            row = {"att_context_size": list(context), "bytes": recording.size_bytes(), "seconds": round(seconds, 1),
                   "steps": steps, "caches_stored_whole": whole, "by_kind": by_kind}
            rows.append(row)
            modes = " + ".join(recording.manifest["plan"]["modes"])
            print(f"[{context[0]},{context[1]}] {row['bytes'] / 1e6:8.1f} MB in {seconds:6.1f} s; {steps} steps "
                  f"({modes}), {whole} with the channel cache whole; "
                  + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in by_kind.items()))
            shutil.rmtree(out)
    total = sum(r["bytes"] for r in rows)
    print(f"total {total / 1e6:.1f} MB, {sum(r['seconds'] for r in rows):.1f} s; peak RSS {peak_rss_mb():.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"model": nemo_path.name, "audio_seconds": audio_seconds, "rows": rows,
                                         "plan": args.plan, "total_bytes": total, "peak_rss_mb": peak_rss_mb()}, indent=1) + "\n")
    reference.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

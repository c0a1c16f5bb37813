"""Streaming speed, side by side: time per chunk (median, p95) and real-time factor per lookahead.

    python bench/benchmark.py                               # tiny-streaming: nemo, onnx fp32, onnx int8
    python bench/benchmark.py --backends nemo,onnx,mlx      # any registered backend, by name
    python bench/benchmark.py --full                        # full-0.6b (builds a 2.5 GB .nemo; ~10 GB RAM to export)

A backend is named as ``NAME`` or ``NAME:DTYPE`` (``onnx:int8``); each is prepared through the
registry (``backends.get(NAME).prepare``, cached under ``--work-dir``) and loaded one at a time, so
peak memory is one model. Every backend streams the same utterances through the same chunk
schedule (``--mode``, pad-and-drop by default: the only mode the ONNX graphs run). The time of
a chunk is ``StepOutput.seconds``: encoder step plus greedy decoding of that chunk. RTF is compute
time over audio duration. A warm-up utterance is streamed first and not counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SAMPLE_RATE = 16000
# Backend-specific load options for timing runs (the ONNX debug graphs carry extra tap outputs).
LOAD_OPTIONS = {"onnx": {"taps": False}}


@dataclass
class Timing:
    step_seconds: list[float] = field(default_factory=list)
    audio_seconds: float = 0.0

    def summary(self) -> tuple[float, float, float]:
        steps = np.asarray(self.step_seconds)
        return (float(np.median(steps)) * 1e3, float(np.percentile(steps, 95)) * 1e3,
                float(steps.sum()) / self.audio_seconds)


def parse_backends(text: str) -> list[tuple[str, str]]:
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, dtype = item.partition(":")
        specs.append((name, dtype or "float32"))
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="nemo,onnx,onnx:int8", help="NAME[:DTYPE],... (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="benchmark full-0.6b instead of tiny-streaming")
    parser.add_argument("--model", type=Path, help="a .nemo to benchmark instead of a fixture")
    parser.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all")
    parser.add_argument("--utterances", type=int, default=10, help="fixture utterances to stream (default: 10)")
    parser.add_argument("--mode", choices=("pad-and-drop", "plain"), default="pad-and-drop",
                        help="first-chunk mode (default: %(default)s, the one ONNX graphs bake in)")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "bench", help="prepared artifacts")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from backends import get
    from harness.chunking import FirstChunkMode, parse_att_context
    from harness.compare import stream
    from harness.parity import fixture_utterances

    console = Console(highlight=False)
    if args.model:
        nemo_path = args.model
    else:
        from fixtures.models import build

        nemo_path = build("full-0.6b" if args.full else "tiny-streaming",
                          progress=lambda m: console.print(f"[dim]{m}[/]"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    specs = parse_backends(args.backends)
    utterances = fixture_utterances()[: args.utterances]
    audio_seconds = sum(len(u.audio) for u in utterances) / SAMPLE_RATE

    # Lookaheads named on the command line are the only ones prepared (a full-size ONNX export per
    # lookahead costs minutes); otherwise every lookahead of the model.
    chosen_contexts = [parse_att_context(c) for c in args.att_context] if args.att_context else None

    def load_one(spec):
        name, dtype = spec
        entry = get(name)
        missing = entry.missing_requirements()
        if missing:
            raise SystemExit(f"backend {name}: missing {', '.join(missing)}")
        started = time.perf_counter()
        source = entry.prepare(nemo_path, args.work_dir, dtype=dtype, att_context_sizes=chosen_contexts)
        prepared = time.perf_counter() - started
        backend = entry.load(source, dtype=dtype, **LOAD_OPTIONS.get(name, {}))
        console.print(f"[dim]{name}:{dtype} prepared in {prepared:.1f} s, loaded in "
                      f"{time.perf_counter() - started - prepared:.1f} s[/]")
        return backend

    mode = FirstChunkMode(args.mode)
    # The first backend's front end cuts the mel once; every backend gets identical chunks.
    first = load_one(specs[0])
    mels = [first.features(u.audio[None])[0] for u in utterances]
    contexts = chosen_contexts or list(first.info.att_context_sizes)
    first.close()
    del first
    console.print(f"model {Path(nemo_path).name}, {len(utterances)} utterances ({audio_seconds:.1f} s audio), "
                  f"first-chunk mode {mode.value}")

    timings: dict[tuple[str, tuple[int, int]], Timing] = {}
    for spec in specs:  # one backend in memory at a time
        backend = load_one(spec)
        label = f"{spec[0]}:{spec[1]}" if spec[1] != "float32" else spec[0]
        if mode.value not in backend.first_chunk_modes:
            raise SystemExit(f"{label} runs {'/'.join(backend.first_chunk_modes)}, not {mode.value} (see --mode)")
        for context in contexts:
            stream(backend, mels[0], context, mode, dtype=spec[1])  # warm-up
            timing = Timing(audio_seconds=audio_seconds)
            for mel in mels:
                timing.step_seconds += stream(backend, mel, context, mode, dtype=spec[1]).step_seconds
            timings[(label, tuple(context))] = timing
        backend.close()
        del backend

    labels = list(dict.fromkeys(label for label, _ in timings))
    table = Table(title=f"streaming speed per chunk ({Path(nemo_path).name}, {mode.value})")
    for column in ("lookahead", "backend", "chunks", "median ms", "p95 ms", "RTF"):
        table.add_column(column, justify="left" if column in ("lookahead", "backend") else "right")
    for context in contexts:
        for label in labels:
            timing = timings[(label, tuple(context))]
            median, p95, rtf = timing.summary()
            table.add_row(f"[{context[0]},{context[1]}]", label, str(len(timing.step_seconds)),
                          f"{median:.2f}", f"{p95:.2f}", f"{rtf:.4f}")
        table.add_section()
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

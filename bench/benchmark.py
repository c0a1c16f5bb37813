"""Streaming speed and memory, side by side: per chunk latency (median, p95), RTF and peak RSS.

    python bench/benchmark.py                                  # tiny-streaming: nemo, onnx fp32, onnx int8
    python bench/benchmark.py --backends nemo,onnx,mlx         # any registered backend, by name
    python bench/benchmark.py --full --att-context 70,13 --audio-seconds 60 --backends nemo,onnx,onnx:int8,mlx
                                                               # full-0.6b (2.5 GB .nemo; ~10 GB RAM to export)

A backend is named as ``NAME`` or ``NAME:DTYPE`` (``onnx:int8``). Each one is handled in two fresh
processes, so that its figures are its own: the first prepares it through the registry
(``backends.get(NAME).prepare``: export or conversion, cached under ``--work-dir``) and reports the
time and peak RSS of that; the second loads it, streams one warm-up pass, then ``--repeat`` timed
passes over the same audio through the same chunk schedule (``--mode``, pad-and-drop by default:
the only mode the ONNX graphs run), and reports its peak RSS.

The time of a chunk is ``StepOutput.seconds``: the encoder step plus greedy decoding of that chunk,
measured inside the backend. RTF is compute time over audio duration, the median over repetitions;
latencies are pooled over repetitions. Nothing here asserts a time: it prints a table and writes
JSON (``--json``) with the machine, thread count and library versions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from streaming_parity.core.system.threads import limit_threads  # noqa: E402

SAMPLE_RATE = 16000


def parse_backends(text: str) -> list[tuple[str, str]]:
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, dtype = item.partition(":")
        specs.append((name, dtype or "float32"))
    return specs


def label_of(spec: tuple[str, str]) -> str:
    return spec[0] if spec[1] == "float32" else f"{spec[0]}:{spec[1]}"


def _limit_threads(threads: int) -> None:
    """In a fresh process, before the frameworks start their pools."""
    try:
        import torch  # noqa: F401  (imported first so that limit_threads sizes its pool)
    except ImportError:
        pass
    limit_threads(threads)


def prepare_one(spec, nemo_path: str, work_dir: str, contexts, threads: int) -> dict:
    """Child process: export/convert one backend; time and peak memory of that alone."""
    _limit_threads(threads)
    from streaming_parity.core.system.memory import peak_rss_mb
    from streaming_parity.interface.registry import get

    started = time.perf_counter()
    source = get(spec[0]).prepare(Path(nemo_path), Path(work_dir), dtype=spec[1], att_context_sizes=contexts)
    return {"source": str(source), "prepare_seconds": round(time.perf_counter() - started, 2),
            "prepare_peak_rss_mb": round(peak_rss_mb(), 1)}


def time_one(spec, source: str, mels, contexts, mode: str, repeat: int, threads: int, audio_seconds: float) -> dict:
    """Child process: load one backend, warm it up, then time ``repeat`` passes per lookahead."""
    _limit_threads(threads)
    from streaming_parity.core.system.memory import peak_rss_mb
    from streaming_parity.interface.driver import stream
    from streaming_parity.interface.registry import get

    options = {"taps": False, "threads": threads} if spec[0] == "onnx" else (
        {"taps": False} if spec[0] == "mlx" else {})
    started = time.perf_counter()
    backend = get(spec[0]).load(Path(source), dtype=spec[1], **options)
    load_seconds = time.perf_counter() - started
    if mode not in backend.first_chunk_modes:
        raise SystemExit(f"{label_of(spec)} runs {'/'.join(backend.first_chunk_modes)}, not {mode} (see --mode)")
    rows = []
    for context in contexts:
        stream(backend, mels[0], context, mode)  # warm-up, not counted
        latencies, rtfs, labels = [], [], 0
        for _ in range(repeat):
            runs = [stream(backend, mel, context, mode) for mel in mels]
            seconds = [s for run in runs for s in run.step_seconds]
            labels = sum(len(run.tokens) for run in runs)
            latencies += seconds
            rtfs.append(sum(seconds) / audio_seconds)
        steps = np.asarray(latencies)
        rows.append({"att_context_size": list(context), "chunks_per_pass": len(latencies) // repeat,
                     "median_ms": round(float(np.median(steps)) * 1e3, 3),
                     "p95_ms": round(float(np.percentile(steps, 95)) * 1e3, 3),
                     "max_ms": round(float(steps.max()) * 1e3, 3),
                     "rtf": round(float(np.median(rtfs)), 4), "rtf_per_repeat": [round(r, 4) for r in rtfs],
                     # Greedy decoding runs once per label: a model that emits nothing is timed without it.
                     "labels_per_second": round(labels / audio_seconds, 2)})
    backend.close()
    return {"load_seconds": round(load_seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1), "lookaheads": rows}


def overhead_one(specs, nemo_path: str, sources: dict, utterances, contexts, threads: int) -> dict:
    """Child process: one ``parity compare`` run (taps, comparison, recording) through the loop; each
    backend's own compute (the sum of its ``StepOutput.seconds``) against the wall time of the run."""
    _limit_threads(threads)
    from streaming_parity.app.session import compare_backends
    from streaming_parity.interface.registry import get
    from streaming_parity.judge.tolerances import Tolerances

    reference = get("nemo").load(Path(nemo_path))
    candidates = [get(name).load(Path(sources[f"{name}:{dtype}"]), dtype=dtype, nemo_path=Path(nemo_path))
                  for name, dtype in specs if name != "nemo"]
    started = time.perf_counter()
    outcome = compare_backends(reference, candidates, utterances, contexts, Tolerances.load(),
                               include_offline=False)
    wall = time.perf_counter() - started
    # Every run each backend streamed, the teacher-forced reruns the judge asked for included: the backend computes
    # them (they are not the judge's own cost, but the judge asks for them, so they are shown apart too); and each
    # backend's front end over every utterance (the candidate's own mel is its work, not the judge's).
    compute = {label.removesuffix(":float32"): seconds for label, seconds in outcome.backend_seconds.items()}
    frontend = {label.removesuffix(":float32"): seconds for label, seconds in outcome.frontend_seconds.items()}
    free: dict[str, float] = dict(frontend)  # what is not a rerun: the front end and the free runs' steps
    for row in outcome.results.timings:
        label = row["backend"] if row["dtype"] == "float32" else f"{row['backend']}:{row['dtype']}"
        free[label] = free.get(label, 0.0) + sum(row["step_seconds"])
    forced = {label: round(compute[label] - free.get(label, 0.0), 2) for label in compute
              if compute[label] - free.get(label, 0.0) > 0.005}
    backends = sum(compute.values())
    # Per phase (the reference's, each candidate's): its wall time, opening excluded, against what the backend
    # computed in it; the judge of a candidate runs beside it, so a phase's harness share is what it adds.
    phases = {label.removesuffix(":float32"): {
        "wall_seconds": round(seconds, 2), "backend_seconds": round(outcome.backend_seconds.get(label, 0.0), 2),
        "harness_share": round(1 - outcome.backend_seconds.get(label, 0.0) / seconds, 4) if seconds else None}
        for label, seconds in outcome.phase_seconds.items()}
    return {"wall_seconds": round(wall, 2), "backend_seconds": {k: round(v, 2) for k, v in compute.items()},
            "frontend_seconds": {k: round(v, 2) for k, v in frontend.items()},
            "phases": phases,
            "teacher_forced_seconds": forced,
            "harness_seconds": round(wall - backends, 2), "harness_share": round((wall - backends) / wall, 4),
            "comparisons": len(outcome.results.comparisons)}


def overhead_groups(specs) -> dict[str, list]:
    """The compare runs ``--overhead`` times: the reference against each candidate backend, all its dtypes in one
    run (ONNX fp32 + int8 together, MLX fp32 alone), as a nightly judges them; keyed by their labels."""
    reference = [spec for spec in specs if spec[0] == "nemo"]
    groups: dict[str, list] = {}
    for spec in specs:
        if spec[0] != "nemo":
            groups.setdefault(spec[0], []).append(spec)
    return {",".join(label_of(spec) for spec in members): reference + members for members in groups.values()}


def overhead_runs(figures: dict) -> dict[str, dict]:
    """``figures``' overhead runs by group; a file of the earlier format (one run of every backend) as one group."""
    overhead = figures.get("overhead") or {}
    if "runs" in overhead:
        return overhead["runs"]
    if "harness_share" in overhead:
        return {",".join(k for k in overhead.get("backend_seconds", {}) if k != "nemo"): overhead}
    return {}


REGRESSION = 1.25  # a figure more than 25 % worse than the previous run on the same machine and threads


def previous_figures(history: Path, figures: dict) -> tuple[Path, dict] | None:
    """The latest earlier benchmark of the same model, machine, thread count and mode in ``history``."""
    same = []
    for path in sorted(history.rglob("bench-*.json")):
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (old.get("model", {}).get("name") == figures["model"]["name"] and old.get("machine") == figures["machine"]
                and old.get("threads") == figures["threads"] and old.get("mode") == figures["mode"]
                and old.get("created", "") < figures["created"]):
            same.append((old["created"], path, old))
    return (same[-1][1], same[-1][2]) if same else None


def regressions(previous: dict, figures: dict) -> list[str]:
    """Every RTF, latency, peak RSS (and peak over the weights), preparation figure and harness share (of the run
    and of each phase) more than 25 % worse than ``previous``."""
    figures_compared: list[tuple[str, float | None, float | None]] = []  # (name, previous value, this value)
    before = {entry["label"]: entry for entry in previous.get("backends", [])}
    for entry in figures["backends"]:
        old = before.get(entry["label"])
        if old is None:
            continue
        figures_compared += [(f"{entry['label']} {key}", old.get(key), entry.get(key))
                             for key in ("peak_rss_mb", "peak_over_weights", "prepare_seconds", "prepare_peak_rss_mb")]
        old_rows = {tuple(r["att_context_size"]): r for r in old.get("lookaheads", [])}
        for row in entry["lookaheads"]:
            old_row = old_rows.get(tuple(row["att_context_size"]))
            if old_row:
                context = "[{},{}]".format(*row["att_context_size"])
                figures_compared += [(f"{entry['label']} {context} {key}", old_row.get(key), row.get(key))
                                     for key in ("rtf", "median_ms", "p95_ms")]
    old_runs = overhead_runs(previous)
    for group, overhead in overhead_runs(figures).items():
        old_overhead = old_runs.get(group) or {}
        figures_compared.append((f"harness share against {group}", old_overhead.get("harness_share"),
                                 overhead.get("harness_share")))
        figures_compared += [(f"{group}: {label} phase harness share",
                              (old_overhead.get("phases") or {}).get(label, {}).get("harness_share"),
                              phase.get("harness_share")) for label, phase in (overhead.get("phases") or {}).items()]
    return [f"{name}: {old_value:g} -> {value:g} (+{(value / old_value - 1) * 100:.0f} %)"
            for name, old_value, value in figures_compared
            if old_value and value is not None and value > REGRESSION * old_value]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="nemo,onnx,onnx:int8", help="NAME[:DTYPE],... (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="benchmark full-0.6b instead of tiny-streaming")
    parser.add_argument("--model", type=Path, help="a .nemo to benchmark instead of a fixture")
    parser.add_argument("--att-context", action="append", metavar="L,R",
                        help="lookahead(s); default: all (only these are prepared)")
    parser.add_argument("--utterances", type=int, default=10, help="fixture utterances to stream (default: 10)")
    parser.add_argument("--audio-seconds", type=float, metavar="S",
                        help="stream the fixture speech joined into one utterance of at least S seconds")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per lookahead (default: 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads per framework (default: all cores, %(default)s)")
    parser.add_argument("--mode", choices=("pad-and-drop", "plain"), default="pad-and-drop",
                        help="first-chunk mode (default: %(default)s, the one ONNX graphs bake in)")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "bench", help="prepared artifacts")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the figures as JSON (default: "
                        "reports/bench/bench-<model>-<UTC time>.json)")
    parser.add_argument("--overhead", action="store_true",
                        help="also time compare runs, the reference against each candidate backend (all its dtypes "
                             "in one run): each backend's compute against the harness's share")
    parser.add_argument("--history", type=Path, metavar="DIR", default=REPO / "reports" / "bench",
                        help="earlier benchmark JSON; figures >25%% worse than the last comparable run are flagged "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    from rich.console import Console
    from rich.table import Table

    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.interface.chunking import parse_att_context
    from streaming_parity.interface.registry import get
    from streaming_parity.interface.utterance import long_utterance
    from streaming_parity.judge.results import environment

    limit_threads(args.threads)  # inherited by the spawned processes
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    if args.model:
        nemo_path = args.model
    else:
        from streaming_parity.fixtures.models import build

        nemo_path = build("full-0.6b" if args.full else "tiny-streaming",
                          progress=lambda m: console.print(f"[dim]{m}[/]"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    specs = parse_backends(args.backends)
    for name, dtype in specs:
        entry = get(name)
        if entry.missing_requirements():
            raise SystemExit(f"backend {name}: missing {', '.join(entry.missing_requirements())}")
        if dtype not in entry.dtypes:
            raise SystemExit(f"backend {name} runs {', '.join(entry.dtypes)}, not {dtype}")
    utterances = fixture_utterances()[: args.utterances]
    if args.audio_seconds:
        utterances = [long_utterance(utterances, args.audio_seconds)]
    audio_seconds = sum(len(u.audio) for u in utterances) / SAMPLE_RATE
    contexts = [parse_att_context(c) for c in args.att_context] if args.att_context else None

    spawn = multiprocessing.get_context("spawn")
    figures = {"created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
               "model": {"path": str(nemo_path), "name": Path(nemo_path).stem,
                         "bytes": Path(nemo_path).stat().st_size},
               "machine": machine(), "threads": args.threads, "versions": environment()["versions"],
               "mode": args.mode, "repeat": args.repeat, "audio_seconds": round(audio_seconds, 3),
               "utterances": [u.name for u in utterances], "backends": []}
    mels = None
    for spec in specs:  # one backend at a time, each in fresh processes
        label = label_of(spec)
        console.print(f"[bold]{label}[/]: preparing")
        with spawn.Pool(1) as pool:
            prepared = pool.apply(prepare_one, (spec, str(nemo_path), str(args.work_dir),
                                                [list(c) for c in contexts] if contexts else None, args.threads))
        if mels is None:  # the reference front end cuts the mel once; every backend gets identical chunks
            reference = get("nemo").load(Path(nemo_path)) if get("nemo").available() else None
            frontend = reference or get(spec[0]).load(Path(prepared["source"]), dtype=spec[1])
            mels = [frontend.features(u.audio[None])[0] for u in utterances]
            contexts = contexts or list(frontend.info.att_context_sizes)
            frontend.close()
            del reference, frontend
        console.print(f"[bold]{label}[/]: prepared in {prepared['prepare_seconds']:.1f} s "
                      f"(peak RSS {prepared['prepare_peak_rss_mb']:.0f} MB); timing {len(contexts)} lookahead(s) "
                      f"× {args.repeat} passes over {audio_seconds:.1f} s")
        with spawn.Pool(1) as pool:
            timed = pool.apply(time_one, (spec, prepared["source"], mels, contexts, args.mode, args.repeat,
                                          args.threads, audio_seconds))
        # Peak over the fp32 weights (the checkpoint's size): the memory target is 1.3x in every phase.
        timed["peak_over_weights"] = round(timed["peak_rss_mb"] * (1 << 20) / figures["model"]["bytes"], 2)
        figures["backends"].append({"backend": spec[0], "dtype": spec[1], "label": label, **prepared, **timed})

    reference_rtf = {tuple(row["att_context_size"]): row["rtf"] for entry in figures["backends"]
                     if entry["label"] == "nemo" for row in entry["lookaheads"]}
    table = Table(title=f"streaming per chunk: {Path(nemo_path).name}, {audio_seconds:.1f} s audio, "
                        f"{args.mode}, {args.threads} thread(s), median of {args.repeat}")
    for column in ("lookahead", "backend", "chunks", "median ms", "p95 ms", "RTF", "× NeMo", "labels/s",
                   "peak RSS MB", "× weights", "prepare s", "prepare RSS MB"):
        table.add_column(column, justify="left" if column in ("lookahead", "backend") else "right")
    for context in contexts:
        for entry in figures["backends"]:
            row = next(r for r in entry["lookaheads"] if tuple(r["att_context_size"]) == tuple(context))
            ratio = row["rtf"] / reference_rtf[tuple(context)] if tuple(context) in reference_rtf else None
            row["rtf_vs_nemo"] = None if ratio is None else round(ratio, 3)
            table.add_row(f"[{context[0]},{context[1]}]", entry["label"], str(row["chunks_per_pass"]),
                          f"{row['median_ms']:.2f}", f"{row['p95_ms']:.2f}", f"{row['rtf']:.4f}",
                          "" if ratio is None else f"{ratio:.2f}", f"{row['labels_per_second']:.1f}",
                          f"{entry['peak_rss_mb']:.0f}", f"{entry['peak_over_weights']:.2f}",
                          f"{entry['prepare_seconds']:.1f}", f"{entry['prepare_peak_rss_mb']:.0f}")
        table.add_section()
    console.print(table)
    if args.overhead:
        sources = {entry["label"] if ":" in entry["label"] else f"{entry['label']}:float32": entry["source"]
                   for entry in figures["backends"]}
        figures["overhead"] = {"runs": {}}
        for group, members in overhead_groups(specs).items():
            with spawn.Pool(1) as pool:  # each run in a fresh process, as a compare run is
                overhead = pool.apply(overhead_one, (members, str(nemo_path), sources, utterances, contexts,
                                                     args.threads))
            figures["overhead"]["runs"][group] = overhead
            console.print(f"compare run against {group}: {overhead['wall_seconds']:.1f} s wall, backends "
                          + ", ".join(f"{k} {v:.1f} s" for k, v in overhead["backend_seconds"].items())
                          + (" (teacher-forced reruns: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                       overhead["teacher_forced_seconds"].items()) + ")"
                             if overhead["teacher_forced_seconds"] else "")
                          + "; of which front ends " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                                overhead["frontend_seconds"].items())
                          + f"; harness {overhead['harness_seconds']:.1f} s = {overhead['harness_share'] * 100:.1f} %"
                            " (target <= 10 %)")
            for label, phase in overhead["phases"].items():
                console.print(f"  {label} phase: {phase['wall_seconds']:.1f} s wall, {phase['backend_seconds']:.1f} s "
                              f"computed by it, harness {phase['harness_share'] * 100:.1f} %")
    earlier = previous_figures(args.history, figures) if args.history and args.history.is_dir() else None
    if earlier is not None:
        flagged = regressions(earlier[1], figures)
        figures["regressions"] = {"against": str(earlier[0]), "flagged": flagged}
        console.print(f"against {earlier[0].name}: " + ("; ".join(flagged) if flagged else "no figure 25 % worse"))
    out = args.json or REPO / "reports" / "bench" / (
        f"bench-{Path(nemo_path).stem}-{figures['created'].replace(':', '').replace('+0000', 'Z')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    console.print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

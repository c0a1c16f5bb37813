"""``parity``: a thin command line over the library (parse, call, print).

Backends add their own subcommands (``export-onnx``, ``convert``, ``verify``...) and the options
that name their artifacts (``--onnx DIR``, ``--mlx DIR``) through their registry entries
(``backends.BackendEntry.cli``, ``source_option``); this module names no backend.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from streaming_parity.core.errors import BadInput, InvalidInput
from streaming_parity.core.system.progress import ProgressBar
from streaming_parity.core.system.provenance import ResolvedSource
from streaming_parity.interface.commands import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VIOLATION,
    CommandContext,
    CommandError,
    add_audio_options,
    err,
    load_utterances,
    one_line,
    parse_contexts,
)


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


log = logging.getLogger("streaming_parity.app.cli")
SOURCE_HELP = "; or ORG/NAME[@REVISION] on the hub"


def add_backend_sources(parser: argparse.ArgumentParser) -> None:
    """``--NAME SOURCE`` (and dtype flags) for every registered backend that has an artifact format.

    A source is a local path or a hub name (``streaming_parity.app.hub``), resolved when the command runs."""
    from streaming_parity.interface.registry import REGISTRY

    for entry in REGISTRY.values():
        if entry.source_option:
            parser.add_argument(entry.source_option, dest=f"source_{entry.name}", metavar="SOURCE",
                                help=entry.source_help + SOURCE_HELP)
        for flag, dtype in entry.dtype_flags.items():
            parser.add_argument(flag, dest=f"dtype_{entry.name}", action="store_const", const=dtype,
                                help=f"use the {entry.name} artifact's {dtype} graphs")


def named_sources(args) -> list[tuple[str, ResolvedSource, str | None]]:
    """``(backend, source, dtype or None)`` for every ``--NAME SOURCE`` given, in registry order,
    each resolved to a local path (a hub name downloads only that backend's files)."""
    from streaming_parity.interface.registry import REGISTRY

    return [(name, args.context.resolve_source(getattr(args, f"source_{name}"), name),
             getattr(args, f"dtype_{name}", None))
            for name in REGISTRY if getattr(args, f"source_{name}", None)]


def open_candidates(args, nemo_path: Path | None) -> list:
    from streaming_parity.interface.registry import get

    return [get(name).load(source.path, dtype=dtype, nemo_path=nemo_path)
            for name, source, dtype in named_sources(args)]


def command_context() -> CommandContext:
    """What backend commands may use from the application layer (``streaming_parity.interface.commands``)."""
    from streaming_parity.app.diagnose_path import diagnose_path
    from streaming_parity.app.hub import resolve_source
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.interface.registry import REFERENCE, get

    return CommandContext(load_reference=lambda nemo_path: get(REFERENCE).load(Path(nemo_path)),
                          default_utterances=fixture_utterances, diagnose=diagnose_path, resolve_source=resolve_source)


# -- commands ---------------------------------------------------------------------------------------

def cmd_fixtures(args) -> int:
    from streaming_parity.fixtures.models import FIXTURES, build

    names = [args.model] if args.model else [n for n, s in FIXTURES.items() if s.default_test]
    for name in names:
        if name not in FIXTURES:
            raise CommandError(f"unknown fixture model {name!r}; known: {', '.join(FIXTURES)}")
    with ProgressBar("fixtures", total=len(names), logger=log) as bar:
        for name in names:
            bar.phase(name)
            path = build(name, force=args.rebuild, progress=bar.phase)
            bar.advance(name)
            print(path)
    return EXIT_OK


def cmd_transcribe(args) -> int:
    from streaming_parity.app.hub import parse
    from streaming_parity.interface.driver import transcripts
    from streaming_parity.interface.registry import REFERENCE, get

    paths = list(args.paths)
    sources = {name: (source, dtype) for name, source, dtype in named_sources(args)}
    if args.backend in sources:
        source, dtype = sources[args.backend]
        backend = get(args.backend).load(source.path, dtype=dtype)
    elif get(args.backend).source_option:
        raise CommandError(f"--backend {args.backend} needs {get(args.backend).source_option} SOURCE")
    else:
        if not paths or (args.backend == REFERENCE and not (paths[0].endswith(".nemo") or parse(paths[0]))):
            raise CommandError(f"the {args.backend} backend needs MODEL.nemo (or ORG/NAME on the hub) "
                               f"as the first argument")
        backend = get(args.backend).load(args.context.resolve_source(paths.pop(0), args.backend).path)
    if not paths:
        raise CommandError("no audio files given")
    utterances = load_utterances(args, [Path(p) for p in paths])
    contexts = parse_contexts(args.att_context) or [backend.info.att_context_sizes[0]]
    for utterance in utterances:
        for context in contexts:
            texts = transcripts(backend, utterance, context)
            if len(texts) == 1:
                print(f"{utterance.name}\t[{context[0]},{context[1]}]\t{texts['rnnt']}")
                continue
            # A hybrid RNNT-CTC model: one line per decoder, its name in a column of its own.
            for decoder, text in texts.items():
                print(f"{utterance.name}\t[{context[0]},{context[1]}]\t{decoder}\t{text}")
    return EXIT_OK


NOT_COMPARED = "–"


def _error(value: float | None) -> str:
    return NOT_COMPARED if value is None else f"{value:.1e}"


def print_comparisons(report, out=None) -> None:
    """One table per pair and dtype, narrow enough for an 80-column terminal: the pair names the
    table, each row is one utterance at one lookahead, and a tap that was not compared shows ``–``."""
    from rich import box
    from rich.table import Table

    groups: dict[tuple[str, str], list] = {}
    for comparison in report.results.comparisons:
        groups.setdefault((comparison.pair.split("@")[0], comparison.dtype), []).append(comparison)
    for (pair, dtype), comparisons in groups.items():
        table = Table(title=f"{pair} {dtype}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("lookahead", no_wrap=True)
        table.add_column("utterance", overflow="fold")
        for column in ("layers", "encoder"):
            table.add_column(f"{column} max", justify="right", no_wrap=True, min_width=7)
        table.add_column("tokens", no_wrap=True)
        table.add_column("result", no_wrap=True)
        for comparison in comparisons:
            worst = comparison.worst("max_abs")
            layers = max((v for k, v in worst.items() if k.startswith("layers.")), default=None)
            if not comparison.require_token_match:
                tokens = "n/a"
            elif comparison.tokens_equal and comparison.ctc_tokens_equal:  # a hybrid's CTC transcript too
                tokens = "equal"
            else:
                ties = len(comparison.near_ties) + sum(f.near_tie for f in comparison.ctc_flips)
                agree = comparison.tokens_agree and comparison.ctc_tokens_agree
                tokens = f"{ties} tie(s)" if agree else "differ"
            table.add_row(f"{comparison.att_context_size[0]},{comparison.att_context_size[1]}", comparison.utterance,
                          _error(layers), _error(worst.get("encoder")), tokens,
                          "[green]pass[/]" if comparison.passed else "[red]FAIL[/]")
        (out or console()).print(table)


def print_first_chunk_cost(results, out=None) -> None:
    """What a candidate that cannot run NeMo's plain first chunk (a peer's pad-and-drop export) costs by that
    alone: NeMo's own WER in each mode on the same utterances, per lookahead (where they have texts)."""
    from streaming_parity.report import REFERENCE_BACKEND, wer_rows

    rows = [r for r in wer_rows([results]) if r.decoder == "rnnt" and r.wer_vs_text is not None]
    padded_only = sorted({f"{r.backend}:{r.dtype}" for r in rows if r.backend != REFERENCE_BACKEND}
                         - {f"{r.backend}:{r.dtype}" for r in rows if r.backend != REFERENCE_BACKEND and r.mode == "plain"})
    if not padded_only:
        return
    nemo = {(r.context, r.mode): r.wer_vs_text for r in rows if r.backend == REFERENCE_BACKEND}
    for context in sorted({c for c, _ in nemo}, key=lambda c: -c[1]):
        plain, padded = nemo.get((context, "plain")), nemo.get((context, "pad-and-drop"))
        if plain is None or padded is None:
            continue
        (out or console()).print(
            f"first chunk [{context[0]},{context[1]}]: {', '.join(padded_only)} run(s) pad-and-drop only; NeMo on these "
            f"utterances: WER {100 * plain:.1f} % plain (its default), {100 * padded:.1f} % pad-and-drop")


def cmd_compare(args) -> int:
    from streaming_parity.app.peers import candidate_sources, print_bisections, print_diagnoses, print_notes
    from streaming_parity.app.session import compare_backends, fixture_utterances
    from streaming_parity.app.source_provenance import artifact_record, reference_record
    from streaming_parity.core.nemo_file import sha256_file
    from streaming_parity.interface.registry import REFERENCE, get
    from streaming_parity.judge.tolerances import Tolerances

    tolerances = Tolerances.load(args.tolerances)
    if args.speaker_masks and not args.audio:
        raise CommandError("--speaker-masks needs --audio (the masks describe that audio)")
    if args.model is None and args.reference is None:
        raise CommandError("name the reference: MODEL (a .nemo or hub name), or --reference REF (a recording)")
    model = args.context.resolve_source(args.model) if args.model else None
    sources = named_sources(args) + candidate_sources(args)
    with ProgressBar("compare", logger=log) as bar:
        if args.reference:
            reference = open_recording(args.reference, model.path if model else None)
            sha256 = reference.model["sha256"]
            records = [{"backend": f"{REFERENCE} (recorded)", "path": str(args.reference), "sha256": sha256,
                        "recording": reference.manifest["provenance"]}]
        else:
            bar.phase(f"loading {REFERENCE} ({model.path.name})")
            reference = get(REFERENCE).load(model.path)
            sha256 = sha256_file(model.path)
            records = [reference_record(model, sha256)]
        candidates, peer_sources = [], {}
        for name, source, dtype in sources:
            bar.phase(f"loading {name} ({source.path.name})")
            candidate = get(name).load(source.path, dtype=dtype, nemo_path=model.path if model else None)
            candidates.append(candidate)
            print_notes(candidate)
            records.append(artifact_record(name, f"{name}:{candidate.dtype}", source, sha256))
            if candidate.capabilities.input == "audio":
                peer_sources[f"{candidate.name}:{candidate.dtype}"] = source.path
        if args.audio:
            utterances = load_utterances(args, args.audio)
        elif args.reference:
            utterances = reference.utterances()
        else:
            utterances = [dataclasses.replace(u, prompt=args.prompt) for u in fixture_utterances()]
        contexts = parse_contexts(args.att_context) or (
            reference.contexts if args.reference else list(reference.info.att_context_sizes))
        if args.reference:
            for record in records[1:]:  # the chunk plan is the loop's to check (Recording.check_plan)
                reference.check_made_from(record.get("source_sha256"), record["path"])
            if peer_sources:
                log.warning("a peer's stack bisection needs the live reference's front end; with a recording "
                            "the peer is compared on its tokens only")
                peer_sources = {}
        report = compare_backends(reference, candidates, utterances, contexts, tolerances,
                                  model_path=model.path if model and not args.reference else None,
                                  model_hub=model.hub if model else None, backends=records,
                                  peer_sources=peer_sources, progress=bar)
        if args.reference:
            report.results.model.update(name=Path(reference.model.get("name") or "").stem or None, sha256=sha256,
                                        recording=str(args.reference))
    print_comparisons(report)
    print_first_chunk_cost(report.results)
    print_bisections(report.results)
    print_diagnoses(report.results)
    if args.json:
        print(f"results written to {report.results.save(args.json)}")
    return _verdict(report.results, tolerances)


def open_recording(path: Path, model_path: Path | None):
    """A reference recording, its shards checked; when MODEL is named too, it must be the recorded checkpoint."""
    from streaming_parity.core.nemo_file import sha256_file
    from streaming_parity.judge.recording import Recording, RecordingError

    recording = Recording(path)
    for line in recording.describe():
        log.info("reference: %s", line)
    if model_path is not None and sha256_file(model_path) != recording.model["sha256"]:
        raise RecordingError(f"{path}: recorded from {recording.model.get('name')} (sha256 "
                             f"{recording.model['sha256'][:12]}), not from {model_path.name}")
    return recording


def cmd_record(args) -> int:
    """Stream the reference once and write everything a verdict needs (``streaming_parity.judge.recording``)."""
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.app.source_provenance import record_reference
    from streaming_parity.interface.registry import REFERENCE, get
    from streaming_parity.judge.recording import OFFLINE_LENGTHS, Recording

    model = args.context.resolve_source(args.model)
    with ProgressBar("record", logger=log) as bar:
        bar.phase(f"loading {REFERENCE} ({model.path.name})")
        reference = get(REFERENCE).load(model.path)
        utterances = load_utterances(args, args.audio) if args.audio else [
            dataclasses.replace(u, prompt=args.prompt) for u in fixture_utterances()]
        contexts = parse_contexts(args.att_context) or list(reference.info.att_context_sizes)
        started = time.perf_counter()
        record_reference(reference, model.path, utterances, contexts, args.out, hub=model.hub, progress=bar.phase,
                         modes=split_names(args.modes) or ("plain", "pad-and-drop"), offline=not args.no_offline,
                         offline_lengths=split_names(args.offline_lengths) or OFFLINE_LENGTHS)
        reference.close()
    recording = Recording(args.out)
    for line in recording.describe():
        print(line)
    print(f"recorded in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def cmd_probes(args) -> int:
    """Every probe through every candidate: a verdict table per backend, the results JSON with the verdicts."""
    from streaming_parity.app.peers import candidate_sources, print_bisections, print_notes
    from streaming_parity.app.probes import label, print_long_streams, print_probe_tables, run_probes
    from streaming_parity.app.source_provenance import artifact_record, reference_record
    from streaming_parity.core.nemo_file import sha256_file
    from streaming_parity.fixtures.probes import probe_set
    from streaming_parity.interface.registry import REFERENCE, get
    from streaming_parity.judge.tolerances import Tolerances

    tolerances = Tolerances.load(args.tolerances)
    try:
        probes = probe_set(long_seconds=args.long_seconds, classes=split_names(args.probe_class), speech=args.speech)
    except ValueError as error:  # an unknown class name, from the command line
        raise CommandError(str(error)) from None
    model = args.context.resolve_source(args.model)
    sources = named_sources(args) + candidate_sources(args)
    if not sources:
        raise CommandError("no candidate: give --onnx DIR, --mlx DIR or --candidate [BACKEND[:DTYPE]:]PATH")
    opened = []
    try:
        with ProgressBar("probes", logger=log) as bar:
            bar.phase(f"loading {REFERENCE} ({model.path.name})")
            reference = get(REFERENCE).load(model.path)
            opened.append(reference)
            sha256 = sha256_file(model.path)
            records = [reference_record(model, sha256)]
            peer_sources = {}
            for name, source, dtype in sources:
                bar.phase(f"loading {name} ({source.path.name})")
                candidate = get(name).load(source.path, dtype=dtype, nemo_path=model.path)
                opened.append(candidate)
                print_notes(candidate)
                records.append(artifact_record(name, label(candidate), source, sha256))
                if candidate.capabilities.input == "audio":
                    peer_sources[label(candidate)] = source.path
            contexts = parse_contexts(args.att_context) or list(reference.info.att_context_sizes)
            run = run_probes(reference, opened[1:], probes, contexts, tolerances, model_path=model.path,
                             model_hub=model.hub, backends=records, peer_sources=peer_sources,
                             resample=args.resample, mix_to_mono=args.mix_to_mono, progress=bar.phase)
            run.results.extra["probes"]["settings"]["speech"] = args.speech
    finally:
        for backend in opened:
            backend.close()
    print_probe_tables(run.verdicts, console())
    print_long_streams(run.results, console())
    print_bisections(run.results)
    if args.json:
        print(f"results written to {run.results.save(args.json)}")
    failures = [v for v in run.verdicts if not v.ok]
    for failure in failures:
        where = "" if failure.step is None else f" (first divergence: step {failure.step}, tap {failure.tap})"
        print(f"FAIL probe {failure.failure_class}/{failure.probe} {failure.backend}{where}: {failure.detail}")
    return EXIT_VIOLATION if failures else EXIT_OK


def _verdict(results, tolerances) -> int:
    """Every failing comparison, and every pair whose tokens the tolerance file bounds on the aggregate
    (``streaming_parity.judge.compare.token_agreement_failures``); the exit status."""
    from streaming_parity.judge.compare import token_agreement_failures

    failures = [c.describe_failure() for c in results.comparisons if not c.passed]
    failures += token_agreement_failures(results.comparisons, tolerances)
    for failure in failures:
        print(f"FAIL {failure}")
    return EXIT_VIOLATION if failures else EXIT_OK


def cmd_judge(args) -> int:
    """Re-apply a tolerance file to saved results: nothing is re-run (as Polygraphy's check accuracy)."""
    from streaming_parity.app.session import ParityReport
    from streaming_parity.judge.compare import rejudge
    from streaming_parity.judge.results import Results
    from streaming_parity.judge.tolerances import Tolerances

    tolerances = Tolerances.load(args.tolerances)
    results = Results.load(args.results)
    results.comparisons = [rejudge(c, tolerances) for c in results.comparisons]
    results.tolerances = tolerances.source
    from streaming_parity.judge.probes import refresh

    refresh(results)  # a probe run's verdicts follow its comparisons
    print_comparisons(ParityReport(results))
    if args.json:
        print(f"re-judged results written to {results.save(args.json)}")
    return _verdict(results, tolerances)


def cmd_demo(args) -> int:
    from streaming_parity.app.demo import run_demo

    return run_demo(out_dir=args.out, model=args.model, utterances=args.utterances,
                    att_contexts=parse_contexts(args.att_context), backends=split_names(args.backends))


def split_names(values: Sequence[str] | None) -> list[str] | None:
    """``--backends nemo,mlx`` or repeated ``--backends`` -> ["nemo", "mlx"]."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def cmd_nightly(args) -> int:
    from streaming_parity.app.nightly import fp32_failures, run_nightly

    if args.stage != "all":
        outcome = _nightly_stage(args)
    elif args.parallel != 1 or args.job:
        raise InvalidInput("--parallel and --job are options of --stage candidates")
    else:
        outcome = run_nightly(split_names(args.models), out_root=args.out, backends=split_names(args.backends),
                              att_contexts=parse_contexts(args.att_context), utterance_limit=args.utterances,
                              tolerances_path=args.tolerances, date=args.date, work_dir=args.work_dir,
                              audio_seconds=args.audio_seconds, bounded_memory=args.bounded_memory,
                              mutation_testing=args.mutation_testing, recordings=args.recordings, probes=args.probes,
                              probe_long_seconds=args.probe_long_seconds, full_plan=args.full_plan)
    failures = fp32_failures(outcome.results)
    for line in failures:
        print(f"FAIL {line}")
    for path in outcome.results_files:
        print(f"results: {path}")
    print(f"report:  {outcome.report.markdown}\nreport:  {outcome.report.html}")
    return EXIT_VIOLATION if failures else EXIT_OK


def _nightly_stage(args):
    """``parity nightly --stage record|candidates``: the night split across machines (``app.nightly_stages``)."""
    from streaming_parity.app.nightly_stages import judge_night_candidates, record_night

    if args.recordings is None:
        raise InvalidInput(f"--stage {args.stage} needs --recordings DIR (where the night plan and recordings are)")
    if args.stage == "record":
        unsupported = {"--mutation-testing": args.mutation_testing, "--probes": args.probes,
                       "--parallel": args.parallel != 1, "--job": args.job, "--full-plan": args.full_plan}
    else:
        unsupported = {"--models": args.models, "--att-context": args.att_context, "--utterances": args.utterances,
                       "--audio-seconds": args.audio_seconds, "--mutation-testing": args.mutation_testing,
                       "--probes": args.probes}
    named = [option for option, value in unsupported.items() if value]
    if named:
        raise InvalidInput(f"--stage {args.stage} does not take {', '.join(named)}")
    if args.stage == "record":
        return record_night(split_names(args.models), recordings=args.recordings, out_root=args.out, date=args.date,
                            backends=split_names(args.backends), att_contexts=parse_contexts(args.att_context),
                            utterance_limit=args.utterances, audio_seconds=args.audio_seconds,
                            tolerances_path=args.tolerances, work_dir=args.work_dir,
                            bounded_memory=args.bounded_memory)
    return judge_night_candidates(recordings=args.recordings, backends=split_names(args.backends), out_root=args.out,
                                  date=args.date, tolerances_path=args.tolerances, work_dir=args.work_dir,
                                  job=args.job, bounded_memory=args.bounded_memory, parallel=args.parallel,
                                  full_plan=args.full_plan)


def cmd_mutants(args) -> int:
    from streaming_parity.app.mutation import run_mutation_tests, write_mutants

    outcome = run_mutation_tests(workers=args.workers, progress=lambda m: log.info("mutants: %s", m))
    path = write_mutants(outcome, args.out)
    totals = ", ".join(f"{count} {status}" for status, count in outcome["totals"].items())
    print(f"{outcome['mutants']} mutants of the judge: {totals}")
    for survivor in outcome["survived"][:20]:
        print(f"survived: {survivor['name']}")
    print(f"written to {path}")
    return EXIT_OK


def cmd_report(args) -> int:
    from streaming_parity.app.mutation import load_mutants
    from streaming_parity.report import load_results, write_report

    # A night's mutation-test outcome lies beside its results (parity nightly --mutation-testing).
    mutants = load_mutants(Path(args.results[0]).parent)
    files = write_report(load_results(args.results), args.out, reports_dir=args.history, date=args.date,
                         mutants=mutants)
    print(f"report:  {files.markdown}\nreport:  {files.html}")
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description=__doc__.splitlines()[0])
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug logging, and NeMo's own logging")
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (exit 2: bad input, exit 3: internal error)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="threads for torch, BLAS/OpenMP and ONNX Runtime, also in the processes parity "
                             "starts (default: each library's own, usually every core)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fixtures", help="build a fixture model and print the path of its .nemo")
    p.add_argument("--model", help="fixture name (default: every default-test fixture)")
    p.add_argument("--rebuild", action="store_true", help="ignore the build cache")
    p.set_defaults(func=cmd_fixtures)

    p = sub.add_parser("transcribe", help="stream audio through one backend and print transcripts")
    p.add_argument("paths", nargs="+", metavar="[MODEL] AUDIO",
                   help="MODEL: a .nemo or ORG/NAME[@REVISION] on the hub (the nemo backend only)")
    p.add_argument("--backend", default="nemo")
    p.add_argument("--att-context", action="append", metavar="L,R")
    add_backend_sources(p)
    add_audio_options(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("record", help="stream NeMo once and record everything a verdict needs (no NeMo needed "
                                      "to compare against it)")
    p.add_argument("model", metavar="MODEL", help="a .nemo, ORG/NAME[@REVISION] or hf://ORG/NAME[@REVISION]/FILE")
    p.add_argument("--out", type=Path, required=True, metavar="REF", help="a new directory for the recording")
    p.add_argument("--audio", nargs="+", type=Path, help="audio files (default: the fixture speech)")
    p.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all of the model's")
    p.add_argument("--modes", action="append", default=None, metavar="MODE[,MODE]",
                   help="first-chunk modes (default: plain,pad-and-drop)")
    p.add_argument("--no-offline", action="store_true", help="leave out the offline forwards")
    p.add_argument("--offline-lengths", action="append", default=None, metavar="LENGTH[,LENGTH]",
                   help="offline forwards over the whole mel tensor (tensor: what a comparison runs) and/or the front "
                        "end's length (front-end: what a suite may ask for); default: both")
    add_audio_options(p)
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("compare", help="compare backends against NeMo (and NeMo streaming against offline)")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a .nemo, ORG/NAME[@REVISION] or hf://ORG/NAME[@REVISION]/FILE (optional with --reference)")
    p.add_argument("--reference", type=Path, metavar="REF",
                   help="a recording of the reference (parity record): compared against it, no NeMo needed")
    p.add_argument("--audio", nargs="+", type=Path, help="audio files (default: the fixture speech)")
    p.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all of the model's")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results JSON here")
    p.add_argument("--tolerances", type=Path, help="tolerance file (default: streaming_parity/judge/tolerances.toml)")
    add_backend_sources(p)
    from streaming_parity.app.peers import add_candidate_option

    add_candidate_option(p)
    add_audio_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("probes", help="every probe (cold start, stream end, levels, rates, resets, a long stream, "
                                      "a wrong chunk size) through every candidate, judged against NeMo")
    p.add_argument("model", metavar="MODEL", help="a .nemo, ORG/NAME[@REVISION] or hf://ORG/NAME[@REVISION]/FILE")
    p.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all of the model's")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results JSON (with the probe verdicts) here")
    p.add_argument("--tolerances", type=Path, help="tolerance file (default: streaming_parity/judge/tolerances.toml)")
    from streaming_parity.fixtures.probes import CLASSES, DEFAULT_LONG_SECONDS, SPEECH

    p.add_argument("--class", dest="probe_class", action="append", metavar="A,B",
                   help=f"only these probe classes ({', '.join(CLASSES)}); default: all")
    p.add_argument("--speech", choices=list(SPEECH), default="fixture",
                   help="the committed speech the probes are built from: the fixture speech (default) or the trained "
                        "fixture's held-out test set (its own domain)")
    p.add_argument("--long-seconds", type=float, default=DEFAULT_LONG_SECONDS, metavar="S",
                   help="length of the long-stream probe (default: %(default)g s)")
    p.add_argument("--resample", action=argparse.BooleanOptionalAction, default=True,
                   help="resample a probe at another rate to the rate a backend declares (default: on; "
                        "--no-resample: refused)")
    p.add_argument("--mix-to-mono", action=argparse.BooleanOptionalAction, default=True,
                   help="mix a multi-channel probe down to the mono a backend declares (default: on; "
                        "--no-mix-to-mono: refused)")
    add_backend_sources(p)
    add_candidate_option(p)
    p.set_defaults(func=cmd_probes)

    p = sub.add_parser("judge", help="re-apply a tolerance file to saved results without re-running anything")
    p.add_argument("results", type=Path, metavar="RESULTS.json")
    p.add_argument("--tolerances", type=Path, required=True, help="the tolerance file to apply")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the re-judged results here")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser("demo", help="build the fixture, prepare every backend, stream the fixture speech, "
                                     "print the parity table and write the HTML report")
    p.add_argument("--out", type=Path, default=Path("reports"), help="the demo writes into OUT/demo/")
    from streaming_parity.app.demo import DEMO_MODEL

    p.add_argument("--model", default=DEMO_MODEL, help="fixture name or MODEL.nemo (default: %(default)s)")
    p.add_argument("--utterances", type=int, metavar="N",
                   help="first N utterances (default: all of the trained model's 20-utterance evaluation subset; "
                        "the fixture speech for another model)")
    p.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all of the model's")
    p.add_argument("--backends", action="append", metavar="A,B", help="candidate backends (default: all available)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("nightly", help="run the whole matrix and write OUT/<date>/results.json, report.md, report.html")
    p.add_argument("--models", action="append", metavar="A,B",
                   help="fixture names or .nemo paths (default: every default-test fixture)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="reports folder (also read for history)")
    p.add_argument("--backends", action="append", metavar="A,B",
                   help="candidate backends, NAME (every dtype) or NAME:DTYPE (default: all available)")
    p.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all of the model's")
    p.add_argument("--utterances", type=int, metavar="N", help="only the first N fixture utterances")
    p.add_argument("--tolerances", type=Path, help="tolerance file (default: streaming_parity/judge/tolerances.toml)")
    p.add_argument("--date", metavar="YYYY-MM-DD", help="the night's folder name (default: today, UTC)")
    p.add_argument("--work-dir", type=Path, help="cache of exports and conversions (default: .cache/artifacts)")
    p.add_argument("--audio-seconds", type=float, metavar="S",
                   help="stream the fixture speech joined into one utterance of at least S seconds")
    p.add_argument("--bounded-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="one model in memory at a time, runs spooled to disk, preparation in a subprocess "
                        "(default: on for checkpoints over 1 GiB)")
    p.add_argument("--mutation-testing", action="store_true",
                   help="also mutate the judging modules (mutmut) and list the mutants the tests miss")
    p.add_argument("--recordings", type=Path, metavar="DIR",
                   help="cache NeMo's runs as recordings here (parity record): a night whose checkpoint, NeMo, "
                        "audio and plan are unchanged runs no NeMo at all; with --stage, where the night plan is")
    p.add_argument("--stage", choices=("all", "record", "candidates"), default="all",
                   help="all: the whole night here (default); record: record NeMo and prepare every candidate's "
                        "artifact under --work-dir, writing the night plan into --recordings; candidates: judge the "
                        "planned candidates chosen by --backends against those recordings, without NeMo "
                        "(docs/recordings.md)")
    p.add_argument("--job", metavar="NAME", help="--stage candidates: names this job's results files "
                                                 "(default: from --backends)")
    p.add_argument("--full-plan", action="store_true",
                   help="judge every dtype on every lookahead and utterance, also one with no fast path on this "
                        "machine (MLX bfloat16 on a CPU: by default one lookahead, two utterances)")
    p.add_argument("--parallel", type=_positive_int, default=1, metavar="N",
                   help="--stage candidates: judge up to N candidates at once, one process each, as many as the "
                        "machine's free memory holds (default: 1)")
    p.add_argument("--probes", action="store_true",
                   help="also run every probe (parity probes) on every model through every candidate")
    p.add_argument("--probe-long-seconds", type=float, metavar="S",
                   help="length of the probes' long stream (default: 600 s)")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("mutants", help="mutation-test the judge: which changes to a verdict do its tests miss?")
    p.add_argument("--out", type=Path, default=Path("reports"), help="writes OUT/mutants.json")
    p.add_argument("--workers", type=_positive_int, default=2, help="mutants tested at once (default: 2)")
    p.set_defaults(func=cmd_mutants)

    p = sub.add_parser("report", help="render report.md and report.html from saved results JSON")
    p.add_argument("results", nargs="+", type=Path, metavar="RESULTS.json")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--history", type=Path, metavar="REPORTS_DIR", help="reports folder with earlier nights")
    p.add_argument("--date", metavar="YYYY-MM-DD", help="the report's night (default: from the results)")
    p.set_defaults(func=cmd_report)

    from streaming_parity.app.commands import fingerprint
    from streaming_parity.interface.registry import REGISTRY

    fingerprint.register(sub)
    for entry in REGISTRY.values():
        if entry.cli:
            importlib.import_module(entry.cli).register(sub)
    return parser


PROJECT_LOGGERS = ("streaming_parity",)


@contextlib.contextmanager
def logging_configured(*, verbose: bool = False, quiet: bool = False):
    """One rich handler on stderr for the project's loggers while a command runs: debug with ``-v``,
    warnings only with ``-q`` (which also turns the progress bars off); undone afterwards."""
    from rich.logging import RichHandler

    from streaming_parity.core.system.progress import make_console, set_bars, use_console

    console = make_console()
    use_console(console)
    set_bars(not quiet)
    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    saved = {}
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.level, logger.propagate)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    try:
        yield
    finally:
        for name, (old_level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = propagate
        use_console(None)
        set_bars(True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Positional audio may follow options (`transcribe MODEL.nemo --att-context 70,13 a.wav b.wav`):
    # argparse stops a nargs="+" positional at the first option, so the rest comes back unparsed.
    args, unparsed = parser.parse_known_args(argv)
    if unparsed:
        if getattr(args, "command", None) == "transcribe" and not any(u.startswith("-") for u in unparsed):
            args.paths = [*args.paths, *unparsed]
        else:
            parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    with logging_configured(verbose=args.verbose, quiet=args.quiet):
        return _run(args)


def _run(args) -> int:
    # Exit codes (streaming_parity.interface.commands): the project's own input errors derive from BadInput and
    # exit 2; anything else is a bug and exits 3. Both print one line; --debug adds the traceback.
    try:
        args.context = command_context()
        from streaming_parity.core.system.nemo_quiet import set_verbose

        set_verbose(args.verbose)
        if args.threads is not None:
            from streaming_parity.core.system.threads import limit_threads

            limit_threads(args.threads)
        return args.func(args)
    except BadInput as error:
        if args.debug:
            traceback.print_exc()
        err(one_line(error))
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 - not an input error: a bug, reported as one
        if args.debug:
            traceback.print_exc()
        message = one_line(error)
        err(f"internal error: {type(error).__name__}" + ("" if message == type(error).__name__ else f": {message}"))
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())

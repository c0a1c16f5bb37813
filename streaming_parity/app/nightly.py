"""``parity nightly``: the whole matrix, saved as results and rendered as a report.

Matrix: fixture models × lookaheads × every registered, available backend × each of its dtypes,
against NeMo, through the one stream-and-compare loop (``streaming_parity.judge.loop``): NeMo streams
first and its runs are stored (in memory, or spooled to disk for large models); NeMo is closed,
then candidates are prepared (export, conversion), loaded, streamed and closed one at a time.

A night writes ``<out>/<YYYY-MM-DD>/results.json`` (``results-<model>.json`` per model when the
night covers several), ``report.md`` and ``report.html``. Only fp32 comparisons gate the exit
status; reduced-precision candidates (int8, bf16) are judged against their own tolerance tables
and reported as degradation.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.app.session import compare_backends, fixture_utterances
from streaming_parity.app.source_provenance import manifest_provenance
from streaming_parity.core.errors import InputNotFound, UnknownName, Unsupported
from streaming_parity.core.nemo_file import sha256_file
from streaming_parity.core.system.memory import current_rss_mb, peak_rss_mb, trim
from streaming_parity.core.system.workers import run_in_subprocess
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import FirstChunkMode
from streaming_parity.interface.utterance import Utterance, long_utterance
from streaming_parity.judge.loop import (
    Candidate,
    Context,
    LoopProgress,
    MemoryStore,
    ReferencePlan,
    SpoolStore,
    plan_reference,
)
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import Tolerances
from streaming_parity.report import FP32, ReportFiles, overall_passed, write_report


def default_work_dir() -> Path:
    """Where exports and conversions are cached between runs (``$PARITY_CACHE/artifacts``)."""
    root = Path(os.environ.get("PARITY_CACHE", Path(__file__).resolve().parents[2] / ".cache"))
    return root / "artifacts"


@dataclass(frozen=True)
class PlannedCandidate:
    """One (backend, dtype) of the matrix."""

    backend: str
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.dtype}"


@dataclass
class MatrixPlan:
    candidates: list[PlannedCandidate]
    unavailable: list[dict[str, str]]  # {backend, dtype, status, error} for backends that cannot run here


def plan_candidates(backends: Sequence[str] | None = None) -> MatrixPlan:
    """Every (backend, dtype) to compare against NeMo: the registry, or only ``backends`` when given.

    A name selects all of its backend's dtypes; ``NAME:DTYPE`` (``mlx:float32``) selects one.
    """
    from streaming_parity.interface.registry import REFERENCE, REGISTRY, get

    plan = MatrixPlan([], [])
    for item in backends or REGISTRY:
        name, _, only = item.partition(":")
        if name == REFERENCE:
            continue  # the reference is never its own candidate
        entry = get(name)  # an unknown name raises KeyError with the registered ones
        if only and only not in entry.dtypes:
            raise UnknownName(f"backend {name} runs {', '.join(entry.dtypes)}, not {only}")
        dtypes = [only] if only else list(entry.dtypes)
        if not entry.available():
            reason = "missing " + ", ".join(entry.missing_requirements())
            plan.unavailable += [{"backend": name, "dtype": d, "status": "unavailable", "error": reason}
                                 for d in dtypes]
            continue
        plan.candidates += [PlannedCandidate(name, dtype) for dtype in dtypes
                            if PlannedCandidate(name, dtype) not in plan.candidates]
    return plan


def resolve_model(name_or_path: str, progress: Callable[[str], None], *, in_subprocess: bool = False) -> Path:
    """A fixture name (built, cached) or the path of a ``.nemo``.

    ``in_subprocess``: build in a spawned process, so that building a large fixture (the model is
    instantiated, perturbed and saved) leaves no memory behind in a bounded-memory run.
    """
    if name_or_path.endswith(".nemo"):
        path = Path(name_or_path)
        if not path.is_file():
            raise InputNotFound(f"model not found: {path}")
        return path
    from streaming_parity.fixtures.models import FIXTURES, build

    if name_or_path not in FIXTURES:
        raise UnknownName(f"unknown fixture model {name_or_path!r}; known: {', '.join(FIXTURES)}")
    if not in_subprocess:
        return build(name_or_path, progress=progress)
    progress(f"building {name_or_path} (if not cached) in a subprocess")
    return Path(run_in_subprocess(_build_quietly, name_or_path, phase=f"building the {name_or_path} fixture"))


def _build_quietly(name: str) -> str:
    from streaming_parity.fixtures.models import build

    return str(build(name, progress=lambda _m: None))


def default_models() -> list[str]:
    from streaming_parity.fixtures.models import FIXTURES

    return [name for name, spec in FIXTURES.items() if spec.default_test]


def device_description() -> str:
    """Where each framework ran: CPU for torch and ONNX Runtime here, MLX's default device (Metal on macOS)."""
    parts = ["cpu"]
    try:
        import mlx.core as mx

        parts.append(f"mlx: {mx.default_device()}")
    except ImportError:
        pass
    return ", ".join(parts)


def artifact_sha256(path: Path) -> str | None:
    """sha256 of a prepared artifact: the file's, or over a directory's relative paths and file hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


# Models whose .nemo is larger than this run the bounded-memory matrix by default.
BOUNDED_MEMORY_THRESHOLD_BYTES = 1 << 30


def _prepare(backend: str, nemo_path: str, work_dir: str, dtype: str, contexts) -> tuple[str, float]:
    """``BackendEntry.prepare``; in the bounded matrix it runs in a spawned process: exports and
    conversions load the whole checkpoint (an ONNX export of the 0.6B model peaks at about 10 GB),
    and that memory must not count against, or stay in, the comparison process."""
    from streaming_parity.interface.registry import get

    source = get(backend).prepare(Path(nemo_path), Path(work_dir), dtype=dtype, att_context_sizes=contexts)
    return str(source), peak_rss_mb()


def prepare_candidate(planned: PlannedCandidate, nemo_path: Path, work_dir: Path, contexts: Sequence[Context], *,
                      in_subprocess: bool, record: dict[str, Any]) -> Path:
    """Export or convert the checkpoint for one (backend, dtype) into ``work_dir`` (cached there), with what was made
    and how recorded in ``record``: the artifact, its sha256, what its manifest says made it, the time it took."""
    started = time.perf_counter()
    arguments = (planned.backend, str(nemo_path), str(work_dir), planned.dtype, [list(c) for c in contexts])
    if in_subprocess:
        source, prepare_peak = run_in_subprocess(_prepare, *arguments, phase=f"preparing {planned.label}")
        record["prepare_peak_rss_mb"] = round(prepare_peak, 1)
    else:
        source, _ = _prepare(*arguments)
    source = Path(source)
    made = manifest_provenance(planned.backend, source)
    record.update(artifact=str(source), artifact_sha256=artifact_sha256(source),
                  prepare_seconds=round(time.perf_counter() - started, 2),
                  source_sha256=made.source_sha256 if made else None,
                  made_by=made.made_by() if made and made.harness_version else None)
    return source


def matrix_candidate(planned: PlannedCandidate, nemo_path: Path, work_dir: Path, contexts: Sequence[Context], *,
                     in_subprocess: bool) -> Candidate:
    """The loop's ``Candidate`` for one (backend, dtype): prepared and loaded when its turn comes,
    with what happened recorded in ``candidate.record``."""
    from streaming_parity.interface.registry import get

    entry = get(planned.backend)
    record = {"backend": planned.backend, "dtype": planned.dtype, "status": "ok"}

    def open_backend() -> Backend:
        source = prepare_candidate(planned, nemo_path, work_dir, contexts, in_subprocess=in_subprocess, record=record)
        return entry.load(source, dtype=planned.dtype, nemo_path=nemo_path)

    # Every first-chunk mode the backend shares with NeMo: NeMo's default (plain) beside pad-and-drop, the mode
    # every peer export runs, so that a run shows what the padded first chunk costs.
    modes = tuple(mode for mode in ("plain", "pad-and-drop") if mode in entry.capabilities.first_chunk_modes)
    return Candidate(label=planned.label, open=open_backend, capabilities=entry.capabilities, record=record,
                     modes=modes if entry.capabilities.input == "mel" else None)


def model_lookaheads(nemo_path: Path) -> list[Context]:
    """The lookaheads a checkpoint's config lists (``encoder.att_context_size``), read without NeMo."""
    from streaming_parity.core.nemo_config import EncoderConfig
    from streaming_parity.core.nemo_file import inspect_nemo

    encoder = EncoderConfig.from_mapping(inspect_nemo(nemo_path).config["encoder"])
    return [(int(c[0]), int(c[1])) for c in encoder.att_context_size]


# The offline forward a night compares against: over the whole streamed mel tensor, as the loop runs it.
NIGHT_OFFLINE_LENGTHS = ("tensor",)


def recording_key(nemo_path: Path, utterances: Sequence[Utterance], plan: ReferencePlan) -> str:
    """What a cached recording is valid for: the checkpoint, the NeMo and torch that streamed it, the audio, the
    plan (modes per lookahead, offline forwards) and the recording format."""
    import importlib.metadata

    from streaming_parity.judge.recording import SCHEMA

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    described = {"schema": SCHEMA, "checkpoint": sha256_file(nemo_path), "nemo": version("nemo_toolkit"),
                 "torch": version("torch"),
                 "audio": [hashlib.sha256(np.asarray(u.audio, np.float32).tobytes()).hexdigest() for u in utterances],
                 "modes": [[list(c), [m.value for m in modes]] for c, modes in plan.modes.items()],
                 "offline": [list(c) for c in plan.offline_contexts], "offline_lengths": list(NIGHT_OFFLINE_LENGTHS)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def cached_recording(nemo_path: Path, utterances: Sequence[Utterance], plan: ReferencePlan, recordings: Path, *,
                     progress: LoopProgress) -> tuple[Any, dict[str, Any]]:
    """The recording of NeMo for this checkpoint, audio and plan under ``recordings``: reused when there (NeMo is
    not loaded), else streamed once and written (atomically) for the nights to come. It holds what the night
    compares and no more (``plan``: the runs and offline forwards the comparison loop asks for)."""
    from streaming_parity.app.source_provenance import record_reference
    from streaming_parity.interface.registry import REFERENCE, get
    from streaming_parity.judge.recording import Recording

    key = recording_key(nemo_path, utterances, plan)
    target = Path(recordings) / f"{nemo_path.stem}-{key}"
    if (target / "recording.json").is_file():
        progress.phase(f"reference: the recording {target.name} is cached; NeMo is not run")
        return Recording(target), {"recording": str(target), "cached": True}
    progress.phase(f"loading NeMo ({nemo_path.name}) to record it")
    started = time.perf_counter()
    reference = get(REFERENCE).load(nemo_path)
    staged = target.with_name(target.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    try:
        record_reference(reference, nemo_path, utterances, list(plan.modes), staged, progress=progress.phase,
                         modes={c: [m.value for m in modes] for c, modes in plan.modes.items()},
                         offline=plan.offline_contexts, offline_lengths=NIGHT_OFFLINE_LENGTHS)
    finally:
        reference.close()
    staged.replace(target)
    recording = Recording(target)
    return recording, {"recording": str(target), "cached": False, "bytes": recording.size_bytes(),
                       "recorded_seconds": round(time.perf_counter() - started, 1)}


def record_failure(progress: LoopProgress) -> Callable[[Candidate, BaseException], None]:
    """The loop's failure hook: one broken candidate is recorded and must not hide the others' results."""

    def hook(candidate: Candidate, error: BaseException) -> None:
        if isinstance(error, Unsupported):  # the backend does not run this model (a peer without speaker masks)
            candidate.record.update(status="unavailable", error=f"{type(error).__name__}: {error}")
            progress.phase(f"{candidate.label} does not run this model: {error}")
            return
        candidate.record.update(status="error", error=f"{type(error).__name__}: {error}",
                                traceback=traceback.format_exc(limit=8))
        progress.phase(f"{candidate.label} failed: {type(error).__name__}: {error}")
        gc.collect()
        trim()

    return hook


def plan_model_night(nemo_path: Path, plan: MatrixPlan, att_contexts: Sequence[Sequence[int]] | None, work_dir: Path,
                     *, bounded: bool, single_reference_pass: bool | None = None, full_plan: bool = False,
                     ) -> tuple[list[Context], list[Candidate], list[Context] | None]:
    """One model's night before anything runs: its lookaheads, its candidates (each in the first-chunk modes it is
    compared in) and where NeMo's streaming is compared with its offline forward (None: every lookahead).

    ``single_reference_pass`` (default: ``bounded``): every candidate that runs pad-and-drop (the mode the ONNX
    graphs bake in) is compared in it, so NeMo streams each lookahead once; NeMo's streaming~offline (which needs
    plain mode) runs at the lookahead with the most frames per step only. Plain mode at every lookahead is the tiny
    fixtures' to check; at full size this halves the reference's time and its recording. ``full_plan``: judge a
    dtype with no fast path here on the full plan too (``reduce_where_slow``)."""
    contexts = [(int(c[0]), int(c[1])) for c in (att_contexts or model_lookaheads(nemo_path))]
    candidates = [matrix_candidate(c, nemo_path, work_dir, contexts, in_subprocess=bounded) for c in plan.candidates]
    offline_contexts = None
    if bounded if single_reference_pass is None else single_reference_pass:
        pad_and_drop = FirstChunkMode.PAD_AND_DROP.value
        for candidate in candidates:
            if pad_and_drop in candidate.capabilities.first_chunk_modes:
                candidate.modes = (pad_and_drop,)
        offline_contexts = [max(contexts, key=lambda context: context[1])]
    for candidate, planned in zip(candidates, plan.candidates) if not full_plan else ():
        reduce_where_slow(candidate, planned, contexts)
    return contexts, candidates, offline_contexts


# A dtype with no fast path on this machine (MLX's bfloat16 on a CPU) is judged on this much of the night.
REDUCED_PLAN_UTTERANCES = 2


def reduce_where_slow(candidate: Candidate, planned: PlannedCandidate, contexts: Sequence[Context]) -> None:
    """A candidate whose dtype has no fast path here (``BackendEntry.slow_dtype_reason``: MLX's bfloat16 on a CPU
    runs a step ten times slower than float32) is judged at one lookahead, the one with the fewest steps, on the
    first utterances only, and its record says why; where the machine has the fast path (Metal), the full plan."""
    from streaming_parity.interface.registry import get

    reason = get(planned.backend).slow_dtype_reason(planned.dtype)
    if reason is None:
        return
    widest = max(contexts, key=lambda context: context[1])
    candidate.contexts, candidate.utterance_limit = (widest,), REDUCED_PLAN_UTTERANCES
    candidate.record["reduced_plan"] = {"reason": reason, "lookaheads": [list(widest)],
                                        "utterances": REDUCED_PLAN_UTTERANCES}


def run_model_matrix(nemo_path: Path, plan: MatrixPlan, utterances: Sequence[Utterance],
                     att_contexts: Sequence[Sequence[int]] | None, tolerances: Tolerances, *,
                     work_dir: Path, bounded: bool = False, spool_dir: Path | None = None,
                     single_reference_pass: bool | None = None, recordings: Path | None = None,
                     full_plan: bool = False, progress: LoopProgress | None = None) -> Results:
    """NeMo streaming against offline, then each candidate against NeMo, for one model.

    ``bounded``: one model in memory at a time. NeMo's runs are spooled to disk (under
    ``spool_dir``) in every first-chunk mode a candidate needs and NeMo is closed; each candidate
    is prepared in a spawned process, loaded, streamed step by step against the spool, and closed.
    Memory: the largest single backend plus two steps of tensors, whatever the audio length.
    ``single_reference_pass``: see ``plan_model_night``.
    """
    from streaming_parity.interface.registry import REFERENCE, get

    progress = progress or LoopProgress()
    started = time.perf_counter()
    contexts, candidates, offline_contexts = plan_model_night(nemo_path, plan, att_contexts, work_dir, bounded=bounded,
                                                              single_reference_pass=single_reference_pass,
                                                              full_plan=full_plan)
    recorded = None
    if recordings is not None:
        # The reference streamed once per checkpoint, NeMo version, audio and plan: a night with nothing changed
        # runs no NeMo at all (streaming_parity.judge.recording).
        reference_plan = plan_reference(get(REFERENCE).capabilities, candidates, contexts,
                                        offline_contexts=offline_contexts)
        reference, recorded = cached_recording(nemo_path, utterances, reference_plan, recordings, progress=progress)
    else:
        progress.phase(f"loading NeMo ({nemo_path.name})")
        reference = get(REFERENCE).load(nemo_path)
    memory = PhaseMemory(REFERENCE) if bounded else None
    if memory is not None:
        for candidate in candidates:
            candidate.open = memory.before(candidate.label, candidate.open)
    store = SpoolStore(spool_dir, progress=progress.phase) if bounded else MemoryStore()
    try:
        results = compare_backends(reference, candidates, utterances, contexts, tolerances, model_path=nemo_path,
                                   store=store, offline_contexts=offline_contexts, close_reference=True,
                                   on_failure=record_failure(progress), progress=progress).results
    finally:
        reference.close()
    results.environment["device"] = device_description()
    if recorded is not None:
        results.extra["reference"] = recorded
    results.extra.update({"kind": "nightly", "lookaheads": [list(c) for c in contexts],
                          "utterances": [u.name for u in utterances],
                          "candidates": [dict(u) for u in plan.unavailable] + [c.record for c in candidates]})
    if memory is not None:
        memory.end()
        # Preparation peaks are per candidate, in its record.
        results.extra.update({**memory.figures(nemo_path.stat().st_size),
                              "seconds": round(time.perf_counter() - started, 1)})
    return results


class PhaseMemory:
    """Peak and resident memory at the end of each phase of a bounded run (reference, then each
    candidate): a phase ends when the next candidate starts opening, the last one at ``end``."""

    def __init__(self, first_phase: str):
        self.current = first_phase
        self.peaks: dict[str, float] = {}
        self.resident: dict[str, float] = {}

    def _close_phase(self) -> None:
        gc.collect()
        trim()
        self.peaks[self.current] = round(peak_rss_mb(), 1)
        self.resident[self.current] = round(current_rss_mb(), 1)

    def before(self, label: str, open_backend: Callable[[], Backend]) -> Callable[[], Backend]:
        def opened() -> Backend:
            self._close_phase()
            self.current = label
            return open_backend()

        return opened

    def end(self) -> None:
        self._close_phase()

    def figures(self, checkpoint_bytes: int) -> dict[str, Any]:
        """What a bounded run records in its results: peak RSS of this process after each phase (a running
        maximum), its RSS once that phase's model was closed, and the weights' size for scale."""
        return {"bounded_memory": True, "peak_rss_mb": self.peaks, "resident_after_close_mb": self.resident,
                "checkpoint_mb": round(checkpoint_bytes / (1 << 20), 1)}


def night_utterances(utterance_limit: int | None = None, audio_seconds: float | None = None) -> list[Utterance]:
    """What a night streams: the fixture speech (its first ``utterance_limit``), or, with ``audio_seconds``, those
    utterances joined into one stream of at least that length."""
    utterances = fixture_utterances()
    utterances = utterances[:utterance_limit] if utterance_limit else utterances
    return [long_utterance(utterances, audio_seconds)] if audio_seconds else utterances


@dataclass
class NightlyOutcome:
    night_dir: Path
    results_files: list[Path]
    report: ReportFiles
    results: list[Results] = field(default_factory=list)

    @property
    def fp32_passed(self) -> bool:
        return overall_passed(self.results, fp32_only=True)


def results_file_names(models: Sequence[str]) -> list[str]:
    if len(models) == 1:
        return ["results.json"]
    return [f"results-{Path(m).stem if m.endswith('.nemo') else m}.json" for m in models]


def run_matrix(models: Sequence[str], *, backends: Sequence[str] | None = None,
               att_contexts: Sequence[Sequence[int]] | None = None, utterance_limit: int | None = None,
               utterances: Sequence[Utterance] | None = None,
               tolerances_path: str | Path | None = None, work_dir: Path | None = None,
               console=None, title: str = "parity", audio_seconds: float | None = None,
               bounded_memory: bool | None = None, recordings: Path | None = None,
               full_plan: bool = False) -> list[Results]:
    """Run the matrix for each model with a rich progress display; one ``Results`` per model.

    ``utterances``: what to stream (default: the fixture speech, its first ``utterance_limit``).
    ``audio_seconds``: stream the utterances joined into one utterance of at least that length
    instead of the separate utterances. ``bounded_memory``: one model in memory at a time, runs
    spooled to disk (default: for checkpoints over 1 GiB). ``recordings``: a folder of cached reference
    recordings: NeMo streams a checkpoint once per audio set and plan, and later runs judge against that."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streaming_parity.core.system.progress import quiet, stderr_console

    console = console or stderr_console()
    say = (lambda _text: None) if quiet() else console.print  # -q: warnings only
    tolerances = Tolerances.load(tolerances_path)
    plan = plan_candidates(backends)
    if utterances is None:
        utterances = night_utterances(utterance_limit, audio_seconds)
    elif audio_seconds:
        utterances = [long_utterance(utterances, audio_seconds)]
    work_dir = Path(work_dir or default_work_dir())
    work_dir.mkdir(parents=True, exist_ok=True)
    say(f"[bold]{title}[/]: {len(models)} model(s) × "
                  f"{len(att_contexts) if att_contexts else 'every'} lookahead(s) × "
                  f"{len(utterances)} utterance(s); NeMo against "
                  f"{', '.join(c.label for c in plan.candidates) or 'its own offline forward only'}")
    for skipped in plan.unavailable:
        say(f"  [yellow]skipping[/] {skipped['backend']}:{skipped['dtype']} ({skipped['error']})")

    all_results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=quiet()) as bar:
        for model in models:
            nemo_path = resolve_model(model, progress=lambda m: say(f"  {m}"),
                                      in_subprocess=bounded_memory is not False)
            task = bar.add_task(model, total=None)
            def phase(text: str, task=task, model=model) -> None:
                bar.update(task, description=f"{model}: {text}")
                if not console.is_terminal:  # CI logs get no live bar: one line per phase instead
                    say(f"  {model}: {text}")

            progress = LoopProgress(total=lambda units, task=task: bar.update(task, total=units), phase=phase,
                                      advance=lambda _text, task=task: bar.advance(task))
            bounded = (bounded_memory if bounded_memory is not None
                       else nemo_path.stat().st_size > BOUNDED_MEMORY_THRESHOLD_BYTES)
            with SpoolStore.temporary(work_dir) as spool:
                results = run_model_matrix(nemo_path, plan, utterances, att_contexts, tolerances, work_dir=work_dir,
                                           bounded=bounded, spool_dir=Path(spool), recordings=recordings,
                                           full_plan=full_plan, progress=progress)
            bar.update(task, description=f"{model}: done")
            for record in results.extra["candidates"]:
                if record["status"] == "error":
                    bar.console.print(f"  [red]{record['backend']}:{record['dtype']} could not run:[/] {record['error']}")
            all_results.append(results)
    return all_results


def run_nightly(models: Sequence[str] | None = None, *, out_root: str | Path = "reports",
                date: str | None = None, mutation_testing: bool = False, probes: bool = False,
                probe_long_seconds: float | None = None, **matrix_options) -> NightlyOutcome:
    """The night: run the matrix, write ``<out_root>/<date>/`` results and the report (history from ``out_root``).

    ``mutation_testing``: also mutate the judge (``streaming_parity.app.mutation``) and list its survivors.
    ``probes``: also run the probe set (``streaming_parity.app.probes``) on every model through every planned
    candidate, its long stream ``probe_long_seconds`` long (default 10 minutes), into ``results-probes*.json``.
    """
    models = list(models or default_models())
    date = date or _dt.datetime.now(_dt.UTC).date().isoformat()
    night_dir = Path(out_root) / date
    all_results = run_matrix(models, title=f"parity nightly {date}", **matrix_options)
    files = []
    for results, file_name in zip(all_results, results_file_names(models)):
        results.extra["date"] = date
        files.append(results.save(night_dir / file_name))
    for peer_results in run_peer_check(plan_candidates(matrix_options.get("backends")), tolerances=Tolerances.load(
            matrix_options.get("tolerances_path")), work_dir=Path(matrix_options.get("work_dir") or default_work_dir())):
        peer_results.extra["date"] = date
        model = peer_results.extra["model"]
        name = "results-peers.json" if model == PEER_CHECK_MODELS[0] else f"results-peers-{model}.json"
        files.append(peer_results.save(night_dir / name))
        all_results.append(peer_results)
    if probes:
        from streaming_parity.app.probes import run_probe_check

        for model in models:
            probe_results = run_probe_check(
                model, plan_candidates(matrix_options.get("backends")),
                work_dir=Path(matrix_options.get("work_dir") or default_work_dir()),
                tolerances=Tolerances.load(matrix_options.get("tolerances_path")),
                att_contexts=matrix_options.get("att_contexts"), long_seconds=probe_long_seconds)
            probe_results.extra["date"] = date
            stem = Path(model).stem if model.endswith(".nemo") else model
            name = "results-probes.json" if len(models) == 1 else f"results-probes-{stem}.json"
            files.append(probe_results.save(night_dir / name))
            all_results.append(probe_results)
    mutants = None
    if mutation_testing:
        from streaming_parity.app.mutation import run_mutation_tests, write_mutants

        mutants = run_mutation_tests()
        files.append(write_mutants(mutants, night_dir))
    report = write_report(all_results, night_dir, reports_dir=out_root, date=date, title=f"Nightly parity {date}",
                          mutants=mutants)
    return NightlyOutcome(night_dir, files, report, all_results)


# The models every peer runtime is checked on, each where the peer runs it (a peer refusing a model at
# preparation, ``Unsupported``, skips it): the trained fixture, whose transcripts mean something (its WER
# is the finding), and the prompt-conditioned family (Nemotron-3.5, which mlx-audio runs).
PEER_CHECK_MODELS = ("trained-streaming", "tiny-prompt")
PEER_CHECK_UTTERANCES = 40


def _peer_check_utterances(model: str) -> list:
    from streaming_parity.interface.utterance import Utterance

    if model == "trained-streaming":
        from streaming_parity.fixtures.trained.evaluate import test_entries

        return [Utterance.from_file(e["audio_filepath"], e["text"]) for e in test_entries()[:PEER_CHECK_UTTERANCES]]

    return fixture_utterances()[:PEER_CHECK_UTTERANCES]


def run_peer_check(plan: MatrixPlan, *, work_dir: Path, tolerances: Tolerances,
                   progress: Callable[[str], None] = lambda _m: None) -> list[Results]:
    """Every planned peer runtime (a candidate that takes audio) on each of ``PEER_CHECK_MODELS`` it runs, at
    every lookahead: its WER next to NeMo's and, where it leaves NeMo, why: the stack bisection
    and the diagnosis of how it loaded and what it computes differently, from the compare session
    (``streaming_parity.app.session``). One ``Results`` per model."""
    from streaming_parity.fixtures.models import build
    from streaming_parity.interface.registry import REFERENCE, get

    peers = [c for c in plan.candidates if get(c.backend).capabilities.input == "audio"]
    checked = []
    for model in PEER_CHECK_MODELS if peers else ():
        nemo_path = build(model, progress=progress)
        utterances = _peer_check_utterances(model)
        reference = get(REFERENCE).load(nemo_path)
        contexts = list(reference.info.att_context_sizes)
        opened = []
        try:
            for planned in peers:
                entry = get(planned.backend)
                progress(f"peer check: preparing {planned.label} for {model}")
                try:
                    source = entry.prepare(nemo_path, work_dir, dtype=planned.dtype, att_context_sizes=contexts)
                except Unsupported as error:
                    progress(f"peer check: {planned.label} does not run {model}: {error}")
                    continue
                opened.append((source, entry.load(source, dtype=planned.dtype, nemo_path=nemo_path)))
            if not opened:
                continue
            progress(f"peer check: {', '.join(b.name for _, b in opened)} on {model}, {len(utterances)} utterances")
            outcome = compare_backends(reference, [backend for _, backend in opened], utterances, contexts,
                                       tolerances, model_path=nemo_path, include_offline=False,
                                       peer_sources={f"{b.name}:{b.dtype}": source for source, b in opened},
                                       diagnose_utterances=2, progress=progress)
        finally:
            for _, backend in opened:
                backend.close()
            reference.close()
        outcome.results.extra.update({"kind": "peer-check", "model": model, "utterances": [u.name for u in utterances],
                                      "lookaheads": [list(c) for c in contexts]})
        checked.append(outcome.results)
    return checked


def fp32_failures(results_list: Sequence[Results]) -> list[str]:
    """One line per failing fp32 comparison or fp32 candidate that could not run."""
    lines = [c.describe_failure() for r in results_list for c in r.comparisons
             if c.dtype == FP32 and c.gating and not c.passed]
    for results in results_list:
        for entry in results.extra.get("candidates", []):
            if entry.get("status") == "error" and entry.get("dtype") == FP32:
                lines.append(f"{entry['backend']}:{entry['dtype']} could not run: {entry.get('error')}")
    from streaming_parity.app.probes import probe_failure_lines

    return lines + probe_failure_lines(results_list)

"""``parity nightly``: the whole matrix, saved as results and rendered as a report.

Matrix: fixture models × lookaheads × every registered, available backend × each of its dtypes,
against NeMo. Per model the reference stays loaded; candidates are prepared (export, conversion),
loaded, streamed and closed one at a time so memory stays bounded by reference + one candidate.

A night writes ``<out>/<YYYY-MM-DD>/results.json`` (``results-<model>.json`` per model when the
night covers several), ``report.md`` and ``report.html``. Only fp32 comparisons gate the exit
status; reduced-precision candidates (int8, bf16) are judged against their own tolerance tables
and reported as degradation.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from harness.chunking import Chunk
from harness.memory import current_rss_mb, peak_rss_mb, trim
from harness.nemo_file import sha256_file
from harness.parity import Utterance, compare_backends, fixture_utterances
from harness.report import FP32, ReportFiles, overall_passed, write_report
from harness.results import Results
from harness.streaming import Backend, StepOutput, StreamingState
from harness.tolerances import Tolerances

REFERENCE = "nemo"


def default_work_dir() -> Path:
    """Where exports and conversions are cached between runs (``$PARITY_CACHE/artifacts``)."""
    root = Path(os.environ.get("PARITY_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
    return root / "artifacts"


@dataclass(frozen=True)
class Candidate:
    backend: str
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.dtype}"


@dataclass
class MatrixPlan:
    candidates: list[Candidate]
    unavailable: list[dict[str, str]]  # {backend, dtype, status, error} for backends that cannot run here


def plan_candidates(backends: Sequence[str] | None = None) -> MatrixPlan:
    """Every (backend, dtype) to compare against NeMo: the registry, or only ``backends`` when given.

    A name selects all of its backend's dtypes; ``NAME:DTYPE`` (``mlx:float32``) selects one.
    """
    from backends import REGISTRY, get

    plan = MatrixPlan([], [])
    for item in backends or REGISTRY:
        name, _, only = item.partition(":")
        if name == REFERENCE:
            continue
        entry = get(name)  # an unknown name raises KeyError with the registered ones
        if only and only not in entry.dtypes:
            raise KeyError(f"backend {name} runs {', '.join(entry.dtypes)}, not {only}")
        dtypes = [only] if only else list(entry.dtypes)
        if not entry.available():
            reason = "missing " + ", ".join(entry.missing_requirements())
            plan.unavailable += [{"backend": name, "dtype": d, "status": "unavailable", "error": reason}
                                 for d in dtypes]
            continue
        plan.candidates += [Candidate(name, dtype) for dtype in dtypes
                            if Candidate(name, dtype) not in plan.candidates]
    return plan


def resolve_model(name_or_path: str, progress: Callable[[str], None], *, in_subprocess: bool = False) -> Path:
    """A fixture name (built, cached) or the path of a ``.nemo``.

    ``in_subprocess``: build in a spawned process, so that building a large fixture (the model is
    instantiated, perturbed and saved) leaves no memory behind in a bounded-memory run.
    """
    if name_or_path.endswith(".nemo"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {path}")
        return path
    from fixtures.models import FIXTURES, build

    if name_or_path not in FIXTURES:
        raise KeyError(f"unknown fixture model {name_or_path!r}; known: {', '.join(FIXTURES)}")
    if not in_subprocess:
        return build(name_or_path, progress=progress)
    import multiprocessing

    progress(f"building {name_or_path} (if not cached) in a subprocess")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return Path(pool.apply(_build_quietly, (name_or_path,)))


def _build_quietly(name: str) -> str:
    from fixtures.models import build

    return str(build(name, progress=lambda _m: None))


def default_models() -> list[str]:
    from fixtures.models import FIXTURES

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


REPLAY_BUDGET_BYTES = 2 << 30


class ReplayedReference(Backend):
    """The reference behind a memo: a step with the same chunk and the same incoming state runs once.

    Every candidate is compared against NeMo on identical chunks, so without the memo NeMo would
    stream each utterance again for each candidate. The memo keeps at most ``budget_bytes`` of step
    outputs; past that, steps simply run again (a large model stays within bounded memory).
    """

    def __init__(self, backend: Backend, budget_bytes: int = REPLAY_BUDGET_BYTES):
        self.backend = backend
        self.name = backend.name
        self.info = backend.info
        self.dtype = backend.dtype
        self.first_chunk_modes = backend.first_chunk_modes
        self.budget_bytes = budget_bytes
        self.stored_bytes = 0
        self._steps: dict[str, StepOutput] = {}

    def features(self, audio):
        return self.backend.features(audio)

    def offline(self, mel, length, att_context_size, *, speaker_masks=None):
        return self.backend.offline(mel, length, att_context_size, speaker_masks=speaker_masks)

    def initial_state(self, att_context_size, batch_size: int = 1):
        return self.backend.initial_state(att_context_size, batch_size)

    def streaming_config(self, att_context_size):
        return self.backend.streaming_config(att_context_size)

    @staticmethod
    def _key(chunk: Chunk, state: StreamingState, speaker_masks=None) -> str:
        digest = hashlib.sha256(repr((chunk.index, chunk.drop_extra_pre_encoded, chunk.keep_all_outputs,
                                      chunk.is_first, chunk.is_last, chunk.cache_frames, state.att_context_size,
                                      state.step_index, [(d.last_token, d.tokens) for d in state.decoder])).encode())
        for array in (chunk.mel, chunk.length, *state.caches().values(),
                      *(a for d in state.decoder for a in (d.h, d.c))):
            digest.update(np.ascontiguousarray(array).tobytes())
        for mask in (speaker_masks.target, speaker_masks.background) if speaker_masks is not None else ():
            digest.update(b"none" if mask is None else repr(mask.shape).encode() + np.ascontiguousarray(mask).tobytes())
        return digest.hexdigest()

    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks=None) -> StepOutput:
        key = self._key(chunk, state, speaker_masks)
        if key not in self._steps:
            output = self.backend.step(chunk, state, speaker_masks=speaker_masks)
            size = sum(a.nbytes for a in (*output.taps.values(), *output.state.caches().values(), output.encoded))
            if self.stored_bytes + size > self.budget_bytes:
                return output
            self.stored_bytes += size
            self._steps[key] = output
        return self._steps[key]

    def close(self) -> None:
        self._steps.clear()
        self.backend.close()


def _merge(into: Results, part: Results) -> None:
    """Add a candidate's comparisons; transcripts and timings of a run already recorded are kept once."""
    into.comparisons += part.comparisons

    def key(row):
        return (row["backend"], row["dtype"], row.get("mode"), row["utterance"], tuple(row["att_context_size"]))

    for name in ("transcripts", "timings"):
        rows = getattr(into, name)
        seen = {key(r) for r in rows}
        rows += [r for r in getattr(part, name) if key(r) not in seen]


@dataclass
class MatrixProgress:
    """Callbacks the matrix reports to: ``total`` (units of work, once the lookaheads are known),
    ``phase`` (a line of text) and ``advance`` (one utterance × lookahead streamed through one pair)."""

    total: Callable[[int], None] = lambda _units: None
    phase: Callable[[str], None] = lambda _text: None
    advance: Callable[[str], None] = lambda _text: None


def run_model_matrix(nemo_path: Path, plan: MatrixPlan, utterances: Sequence[Utterance],
                     att_contexts: Sequence[Sequence[int]] | None, tolerances: Tolerances, *,
                     work_dir: Path, progress: MatrixProgress | None = None) -> Results:
    """NeMo streaming against offline, then each candidate against NeMo, for one model."""
    from backends import get

    progress = progress or MatrixProgress()
    progress.phase(f"loading NeMo ({nemo_path.name})")
    reference = ReplayedReference(get(REFERENCE).load(nemo_path))
    contexts = [tuple(int(v) for v in c) for c in (att_contexts or reference.info.att_context_sizes)]
    progress.total(len(utterances) * len(contexts) * (1 + len(plan.candidates)))
    try:
        progress.phase("NeMo streaming vs offline")
        results = compare_backends(reference, [], utterances, contexts, tolerances, model_path=nemo_path,
                                   progress=progress.advance).results
        records = [dict(entry) for entry in plan.unavailable]
        for candidate in plan.candidates:
            records.append(_run_candidate(reference, candidate, nemo_path, utterances, contexts, tolerances,
                                          work_dir, results, progress))
    finally:
        reference.close()
    results.environment["device"] = device_description()
    results.extra.update({"kind": "nightly", "lookaheads": [list(c) for c in contexts],
                          "utterances": [u.name for u in utterances], "candidates": records})
    return results


def _run_candidate(reference, candidate: Candidate, nemo_path: Path, utterances: Sequence[Utterance],
                   contexts: Sequence[tuple[int, int]], tolerances: Tolerances, work_dir: Path,
                   results: Results, progress: MatrixProgress) -> dict:
    """Prepare, load, compare and close one candidate; a failure is recorded, not raised."""
    from backends import get

    entry = get(candidate.backend)
    record = {"backend": candidate.backend, "dtype": candidate.dtype, "status": "ok"}
    backend = None
    try:
        started = time.perf_counter()
        progress.phase(f"preparing {candidate.label}")
        source = entry.prepare(nemo_path, work_dir, dtype=candidate.dtype, att_context_sizes=contexts)
        record.update(artifact=str(source), artifact_sha256=artifact_sha256(Path(source)),
                      prepare_seconds=round(time.perf_counter() - started, 2))
        backend = entry.load(source, dtype=candidate.dtype, nemo_path=nemo_path)
        progress.phase(f"{candidate.label} vs NeMo")
        part = compare_backends(reference, [backend], utterances, contexts, tolerances, model_path=nemo_path,
                                include_offline=False, progress=progress.advance).results
        _merge(results, part)
    except Exception as error:  # noqa: BLE001 - one broken backend must not hide the others' results
        _record_failure(record, candidate, error, progress)
    finally:
        _close(backend)
    return record


def _record_failure(record: dict, candidate: Candidate, error: Exception, progress: MatrixProgress) -> None:
    record.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8))
    progress.phase(f"{candidate.label} failed: {type(error).__name__}: {error}")


def _close(backend: Backend | None) -> None:
    """Close a backend and hand its memory back before the next one loads."""
    if backend is not None:
        backend.close()
    gc.collect()
    trim()


# Models whose .nemo is larger than this run the bounded-memory matrix by default.
BOUNDED_MEMORY_THRESHOLD_BYTES = 1 << 30


def _prepare_in_subprocess(backend: str, nemo_path: str, work_dir: str, dtype: str, contexts) -> tuple[str, float]:
    """``BackendEntry.prepare`` in a spawned process: exports and conversions load the whole
    checkpoint (an ONNX export of the 0.6B model peaks at about 10 GB), and that memory must not
    count against, or stay in, the comparison process."""
    from backends import get

    source = get(backend).prepare(Path(nemo_path), Path(work_dir), dtype=dtype, att_context_sizes=contexts)
    return str(source), peak_rss_mb()


def run_model_matrix_bounded(nemo_path: Path, plan: MatrixPlan, utterances: Sequence[Utterance],
                             att_contexts: Sequence[Sequence[int]] | None, tolerances: Tolerances, *,
                             work_dir: Path, spool_dir: Path, progress: MatrixProgress | None = None) -> Results:
    """The matrix of ``run_model_matrix`` with one model in memory at a time.

    NeMo streams first and its runs are spooled to disk (``harness.spool``) in every first-chunk
    mode a candidate needs; NeMo is then closed. Each candidate is prepared in a subprocess, loaded,
    spooled and compared step by step against the reference spool, then closed and its spool
    deleted. Memory: the largest single backend plus two steps of tensors, whatever the audio length.
    """
    import multiprocessing

    from backends import get
    from harness.chunking import FirstChunkMode
    from harness.compare import compare_runs, compare_streaming_to_offline
    from harness.parity import ParityReport, _record
    from harness.spool import record

    progress = progress or MatrixProgress()
    started = time.perf_counter()
    spool_dir = Path(spool_dir)
    reference_entry = get(REFERENCE)
    progress.phase(f"loading NeMo ({nemo_path.name})")
    reference = reference_entry.load(nemo_path)
    info = reference.info
    contexts = [tuple(int(v) for v in c) for c in (att_contexts or info.att_context_sizes)]
    progress.total(len(utterances) * len(contexts) * (1 + len(plan.candidates)))
    modes = {FirstChunkMode.PLAIN}  # NeMo streaming vs offline compares the plain mode
    for candidate in plan.candidates:
        shared = [m for m in reference_entry.first_chunk_modes if m in get(candidate.backend).first_chunk_modes]
        if not shared:
            raise ValueError(f"{candidate.backend} shares no first-chunk mode with {REFERENCE}")
        modes.add(FirstChunkMode(shared[0]))
    results = Results(model={"path": str(nemo_path), "sha256": sha256_file(nemo_path), "name": nemo_path.stem},
                      tolerances=tolerances.source)
    report = ParityReport(results)
    mels, spools, memory = {}, {}, {}
    try:
        progress.phase("NeMo: streaming (spooled to disk) and offline")
        for utterance in utterances:
            mel, _ = reference.features(utterance.audio[None])
            mels[utterance.name] = mel
            masks = utterance.speaker_masks_for(reference)
            for context in contexts:
                for mode in sorted(modes, key=lambda m: m.value):
                    run = record(reference, mel, context, mode, spool_dir / f"{REFERENCE}-{utterance.name}-"
                                 f"{context[0]}_{context[1]}-{mode.value}", speaker_masks=masks, features=mel)
                    spools[(utterance.name, context, mode)] = run
                    _record(results, report, run, utterance, info.vocabulary)
                offline = reference.offline(mel, np.array([mel.shape[-1]]), context, speaker_masks=masks)
                results.comparisons.append(compare_streaming_to_offline(
                    spools[(utterance.name, context, FirstChunkMode.PLAIN)], offline, tolerances,
                    num_layers=info.num_layers, utterance=utterance.name))
                del offline
                progress.advance(f"{utterance.name} [{context[0]},{context[1]}]")
    finally:
        _close(reference)
        reference = None
    memory[REFERENCE] = round(peak_rss_mb(), 1)
    resident = {REFERENCE: round(current_rss_mb(), 1)}  # after closing: what the next phase starts from

    records = [dict(entry) for entry in plan.unavailable]
    spawn = multiprocessing.get_context("spawn")
    for candidate in plan.candidates:
        entry = get(candidate.backend)
        status = {"backend": candidate.backend, "dtype": candidate.dtype, "status": "ok"}
        backend = None
        try:
            t0 = time.perf_counter()
            progress.phase(f"preparing {candidate.label} (subprocess)")
            with spawn.Pool(1) as pool:
                source, prepare_peak = pool.apply(_prepare_in_subprocess, (
                    candidate.backend, str(nemo_path), str(work_dir), candidate.dtype, [list(c) for c in contexts]))
            source = Path(source)
            status.update(artifact=str(source), artifact_sha256=artifact_sha256(source),
                          prepare_seconds=round(time.perf_counter() - t0, 2), prepare_peak_rss_mb=round(prepare_peak, 1))
            backend = entry.load(source, dtype=candidate.dtype, nemo_path=nemo_path)
            progress.phase(f"{candidate.label} vs NeMo (spooled)")
            mode = next(FirstChunkMode(m) for m in reference_entry.first_chunk_modes if m in backend.first_chunk_modes)
            for utterance in utterances:
                masks = utterance.speaker_masks_for(backend)
                features = backend.features(utterance.audio[None])[0]
                for context in contexts:
                    run = record(backend, mels[utterance.name], context, mode,
                                 spool_dir / f"{candidate.backend}-{candidate.dtype}-current", dtype=backend.dtype,
                                 speaker_masks=masks, features=features)
                    results.comparisons.append(compare_runs(spools[(utterance.name, context, mode)], run, tolerances,
                                                            num_layers=info.num_layers, utterance=utterance.name))
                    _record(results, report, run, utterance, info.vocabulary)
                    run.delete()
                    progress.advance(f"{candidate.label} {utterance.name} [{context[0]},{context[1]}]")
        except Exception as error:  # noqa: BLE001 - one broken backend must not hide the others' results
            _record_failure(status, candidate, error, progress)
        finally:
            _close(backend)
            backend = None
        memory[candidate.label] = round(peak_rss_mb(), 1)
        resident[candidate.label] = round(current_rss_mb(), 1)
        records.append(status)
    for run in spools.values():
        run.delete()
    results.environment["device"] = device_description()
    results.extra.update({
        "kind": "nightly", "lookaheads": [list(c) for c in contexts], "utterances": [u.name for u in utterances],
        "candidates": records, "bounded_memory": True,
        # Peak RSS of this process after each phase (a running maximum), its RSS once that phase's
        # model was closed, and the weights' size for scale; preparation peaks are per candidate.
        "peak_rss_mb": memory, "resident_after_close_mb": resident,
        "checkpoint_mb": round(nemo_path.stat().st_size / (1 << 20), 1),
        "seconds": round(time.perf_counter() - started, 1),
    })
    return results


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
               tolerances_path: str | Path | None = None, work_dir: Path | None = None,
               console=None, title: str = "parity", audio_seconds: float | None = None,
               bounded_memory: bool | None = None) -> list[Results]:
    """``audio_seconds``: stream the fixture speech joined into one utterance of at least that length
    instead of the separate utterances. ``bounded_memory``: one model in memory at a time, runs
    spooled to disk (default: for checkpoints over 1 GiB)."""
    """Run the matrix for each model with a rich progress display; one ``Results`` per model."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True, highlight=False)
    tolerances = Tolerances.load(tolerances_path)
    plan = plan_candidates(backends)
    utterances = fixture_utterances()[:utterance_limit] if utterance_limit else fixture_utterances()
    if audio_seconds:
        from harness.parity import long_utterance

        utterances = [long_utterance(utterances, audio_seconds)]
    work_dir = Path(work_dir or default_work_dir())
    work_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{title}[/]: {len(models)} model(s) × "
                  f"{len(att_contexts) if att_contexts else 'every'} lookahead(s) × "
                  f"{len(utterances)} utterance(s); NeMo against "
                  f"{', '.join(c.label for c in plan.candidates) or 'its own offline forward only'}")
    for skipped in plan.unavailable:
        console.print(f"  [yellow]skipping[/] {skipped['backend']}:{skipped['dtype']} ({skipped['error']})")

    all_results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        for model in models:
            nemo_path = resolve_model(model, progress=lambda m: bar.console.print(f"  {m}"),
                                      in_subprocess=bounded_memory is not False)
            task = bar.add_task(model, total=None)
            def phase(text: str, task=task, model=model) -> None:
                bar.update(task, description=f"{model}: {text}")
                if not console.is_terminal:  # CI logs get no live bar: one line per phase instead
                    bar.console.print(f"  {model}: {text}")

            progress = MatrixProgress(total=lambda units, task=task: bar.update(task, total=units), phase=phase,
                                      advance=lambda _text, task=task: bar.advance(task))
            bounded = (bounded_memory if bounded_memory is not None
                       else nemo_path.stat().st_size > BOUNDED_MEMORY_THRESHOLD_BYTES)
            if bounded:
                with tempfile.TemporaryDirectory(prefix="parity-spool-", dir=work_dir) as spool:
                    results = run_model_matrix_bounded(nemo_path, plan, utterances, att_contexts, tolerances,
                                                       work_dir=work_dir, spool_dir=Path(spool), progress=progress)
            else:
                results = run_model_matrix(nemo_path, plan, utterances, att_contexts, tolerances, work_dir=work_dir,
                                           progress=progress)
            bar.update(task, description=f"{model}: done")
            for record in results.extra["candidates"]:
                if record["status"] == "error":
                    bar.console.print(f"  [red]{record['backend']}:{record['dtype']} could not run:[/] {record['error']}")
            all_results.append(results)
    return all_results


def run_nightly(models: Sequence[str] | None = None, *, out_root: str | Path = "reports",
                date: str | None = None, **matrix_options) -> NightlyOutcome:
    """The night: run the matrix, write ``<out_root>/<date>/`` results and the report (history from ``out_root``)."""
    models = list(models or default_models())
    date = date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    night_dir = Path(out_root) / date
    all_results = run_matrix(models, title=f"parity nightly {date}", **matrix_options)
    files = []
    for results, file_name in zip(all_results, results_file_names(models)):
        results.extra["date"] = date
        files.append(results.save(night_dir / file_name))
    report = write_report(all_results, night_dir, reports_dir=out_root, date=date, title=f"Nightly parity {date}")
    return NightlyOutcome(night_dir, files, report, all_results)


def fp32_failures(results_list: Sequence[Results]) -> list[str]:
    """One line per failing fp32 comparison or fp32 candidate that could not run."""
    lines = [c.describe_failure() for r in results_list for c in r.comparisons if c.dtype == FP32 and not c.passed]
    for results in results_list:
        for entry in results.extra.get("candidates", []):
            if entry.get("status") == "error" and entry.get("dtype") == FP32:
                lines.append(f"{entry['backend']}:{entry['dtype']} could not run: {entry.get('error')}")
    return lines

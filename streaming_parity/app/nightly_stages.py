"""The night split across machines: record (where NeMo is) -> candidates (anywhere, no NeMo) -> report.

``parity nightly --stage record`` resolves each model, records NeMo once per checkpoint, NeMo version, audio
and plan (``streaming_parity.app.nightly.cached_recording``), prepares every planned candidate's artifact
(export, conversion) and writes the night's plan, ``night.json``, beside the recordings: for each model, its
recording and every candidate's artifact (relative to the work directory), sha256 and first-chunk modes. It
also judges NeMo's own streaming against its offline forward from the recording, once, for the report.

``parity nightly --stage candidates --backends NAME[:DTYPE],...`` reads that plan on another machine (a macOS
runner for MLX on Metal, a Linux runner for ONNX Runtime), opens each selected candidate's artifact as the
record stage made it (its sha256 checked), and judges it against the recording: no torch, no NeMo. Each job
writes its own results; ``parity report`` merges the jobs' results into one report.

The verdicts are the ones a single-machine night gives: the same loop, the same plan, the same recording
(``tests/test_nightly_stages.py``).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from streaming_parity.app.nightly import (
    BOUNDED_MEMORY_THRESHOLD_BYTES,
    NightlyOutcome,
    PhaseMemory,
    PlannedCandidate,
    artifact_sha256,
    cached_recording,
    default_models,
    default_work_dir,
    night_utterances,
    plan_candidates,
    plan_model_night,
    prepare_candidate,
    record_failure,
    reduce_where_slow,
    resolve_model,
)
from streaming_parity.app.session import compare_backends
from streaming_parity.core.errors import InvalidInput, UnknownName
from streaming_parity.core.system.progress import quiet, stderr_console
from streaming_parity.interface.registry import REFERENCE, get
from streaming_parity.judge.loop import Candidate, LoopProgress, MemoryStore, SpoolStore, plan_reference
from streaming_parity.judge.tolerances import Tolerances
from streaming_parity.report import write_report

NIGHT_PLAN = "night.json"
NIGHT_PLAN_KIND = "streaming-parity night plan"
NIGHT_PLAN_SCHEMA = 1
STAGES = ("all", "record", "candidates")


def _say(console) -> Any:
    return (lambda _text: None) if quiet() else (lambda text: console.print(text, highlight=False))


def _night(date: str | None) -> str:
    return date or _dt.datetime.now(_dt.UTC).date().isoformat()


def _stem(model: str) -> str:
    return Path(model).stem if model.endswith(".nemo") else model


# -- record ---------------------------------------------------------------------------------------------------

def record_night(models: Sequence[str] | None = None, *, recordings: Path, out_root: str | Path = "reports",
                 date: str | None = None, backends: Sequence[str] | None = None,
                 att_contexts: Sequence[Sequence[int]] | None = None, utterance_limit: int | None = None,
                 audio_seconds: float | None = None, tolerances_path: str | Path | None = None,
                 work_dir: Path | None = None, bounded_memory: bool | None = None) -> NightlyOutcome:
    """Record NeMo for every model (reused when cached), prepare every planned candidate's artifact, and write
    ``recordings/night.json``; NeMo's streaming~offline goes to ``<out_root>/<date>/results-<model>-reference.json``."""
    console = stderr_console()
    say = _say(console)
    date = _night(date)
    recordings, work_dir = Path(recordings), Path(work_dir or default_work_dir())
    recordings.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    tolerances = Tolerances.load(tolerances_path)
    plan = plan_candidates(backends)
    utterances = night_utterances(utterance_limit, audio_seconds)
    models = list(models or default_models())
    night_dir = Path(out_root) / date
    entries, files, all_results = [], [], []
    for model in models:
        nemo_path = resolve_model(model, progress=say, in_subprocess=bounded_memory is not False)
        bounded = (bounded_memory if bounded_memory is not None
                   else nemo_path.stat().st_size > BOUNDED_MEMORY_THRESHOLD_BYTES)
        contexts, candidates, offline_contexts = plan_model_night(nemo_path, plan, att_contexts, work_dir,
                                                                  bounded=bounded)
        progress = LoopProgress(phase=lambda text, model=model: say(f"  {model}: {text}"))
        reference_plan = plan_reference(get(REFERENCE).capabilities, candidates, contexts,
                                        offline_contexts=offline_contexts)
        recording, recorded = cached_recording(nemo_path, utterances, reference_plan, recordings, progress=progress)
        prepared = []
        for planned, candidate in zip(plan.candidates, candidates):
            progress.phase(f"preparing {planned.label}")
            # Whether a dtype is judged on a reduced plan is decided where it runs (the candidates stage).
            record = {k: v for k, v in candidate.record.items() if k != "reduced_plan"}
            try:
                source = prepare_candidate(planned, nemo_path, work_dir, contexts, in_subprocess=bounded,
                                           record=record)
            except Exception as error:  # noqa: BLE001 - one candidate that cannot be made must not stop the others
                record.update(status="error", error=f"{type(error).__name__}: {error}")
                progress.phase(f"{planned.label} could not be prepared: {error}")
                prepared.append(record)
                continue
            # Relative to the work directory, so that a job that downloads it elsewhere finds it (--work-dir).
            source = source.resolve()
            record.update(artifact=source.relative_to(work_dir.resolve()).as_posix()
                          if source.is_relative_to(work_dir.resolve()) else str(source),
                          modes=list(candidate.modes) if candidate.modes else None)
            prepared.append(record)
        # NeMo's own streaming~offline, judged once here from the recording, not again in every candidate job.
        results = compare_backends(recording, [], utterances, contexts, tolerances, offline_contexts=offline_contexts,
                                   progress=progress).results
        results.model.update(name=nemo_path.stem, sha256=recording.model["sha256"], recording=str(recording.directory))
        results.extra.update({"kind": "nightly", "stage": "record", "date": date, "reference": recorded,
                              "lookaheads": [list(c) for c in contexts], "utterances": [u.name for u in utterances],
                              "candidates": [dict(u) for u in plan.unavailable]})
        files.append(results.save(night_dir / f"results-{_stem(model)}-reference.json"))
        all_results.append(results)
        entries.append({"model": _stem(model), "recording": recording.directory.resolve().relative_to(
            recordings.resolve()).as_posix(), "checkpoint_bytes": nemo_path.stat().st_size,
            "lookaheads": [list(c) for c in contexts],
            "offline_lookaheads": [list(c) for c in offline_contexts] if offline_contexts else None,
            "candidates": prepared, "unavailable": [dict(u) for u in plan.unavailable]})
    night_plan = {"kind": NIGHT_PLAN_KIND, "schema": NIGHT_PLAN_SCHEMA, "date": date, "models": entries}
    (recordings / NIGHT_PLAN).write_text(json.dumps(night_plan, indent=1) + "\n")
    say(f"night plan: {recordings / NIGHT_PLAN} ({len(entries)} model(s), "
        f"{sum(len(e['candidates']) for e in entries)} candidate artifact(s) under {work_dir})")
    report = write_report(all_results, night_dir, reports_dir=out_root, date=date, title=f"Nightly parity {date}: "
                                                                                        "the reference")
    return NightlyOutcome(night_dir, files, report, all_results)


# -- candidates -----------------------------------------------------------------------------------------------

def read_night_plan(recordings: Path) -> dict[str, Any]:
    path = Path(recordings) / NIGHT_PLAN
    if not path.is_file():
        raise InvalidInput(f"{path}: no night plan; run `parity nightly --stage record --recordings "
                           f"{recordings}` first")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{path}: not valid JSON ({error})") from None
    if not isinstance(plan, dict) or plan.get("kind") != NIGHT_PLAN_KIND:
        raise InvalidInput(f"{path}: not a night plan")
    if not isinstance(plan.get("schema"), int) or plan["schema"] > NIGHT_PLAN_SCHEMA:
        raise InvalidInput(f"{path}: schema {plan.get('schema')!r} is newer than this harness reads "
                           f"({NIGHT_PLAN_SCHEMA})")
    return plan


def _selected(record: dict[str, Any], backends: Sequence[str] | None) -> bool:
    if not backends:
        return True
    return any(item.partition(":")[0] == record["backend"] and item.partition(":")[2] in ("", record["dtype"])
               for item in backends)


def _check_selection(plan: dict[str, Any], backends: Sequence[str] | None) -> None:
    """A selection that names nothing in the plan is a mistake (a misspelt backend), never a night that checked
    nothing."""
    planned = {(c["backend"], c["dtype"]) for entry in plan["models"] for c in entry["candidates"]}
    for item in backends or ():
        name, _, dtype = item.partition(":")
        get(name)  # an unknown backend name raises with the registered ones
        if not any(b == name and dtype in ("", d) for b, d in planned):
            raise UnknownName(f"{item} is not in the night plan (planned: "
                              f"{', '.join(f'{b}:{d}' for b, d in sorted(planned)) or 'none'})")


def _checkpoint_bytes(entry: dict[str, Any], work_dir: Path) -> int:
    """The checkpoint's size the plan states, or else the largest planned artifact's here: a full-size model must
    never run unbounded (its runs held in memory) for want of the figure."""
    if entry.get("checkpoint_bytes"):
        return int(entry["checkpoint_bytes"])
    sizes = [0]
    for record in entry["candidates"]:
        source = Path(record.get("artifact") or "")
        source = source if source.is_absolute() else work_dir / source
        if source.is_dir():
            sizes.append(sum(f.stat().st_size for f in source.rglob("*") if f.is_file()))
    return max(sizes)


def stage_candidate(record: dict[str, Any], work_dir: Path, contexts: Sequence[tuple[int, int]], *,
                    full_plan: bool = False) -> Candidate:
    """A planned candidate, opened from the artifact the record stage made (its sha256 checked first)."""
    entry = get(record["backend"])
    planned = PlannedCandidate(record["backend"], record["dtype"])
    result = {k: v for k, v in record.items() if k != "modes"}

    def open_backend():
        source = Path(record["artifact"])
        source = source if source.is_absolute() else work_dir / source
        if not source.exists():
            raise InvalidInput(f"{planned.label}: its artifact {source} is not here (download the record stage's "
                               "work directory to --work-dir)")
        found = artifact_sha256(source)
        if found != record["artifact_sha256"]:
            raise InvalidInput(f"{planned.label}: {source} has sha256 {str(found)[:12]}, the record stage made "
                               f"{record['artifact_sha256'][:12]}")
        return entry.load(source, dtype=planned.dtype, nemo_path=None)

    modes = tuple(record["modes"]) if record.get("modes") else None
    candidate = Candidate(label=planned.label, open=open_backend, capabilities=entry.capabilities, record=result,
                          modes=modes)
    # A dtype with no fast path on this machine (MLX's bfloat16 on a Linux CPU, not on Metal) is judged on less.
    if not full_plan:
        reduce_where_slow(candidate, planned, contexts)
    return candidate


# What one candidate process holds at most, in units of the fp32 checkpoint: measured at full size, an ONNX
# Runtime session peaked at 1.9x its weights (docs/recordings.md); MLX and the judge stay below.
CANDIDATE_MEMORY_FACTOR = 2.0


def parallel_candidates(requested: int, candidates: int, checkpoint_bytes: int, available_mb: float | None) -> int:
    """How many candidate processes run at once: at most ``requested`` and one per candidate, and only as many as
    the memory the system has free holds, each counted at ``CANDIDATE_MEMORY_FACTOR`` times the checkpoint."""
    if requested < 1:
        raise InvalidInput(f"--parallel must be at least 1, not {requested}")
    wanted = min(requested, max(candidates, 1))
    if available_mb is None or not checkpoint_bytes:
        return wanted
    fits = int(available_mb * (1 << 20) // (CANDIDATE_MEMORY_FACTOR * checkpoint_bytes))
    return max(1, min(wanted, fits))


def _judge_one_selection(options: dict[str, Any]) -> list[str]:
    outcome = judge_night_candidates(**options)
    return [str(path) for path in outcome.results_files]


def judge_night_candidates(*, recordings: Path, backends: Sequence[str] | None = None, out_root: str | Path = "reports",
                           date: str | None = None, tolerances_path: str | Path | None = None,
                           work_dir: Path | None = None, job: str | None = None,
                           bounded_memory: bool | None = None, parallel: int = 1,
                           full_plan: bool = False) -> NightlyOutcome:
    """Every planned candidate selected by ``backends`` (all of them by default), judged against the recording the
    record stage made; one results file per model, ``results-<model>-<job>.json`` (``job``: default the backends).
    ``bounded_memory`` (default: for checkpoints over 1 GiB): runs spooled to disk, and each candidate phase's peak
    and resident memory measured, as in the single-machine night. ``parallel``: judge the candidates in up to that
    many processes at once, as many as the machine's free memory holds (``parallel_candidates``), each writing its
    own results; one report covers them all."""
    from streaming_parity.judge.recording import Recording

    console = stderr_console()
    say = _say(console)
    recordings, work_dir = Path(recordings), Path(work_dir or default_work_dir())
    plan = read_night_plan(recordings)
    _check_selection(plan, backends)
    date = _night(date or plan.get("date"))
    tolerances = Tolerances.load(tolerances_path)
    job = job or ("-".join(b.replace(":", "_") for b in backends) if backends else "candidates")
    night_dir = Path(out_root) / date
    if parallel != 1:
        return _judge_in_parallel(plan, recordings=recordings, backends=backends, out_root=out_root, date=date,
                                  tolerances_path=tolerances_path, work_dir=work_dir, job=job,
                                  bounded_memory=bounded_memory, parallel=parallel, full_plan=full_plan, say=say)
    files, all_results = [], []
    for entry in plan["models"]:
        chosen = [c for c in entry["candidates"] if _selected(c, backends)]
        if not chosen:
            continue
        recording = Recording(recordings / entry["recording"])
        utterances = recording.utterances()
        contexts = [tuple(c) for c in entry["lookaheads"]]
        unavailable, candidates = [], []
        for record in chosen:
            backend = get(record["backend"])
            if record.get("status") == "error":  # the record stage could not make its artifact
                status, reason = "error", record.get("error")
            elif not backend.available():
                status, reason = "unavailable", "missing " + ", ".join(backend.missing_requirements())
            else:
                candidates.append(stage_candidate(record, work_dir, contexts, full_plan=full_plan))
                continue
            unavailable.append({"backend": record["backend"], "dtype": record["dtype"], "status": status,
                                "error": reason})
            say(f"  [yellow]skipping[/] {record['backend']}:{record['dtype']} ({reason})")
        progress = LoopProgress(phase=lambda text, model=entry["model"]: say(f"  {model}: {text}"))
        checkpoint = _checkpoint_bytes(entry, work_dir)
        bounded = bounded_memory if bounded_memory is not None else checkpoint > BOUNDED_MEMORY_THRESHOLD_BYTES
        memory = PhaseMemory("recording") if bounded else None
        for candidate in candidates if memory is not None else ():
            candidate.open = memory.before(candidate.label, candidate.open)
        started = time.perf_counter()
        # Spooled beside the artifacts (a runner's work disk), or where the system keeps temporary files.
        with SpoolStore.temporary(work_dir if work_dir.is_dir() else None) if bounded else nullcontext() as spool:
            results = compare_backends(recording, candidates, utterances, contexts, tolerances, include_offline=False,
                                       store=SpoolStore(spool, progress=progress.phase) if bounded
                                       else MemoryStore(),
                                       on_failure=record_failure(progress), progress=progress).results
        if memory is not None:
            memory.end()
            results.extra.update(memory.figures(checkpoint))
        results.extra["seconds"] = round(time.perf_counter() - started, 1)
        results.model.update(name=Path(recording.model.get("name") or entry["model"]).stem,
                             sha256=recording.model["sha256"], recording=str(recording.directory))
        results.extra.update({"kind": "nightly", "stage": "candidates", "job": job, "date": date,
                              "reference": {"recording": str(recording.directory), "cached": True},
                              "lookaheads": [list(c) for c in contexts], "utterances": [u.name for u in utterances],
                              "candidates": unavailable + [c.record for c in candidates]})
        files.append(results.save(night_dir / f"results-{entry['model']}-{job}.json"))
        all_results.append(results)
    if not all_results:
        raise InvalidInput(f"{recordings / NIGHT_PLAN}: no planned candidate to judge")
    report = write_report(all_results, night_dir, reports_dir=out_root, date=date,
                          title=f"Nightly parity {date}: {job}")
    return NightlyOutcome(night_dir, files, report, all_results)


def _judge_in_parallel(plan: dict[str, Any], *, recordings: Path, backends: Sequence[str] | None, out_root: str | Path,
                       date: str, tolerances_path, work_dir: Path, job: str, bounded_memory: bool | None,
                       parallel: int, full_plan: bool, say) -> NightlyOutcome:
    """One process per planned ``backend:dtype`` (spawned: no state shared with this one), as many at once as
    ``parallel_candidates`` allows; their results files are reported together."""
    import multiprocessing

    from streaming_parity.core.system.memory import available_mb
    from streaming_parity.judge.results import Results

    selections = list(dict.fromkeys(f"{c['backend']}:{c['dtype']}" for entry in plan["models"]
                                    for c in entry["candidates"] if _selected(c, backends)))
    checkpoint = max((entry.get("checkpoint_bytes", 0) for entry in plan["models"]), default=0)
    processes = parallel_candidates(parallel, len(selections), checkpoint, available_mb())
    say(f"judging {len(selections)} candidate(s) in {processes} process(es) at once")
    options = [{"recordings": recordings, "backends": [selection], "out_root": out_root, "date": date,
                "tolerances_path": tolerances_path, "work_dir": work_dir, "job": f"{job}-{selection.replace(':', '_')}",
                "bounded_memory": bounded_memory, "full_plan": full_plan} for selection in selections]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        files = [Path(path) for paths in pool.map(_judge_one_selection, options, chunksize=1) for path in paths]
    all_results = [Results.load(path) for path in files]
    night_dir = Path(out_root) / date
    report = write_report(all_results, night_dir, reports_dir=out_root, date=date, title=f"Nightly parity {date}: {job}")
    return NightlyOutcome(night_dir, files, report, all_results)

"""``parity probes``: every probe (``streaming_parity.fixtures.probes``) through every candidate.

A probe that compares (``match``, ``match-or-refuse``) is one compare session
(``streaming_parity.app.session.compare_backends``): the reference streams the probe's streams once, every
candidate streams the identical chunks and is judged per tap and step (a transcript-level peer on its
tokens, with the stack bisection where it leaves the reference); a long probe's runs are spooled to disk,
so memory stays flat whatever its length. What is not a comparison is recorded as an outcome in
``results.extra["probes"]``: a probe's input refused by the harness's input stage as a backend declares
(``Capabilities.sample_rate``, ``channels``), a refusal or a crash inside a session, the runs alone of
input too short to compare (``empty-or-refuse``), and the chunk-size probe, which feeds each backend chunks
cut for another lookahead. ``streaming_parity.judge.probes`` derives the verdicts from both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.app.session import compare_backends, model_record
from streaming_parity.core.errors import BadInput
from streaming_parity.core.system.provenance import HubOrigin
from streaming_parity.fixtures.probes import Probe, ProbeStream, fingerprint
from streaming_parity.interface.audio import conform_samples
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import ChunkSchedule, FirstChunkMode, StreamingConfig
from streaming_parity.interface.decoding import decode_tokens
from streaming_parity.interface.driver import stream_utterance
from streaming_parity.interface.utterance import Utterance
from streaming_parity.judge import probes as judged
from streaming_parity.judge.loop import Candidate, LoopProgress, SpoolStore
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import Tolerances

log = logging.getLogger(__name__)
MEL_HOP_SECONDS = 0.01  # the family's 10 ms mel hop: a step's shift in seconds, for error growth per minute


@dataclass
class ProbeRun:
    results: Results
    verdicts: list[judged.ProbeVerdict]

    @property
    def passed(self) -> bool:
        return not judged.failing(self.verdicts)


def label(backend: Backend) -> str:
    return f"{backend.name}:{backend.dtype}"


def _message(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, BadInput) else f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Recorder:
    """Outcomes of one run of the probe set, appended to ``results.extra["probes"]["outcomes"]``."""

    def __init__(self, results: Results):
        self.outcomes: list[dict[str, Any]] = results.extra[judged.KEY]["outcomes"]

    def add(self, probe: Probe, backend: str, kind: str, message: str = "", **fields: Any) -> None:
        self.outcomes.append({"probe": probe.name, "backend": backend, "kind": kind, "message": message, **fields})

    def failure(self, probe: Probe, backend: str, error: BaseException, **fields: Any) -> None:
        """A refusal (``BadInput``: the input, said clearly) or a crash (anything else: a defect)."""
        if isinstance(error, BadInput):
            self.add(probe, backend, judged.REFUSAL, _message(error), **fields)
            return
        log.debug("%s crashed on probe %s", backend, probe.name, exc_info=error)
        self.add(probe, backend, judged.ERROR, _message(error),
                 traceback="".join(traceback.format_exception(error, limit=8)), **fields)


def admit(stream: ProbeStream, backend: Backend, *, resample: bool, mix_to_mono: bool) -> np.ndarray:
    """The samples ``backend`` is given for ``stream``: through the harness's input stage, at the rate and with
    the channels the backend declares, resampled or mixed down only as allowed; ``AudioError`` otherwise."""
    return conform_samples(stream.audio, stream.sample_rate, name=f"{stream.name} ({stream.sample_rate} Hz, "
                           f"{stream.channels} channel{'s' if stream.channels > 1 else ''})",
                           sample_rate=backend.capabilities.sample_rate, channels=backend.capabilities.channels,
                           resample=resample, mix_to_mono=mix_to_mono)


def run_probes(reference: Backend, candidates: Sequence[Backend], probes: Sequence[Probe],
               contexts: Sequence[Sequence[int]], tolerances: Tolerances, *, model_path: Path,
               model_hub: HubOrigin | None = None, backends: Sequence[dict[str, Any]] | None = None,
               peer_sources: Mapping[str, Path] | None = None, resample: bool = True, mix_to_mono: bool = True,
               spool_parent: Path | None = None, progress: Callable[[str], None] | None = None) -> ProbeRun:
    """Every probe through ``reference`` and every open candidate, at every lookahead of ``contexts``.

    ``resample`` / ``mix_to_mono``: what the harness's input stage may do to a probe's input that a backend
    does not take as it is (as ``--resample`` and ``--mix-to-mono``); otherwise it is refused. ``peer_sources``:
    each transcript-level candidate's files by label, so that a peer that leaves the reference is bisected.
    ``backends``: provenance records for the results; ``spool_parent``: where a long probe's runs are spooled."""
    say = progress or (lambda _text: None)
    contexts = [(int(c[0]), int(c[1])) for c in contexts]
    results = Results(model=model_record(model_path, model_hub), tolerances=tolerances.source)
    if backends:
        results.model["backends"] = list(backends)
    results.extra.update({"kind": "probes", "lookaheads": [list(c) for c in contexts]})
    results.extra[judged.KEY] = {
        "probe_set": fingerprint(probes),
        "settings": {"resample": resample, "mix_to_mono": mix_to_mono},
        "definitions": [probe.describe() for probe in probes],
        "backends": [{"label": label(reference), "reference": True, "gating": True}] + [
            {"label": label(c), "reference": False, "gating": c.capabilities.input == "mel"} for c in candidates],
        "step_seconds": {f"{c[0]},{c[1]}": round(reference.streaming_config(c).shift_size[1] * MEL_HOP_SECONDS, 6)
                         for c in contexts},
        "outcomes": [],
    }
    recorder = _Recorder(results)
    for index, probe in enumerate(probes):
        say(f"probe {index + 1}/{len(probes)}: {probe.name} ({probe.failure_class}, {probe.seconds:.1f} s)")
        if probe.expect == judged.EMPTY_OR_REFUSE:
            for backend in (reference, *candidates):
                _run_alone(probe, backend, contexts, recorder, resample=resample, mix_to_mono=mix_to_mono)
        elif probe.expect == judged.REFUSE:
            for backend in (reference, *candidates):
                _feed_other_chunks(probe, backend, reference, contexts, recorder)
        else:
            _compare(probe, reference, candidates, contexts, tolerances, results, recorder, model_path=model_path,
                     peer_sources=peer_sources or {}, resample=resample, mix_to_mono=mix_to_mono,
                     spool_parent=spool_parent, say=say)
    verdicts = judged.refresh(results)
    return ProbeRun(results, verdicts)


# -- a probe that compares: the compare session ------------------------------------------------------------

def _compare(probe: Probe, reference: Backend, candidates: Sequence[Backend], contexts, tolerances: Tolerances,
             results: Results, recorder: _Recorder, *, model_path: Path,
             peer_sources: Mapping[str, Path], resample: bool, mix_to_mono: bool, spool_parent: Path | None,
             say: Callable[[str], None]) -> None:
    try:
        streams = [admit(s, reference, resample=resample, mix_to_mono=mix_to_mono) for s in probe.streams]
    except BadInput as error:
        recorder.failure(probe, label(reference), error)
        streams = None
    admitted = []
    for candidate in candidates:
        try:
            mine = [admit(s, candidate, resample=resample, mix_to_mono=mix_to_mono) for s in probe.streams]
        except BadInput as error:
            recorder.failure(probe, label(candidate), error)
            continue
        if streams is None:
            continue  # the reference refused it: nothing to compare against (the verdict says so)
        if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(mine, streams)):
            recorder.add(probe, label(candidate), judged.INAPPLICABLE,
                         f"takes {candidate.capabilities.sample_rate} Hz with {candidate.capabilities.channels} "
                         f"channel(s), the reference {reference.capabilities.sample_rate} Hz with "
                         f"{reference.capabilities.channels}: not the same samples, not comparable")
            continue
        admitted.append(candidate)
    if streams is None or not admitted:
        return
    utterances = [Utterance(name=s.name, audio=audio, text=s.text) for s, audio in zip(probe.streams, streams)]
    # One session per set of lookaheads: a candidate streams those of ``contexts`` its files hold (a peer's
    # directory may hold one).
    groups: dict[tuple[tuple[int, int], ...], list[Backend]] = {}
    for candidate in admitted:
        runs = tuple(_runs(candidate, contexts))
        if not runs:
            recorder.add(probe, label(candidate), judged.INAPPLICABLE, _no_lookahead(candidate, contexts))
            continue
        groups.setdefault(runs, []).append(candidate)
    for runs, group in groups.items():
        _session(probe, reference, group, utterances, runs, tolerances, results, recorder, model_path=model_path,
                 peer_sources=peer_sources, spool_parent=spool_parent, say=say)


def _session(probe: Probe, reference: Backend, candidates: Sequence[Backend], utterances: Sequence[Utterance],
             contexts, tolerances: Tolerances, results: Results, recorder: _Recorder, *, model_path: Path,
             peer_sources: Mapping[str, Path], spool_parent: Path | None,
             say: Callable[[str], None]) -> None:
    """One compare session: the reference and ``candidates`` on the probe's streams, merged into ``results``."""

    def on_failure(candidate: Candidate, error: BaseException) -> None:
        recorder.failure(probe, candidate.label, error)

    spool = SpoolStore.temporary(spool_parent) if probe.long else contextlib.nullcontext(None)
    with spool as directory:
        options: dict[str, Any] = {} if directory is None else {
            "store": SpoolStore(directory, progress=lambda text: say(f"  {probe.name}: {text}"))}
        mine = {label(c): peer_sources[label(c)] for c in candidates if label(c) in peer_sources}
        try:
            outcome = compare_backends(reference, [Candidate.of(c) for c in candidates], utterances, list(contexts),
                                       tolerances, model_path=model_path, include_offline=False,
                                       peer_sources=mine or None, on_failure=on_failure,
                                       progress=LoopProgress(phase=lambda text: say(f"  {probe.name}: {text}")),
                                       **options)
        except Exception as error:  # noqa: BLE001 - the reference's refusal or crash is the probe's outcome
            recorder.failure(probe, label(reference), error)
            return
    session = outcome.results
    results.comparisons += session.comparisons
    # The reference's runs are recorded once, however many sessions (sets of lookaheads) a probe takes.
    def key(row: dict[str, Any]) -> tuple:
        return (row["utterance"], row["backend"], row["dtype"], row["mode"], tuple(row["att_context_size"]),
                row.get("decoder"))

    seen = {key(row) for row in results.transcripts}
    results.transcripts += [row for row in session.transcripts if key(row) not in seen]
    seen = {key(row) for row in results.timings}
    results.timings += [row for row in session.timings if key(row) not in seen]
    for key in ("peer_bisection", "peer_diagnosis"):
        for row in session.extra.get(key, []):
            results.extra.setdefault(key, []).append({**row, "probe": probe.name})


# -- input too short to compare: each backend alone ---------------------------------------------------------

def _run_alone(probe: Probe, backend: Backend, contexts, recorder: _Recorder, *, resample: bool,
               mix_to_mono: bool) -> None:
    """Each stream through ``backend`` alone at every lookahead it runs: its tokens, its refusal or its crash."""
    name = label(backend)
    for stream in probe.streams:
        try:
            audio = admit(stream, backend, resample=resample, mix_to_mono=mix_to_mono)
        except BadInput as error:
            recorder.failure(probe, name, error)
            continue
        runs = _runs(backend, contexts)
        if not runs:
            recorder.add(probe, name, judged.INAPPLICABLE, _no_lookahead(backend, contexts))
        for context in runs:
            try:
                run = stream_utterance(backend, Utterance(name=stream.name, audio=audio), context)
            except Exception as error:  # noqa: BLE001 - a refusal or a crash, recorded as the probe's outcome
                recorder.failure(probe, name, error, context=list(context))
                continue
            recorder.add(probe, name, judged.RAN, tokens=list(run.tokens), context=list(context),
                         text=decode_tokens(backend.info.vocabulary, run.tokens), steps=len(run.steps))


def _runs(backend: Backend, contexts) -> list[tuple[int, int]]:
    """The lookaheads of ``contexts`` that ``backend``'s files hold."""
    return [c for c in contexts if c in backend.info.att_context_sizes]


def _no_lookahead(backend: Backend, contexts) -> str:
    return (f"its files hold {', '.join(f'[{c[0]},{c[1]}]' for c in backend.info.att_context_sizes)}, none of the "
            f"lookaheads probed ({', '.join(f'[{c[0]},{c[1]}]' for c in contexts)})")


# -- the chunk-size probe ---------------------------------------------------------------------------------

def other_chunking(reference: Backend, context: tuple[int, int]) -> tuple[str, StreamingConfig]:
    """A chunking that ``context``'s export was not made for, wider than its own (what would be silently
    shortened): the model's widest lookahead, or, when ``context``'s chunk is the widest, its own chunk one
    encoder frame wider."""
    own = reference.streaming_config(context)
    wider = [reference.streaming_config(c) for c in reference.info.att_context_sizes
             if reference.streaming_config(c).chunk_size[1] > own.chunk_size[1]]
    if wider:
        widest = max(wider, key=lambda config: config.chunk_size[1])
        return f"[{widest.att_context_size[0]},{widest.att_context_size[1]}]", widest
    frames = own.subsampling_factor
    return f"{own.chunk_size[1] + frames}-frame", dataclasses.replace(
        own, chunk_size=(own.chunk_size[0] + frames, own.chunk_size[1] + frames),
        shift_size=(own.shift_size[0] + frames, own.shift_size[1] + frames))


def _feed_other_chunks(probe: Probe, backend: Backend, reference: Backend, contexts, recorder: _Recorder) -> None:
    """Chunks cut for another lookahead, fed to ``backend`` streaming ``context``: its first chunk (fresh state)
    and a later one (after a correct first chunk), in every first-chunk mode it shares with the reference. A
    backend that takes audio (its own chunking) is asked to stream a lookahead its files do not hold."""
    name = label(backend)
    stream = probe.streams[0]
    if backend.capabilities.input == "audio":
        missing = [c for c in reference.info.att_context_sizes if c not in backend.info.att_context_sizes]
        if not missing:
            recorder.add(probe, name, judged.INAPPLICABLE, "it chunks the audio itself and runs every lookahead of "
                                                            "the model: no chunk size it was not made for")
            return
        context = missing[0]
        try:
            run = stream_utterance(backend, Utterance(name=stream.name, audio=stream.audio), context)
        except Exception as error:  # noqa: BLE001
            recorder.failure(probe, name, error, context=list(context))
            return
        recorder.add(probe, name, judged.ACCEPTED,
                     f"streamed at [{context[0]},{context[1]}], which its files were not made for: "
                     f"{len(run.tokens)} tokens in {len(run.steps)} steps", context=list(context))
        return
    runs = _runs(backend, contexts)
    if not runs:
        recorder.add(probe, name, judged.INAPPLICABLE, _no_lookahead(backend, contexts))
        return
    context = runs[0]
    wrong_name, wrong = other_chunking(reference, context)
    mel = reference.features(stream.audio[None])[0]
    shared = set(backend.capabilities.first_chunk_modes) & set(reference.capabilities.first_chunk_modes)
    modes = [m for m in (FirstChunkMode.PLAIN, FirstChunkMode.PAD_AND_DROP) if m.value in shared]
    for mode in modes:
        right = ChunkSchedule(backend.streaming_config(context), mode).chunks(mel)
        other = ChunkSchedule(wrong, mode).chunks(mel)
        for position, fed in ((0, other[0]), (1, other[1] if len(other) > 1 else None)):
            if fed is None:
                continue
            where = dict(context=list(context), mode=mode.value)
            state = backend.initial_state(context)
            try:
                if position:
                    state = backend.step(right[0], state).state  # a correct first chunk, then a wrong later one
                output = backend.step(fed, state)
            except Exception as error:  # noqa: BLE001
                recorder.failure(probe, name, error, **where)
                continue
            made_for = right[position].mel.shape[-1] - right[position].cache_frames
            recorder.add(probe, name, judged.ACCEPTED,
                         f"ran a {wrong_name} chunk ({fed.mel.shape[-1] - fed.cache_frames} new mel frames) as "
                         f"{'its first' if position == 0 else 'a later'} chunk at [{context[0]},{context[1]}] "
                         f"({mode.value}; made for {made_for}): returned {int(output.encoded_len[0])} encoder frames",
                         **where)


# -- printing ---------------------------------------------------------------------------------------------

VERDICT_STYLE = {judged.PASS: "green", judged.FAIL: "red", judged.REFUSED: "yellow", judged.NOT_APPLICABLE: "dim"}


def print_probe_tables(verdicts: Sequence[judged.ProbeVerdict], out=None) -> None:
    """One table per backend (the reference's first): class, probe, verdict and its detail."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = out or Console(highlight=False)
    by_backend: dict[str, list[judged.ProbeVerdict]] = {}
    for verdict in verdicts:
        by_backend.setdefault(verdict.backend, []).append(verdict)
    for backend, rows in by_backend.items():
        role = (" (reference)" if rows[0].reference else "" if rows[0].gating
                else " (peer runtime: reported, not gating)")
        table = Table(title=f"probes: {backend}{role}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("class", no_wrap=True)
        table.add_column("probe", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        table.add_column("detail", overflow="fold")
        for row in rows:
            style = VERDICT_STYLE.get(row.verdict, "")
            table.add_row(row.failure_class, row.probe, f"[{style}]{row.verdict}[/]", escape(row.detail))
        console.print(table)


def print_long_streams(results: Results, out=None) -> None:
    """Each long-stream run's time a step and memory per minute of audio (``judge.probes.resource_use``)."""
    from rich.console import Console
    from rich.markup import escape

    rows = judged.resource_use(results)
    if not rows:
        return
    console = out or Console(highlight=False)
    console.print("long stream, per minute of audio:")
    for row in rows:
        console.print(f"  {escape(row.describe())}")


# -- the nightly's probe check ----------------------------------------------------------------------------

def run_probe_check(model: str, plan, *, work_dir: Path, tolerances: Tolerances,
                    att_contexts: Sequence[Sequence[int]] | None = None, long_seconds: float | None = None,
                    progress: Callable[[str], None] = lambda _m: None) -> Results:
    """``parity nightly --probes``: the probe set on one model (a fixture name or a ``.nemo``) through every planned
    candidate (``streaming_parity.app.nightly.plan_candidates``), prepared and loaded together (fixture-sized
    models: every candidate is open at once). A candidate that does not run the model is recorded as such."""
    from streaming_parity.app.nightly import resolve_model
    from streaming_parity.core.errors import Unsupported
    from streaming_parity.fixtures.probes import DEFAULT_LONG_SECONDS, probe_set
    from streaming_parity.interface.registry import REFERENCE, get

    nemo_path = resolve_model(model, progress)
    # The trained fixture reads its own held-out speech; every other model the fixture speech.
    speech = "trained" if model == "trained-streaming" else "fixture"
    probes = probe_set(long_seconds=long_seconds or DEFAULT_LONG_SECONDS, speech=speech)
    reference = get(REFERENCE).load(nemo_path)
    contexts = [tuple(int(v) for v in c) for c in (att_contexts or reference.info.att_context_sizes)]
    opened, peer_sources, records = [], {}, []
    try:
        for planned in plan.candidates:
            entry = get(planned.backend)
            progress(f"probes: preparing {planned.label} for {model}")
            try:
                source = entry.prepare(nemo_path, work_dir, dtype=planned.dtype, att_context_sizes=contexts)
                backend = entry.load(source, dtype=planned.dtype, nemo_path=nemo_path)
            except Unsupported as error:
                records.append({"backend": planned.backend, "dtype": planned.dtype, "status": "unavailable",
                                "error": f"{type(error).__name__}: {error}"})
                continue
            except Exception as error:  # noqa: BLE001 - one candidate that cannot run must not hide the others
                records.append({"backend": planned.backend, "dtype": planned.dtype, "status": "error",
                                "error": f"{type(error).__name__}: {error}"})
                continue
            opened.append(backend)
            records.append({"backend": planned.backend, "dtype": planned.dtype, "status": "ok",
                            "artifact": str(source)})
            if backend.capabilities.input == "audio":
                peer_sources[label(backend)] = source
        run = run_probes(reference, opened, probes, contexts, tolerances, model_path=nemo_path,
                         peer_sources=peer_sources, spool_parent=work_dir, progress=progress)
    finally:
        for backend in opened:
            backend.close()
        reference.close()
    run.results.extra.update({"kind": "probes", "model": model, "candidates": records})
    run.results.extra[judged.KEY]["settings"]["speech"] = speech
    return run.results


def probe_failure_lines(results_list: Sequence[Results], *, fp32_only: bool = True) -> list[str]:
    """One line per failing probe verdict that no failing comparison already reports (a crash, a refusal of input
    a backend must take, a wrong chunk accepted, state carried over), for gating backends (fp32 only by default)."""
    lines = []
    for results in results_list:
        for verdict in judged.probe_verdicts(results):
            if verdict.ok or verdict.comparison or not verdict.gating:
                continue
            if fp32_only and not verdict.backend.endswith(":float32"):
                continue
            lines.append(f"probe {verdict.failure_class}/{verdict.probe} {verdict.backend}: {verdict.detail}")
    return lines

"""The one stream-and-compare loop: ``parity compare``, the nightly (in memory or bounded) and MLX
verification all run through ``stream_and_compare``.

Data flow, one way::

    audio -> reference mel (once per utterance) -> chunk schedule -> reference runs (run store)
          -> NeMo streaming vs offline
          -> for each candidate, one at a time: open, stream the identical chunks, compare every
             step against the stored reference run, judge, record, close

The reference streams first, in every first-chunk mode a candidate needs, and its runs go to a
``RunStore``: ``MemoryStore`` keeps them as ``StreamRun``s, ``SpoolStore`` writes each step to disk
(``streaming_parity.judge.spool``) so that a comparison holds one step of each run at a time. With
``close_reference`` the reference is closed before the first candidate opens: only one model is
in memory at a time. A reference step therefore runs once, however many candidates there are.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.system.cpu import int8_kernel_path
from streaming_parity.interface.backend import Backend, Capabilities
from streaming_parity.interface.chunking import FirstChunkMode, shared_first_chunk_mode
from streaming_parity.interface.decoding import decode_tokens
from streaming_parity.interface.driver import StreamRun, stream
from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.speakers import SpeakerTargets
from streaming_parity.interface.types import OfflineOutput
from streaming_parity.interface.utterance import Utterance
from streaming_parity.judge.compare import (
    PairComparison,
    compare_runs,
    compare_streaming_to_offline,
    judge_teacher_forced,
)
from streaming_parity.judge.forcing import judge_offline, needs_teacher_forcing, reference_decisions
from streaming_parity.judge.int8 import INT8, explain_int8_excess
from streaming_parity.judge.metrics import word_error_rate
from streaming_parity.judge.prompts import explain_prompt_divergence
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import Tolerances

if TYPE_CHECKING:
    from streaming_parity.judge.recording import Recording

Context = tuple[int, int]
SAMPLE_RATE = 16000


# -- run stores --------------------------------------------------------------------------------------

class RunStore(Protocol):
    """Where streamed runs live between streaming and comparison."""

    def record(self, backend: Backend, mel: np.ndarray, context: Context, mode: FirstChunkMode, *, key: str,
               speaker_masks: SpeakerTargets | None, features: np.ndarray | None,
               forced_decisions: Sequence[Sequence[int]] | None = None, audio: np.ndarray | None = None,
               prompt: str | None = None) -> Any:
        """Stream ``mel`` through ``backend`` (``audio`` for a backend with its own front end) and keep the
        run; returns an object ``compare_runs`` reads."""

    def release(self, run: Any) -> None:
        """Forget a run that is no longer needed."""


class MemoryStore:
    """Runs kept in memory as ``StreamRun``s (the tiny fixtures, ``parity compare``, verification)."""

    def record(self, backend, mel, context, mode, *, key, speaker_masks, features, forced_decisions=None,
               audio=None, prompt=None):
        return stream(backend, mel, context, mode, dtype=backend.dtype, speaker_masks=speaker_masks,
                      features=features, forced_decisions=forced_decisions, audio=audio, prompt=prompt)

    def release(self, run) -> None:
        pass


class SpoolStore:
    """Runs written step by step under ``directory``: memory does not grow with the audio. ``progress`` gets a
    line about every minute while a run streams (``streaming_parity.judge.spool.PROGRESS_SECONDS``)."""

    def __init__(self, directory: str | Path, progress: Callable[[str], None] | None = None):
        self.directory = Path(directory)
        self.progress = progress

    def record(self, backend, mel, context, mode, *, key, speaker_masks, features, forced_decisions=None,
               audio=None, prompt=None):
        from streaming_parity.judge.spool import record

        return record(backend, mel, context, mode, self.directory / key, dtype=backend.dtype,
                      speaker_masks=speaker_masks, features=features, forced_decisions=forced_decisions,
                      audio=audio, prompt=prompt, progress=self.progress)

    def release(self, run) -> None:
        run.delete()

    @classmethod
    def temporary(cls, parent: str | Path | None = None) -> tempfile.TemporaryDirectory:
        """A spool directory removed on exit: ``with SpoolStore.temporary(dir) as path: SpoolStore(path)``."""
        return tempfile.TemporaryDirectory(prefix="parity-spool-", dir=parent)


# -- candidates, hooks, progress ---------------------------------------------------------------------

class _SamePrompt:
    """``Candidate.prompt``'s default: the candidate streams with the reference's locale."""

    def __repr__(self) -> str:
        return "SAME_PROMPT"


SAME_PROMPT = _SamePrompt()

@dataclass
class Candidate:
    """A backend to compare against the reference, opened only when its turn comes.

    ``open`` returns the backend (preparing it first, if need be); the loop closes it afterwards
    unless ``keep_open`` (a backend the caller opened and still uses). ``capabilities`` is what the
    backend declares; the loop plans the reference's first-chunk modes from it before opening any
    candidate. ``modes``: the first-chunk modes to compare (default: the one it shares with the
    reference, plain where possible). ``compare_offline``: also compare both offline forwards.
    ``prompt``: a prompt-conditioned model's locale for this candidate's streams instead of the
    reference's (``None``: never set, a runtime that skips ``set_inference_prompt``); by default each
    utterance's, the one the reference streams with. ``contexts`` and ``utterance_limit``: a reduced plan for this
    candidate (only those lookaheads, only the first utterances), for a dtype with no fast path on the machine.
    """

    label: str
    open: Callable[[], Backend]
    capabilities: Capabilities
    keep_open: bool = False
    modes: tuple[str, ...] | None = None
    compare_offline: bool = False
    prompt: str | None | _SamePrompt = SAME_PROMPT
    record: dict[str, Any] = field(default_factory=dict)  # status, artifact, timings: filled by the caller
    contexts: tuple[Context, ...] | None = None
    utterance_limit: int | None = None

    def plan(self, utterances: Sequence[Utterance], contexts: Sequence[Context]) -> tuple[list[Utterance],
                                                                                           list[Context]]:
        """The utterances and lookaheads this candidate streams: all of them, or its reduced plan."""
        chosen = [c for c in contexts if self.contexts is None or c in self.contexts]
        if not chosen:
            raise InvalidInput(f"{self.label}: its lookaheads {list(self.contexts or ())} are none of the run's "
                               f"{list(contexts)}")
        return list(utterances[:self.utterance_limit] if self.utterance_limit else utterances), chosen

    @classmethod
    def of(cls, backend: Backend, **options: Any) -> Candidate:
        """An already open backend, left open."""
        return cls(label=f"{backend.name}:{backend.dtype}", open=lambda: backend,
                   capabilities=backend.capabilities, keep_open=True, **options)


# (candidate, exception) -> None to record the failure and go on; re-raise to stop
FailureHook = Callable[[Candidate, BaseException], None]


@dataclass
class LoopProgress:
    """Callbacks: ``total`` (units of work, once known), ``phase`` (a line of text) and ``advance``
    (one utterance x lookahead streamed through one backend)."""

    total: Callable[[int], None] = lambda _units: None
    phase: Callable[[str], None] = lambda _text: None
    advance: Callable[[str], None] = lambda _text: None


def candidate_modes(reference: Capabilities, candidate: Candidate) -> list[FirstChunkMode]:
    if candidate.modes is None:
        return [shared_first_chunk_mode(reference, candidate.capabilities)]
    modes = [FirstChunkMode(m) for m in candidate.modes]
    for mode in modes:
        if mode.value not in candidate.capabilities.first_chunk_modes or mode.value not in reference.first_chunk_modes:
            raise InvalidInput(f"{candidate.label} cannot be compared in {mode.value} mode")
    return modes


@dataclass(frozen=True)
class ReferencePlan:
    """What the reference phase streams: the first-chunk modes at each lookahead (every mode a candidate is compared
    in, and plain where NeMo's streaming is compared with its offline forward, the only mode comparable to it), and
    where the offline forward is run (``offline_at``) or kept for the candidates (``keep_offline``: every lookahead).
    A recording made for a comparison records exactly this (``streaming_parity.app.nightly``)."""

    modes: dict[Context, list[FirstChunkMode]]
    offline_at: frozenset[Context]
    keep_offline: bool

    @property
    def offline_contexts(self) -> list[Context]:
        return [context for context in self.modes if self.keep_offline or context in self.offline_at]


def plan_reference(reference: Capabilities, candidates: Sequence[Candidate], contexts: Sequence[Sequence[int]], *,
                   include_offline: bool = True, offline_contexts: Sequence[Sequence[int]] | None = None,
                   reference_modes: Sequence[str] = ()) -> ReferencePlan:
    """The reference phase ``stream_and_compare`` runs for these candidates (its arguments of the same names)."""
    contexts = [(int(c[0]), int(c[1])) for c in contexts]
    offline_at = frozenset() if not include_offline else frozenset(contexts) if offline_contexts is None else \
        frozenset((int(c[0]), int(c[1])) for c in offline_contexts)
    wanted = {m for candidate in candidates for m in candidate_modes(reference, candidate)}
    wanted |= {FirstChunkMode(m) for m in reference_modes}
    # Plain first: NeMo's plain-mode run is the one comparable to offline, recorded before any other.
    modes = {context: sorted(wanted | ({FirstChunkMode.PLAIN} if context in offline_at else set()),
                             key=lambda m: (m is not FirstChunkMode.PLAIN, m.value)) for context in contexts}
    return ReferencePlan(modes, offline_at, keep_offline=any(candidate.compare_offline for candidate in candidates))


# -- the loop ----------------------------------------------------------------------------------------

@dataclass
class ReferenceRuns:
    """The reference's side of a comparison, streamed once and kept for everything judged against it:
    every candidate, and a peer's stack bisection and diagnosis (``streaming_parity.judge.bisect``,
    ``streaming_parity.judge.peer_audit``), which read these runs instead of streaming NeMo again.

    ``backend`` stays usable for its front end only while the caller keeps it open (not ``close_reference``), and
    only when it is a live backend, not a ``Recording``."""

    backend: Backend | Recording
    # Read before a live reference may close: it explains a candidate's prompt divergence (judge.prompts).
    prompt_kernel: PromptKernel | None
    mels: dict[str, np.ndarray] = field(default_factory=dict)
    runs: dict[tuple[str, Context, FirstChunkMode], Any] = field(default_factory=dict)
    offline: dict[tuple[str, Context], OfflineOutput] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    def run(self, utterance: str, context: Sequence[int], mode: FirstChunkMode | str) -> Any:
        key = (utterance, (int(context[0]), int(context[1])), FirstChunkMode(mode))
        if key not in self.runs:
            raise InvalidInput(f"the reference did not stream {utterance} at [{key[1][0]},{key[1][1]}] in "
                               f"{key[2].value} mode (recorded: {sorted((u, c, m.value) for u, c, m in self.runs)})")
        return self.runs[key]

    def release(self, run: Any) -> None:
        """A comparison is done with ``run`` for now: a recorded run lets its memory-mapped shards go (it is read
        again, reopened, by the next candidate); a streamed run is kept as it is."""
        from streaming_parity.judge.recording import RecordedRun

        if isinstance(run, RecordedRun):
            run.release()

    def offline_output(self, utterance: str, context: Sequence[int]) -> OfflineOutput:
        key = (utterance, (int(context[0]), int(context[1])))
        if key not in self.offline:
            raise InvalidInput(f"the reference's offline forward of {utterance} at [{key[1][0]},{key[1][1]}] "
                               "was not kept (keep_offline)")
        return self.offline[key]


@dataclass
class LoopOutcome:
    results: Results
    # Every run kept in memory (MemoryStore only), by (backend:dtype, utterance, context, mode).
    runs: dict[tuple[str, str, Context, str], StreamRun] = field(default_factory=dict)
    recorded: set[tuple[str, str, Context, str]] = field(default_factory=set, repr=False)
    reference: ReferenceRuns | None = None
    # Seconds each backend (``name:dtype``) computed in this comparison: its front end over every utterance, every
    # run it streamed, the teacher-forced reruns the judge asked for included (``StepOutput.seconds``). What is left
    # of the wall time is the harness's.
    backend_seconds: dict[str, float] = field(default_factory=dict)
    # Of those, the seconds of each backend's front end (the mel of every utterance it computed).
    frontend_seconds: dict[str, float] = field(default_factory=dict)
    # Wall seconds of each phase (the reference's streaming and each candidate's streaming and judging, opening
    # and loading excluded), by the backend's ``name:dtype``: its share that is not the backend's is the harness's.
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def count_compute(self, run: Any) -> None:
        self.count_seconds(f"{run.backend}:{run.dtype}", float(sum(run.step_seconds)))

    def count_seconds(self, label: str, seconds: float) -> None:
        self.backend_seconds[label] = self.backend_seconds.get(label, 0.0) + seconds

    def count_frontend(self, label: str, seconds: float) -> None:
        self.frontend_seconds[label] = self.frontend_seconds.get(label, 0.0) + seconds
        self.count_seconds(label, seconds)

    @property
    def passed(self) -> bool:
        return self.results.passed


# (candidate, its open backend, the outcome so far) -> None: called after the candidate's comparisons, while
# both it and the reference's runs are still there (a peer's bisection and diagnosis, streaming_parity.app.session).
AfterCandidate = Callable[[Candidate, Backend, LoopOutcome], None]


def stream_and_compare(reference: Backend | Recording, candidates: Sequence[Candidate], utterances: Sequence[Utterance],
                       contexts: Sequence[Sequence[int]], tolerances: Tolerances, *,
                       store: RunStore | None = None, include_offline: bool = True,
                       offline_contexts: Sequence[Sequence[int]] | None = None, close_reference: bool = False,
                       reference_modes: Sequence[str] = (), on_failure: FailureHook | None = None,
                       after_candidate: AfterCandidate | None = None,
                       results: Results | None = None, progress: LoopProgress | None = None) -> LoopOutcome:
    """Stream every utterance at every lookahead through the reference, then each candidate in turn.

    ``reference``: the reference backend, or a ``Recording`` of it (``streaming_parity.judge.recording``), whose
    runs are then read instead of streamed: the candidates are compared and judged the same way.

    The mel is computed once per utterance by the reference front end and the identical chunks go
    to every backend; each candidate's own front end is compared as the ``mel`` tap.
    ``include_offline``: NeMo streaming against NeMo offline, per utterance and lookahead (only at
    ``offline_contexts`` when given: the plain-mode reference run it needs is then streamed there alone).
    ``reference_modes``: first-chunk modes the reference also streams beyond the candidates' (for what
    ``after_candidate`` compares against the stored runs); the reference's offline forwards are kept in
    ``outcome.reference`` when a candidate ``compare_offline``s. ``on_failure`` records a candidate that fails to open
    or run and goes on; without it, the failure propagates.
    """
    store = store or MemoryStore()
    progress = progress or LoopProgress()
    contexts = [(int(c[0]), int(c[1])) for c in contexts]
    results = results if results is not None else Results(model={}, tolerances=tolerances.source)
    outcome = LoopOutcome(results)
    plans = [(candidate, candidate_modes(reference.capabilities, candidate)) for candidate in candidates]
    plan = plan_reference(reference.capabilities, candidates, contexts, include_offline=include_offline,
                          offline_contexts=offline_contexts, reference_modes=reference_modes)
    units = len(utterances) * len(contexts)
    progress.total(units + sum(len(u) * len(c) for u, c in (candidate.plan(utterances, contexts)
                                                              for candidate in candidates)))
    try:
        started = time.perf_counter()
        outcome.reference = stream_reference(reference, utterances, tolerances, plan, store=store, outcome=outcome,
                                             progress=progress)
        outcome.phase_seconds[f"{reference.name}:{reference.dtype}"] = time.perf_counter() - started
    finally:
        if close_reference:
            reference.close()
    try:
        # Candidate phase: one at a time, each closed before the next opens.
        for candidate, wanted in plans:
            compare_candidate(outcome.reference, candidate, wanted, utterances, contexts, tolerances, store=store,
                              outcome=outcome, on_failure=on_failure, after=after_candidate,
                              progress=progress)
    finally:
        if isinstance(reference, Backend):  # a recording's runs are its own, never the store's
            for run in outcome.reference.runs.values():
                store.release(run)
    return outcome


def stream_reference_runs(reference: Backend, utterances: Sequence[Utterance], contexts: Sequence[Sequence[int]],
                          tolerances: Tolerances, *,
                          modes: Sequence[str] = (FirstChunkMode.PLAIN.value,)) -> ReferenceRuns:
    """The reference alone, kept in memory: for a caller that has no comparison's runs to hand (a bisection
    or diagnosis outside a session)."""
    return stream_and_compare(reference, [], utterances, contexts, tolerances, include_offline=False,
                              reference_modes=modes).reference


def stream_reference(reference: Backend | Recording, utterances: Sequence[Utterance], tolerances: Tolerances,
                     plan: ReferencePlan, *, store: RunStore, outcome: LoopOutcome,
                     progress: LoopProgress) -> ReferenceRuns:
    """The reference phase: every run of ``plan``, and NeMo's own streaming~offline at ``plan.offline_at``,
    recorded in ``outcome``. A ``Recording`` (``streaming_parity.judge.recording``) serves the runs and offline
    forwards it holds instead of streaming them; everything else is the same."""
    info = reference.info
    recorded = not isinstance(reference, Backend)
    side = ReferenceRuns(backend=reference, prompt_kernel=reference.prompt_kernel() if info.prompted else None)
    offline_at, keep_offline = plan.offline_at, plan.keep_offline
    progress.phase(f"{reference.name}: " + ("reading the recording" if recorded else "streaming")
                   + (" and offline" if offline_at or keep_offline else ""))
    for utterance in utterances:
        if recorded:
            reference.check_utterance(utterance)
            mel = reference.mel(utterance.name)
        else:
            mel = _own_features(reference, utterance, outcome)
        side.mels[utterance.name] = mel
        masks = utterance.speaker_masks_for(reference)
        prompt = utterance.prompt_for(info)
        for context, modes in plan.modes.items():
            for mode in modes:
                run = reference.run(utterance.name, context, mode) if recorded else store.record(
                    reference, mel, context, mode, key=_key(reference, utterance, context, mode),
                    speaker_masks=masks, features=mel, prompt=prompt)
                side.runs[(utterance.name, context, mode)] = run
                if not recorded:
                    outcome.count_compute(run)
                _record_run(outcome, run, utterance, info.vocabulary)
            if context in offline_at or keep_offline:
                # NeMo's streaming buffer streams the whole mel tensor, including the frame past
                # seq_len (= samples // hop) that the front end masks to zero; with seq_len as the
                # offline length, the last 1-3 frames differ by ~1e-2 whenever that frame adds an
                # encoder frame. The offline forward therefore sees exactly the streamed input.
                offline = reference.offline(utterance.name, context) if recorded else reference.offline(
                    mel, np.array([mel.shape[-1]] * mel.shape[0]), context, speaker_masks=masks, prompt=prompt)
                if context in offline_at:
                    streamed = side.runs[(utterance.name, context, FirstChunkMode.PLAIN)]
                    outcome.results.comparisons.append(compare_streaming_to_offline(
                        streamed, offline, tolerances, num_layers=info.num_layers, utterance=utterance.name))
                    side.release(streamed)
                if keep_offline:
                    side.offline[(utterance.name, context)] = offline
                del offline
            progress.advance(f"{reference.name} {utterance.name} [{context[0]},{context[1]}]")
    return side


def compare_candidate(reference: ReferenceRuns, candidate: Candidate, modes: Sequence[FirstChunkMode],
                      utterances: Sequence[Utterance], contexts: Sequence[Context], tolerances: Tolerances, *,
                      store: RunStore, outcome: LoopOutcome,
                      on_failure: FailureHook | None = None, after: AfterCandidate | None = None,
                      progress: LoopProgress | None = None) -> None:
    """Open ``candidate``, stream the identical chunks in each of ``modes``, judge every step against the
    reference's stored run, record, and close it (unless ``keep_open``)."""
    progress = progress or LoopProgress()
    results = outcome.results
    info = reference.info
    num_layers = info.num_layers
    backend = None
    try:
        progress.phase(f"{candidate.label}: opening")
        backend = candidate.open()
        if not isinstance(reference.backend, Backend):  # a recording: the candidate must run its chunk plan
            reference.backend.check_plan(backend, contexts)
        utterances, contexts = candidate.plan(utterances, contexts)
        progress.phase(f"{candidate.label} vs {reference.name}")
        started = time.perf_counter()
        # A transcript-level backend (a peer runtime) takes the audio through its own front end and is
        # compared by its tokens, step by step (``compare_runs(tokens_only=True)``).
        audio_input = backend.capabilities.input == "audio"
        tokens_only = not backend.capabilities.tensor_level
        # The judge runs beside the candidate: while the candidate streams the next utterance and lookahead, a
        # thread measures the one before (``compare_runs``, whether its decisions differ, and the verdict on a
        # teacher-forced rerun: numpy, which releases the GIL, as ONNX Runtime, torch and MLX do while they
        # compute). What needs the backend (the rerun itself) runs here, and results are taken here in stream
        # order, so they are those of judging in turn.
        forceable = backend.capabilities.teacher_forcing
        pending: deque[_Judging] = deque()

        def advance(item: _Judging) -> bool:
            """Move the oldest stream's verdict on; True once it is recorded."""
            if item.forced is None:
                comparison, needed = item.measured.result()
                if forceable and needed:
                    item.forced = item.rerun(forced_decisions=reference_decisions(item.reference_run))
                    outcome.count_compute(item.forced)
                    item.measured = judge.submit(judge_teacher_forced, comparison, item.reference_run, item.forced,
                                                 tolerances, num_layers=num_layers)
                    return False  # judged beside the next stream
                judged_run = item.run
            else:
                comparison, judged_run = item.measured.result(), item.forced
            if reference.prompt_kernel is not None and not tokens_only:
                cause = explain_prompt_divergence(comparison, item.reference_run, judged_run,
                                                  reference.prompt_kernel, info, item.reference_prompt, tolerances)
                if cause:
                    comparison.causes.append(cause)
            if backend.dtype == INT8 and not comparison.passed:
                cause = explain_int8_excess(comparison, backend.int8_quantization(), int8_kernel_path())
                if cause:
                    comparison.causes.append(cause)
            if not backend.capabilities.gating:
                # A peer (its runtime, or its model driven here) is judged and reported, never this project's
                # verdict.
                comparison.gating = False
            results.comparisons.append(comparison)
            _record_run(outcome, item.run, item.utterance, backend.info.vocabulary)
            store.release(item.run)
            reference.release(item.reference_run)
            if judged_run is not item.run:
                store.release(judged_run)
            return True

        def settle(keep: int) -> None:
            """Record verdicts in order until at most ``keep`` streams are left in flight (one whose forced run is
            being judged stays, beside the next stream, while ``keep`` allows)."""
            while len(pending) > keep:
                if advance(pending[0]):
                    pending.popleft()
                elif len(pending) <= keep + 1 and keep:
                    return

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-judge") as judge:
            try:
                for utterance in utterances:
                    own_features = None if audio_input else _own_features(backend, utterance, outcome)
                    masks = None if audio_input else utterance.speaker_masks_for(backend)
                    reference_prompt = utterance.prompt_for(info)
                    prompt = reference_prompt if candidate.prompt is SAME_PROMPT else candidate.prompt
                    mel = reference.mels[utterance.name]
                    for context in contexts:
                        for mode in modes:
                            reference_run = reference.run(utterance.name, context, mode)
                            run = store.record(backend, mel, context, mode,
                                               key=_key(backend, utterance, context, mode), speaker_masks=masks,
                                               features=own_features, audio=utterance.audio[None], prompt=prompt)
                            outcome.count_compute(run)
                            # Where the free run took another greedy decision somewhere, its decoder and joint rows
                            # no longer match the reference's: it is decoded again with the reference's decisions,
                            # the taps judged on that run, the transcript kept from the free run.
                            rerun = functools.partial(
                                store.record, backend, mel, context, mode,
                                key=_key(backend, utterance, context, mode) + "-forced", speaker_masks=masks,
                                features=own_features, prompt=prompt)
                            measured = judge.submit(_measure, reference_run, run, tolerances, num_layers=num_layers,
                                                    utterance=utterance.name, tokens_only=tokens_only)
                            pending.append(_Judging(measured, reference_run, run, rerun, utterance, reference_prompt))
                            settle(keep=1)  # one stream judged beside the next
                        if candidate.compare_offline:
                            settle(keep=0)
                            # The whole-utterance decode may meet a near-tie too: then decoded again with the
                            # reference's decisions (the same call, forced_decisions given).
                            run_offline = functools.partial(backend.offline, mel,
                                                            np.array([mel.shape[-1]] * mel.shape[0]), context,
                                                            speaker_masks=masks, prompt=prompt)
                            comparison = judge_offline(
                                reference.offline_output(utterance.name, context), run_offline(), tolerances,
                                reference_name=reference.name, candidate_name=backend.name, dtype=backend.dtype,
                                context=context, utterance=utterance.name, num_layers=num_layers,
                                rerun=run_offline if backend.capabilities.teacher_forcing else None)
                            results.comparisons.append(comparison)
                        progress.advance(f"{candidate.label} {utterance.name} [{context[0]},{context[1]}]")
                settle(keep=0)
                outcome.phase_seconds[f"{backend.name}:{backend.dtype}"] = time.perf_counter() - started
            finally:
                for item in pending:  # a failure: what is still being judged is dropped
                    item.measured.cancel()
        if after is not None:
            after(candidate, backend, outcome)
    except Exception as error:
        if on_failure is None:
            raise
        on_failure(candidate, error)
    finally:
        if backend is not None and not candidate.keep_open:
            backend.close()


@dataclass
class _Judging:
    """A candidate's stream being judged beside the next one, and what finishing its verdict needs: ``measured``
    yields ``(comparison, needs teacher forcing)``, then, once ``forced`` is streamed, the forced verdict."""

    measured: Future
    reference_run: Any
    run: Any
    rerun: Callable[..., Any]
    utterance: Utterance
    reference_prompt: str | None
    forced: Any = None


def _measure(reference_run: Any, run: Any, tolerances: Tolerances, *, num_layers: int, utterance: str,
             tokens_only: bool) -> tuple[PairComparison, bool]:
    comparison = compare_runs(reference_run, run, tolerances, num_layers=num_layers, utterance=utterance,
                              tokens_only=tokens_only)
    return comparison, needs_teacher_forcing(reference_run, run, tokens_only=tokens_only)


def _own_features(backend: Backend, utterance: Utterance, outcome: LoopOutcome) -> np.ndarray:
    """``backend``'s front end over ``utterance``, counted as the backend's compute, as its steps are."""
    started = time.perf_counter()
    mel = backend.features(utterance.audio[None])[0]
    outcome.count_frontend(f"{backend.name}:{backend.dtype}", time.perf_counter() - started)
    return mel


def _key(backend: Backend, utterance: Utterance, context: Context, mode: FirstChunkMode) -> str:
    return f"{backend.name}-{backend.dtype}-{utterance.name}-{context[0]}_{context[1]}-{mode.value}"


def _record_run(outcome: LoopOutcome, run: Any, utterance: Utterance, vocabulary: Sequence[str]) -> None:
    """A run's transcript (and a hybrid model's CTC greedy transcript beside it, ``"decoder": "ctc"``) and
    step timings, once per (backend, dtype, mode, utterance, lookahead)."""
    key = (f"{run.backend}:{run.dtype}", utterance.name, tuple(run.att_context_size), run.mode)
    if isinstance(run, StreamRun):
        outcome.runs[key] = run
    if key in outcome.recorded:
        return
    outcome.recorded.add(key)
    results = outcome.results
    ctc_tokens = getattr(run, "ctc_tokens", None)
    for decoder, tokens in (("rnnt", run.tokens), ("ctc", ctc_tokens)):
        if tokens is None:
            continue  # no CTC head
        text = decode_tokens(vocabulary, tokens)
        results.transcripts.append({
            "utterance": utterance.name, "backend": run.backend, "dtype": run.dtype, "mode": run.mode,
            "att_context_size": list(run.att_context_size), "text": text, "reference_text": utterance.text,
            "tokens": tokens, "decoder": decoder,
            "wer": word_error_rate([utterance.text], [text]) if utterance.text else None,
        })
    # The emission rate beside every timing: greedy decoding runs once per label, so a model that
    # emits nothing would be timed without it.
    audio_seconds = len(utterance.audio) / SAMPLE_RATE
    results.timings.append({"backend": run.backend, "dtype": run.dtype, "mode": run.mode,
                            "att_context_size": list(run.att_context_size), "utterance": utterance.name,
                            "step_seconds": list(run.step_seconds), "labels": len(run.tokens),
                            "audio_seconds": round(audio_seconds, 3)})
    if getattr(run, "step_rss_mb", None):  # a spooled run: the process's memory after each step
        results.timings[-1]["step_rss_mb"] = list(run.step_rss_mb)

"""Stack bisection: when a peer runtime disagrees with the reference, say which part of its stack does it.

A peer runtime (a transcript-level backend, ``Capabilities.input == "audio"``) is a stack: exported
graphs, a front end, a way of cutting the stream into chunks, and a decoding loop. The harness owns a
tensor-level driver for the same graphs (the ONNX Runtime backend reading the peer's directory), the
reference front end and the reference chunk schedule, and the peer says how it runs
(``Backend.features``: its own front end; ``Backend.own_chunks``: its own windows; ``Backend.input_audio``:
what it actually decodes). The stack is rebuilt from those parts one swap at a time:

(a) the export: the same files driven by the harness with the reference's mel and schedule, every tap
    and cache against the reference (the export is right or wrong);
(b) the front end: the runtime's features against the reference mel, and the harness's driver fed them;
(c) the chunking: the harness's driver fed the runtime's own windows over the reference mel;
(d) both swaps at once, which must reproduce the runtime's transcripts token for token if the stack is
    understood;

and the first step at which the runtime's tokens leave the reference's names the tokens lost or added.
The cause stated is the swap that accounts for the runtime's extra errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import Chunk, ChunkSchedule, FirstChunkMode
from streaming_parity.interface.decoding import decode_tokens
from streaming_parity.interface.utterance import Utterance
from streaming_parity.judge.loop import (
    Candidate,
    Context,
    LoopOutcome,
    MemoryStore,
    ReferenceRuns,
    compare_candidate,
    stream_reference_runs,
)
from streaming_parity.judge.metrics import word_error_rate
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import Tolerances
from streaming_parity.judge.transcripts import describe_divergence, step_tokens, token_divergence

FRONT_ENDS = ("reference", "runtime")
CHUNKINGS = ("reference", "runtime")


@dataclass
class StackVariant:
    """The harness's driver on the peer's graphs with one choice of front end and chunking."""

    front_end: str  # "reference" (the reference backend's mel) or "runtime" (the peer's own features)
    chunking: str  # "reference" (the harness's schedule in the peer's first-chunk mode) or "runtime" (its windows)
    wer: float | None
    first_word_errors: int
    same_as_runtime: int  # utterances whose tokens equal the runtime's exactly
    token_error: float = 0.0  # token edit distance to the reference's tokens / the reference's token count
    tokens: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{self.front_end} front end, {self.chunking} chunking"


@dataclass
class FrontEndComparison:
    """The runtime's features against the reference mel of the same samples, over their common frames."""

    reference_frames: int
    runtime_frames: int
    max_abs: float
    mean_abs: float
    rel_l2: float
    edge_mean_abs: float  # over the first and last 3 frames (padding at the signal's edges)
    best_shift: float  # the fractional frame offset (runtime vs reference) that fits best, from -1 to 1


@dataclass
class Bisection:
    candidate: str
    context: tuple[int, int]
    utterances: int
    wer_against: str  # "references" or the reference backend's transcripts
    reference_wer: float | None
    runtime_wer: float | None
    runtime_token_error: float
    reference_first_word_errors: int
    runtime_first_word_errors: int
    export_passed: bool | None
    export_summary: str
    front_end: FrontEndComparison | None
    variants: list[StackVariant]
    divergence: dict[str, Any] | None  # the first utterance whose runtime tokens leave the reference's
    divergence_text: str
    chunking_facts: list[str]
    reproduced: bool  # the emulation (runtime front end + runtime chunking) gives the runtime's tokens
    cause: str
    # When the runtime's windows start later than the reference's: the runtime itself fed that much
    # silence before each utterance (a workaround a user can apply today), and its WER.
    lead_in_ms: int = 0
    lead_in_wer: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for variant in data["variants"]:
            variant.pop("tokens", None)
        return data

    def lines(self) -> list[str]:
        """The bisection as a few lines of text (``parity compare`` prints them, the report shows them)."""
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        context = f"[{self.context[0]},{self.context[1]}]"
        out = [f"{self.candidate} {context}, {self.utterances} utterances, WER against {self.wer_against}: "
               f"runtime {pct(self.runtime_wer)}, reference {pct(self.reference_wer)}; runtime token error vs reference "
               f"{pct(self.runtime_token_error)}; first word wrong in "
               f"{self.runtime_first_word_errors} vs {self.reference_first_word_errors}"]
        out.append(f"  (a) export: {self.export_summary}")
        if self.front_end is not None:
            fe = self.front_end
            out.append(f"  (b) front end vs reference mel: max_abs {fe.max_abs:.3g}, mean_abs {fe.mean_abs:.3g}, rel_l2 "
                       f"{fe.rel_l2:.3g} (edges {fe.edge_mean_abs:.3g}), best-fitting offset {fe.best_shift:+.2f} "
                       f"frame, {fe.runtime_frames} vs {fe.reference_frames} frames")
        for fact in self.chunking_facts:
            out.append(f"  (c) chunking: {fact}")
        for variant in self.variants:
            out.append(f"      harness driver, {variant.label}: WER {pct(variant.wer)}, token error vs reference "
                       f"{pct(variant.token_error)}, first word wrong in {variant.first_word_errors}, tokens identical "
                       f"to the runtime's in {variant.same_as_runtime}/{self.utterances}")
        if self.lead_in_ms:
            out.append(f"      the runtime itself with {self.lead_in_ms} ms of silence before each utterance: WER "
                       f"{pct(self.lead_in_wer)}")
        out.append(f"  (d) {self.divergence_text}")
        out.append(f"  cause: {self.cause}")
        return out


# -- the pieces ------------------------------------------------------------------------------------------

def run_chunks(backend: Backend, chunks: Sequence[Chunk], context: Sequence[int]) -> list[list[int]]:
    """Tokens per step of ``backend`` (a tensor-level driver) fed exactly ``chunks``."""
    state = backend.initial_state(context)
    steps = []
    for chunk in chunks:
        output = backend.step(chunk, state)
        steps.append(list(output.tokens[0]))
        state = output.state
    return steps


def compare_front_ends(reference: np.ndarray, runtime: np.ndarray) -> FrontEndComparison:
    """``[n_mels, T]`` each; the common frames compared, and the fractional offset that fits best."""
    frames = min(reference.shape[-1], runtime.shape[-1])
    ref, run = reference[:, :frames].astype(np.float64), runtime[:, :frames].astype(np.float64)
    diff = np.abs(ref - run)
    edges = np.concatenate([diff[:, :3], diff[:, -3:]], axis=1) if frames > 6 else diff
    best, best_error = 0.0, float("inf")
    for shift in np.linspace(-1.0, 1.0, 9):  # linear interpolation of the reference between its frames
        index = np.arange(3, frames - 3) + shift
        low = np.floor(index).astype(int)
        weight = index - low
        shifted = ref[:, low] * (1 - weight) + ref[:, np.minimum(low + 1, frames - 1)] * weight
        error = float(np.mean(np.abs(shifted - run[:, 3:frames - 3]))) if frames > 6 else float("inf")
        if error < best_error:
            best, best_error = float(shift), error
    return FrontEndComparison(reference_frames=int(reference.shape[-1]), runtime_frames=int(runtime.shape[-1]),
                              max_abs=float(diff.max()) if diff.size else 0.0,
                              mean_abs=float(diff.mean()) if diff.size else 0.0,
                              rel_l2=float(np.linalg.norm(ref - run) / max(np.linalg.norm(ref), 1e-30)),
                              edge_mean_abs=float(edges.mean()) if edges.size else 0.0, best_shift=best)


def _aggregate(comparisons: Sequence[FrontEndComparison]) -> FrontEndComparison | None:
    """Worst max_abs and rel_l2, mean of the means, the most common best offset, over utterances."""
    if not comparisons:
        return None
    shifts = [c.best_shift for c in comparisons]
    return FrontEndComparison(
        reference_frames=sum(c.reference_frames for c in comparisons),
        runtime_frames=sum(c.runtime_frames for c in comparisons),
        max_abs=max(c.max_abs for c in comparisons), mean_abs=float(np.mean([c.mean_abs for c in comparisons])),
        rel_l2=max(c.rel_l2 for c in comparisons), edge_mean_abs=float(np.mean([c.edge_mean_abs for c in comparisons])),
        best_shift=max(set(shifts), key=shifts.count))


def _token_error(reference: dict[str, list[int]], candidate: dict[str, list[int]]) -> float:
    from streaming_parity.judge.metrics import token_edit_distance

    total = sum(len(tokens) for tokens in reference.values())
    distance = sum(token_edit_distance(reference[name], candidate.get(name, [])) for name in reference)
    return distance / total if total else float(distance > 0)


def _first_word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> int:
    return sum(1 for r, h in zip(references, hypotheses) if r.split()[:1] != h.split()[:1])


def _chunking_facts(reference_chunks: Sequence[Chunk], runtime_chunks: Sequence[Chunk], hop_ms: int = 10) -> list[str]:
    """What differs between the two ways of cutting the same mel, read from the chunks themselves."""
    if not runtime_chunks or not reference_chunks:
        return ["the runtime decoded no chunk" if not runtime_chunks else "the reference schedule has no chunk"]
    ref, run = reference_chunks[0], runtime_chunks[0]
    facts = []
    ref_new = ref.start_frame
    run_new = run.start_frame
    ref_zero = ref.cache_frames if ref.start_frame == 0 else 0
    if ref.cache_frames == run.cache_frames == 0:
        facts.append(f"first chunk: both hand the encoder frames {ref_new}.. with no cache frames "
                     f"({ref.num_new_frames} and {run.num_new_frames} frames), nothing dropped")
    else:
        facts.append(f"first chunk: the reference hands the encoder {ref.cache_frames} cache frames "
                     f"({'zeros' if ref_zero else 'from the utterance'}) then frames {ref_new}.., the runtime "
                     f"{run.cache_frames} cache frames taken from the utterance (frames 0..{run.cache_frames - 1}) "
                     f"then frames {run_new}..; both drop the first {run.drop_extra_pre_encoded} encoder frames")
    if run_new > ref_new:
        facts.append(f"so the first {run_new - ref_new} frames ({(run_new - ref_new) * hop_ms} ms) of every utterance "
                     f"are only ever the pre-encode cache of the runtime's first chunk: no encoder frame of theirs is "
                     f"decoded, and every later window starts {run_new - ref_new} frames later than the reference's")
    ref_end = reference_chunks[-1].start_frame + reference_chunks[-1].num_new_frames
    run_end = runtime_chunks[-1].start_frame + runtime_chunks[-1].num_new_frames
    if run_end < ref_end:
        facts.append(f"the runtime's last chunk ends at frame {run_end}, the reference's at {ref_end}: the final "
                     f"{ref_end - run_end} frames ({(ref_end - run_end) * hop_ms} ms) are never decoded")
    facts.append(f"{len(runtime_chunks)} runtime chunks vs {len(reference_chunks)} reference chunks")
    return facts


def bisect_peer(reference: Backend | ReferenceRuns, driver: Backend, peer: Backend, utterances: Sequence[Utterance],
                context: Sequence[int], tolerances: Tolerances, *,
                progress: Callable[[str], None] | None = None) -> Bisection:
    """Rebuild ``peer``'s stack from ``driver`` (a tensor-level backend over the peer's own graphs),
    ``reference``'s front end and schedule, and the peer's declared front end and windows.

    ``reference``: the runs a comparison already streamed (``LoopOutcome.reference``, with its backend still
    open for its front end), or the reference backend itself, streamed here in the first-chunk mode the peer runs
    (pad-and-drop for the ONNX peer exports; plain for transformers' generate())."""
    say = progress or (lambda _m: None)
    context = (int(context[0]), int(context[1]))
    mode = FirstChunkMode(peer.capabilities.first_chunk_modes[0])
    if isinstance(reference, Backend):
        say(f"{reference.name}: streaming [{context[0]},{context[1]}] {mode.value}")
        reference = stream_reference_runs(reference, utterances, [context], tolerances, modes=(mode.value,))
    stored = reference
    vocabulary = stored.info.vocabulary

    # (a) the export: the peer's files through the harness's driver, every tap and cache against the reference's
    # stored runs (the reference is not streamed again).
    say(f"(a) {driver.name} on the runtime's files vs {stored.name}")
    export_passed, export_summary = check_export(stored, driver, utterances, context, tolerances, mode)

    reference_steps = {u.name: step_tokens(stored.run(u.name, context, mode)) for u in utterances}
    reference_texts = {name: decode_tokens(vocabulary, [t for s in steps for t in s])
                       for name, steps in reference_steps.items()}
    reference = stored.backend

    # The runtime itself, and the pieces of its stack.
    say(f"{peer.name}: its own runs")
    runtime_steps: dict[str, list[list[int]]] = {}
    for utterance in utterances:
        runtime_steps[utterance.name] = [list(s.tokens[0]) for s in peer.stream_audio(utterance.audio[None], context)]
    variant_tokens: dict[tuple[str, str], dict[str, list[int]]] = {(f, c): {} for f in FRONT_ENDS for c in CHUNKINGS}
    front_ends: list[FrontEndComparison] = []
    reference_chunk_example: list[Chunk] = []
    runtime_chunk_example: list[Chunk] = []
    front_ends_of = {"reference": reference.features, "runtime": peer.features}
    for index, utterance in enumerate(utterances):
        say(f"(b)-(d) {utterance.name}")
        # The reference schedule streams the utterance as it is (its last chunk keeps every output); the
        # runtime's windows need the samples it actually decodes (its tail padding flushes the last window).
        samples = {"reference": utterance.audio[None], "runtime": peer.input_audio(utterance.audio[None], context)}
        for front in FRONT_ENDS:
            for chunking in CHUNKINGS:
                mel = front_ends_of[front](samples[chunking])[0]
                if chunking == "reference":
                    chunks = ChunkSchedule(driver.streaming_config(context), mode).chunks(mel)
                else:
                    chunks = peer.own_chunks(mel, context)
                    if chunks is None:
                        continue
                if index == 0 and front == "reference":
                    if chunking == "reference":
                        reference_chunk_example = chunks
                    else:
                        runtime_chunk_example = chunks
                tokens = [t for step in run_chunks(driver, chunks, context) for t in step]
                variant_tokens[(front, chunking)][utterance.name] = tokens
        front_ends.append(compare_front_ends(reference.features(samples["runtime"])[0][0],
                                             peer.features(samples["runtime"])[0][0]))

    front_end = _aggregate(front_ends)
    texts = {u.name: u.text for u in utterances if u.text}
    against = "references" if len(texts) == len(utterances) else f"{reference.name}'s transcripts"
    truth = [texts.get(u.name) or reference_texts.get(u.name, "") for u in utterances]
    runtime_text = [decode_tokens(vocabulary, [t for s in runtime_steps[u.name] for t in s]) for u in utterances]
    runtime_tokens = {u.name: [t for s in runtime_steps[u.name] for t in s] for u in utterances}
    reference_tokens = {u.name: [t for s in reference_steps.get(u.name, []) for t in s] for u in utterances}
    reference_hyp = [reference_texts.get(u.name, "") for u in utterances]

    variants = []
    for (front, chunking), tokens in variant_tokens.items():
        if len(tokens) != len(utterances):
            continue
        hypotheses = [decode_tokens(vocabulary, tokens[u.name]) for u in utterances]
        variants.append(StackVariant(
            front_end=front, chunking=chunking, wer=word_error_rate(truth, hypotheses),
            first_word_errors=_first_word_errors(truth, hypotheses),
            same_as_runtime=sum(tokens[u.name] == runtime_tokens[u.name] for u in utterances),
            token_error=_token_error(reference_tokens, tokens), tokens=tokens))

    divergence, divergence_text = None, "the runtime's tokens equal the reference's at every step"
    for utterance in utterances:
        found = token_divergence(reference_steps.get(utterance.name, []), runtime_steps[utterance.name])
        if found is not None:
            divergence = {"utterance": utterance.name, **found}
            divergence_text = f"{utterance.name}: " + describe_divergence(found, vocabulary)
            break

    runtime_wer = word_error_rate(truth, runtime_text)
    reference_wer = word_error_rate(truth, reference_hyp) if reference_texts else None
    by_swap = {(v.front_end, v.chunking): v for v in variants}
    emulation = by_swap.get(("runtime", "runtime"))
    reproduced = emulation is not None and emulation.same_as_runtime == len(utterances)
    bisection = Bisection(
        candidate=f"{peer.name}:{peer.dtype}", context=context, utterances=len(utterances), wer_against=against,
        reference_wer=reference_wer, runtime_wer=runtime_wer,
        runtime_token_error=_token_error(reference_tokens, runtime_tokens),
        reference_first_word_errors=_first_word_errors(truth, reference_hyp),
        runtime_first_word_errors=_first_word_errors(truth, runtime_text),
        export_passed=export_passed, export_summary=export_summary, front_end=front_end, variants=variants,
        divergence=divergence, divergence_text=divergence_text,
        chunking_facts=_chunking_facts(reference_chunk_example, runtime_chunk_example), reproduced=reproduced,
        cause="")
    skipped = _skipped_frames(reference_chunk_example, runtime_chunk_example)
    if skipped > 0:
        say(f"{peer.name} with {skipped * 10} ms of leading silence")
        lead = np.zeros((1, skipped * _hop(reference)), np.float32)
        lead_text = [decode_tokens(vocabulary, [t for s in peer.stream_audio(np.concatenate(
            [lead, u.audio[None].astype(np.float32)], axis=1), context) for t in s.tokens[0]]) for u in utterances]
        bisection.lead_in_ms, bisection.lead_in_wer = skipped * 10, word_error_rate(truth, lead_text)
    bisection.cause = state_cause(bisection)
    return bisection


def check_export(reference: ReferenceRuns, driver: Backend, utterances: Sequence[Utterance], context: Context,
                 tolerances: Tolerances, mode: FirstChunkMode) -> tuple[bool | None, str]:
    """Step (a): the peer's own graphs, driven by the harness, against the reference's stored runs, every tap and
    cache at every step. Whether they pass (None: nothing compared), and the sentence that says so."""
    outcome = LoopOutcome(Results(model={}, tolerances=tolerances.source))
    compare_candidate(reference, Candidate.of(driver, modes=(mode.value,)), [mode], utterances, [context],
                      tolerances, store=MemoryStore(), outcome=outcome)
    compared = [c for c in outcome.results.comparisons if c.candidate == driver.name]
    if not compared:
        return None, "not compared"
    failing = [c for c in compared if not c.passed]
    if failing:
        return False, f"{len(failing)} of {len(compared)} runs fail: {failing[0].describe_failure()}"
    worst: dict[str, float] = {}
    for comparison in compared:
        for tap, value in comparison.worst("max_abs").items():
            kind = tap.split(".")[0]
            worst[kind] = max(worst.get(kind, 0.0), value)
    taps = ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) or "no taps"
    return True, (f"every tap, cache and token of {len(compared)} runs within tolerance ({taps}): "
                  "the exported graphs are right")


def _hop(backend: Backend) -> int:
    frontend = getattr(backend, "frontend", None)
    return int(getattr(getattr(frontend, "config", None), "hop_length", 160))


def _skipped_frames(reference_chunks: Sequence[Chunk], runtime_chunks: Sequence[Chunk]) -> int:
    """Frames at the start that the runtime's first window holds only as cache, beyond the reference's."""
    if not reference_chunks or not runtime_chunks:
        return 0
    return max(runtime_chunks[0].start_frame - reference_chunks[0].start_frame, 0)


def state_cause(bisection: Bisection) -> str:
    """The swap that accounts for the runtime's departure from the reference, in one sentence with its
    figures. Swaps are weighed by their token error against the reference's tokens (WER saturates on a
    model that knows no words); WER is quoted where the utterances have references."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    by_swap = {(v.front_end, v.chunking): v for v in bisection.variants}
    base = by_swap.get(("reference", "reference"))
    if bisection.export_passed is False:
        export = "the exported graphs themselves: " + bisection.export_summary
        if base is None or bisection.runtime_token_error - base.token_error <= 0.005:
            return export
        # The files are wrong, and the runtime departs further than the harness's driver on them: say both.
        beyond = state_cause(replace(bisection, export_passed=None))
        return f"{export}; and beyond the graphs, {beyond}"
    if base is None:
        return "not determined (the harness could not rebuild the runtime's stack)"
    gap = bisection.runtime_token_error - base.token_error
    if gap <= 0.005:
        return (f"none: the runtime's tokens differ from the reference's by {pct(bisection.runtime_token_error)}, "
                f"the harness driver's on the same graphs by {pct(base.token_error)}")
    swaps = {"the front end": by_swap.get(("runtime", "reference")), "the chunking": by_swap.get(("reference", "runtime"))}
    shares = {name: v.token_error - base.token_error for name, v in swaps.items() if v is not None}
    if not shares:
        return "not determined (the runtime declares neither its front end nor its chunking)"
    ranked = sorted(shares.items(), key=lambda item: -item[1])
    name, share = ranked[0]
    if share <= 0.005:
        return (f"not one swap: neither the runtime's front end nor its chunking alone moves the harness driver's "
                f"tokens, while the runtime's differ by {pct(bisection.runtime_token_error)}; compare the decoding loops")

    def figures(variant: StackVariant) -> str:
        wer = f"WER {pct(variant.wer)}, " if bisection.wer_against == "references" else ""
        return f"{wer}tokens {pct(variant.token_error)} off the reference's"

    if len(ranked) > 1 and ranked[1][1] > 0.5 * share:
        name = f"{name} and {ranked[1][0]} together"
    detail = ""
    if name.startswith("the chunking") and len(bisection.chunking_facts) > 1 and bisection.chunking_facts[1].startswith("so "):
        detail = " (" + bisection.chunking_facts[1][3:] + ")"
    parts = [f"the harness's driver on the same graphs: {figures(base)}"]
    parts += [f"with the runtime's {n[4:]} alone: {figures(swaps[n])}" for n, _ in ranked]
    emulated = by_swap.get(("runtime", "runtime"))
    if emulated is not None:
        parts.append(f"with both: {figures(emulated)}, the runtime's exact tokens on "
                     f"{emulated.same_as_runtime}/{bisection.utterances} utterances")
    if "chunking" in name and bisection.lead_in_ms:
        parts.append(f"the runtime itself with {bisection.lead_in_ms} ms of silence before each utterance: WER "
                     f"{pct(bisection.lead_in_wer)}")
    return f"{name}{detail}; " + "; ".join(parts)

"""Peer diagnosis: name why a peer runtime (its own converter, loader and front end) departs from the reference.

The stack bisection (``streaming_parity.judge.bisect``) rebuilds a peer's stack from the harness's own parts, which
needs a tensor-level driver for the peer's files. A runtime whose files no harness backend reads (mlx-audio's
converted directory) is diagnosed from what it says about itself instead (``streaming_parity.interface.peer``):

(a) parameters: what its converter wrote against what its loader left in the model, and every value
    against the checkpoint's tensor. A checkpoint tensor that was not loaded and a model parameter
    that no tensor reached are paired by module and shape, so a silent non-strict load is named
    with the name the runtime expected;
(b) front end: the runtime's mel against the reference's over the reference's valid frames (max abs,
    which frames), and again with each front-end ``Correction`` the runtime declares: a correction that
    brings it within tolerance is the cause;
(c) encoder: the runtime's encoder fed the *reference's* mel, offline and streaming, against the
    reference's encoder (so the encoder is cleared, or blamed, apart from the front end), and again
    with each encoder correction;
(d) the runtime as its users run it (its own mel, its own streaming): the first divergent tap and step.

Everything is data (``PeerDiagnosis.to_dict``); ``lines`` prints it as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import FirstChunkMode
from streaming_parity.interface.driver import iter_steps
from streaming_parity.interface.peer import PART_ENCODER, PART_FRONT_END, LoadedParameters, PeerRuntime
from streaming_parity.interface.taps import TAP_ENCODER, TAP_MEL
from streaming_parity.interface.utterance import Utterance
from streaming_parity.judge.tolerances import Tolerances

EXTRA_KEY = "peer_diagnosis"
VALUE_RTOL = 1e-6  # a float32 conversion copies values; allow a summed bias its rounding


# -- (a) parameters --------------------------------------------------------------------------------------

@dataclass
class ParameterFinding:
    kind: str  # "not_loaded" (checkpoint tensor skipped by the load), "initial" (parameter never assigned),
    #            "differs" (loaded, value differs), "not_converted" (checkpoint tensor the converter skips)
    names: list[str]  # checkpoint names (not_loaded, differs, not_converted) or runtime names (initial)
    shape: tuple[int, ...]
    expected_as: list[str] = field(default_factory=list)  # not_loaded: the runtime's names for them
    max_abs: float | None = None  # differs / initial-vs-checkpoint: the largest difference

    def text(self, strict: bool, runtime: str) -> str:
        shown = _braced(self.names)
        if self.kind == "not_loaded":
            where = (f"{runtime} expects {_braced(self.expected_as)}" if self.expected_as
                     else f"{runtime}'s model has no such parameter")
            random = (f", so {_braced(self.expected_as)} keeps its random initial value"
                      f"{'' if self.max_abs is None else f' (max |diff| to the checkpoint tensor {self.max_abs:.3g})'}"
                      if self.expected_as else "")
            return f"{shown} {list(self.shape)} not loaded: {where}; loaded with strict={strict}{random}"
        if self.kind == "initial":
            return f"{shown} {list(self.shape)} left at its initial value: no tensor of the artifact reaches it"
        if self.kind == "differs":
            return f"{shown} {list(self.shape)} loaded with a different value (max |diff| {self.max_abs:.3g})"
        return f"{shown} not converted (the runtime does not use it)"


@dataclass
class ParameterAudit:
    runtime: str
    strict: bool
    checkpoint_tensors: int
    parameters: int
    loaded: int
    findings: list[ParameterFinding]

    @property
    def silent_failures(self) -> list[ParameterFinding]:
        return [f for f in self.findings if f.kind in ("not_loaded", "initial", "differs")]

    def lines(self) -> list[str]:
        head = (f"parameters: {self.loaded} of {self.parameters} {self.runtime} parameters loaded from "
                f"{self.checkpoint_tensors} checkpoint tensors (strict={self.strict})")
        failures = self.silent_failures
        body = [f.text(self.strict, self.runtime) for f in failures] or ["every parameter holds its checkpoint value"]
        skipped = [f.text(self.strict, self.runtime) for f in self.findings if f.kind == "not_converted"]
        return [head] + [f"  {line}" for line in body + skipped]


def _braced(names: Sequence[str]) -> str:
    """``["a.b.weight", "a.b.bias"]`` -> ``a.b.{weight,bias}``."""
    names = list(names)
    if len(names) == 1:
        return names[0]
    stems = {name.rsplit(".", 1)[0] for name in names}
    if len(stems) == 1:
        return f"{stems.pop()}.{{{','.join(name.rsplit('.', 1)[-1] for name in names)}}}"
    return ", ".join(names)


def _module(name: str) -> tuple[str, str]:
    """``joint.joint_net.1.weight`` -> (``joint.joint_net``, ``weight``): the container and the leaf."""
    parts = name.split(".")
    container = ".".join(p for p in parts[:-1] if not p.isdigit()) if len(parts) > 1 else ""
    return container, parts[-1]


def audit_parameters(checkpoint: Mapping[str, np.ndarray], loaded: LoadedParameters) -> ParameterAudit:
    """Every checkpoint tensor against what the runtime's converter wrote and its loader kept."""
    checkpoint = {name: np.asarray(value) for name, value in checkpoint.items() if hasattr(value, "shape")}
    parameters = loaded.parameters
    not_loaded = [name for name in loaded.artifact if name not in parameters]
    initial = [name for name in parameters if name not in loaded.artifact]
    findings: list[ParameterFinding] = []
    loaded_count = 0
    differs: list[tuple[str, float]] = []
    for name, sources in loaded.artifact.items():
        if name not in parameters or not all(s in checkpoint for s in sources):
            continue
        loaded_count += 1
        expected = sum(checkpoint[s].astype(np.float64) for s in sources)
        actual = np.asarray(parameters[name], np.float64)
        if actual.shape != expected.shape:
            differs.append((name, float("inf")))
            continue
        error = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
        if error > VALUE_RTOL * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0):
            differs.append((name, error))
    # Pair each skipped checkpoint tensor with a never-assigned parameter of the same container, leaf and shape.
    unpaired = set(initial)
    for name in sorted(not_loaded):
        sources = loaded.artifact[name]
        shape = tuple(checkpoint[sources[0]].shape) if sources[0] in checkpoint else ()
        container, leaf = _module(name)
        match = next((p for p in sorted(unpaired) if _module(p) == (container, leaf)
                      and tuple(parameters[p].shape) == shape), None)
        finding = ParameterFinding("not_loaded", list(sources), shape)
        if match is not None:
            unpaired.discard(match)
            finding.expected_as = [match]
            if sources[0] in checkpoint:
                finding.max_abs = float(np.max(np.abs(np.asarray(parameters[match], np.float64)
                                                      - checkpoint[sources[0]].astype(np.float64))))
        findings.append(finding)
    findings += [ParameterFinding("initial", [p], tuple(parameters[p].shape)) for p in sorted(unpaired)]
    findings += [ParameterFinding("differs", list(loaded.artifact[n]), tuple(parameters[n].shape), max_abs=e)
                 for n, e in differs]
    converted = {s for sources in loaded.artifact.values() for s in sources}
    skipped = sorted(name for name in checkpoint if name not in converted)
    if skipped:
        findings.append(ParameterFinding("not_converted", skipped, ()))
    return ParameterAudit(runtime=loaded.runtime, strict=loaded.strict, checkpoint_tensors=len(checkpoint),
                          parameters=len(parameters), loaded=loaded_count, findings=_grouped(findings))


def _grouped(findings: list[ParameterFinding]) -> list[ParameterFinding]:
    """Merge findings of one kind on one module (``weight`` and ``bias`` of the same layer) into one line."""
    merged: list[ParameterFinding] = []
    for finding in findings:
        stem = finding.names[0].rsplit(".", 1)[0] if len(finding.names) == 1 else None
        previous = merged[-1] if merged else None
        if (stem is not None and previous is not None and previous.kind == finding.kind
                and {n.rsplit(".", 1)[0] for n in previous.names} == {stem}
                and len(previous.expected_as) == len(previous.names) and finding.kind != "not_converted"):
            previous.names.append(finding.names[0])
            previous.expected_as += finding.expected_as
            previous.shape = previous.shape if len(previous.shape) >= len(finding.shape) else finding.shape
            if finding.max_abs is not None:
                previous.max_abs = max(previous.max_abs or 0.0, finding.max_abs)
            continue
        merged.append(finding)
    return merged


# -- (b)-(d) tensors -------------------------------------------------------------------------------------

@dataclass
class TensorCheck:
    """One tensor of the runtime against the reference's: ``[channels, frames]`` each, over common frames."""

    part: str  # "mel", "encoder offline", "encoder streaming", "encoder (its own run)"
    utterance: str
    context: tuple[int, int] | None
    corrections: tuple[str, ...]
    frames: int
    max_abs: float
    rel_l2: float
    limit: float  # the max_abs tolerance of this tap
    first_frame: int | None  # first frame over the limit
    first_step: int | None  # the runtime's step that produced it (streaming)
    frames_over: list[int] = field(default_factory=list)  # up to 12

    @property
    def passed(self) -> bool:
        return self.first_frame is None

    def text(self) -> str:
        fixed = f" with {'+'.join(self.corrections)}" if self.corrections else ""
        context = f" [{self.context[0]},{self.context[1]}]" if self.context else ""
        where = "within tolerance" if self.passed else (
            f"first over {self.limit:g} at frame {self.first_frame}"
            f"{'' if self.first_step is None else f' (step {self.first_step})'}, frames over: "
            f"{_frames(self.frames_over)}")
        return (f"{self.part}{context}{fixed}, {self.utterance}: max_abs {self.max_abs:.3g}, rel_l2 {self.rel_l2:.3g} "
                f"over {self.frames} frames; {where}")


def _frames(frames: Sequence[int]) -> str:
    return ", ".join(str(f) for f in frames[:12]) + (" ..." if len(frames) > 12 else "")


def compare_frames(part: str, utterance: str, reference: np.ndarray, runtime: np.ndarray, limit: float, *,
                   context=None, corrections: Sequence[str] = (), step_frames: Sequence[int] | None = None) -> TensorCheck:
    frames = min(reference.shape[-1], runtime.shape[-1])
    ref = np.asarray(reference, np.float64)[:, :frames]
    run = np.asarray(runtime, np.float64)[:, :frames]
    per_frame = np.max(np.abs(ref - run), axis=0) if frames else np.zeros(0)
    over = [int(i) for i in np.nonzero(per_frame > limit)[0]]
    if reference.shape[-1] != runtime.shape[-1]:
        over.append(frames)  # a missing or extra frame is a divergence there
    first = over[0] if over else None
    step = None
    if first is not None and step_frames is not None:
        step = int(np.searchsorted(np.cumsum(step_frames), first, side="right"))
    return TensorCheck(part=part, utterance=utterance, context=None if context is None else tuple(context),
                       corrections=tuple(corrections), frames=frames,
                       max_abs=float(per_frame.max()) if frames else 0.0,
                       rel_l2=float(np.linalg.norm(ref - run) / max(np.linalg.norm(ref), 1e-30)),
                       limit=float(limit), first_frame=first, first_step=step, frames_over=over[:12])


def reference_streaming_encoder(reference: Backend, mel: np.ndarray, context) -> tuple[np.ndarray, list[int]]:
    """The reference's streaming encoder output over ``mel`` (the harness's plain schedule, as NeMo's buffer
    cuts it), concatenated ``[D, T]``, and the frames of each step."""
    outputs, frames = [], []
    for step in iter_steps(reference, mel, context, FirstChunkMode.PLAIN):
        valid = int(step.encoded_len[0])
        outputs.append(step.encoded[0, :, :valid])
        frames.append(valid)
    return np.concatenate(outputs, axis=-1), frames


@dataclass
class PeerDiagnosis:
    candidate: str
    reference: str
    contexts: list[tuple[int, int]]
    prompt: str | None
    parameters: ParameterAudit | None
    checks: list[TensorCheck]
    causes: list[str]
    first_divergence: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"{self.candidate} against {self.reference} (prompt {self.prompt or 'default'}):"]
        if self.parameters is not None:
            out += [f"  (a) {line}" for line in self.parameters.lines()]
        labels = {"mel": "(b)", "encoder offline": "(c)", "encoder streaming": "(c)", "encoder (its own run)": "(d)"}
        for check in self.checks:
            out.append(f"  {labels.get(check.part, '   ')} {check.text()}")
        out.append(f"  first divergence: {self.first_divergence}")
        out += [f"  cause: {cause}" for cause in self.causes] or ["  cause: none found"]
        return out


def _worst(checks: Sequence[TensorCheck]) -> TensorCheck | None:
    return max(checks, key=lambda c: c.max_abs) if checks else None


def diagnose_peer(reference: Backend, peer: Backend, utterances: Sequence[Utterance], contexts: Sequence[Sequence[int]],
                  tolerances: Tolerances, *, checkpoint: Mapping[str, np.ndarray] | None = None,
                  prompt: str | None = None, progress: Callable[[str], None] | None = None) -> PeerDiagnosis:
    """(a)-(d) above for ``peer`` (a backend that is a ``PeerRuntime``: it offers ``loaded_parameters``,
    ``corrections``, ``features(..., corrections=)`` and ``encode_mel``) against ``reference`` on ``utterances``."""
    say = progress or (lambda _m: None)
    pair, dtype = f"{reference.name}~{peer.name}", "float32"  # fp32 limits: the peer runs its converter's fp32
    mel_limit = tolerances.limit(pair, dtype, TAP_MEL, "max_abs")
    encoder_limit = tolerances.limit(pair, dtype, TAP_ENCODER, "max_abs")
    contexts = [(int(c[0]), int(c[1])) for c in contexts]
    audit = None
    describes_itself = isinstance(peer, PeerRuntime)
    if checkpoint is not None and describes_itself:
        say("(a) parameters")
        audit = audit_parameters(checkpoint, peer.loaded_parameters())
    corrections = list(peer.corrections()) if describes_itself else []
    front_fixes = [c.name for c in corrections if c.part == PART_FRONT_END]
    encoder_fixes = [c.name for c in corrections if c.part == PART_ENCODER]
    checks: list[TensorCheck] = []
    for utterance in utterances:
        say(f"(b)-(d) {utterance.name}")
        audio = utterance.audio[None]
        ref_mel, ref_len = reference.features(audio)
        valid = int(ref_len[0])
        ref_mel = ref_mel[:, :, :valid]
        run_mel = peer.features(audio)[0][0, :, :valid]
        checks.append(compare_frames("mel", utterance.name, ref_mel[0], run_mel, mel_limit))
        for fix in front_fixes:
            fixed = peer.features(audio, corrections=(fix,))[0][0, :, :valid]
            checks.append(compare_frames("mel", utterance.name, ref_mel[0], fixed, mel_limit, corrections=(fix,)))
        for context in contexts:
            reference_offline = reference.offline(ref_mel, np.array([valid], np.int64), context)
            offline = reference_offline.encoded[0, :, :int(reference_offline.encoded_len[0])]
            checks.append(compare_frames("encoder offline", utterance.name, offline,
                                         peer.encode_mel(ref_mel, context, offline=True)[0][0], encoder_limit,
                                         context=context))
            streamed, _ = reference_streaming_encoder(reference, ref_mel, context)
            combined = [tuple(encoder_fixes)] if len(encoder_fixes) > 1 else []
            for fixes in [()] + [(fix,) for fix in encoder_fixes] + combined:
                steps = peer.encode_mel(ref_mel, context, corrections=fixes)
                runtime = np.concatenate([s[0] for s in steps], axis=-1)
                checks.append(compare_frames("encoder streaming", utterance.name, streamed, runtime, encoder_limit,
                                             context=context, corrections=fixes,
                                             step_frames=[s.shape[-1] for s in steps]))
            own = list(peer.stream_audio(audio, context, prompt=prompt))
            if own and TAP_ENCODER in own[0].taps:
                runtime = np.concatenate([s.taps[TAP_ENCODER][0] for s in own], axis=-1)
                checks.append(compare_frames("encoder (its own run)", utterance.name, streamed, runtime, encoder_limit,
                                             context=context,
                                             step_frames=[s.taps[TAP_ENCODER].shape[-1] for s in own]))
    return PeerDiagnosis(candidate=f"{peer.name}:{peer.dtype}", reference=reference.name, contexts=contexts,
                         prompt=prompt, parameters=audit, checks=checks,
                         causes=_causes(audit, checks, corrections, peer.name, reference.name),
                         first_divergence=_first_divergence(checks))


def _first_divergence(checks: Sequence[TensorCheck]) -> str:
    """The first tap, in stack order, at which the runtime as its users run it leaves the reference."""
    plain = [c for c in checks if not c.corrections and c.part in ("mel", "encoder (its own run)")]
    for part in ("mel", "encoder (its own run)"):
        failing = [c for c in plain if c.part == part and not c.passed]
        if failing:
            first = min(failing, key=lambda c: (c.first_step or 0, c.first_frame or 0))
            step = "" if first.first_step is None else f", step {first.first_step}"
            context = "" if first.context is None else f" [{first.context[0]},{first.context[1]}]"
            tap = "mel" if part == "mel" else "encoder"
            return f"tap {tap}{context}{step}, frame {first.first_frame} ({first.utterance}, max_abs {first.max_abs:.3g})"
    return "none: every compared tap is within tolerance"


def _causes(audit: ParameterAudit | None, checks: Sequence[TensorCheck], corrections, runtime: str,
            reference: str) -> list[str]:
    causes = []
    if audit is not None:
        for finding in audit.silent_failures:
            causes.append("weights: " + finding.text(audit.strict, audit.runtime))
    by_name = {c.name: c for c in corrections}

    def group(part: str, fixes: Sequence[str] = ()) -> list[TensorCheck]:
        return [c for c in checks if c.part == part and c.corrections == tuple(fixes)]

    mel = group("mel")
    if any(not c.passed for c in mel):
        worst = _worst(mel)
        frames = sorted({f for c in mel for f in c.frames_over})
        named = [fix for fix in by_name if by_name[fix].part == PART_FRONT_END
                 and group("mel", (fix,)) and all(c.passed for c in group("mel", (fix,)))]
        if named:
            fix = by_name[named[0]]
            after = _worst(group("mel", (named[0],)))
            causes.append(f"front end: {runtime} uses {fix.runtime_setting} where {reference} uses {fix.reference_setting}: "
                          f"mel max_abs {worst.max_abs:.3g} (frames {_frames(frames)}), {after.max_abs:.3g} with "
                          f"{fix.name}")
        else:
            causes.append(f"front end: mel max_abs {worst.max_abs:.3g} (frames {_frames(frames)}); none of the "
                          f"runtime's declared corrections accounts for it")
    offline = group("encoder offline")
    if offline:
        worst = _worst(offline)
        verdict = "cleared" if all(c.passed for c in offline) else "differs"
        causes.append(f"encoder offline, fed {reference}'s mel: {verdict} (max_abs {worst.max_abs:.3g})")
    streaming = group("encoder streaming")
    if any(not c.passed for c in streaming):
        worst = _worst(streaming)
        sets = sorted({c.corrections for c in checks if c.part == "encoder streaming" and c.corrections})
        if sets:
            causes.append(f"encoder streaming, fed {reference}'s mel: max_abs {worst.max_abs:.3g} from step "
                          f"{worst.first_step}, with {runtime}'s own settings")
            for fixes in sets:
                rows = group("encoder streaming", fixes)
                remaining = [c for c in rows if not c.passed]
                rest = "within tolerance everywhere" if not remaining else "still over the limit at " + "; ".join(
                    f"[{c.context[0]},{c.context[1]}] {c.utterance} frame {c.first_frame} (step {c.first_step}, "
                    f"max_abs {c.max_abs:.3g})" for c in remaining[:3])
                said = "; ".join(f"{runtime} uses {by_name[f].runtime_setting} where {reference} uses "
                                 f"{by_name[f].reference_setting}" for f in fixes if len(fixes) == 1)
                causes.append(f"  with {'+'.join(fixes)}: max_abs {_worst(rows).max_abs:.3g}, {rest}"
                              + (f" ({said})" if said else ""))
        else:
            causes.append(f"encoder streaming, fed {reference}'s mel: max_abs {worst.max_abs:.3g} from step "
                          f"{worst.first_step}; none of the runtime's declared corrections accounts for it")
    elif streaming:
        causes.append(f"encoder streaming, fed {reference}'s mel: cleared (max_abs {_worst(streaming).max_abs:.3g})")
    return causes

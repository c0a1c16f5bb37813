"""Probe verdicts: what each probe expects of a backend, judged from a run's saved results.

A probe (``streaming_parity.fixtures.probes``) is audio built to provoke one failure class (a cold
start, a stream's end, the input level, the sample rate, state carried from one stream to the next,
drift over a long stream, a chunk size an export was not made for). ``streaming_parity.app.probes`` runs
every probe through every candidate: a probe that compares goes through the compare session (so its
comparisons are ordinary ``PairComparison``s in ``Results.comparisons``, one utterance per probe
stream); what is not a comparison (a refusal, a crash, a run alone, a chunk refused or accepted) is
recorded as an *outcome* in ``results.extra["probes"]``. Verdicts are derived from both here, so that
``parity judge`` re-judging the comparisons with another tolerance file re-derives them (``refresh``).

Verdicts, one per probe and backend: ``pass``; ``fail`` with the first divergence (step and tap), the
crash, or what should not have happened; ``refused`` with the message (where the probe allows a
refusal); ``n/a`` with the reason a probe cannot apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from streaming_parity.interface.taps import TAP_LAYERS, tap_kind
from streaming_parity.judge.compare import PairComparison
from streaming_parity.judge.results import Results

KEY = "probes"  # results.extra[KEY]: definitions, backends, outcomes, verdicts, growth

# What a probe expects of a backend.
MATCH = "match"  # streamed beside the reference, judged per tap and step (or on tokens): must pass
MATCH_OR_REFUSE = "match-or-refuse"  # input a backend takes only as it declares: refused, or taken and matching
EMPTY_OR_REFUSE = "empty-or-refuse"  # each backend alone: a clear refusal or empty text, never a crash
REFUSE = "refuse"  # must be refused with a clear error, never run (silently shortened)
EXPECTATIONS = {
    MATCH: "streams and matches the reference",
    MATCH_OR_REFUSE: "refused as the backend declares, or taken and matching the reference",
    EMPTY_OR_REFUSE: "a clear refusal or empty text, never a crash",
    REFUSE: "refused with a clear error, never silently shortened",
}

PASS, FAIL, REFUSED, NOT_APPLICABLE = "pass", "fail", "refused", "n/a"

# Outcome kinds (``extra["probes"]["outcomes"]``), recorded by the runner.
RAN = "ran"  # streamed alone: its tokens (an EMPTY_OR_REFUSE probe)
REFUSAL = "refused"  # a BadInput, with its message
ERROR = "error"  # any other exception: a crash
ACCEPTED = "accepted"  # a chunk it should have refused (a REFUSE probe)
INAPPLICABLE = "not-applicable"  # the probe cannot apply to this backend, with the reason

# Taps whose error over a long stream is reported per minute: the encoder layers (``TAP_LAYERS``: the worst
# layer within each minute, whichever it is; each ``layers.{i}`` on its own in the results), the encoder output
# and every cache and position (``cache_last_channel_len`` is the stream's position in the channel cache).
GROWTH_TAPS = (TAP_LAYERS, "encoder", "cache_last_channel", "cache_last_time", "cache_last_channel_len")


@dataclass
class ProbeVerdict:
    probe: str
    failure_class: str
    backend: str  # backend:dtype
    verdict: str
    detail: str
    reference: bool = False  # the reference's own row (its runs alone, its refusals)
    gating: bool = True  # False for a peer runtime: reported, not this project's verdict
    step: int | None = None  # a failure's first divergent step
    tap: str | None = None  # ... and tap ("tokens" for a token-level divergence)
    context: list[int] | None = None
    mode: str | None = None
    comparison: bool = False  # a failure read from a failing comparison (already a failure of the results)

    @property
    def ok(self) -> bool:
        return self.verdict != FAIL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.backend} {self.probe} ({self.failure_class}): {self.verdict}" + (
            f": {self.detail}" if self.detail else "")


@dataclass
class GrowthRow:
    """The error of one long-stream comparison per minute of audio, and its growth per minute."""

    probe: str
    backend: str
    context: list[int]
    mode: str
    tap: str
    per_minute: list[float]  # worst max_abs within each minute of the stream
    growth_per_minute: float | None  # least-squares slope of ``per_minute`` (None with one minute)
    limit: float | None  # the tolerance's max_abs for this tap, for scale

    def describe(self) -> str:
        growth = "n/a (one minute)" if self.growth_per_minute is None else f"{self.growth_per_minute:+.2e}/min"
        minutes = ", ".join(f"{v:.1e}" for v in self.per_minute[:12]) + (" ..." if len(self.per_minute) > 12 else "")
        return (f"{self.backend} [{self.context[0]},{self.context[1]}] {self.mode} {self.tap}: max_abs per minute "
                f"{minutes}; growth {growth}" + ("" if self.limit is None else f" (limit {self.limit:.1e})"))


@dataclass
class ResourceRow:
    """One backend's long-stream run per minute of audio: its time a step and the process's memory, each with its
    least-squares growth per minute. Measured, not judged: the time follows the machine's load as well."""

    probe: str
    backend: str
    context: list[int]
    mode: str
    seconds_per_step: list[float]  # the backend's mean time a step within each minute
    peak_rss_mb: list[float] | None  # the process's largest resident memory within each minute (a spooled run)
    seconds_growth_per_minute: float | None
    rss_growth_per_minute: float | None

    def describe(self) -> str:
        def minutes(values: Sequence[float], form: str) -> str:
            return ", ".join(format(v, form) for v in values[:12]) + (" ..." if len(values) > 12 else "")

        def growth(slope: float | None, form: str) -> str:
            return "n/a (one minute)" if slope is None else f"{format(slope, form)}/min"

        text = (f"{self.backend} [{self.context[0]},{self.context[1]}] {self.mode}: s a step per minute "
                f"{minutes(self.seconds_per_step, '.3f')}; growth {growth(self.seconds_growth_per_minute, '+.4f')}")
        if self.peak_rss_mb is not None:
            text += (f"; resident MiB per minute {minutes(self.peak_rss_mb, '.0f')}; growth "
                     f"{growth(self.rss_growth_per_minute, '+.1f')}")
        return text


def _label(comparison: PairComparison) -> str:
    return f"{comparison.candidate}:{comparison.dtype}"


def _section(results: Results) -> dict[str, Any]:
    return (results.extra or {}).get(KEY) or {}


def _divergence(comparison: PairComparison) -> tuple[int | None, str | None]:
    """The first divergent step and tap of a failing comparison (``tokens`` where only tokens differ)."""
    divergence = comparison.first_divergence()
    if divergence is not None:
        return divergence.step, divergence.tap
    real = [f for f in comparison.flips + comparison.ctc_flips if not f.near_tie]
    if real:
        return real[0].step, real[0].tap
    if comparison.token_divergence is not None:
        return int(comparison.token_divergence["step"]), "tokens"
    return None, "tokens"


def _stream_names(definition: dict[str, Any]) -> list[str]:
    return [stream["name"] for stream in definition["streams"]]


def probe_verdicts(results: Results) -> list[ProbeVerdict]:
    """Every probe's verdict for every backend the run recorded (the reference's own row first)."""
    section = _section(results)
    definitions = section.get("definitions", [])
    backends = section.get("backends", [])
    outcomes = section.get("outcomes", [])
    by_utterance: dict[str, list[PairComparison]] = {}
    for comparison in results.comparisons:
        by_utterance.setdefault(comparison.utterance, []).append(comparison)
    verdicts = []
    for definition in definitions:
        reference_outcomes = [o for o in outcomes if o["probe"] == definition["name"]
                              and o["backend"] == next((b["label"] for b in backends if b.get("reference")), None)]
        for backend in backends:
            mine = [o for o in outcomes if o["probe"] == definition["name"] and o["backend"] == backend["label"]]
            comparisons = [c for name in _stream_names(definition) for c in by_utterance.get(name, [])
                           if _label(c) == backend["label"]]
            if backend.get("reference"):
                comparisons = [c for name in _stream_names(definition) for c in by_utterance.get(name, [])]
            verdict = _verdict(definition, backend, mine, reference_outcomes, comparisons, results)
            verdicts.append(verdict)
    return verdicts


def _verdict(definition: dict[str, Any], backend: dict[str, Any], outcomes: list[dict[str, Any]],
             reference_outcomes: list[dict[str, Any]], comparisons: list[PairComparison],
             results: Results) -> ProbeVerdict:
    expect = definition["expect"]
    is_reference = bool(backend.get("reference"))
    verdict = ProbeVerdict(probe=definition["name"], failure_class=definition["failure_class"],
                           backend=backend["label"], verdict=PASS, detail="", reference=is_reference,
                           gating=bool(backend.get("gating", True)))

    def set_(kind: str, detail: str, **where: Any) -> ProbeVerdict:
        verdict.verdict, verdict.detail = kind, detail
        for name, value in where.items():
            setattr(verdict, name, value)
        return verdict

    errors = [o for o in outcomes if o["kind"] == ERROR]
    if errors:
        where = f" at [{errors[0]['context'][0]},{errors[0]['context'][1]}]" if errors[0].get("context") else ""
        return set_(FAIL, f"crashed{where}: {errors[0]['message']}", context=errors[0].get("context"))
    refusals = [o for o in outcomes if o["kind"] == REFUSAL]

    if expect == EMPTY_OR_REFUSE:
        spoke = [o for o in outcomes if o["kind"] == RAN and o.get("tokens")]
        if spoke:
            o = spoke[0]
            return set_(FAIL, f"{len(o['tokens'])} token(s) from {definition['seconds'] * 1000:.0f} ms of audio at "
                              f"[{o['context'][0]},{o['context'][1]}]: {o.get('text')!r}", context=o["context"])
        if refusals:
            return set_(REFUSED, refusals[0]["message"])
        if any(o["kind"] == RAN for o in outcomes):
            return set_(PASS, "empty text")
        return set_(NOT_APPLICABLE, "not run")

    if expect == REFUSE:
        accepted = [o for o in outcomes if o["kind"] == ACCEPTED]
        if accepted:
            return set_(FAIL, accepted[0]["message"], context=accepted[0].get("context"), mode=accepted[0].get("mode"))
        if refusals:
            return set_(REFUSED, refusals[0]["message"])
        inapplicable = [o for o in outcomes if o["kind"] == INAPPLICABLE]
        return set_(NOT_APPLICABLE, inapplicable[0]["message"] if inapplicable else "not run")

    # MATCH, MATCH_OR_REFUSE: the compare session's comparisons.
    if refusals:
        if expect == MATCH_OR_REFUSE:
            return set_(REFUSED, refusals[0]["message"])
        return set_(FAIL, f"refused input it must take: {refusals[0]['message']}")
    if not is_reference:
        for o in reference_outcomes:
            if o["kind"] in (REFUSAL, ERROR):
                return set_(NOT_APPLICABLE, f"the reference {'refused' if o['kind'] == REFUSAL else 'crashed'}: "
                                            f"{o['message']}")
    inapplicable = [o for o in outcomes if o["kind"] == INAPPLICABLE]
    if inapplicable:
        return set_(NOT_APPLICABLE, inapplicable[0]["message"])
    if not comparisons:
        return set_(NOT_APPLICABLE if is_reference else FAIL,
                    "no candidate compared" if is_reference else "no comparison recorded for this probe")
    if not is_reference:
        failing = [c for c in comparisons if not c.passed]
        if failing:
            first = failing[0]
            step, tap = _divergence(first)
            return set_(FAIL, first.describe_failure(), step=step, tap=tap, context=list(first.att_context_size),
                        mode=first.mode, comparison=True)
    same = definition.get("same_tokens")
    if same:
        carried = _carried_state(comparisons, same, reference=is_reference)
        if carried is not None:
            context, mode, first_tokens, second_tokens = carried
            index = next((i for i, (a, b) in enumerate(zip(first_tokens, second_tokens)) if a != b),
                         min(len(first_tokens), len(second_tokens)))
            return set_(FAIL, f"state carried over: {same[1]} decoded {len(second_tokens)} tokens where the same audio "
                              f"as {same[0]} decoded {len(first_tokens)} (first difference at token {index})",
                        context=list(context), mode=mode, tap="tokens")
    if is_reference:
        return set_(PASS, f"streamed ({len({tuple(c.att_context_size) for c in comparisons})} lookahead(s))")
    growth = [row for row in error_growth(results)
              if row.probe == definition["name"] and row.backend == backend["label"]]
    detail = f"{len(comparisons)} comparison(s) passed"
    if growth:
        detail += f"; {growth_summary(growth)}"
    return set_(PASS, detail)


def growth_summary(rows: Sequence[GrowthRow]) -> str:
    """One line for a long stream: per growth tap, its worst comparison's max_abs in the first and the last
    minute and the growth per minute; positions (``cache_last_channel_len``) as exact or not."""
    parts = []
    minutes = max(len(row.per_minute) for row in rows)
    for tap in GROWTH_TAPS:
        mine = [row for row in rows if row.tap == tap]
        if not mine:
            continue
        worst = max(mine, key=lambda row: max(row.per_minute))
        if tap == "cache_last_channel_len":
            parts.append("positions exact" if max(worst.per_minute) == 0 else
                         f"positions off by up to {max(worst.per_minute):g}")
            continue
        growth = "" if worst.growth_per_minute is None else f" ({worst.growth_per_minute:+.1e}/min)"
        parts.append(f"{tap} [{worst.context[0]},{worst.context[1]}] {worst.per_minute[0]:.1e}->"
                     f"{worst.per_minute[-1]:.1e}{growth}")
    return f"{minutes} min: " + ", ".join(parts)


def _carried_state(comparisons: Sequence[PairComparison], same: Sequence[str], *,
                   reference: bool) -> tuple[tuple[int, int], str, list[int], list[int]] | None:
    """Where the second of two streams of the same audio decoded other tokens than the first (same lookahead
    and mode): state carried from one stream to the next. None when every pair agrees."""
    first, second = same
    runs: dict[tuple[str, tuple[int, int], str], list[int]] = {}
    for c in comparisons:
        runs[(c.utterance, tuple(c.att_context_size), c.mode)] = c.reference_tokens if reference else c.candidate_tokens
    for (utterance, context, mode), tokens in runs.items():
        if utterance != first:
            continue
        other = runs.get((second, context, mode))
        if other is not None and other != tokens:
            return context, mode, tokens, other
    return None


def _long_stream_lookup(results: Results) -> Callable[[str | None, Sequence[int]], tuple[str, float] | None]:
    """For a run (its utterance and lookahead): the long-stream probe it streamed and the seconds of audio a step
    covers at that lookahead (recorded by the runner); None for a run of any other probe."""
    section = _section(results)
    probes = {s["name"]: d["name"] for d in section.get("definitions", []) if d.get("long") for s in d["streams"]}
    step_seconds = section.get("step_seconds", {})

    def lookup(utterance: str | None, context: Sequence[int]) -> tuple[str, float] | None:
        probe = probes.get(utterance)
        seconds = step_seconds.get(",".join(str(int(v)) for v in context))
        return (probe, seconds) if probe is not None and seconds else None

    return lookup


def _minute(step: int, step_seconds: float) -> int:
    """The minute of audio a step falls in."""
    return int(step * step_seconds // 60)


def error_growth(results: Results, *, per_layer: bool = False) -> list[GrowthRow]:
    """Per long-stream probe and tensor-level comparison: each growth tap's worst ``max_abs`` per minute of
    audio and its least-squares growth per minute (a step covers ``step_seconds`` of audio at its lookahead,
    recorded by the runner). ``per_layer``: each encoder layer's row too, after the worst layer's."""
    long_stream = _long_stream_lookup(results)
    rows = []
    for comparison in results.comparisons:
        found = long_stream(comparison.utterance, comparison.att_context_size)
        if found is None:
            continue
        probe, seconds = found
        per_minute: dict[str, dict[int, float]] = {}
        limits: dict[str, float] = {}
        for result in comparison.taps:
            kind = tap_kind(result.tap)
            if kind not in GROWTH_TAPS or result.step < 0 or "max_abs" not in result.metrics:
                continue
            minute = _minute(result.step, seconds)
            # A layer counts for the worst layer's row, and for its own row when asked.
            for tap in (kind, result.tap) if per_layer and kind != result.tap else (kind,):
                minutes = per_minute.setdefault(tap, {})
                minutes[minute] = max(minutes.get(minute, 0.0), float(result.metrics["max_abs"]))
                if "max_abs" in result.limits:
                    # the strictest limit among the layers, for scale
                    limits[tap] = min(limits.get(tap, float("inf")), float(result.limits["max_abs"]))
        each_layer = sorted((t for t in per_minute if tap_kind(t) == TAP_LAYERS and t != TAP_LAYERS),
                            key=lambda t: int(t.split(".")[1]))
        order = []
        for tap in GROWTH_TAPS:
            order += [tap] if tap in per_minute else []
            order += each_layer if tap == TAP_LAYERS else []
        for tap in order:
            values = [per_minute[tap].get(m, 0.0) for m in range(max(per_minute[tap]) + 1)]
            rows.append(GrowthRow(probe=probe, backend=_label(comparison), context=list(comparison.att_context_size),
                                  mode=comparison.mode, tap=tap, per_minute=values, growth_per_minute=_slope(values),
                                  limit=limits.get(tap)))
    return rows


def resource_use(results: Results) -> list[ResourceRow]:
    """Per long-stream probe and backend run (the reference's included): the backend's mean time a step and the
    process's peak resident memory within each minute of audio, and their growth per minute, from the run's step
    timings (``results.timings``; memory where the run was spooled, ``step_rss_mb``)."""
    long_stream = _long_stream_lookup(results)
    rows = []
    for timing in results.timings:
        context = timing.get("att_context_size") or []
        found = long_stream(timing.get("utterance"), context)
        if found is None or not timing.get("step_seconds"):
            continue
        probe, seconds = found
        minute_of = [_minute(step, seconds) for step in range(len(timing["step_seconds"]))]
        count = minute_of[-1] + 1
        spent, steps = [0.0] * count, [0] * count
        for minute, value in zip(minute_of, timing["step_seconds"]):
            spent[minute] += float(value)
            steps[minute] += 1
        per_step = [spent[m] / steps[m] if steps[m] else 0.0 for m in range(count)]
        rss = timing.get("step_rss_mb")
        peaks = None
        if rss:
            if len(rss) != len(minute_of):
                raise ValueError(f"timings of {timing['backend']}:{timing['dtype']} on {timing['utterance']}: "
                                 f"{len(rss)} resident-memory samples for {len(minute_of)} steps")
            peaks = [0.0] * count
            for minute, value in zip(minute_of, rss):
                peaks[minute] = max(peaks[minute], float(value))
        rows.append(ResourceRow(probe=probe, backend=f"{timing['backend']}:{timing['dtype']}", context=list(context),
                                mode=timing.get("mode", ""), seconds_per_step=per_step, peak_rss_mb=peaks,
                                seconds_growth_per_minute=_slope(per_step),
                                rss_growth_per_minute=None if peaks is None else _slope(peaks)))
    return rows


def _slope(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


def refresh(results: Results) -> list[ProbeVerdict]:
    """Derive the verdicts (and long-stream growth) again from the results, and store them in
    ``results.extra["probes"]`` (after ``parity judge`` re-judged the comparisons). Returns the verdicts."""
    if KEY not in (results.extra or {}):
        return []
    verdicts = probe_verdicts(results)
    results.extra[KEY]["verdicts"] = [v.to_dict() for v in verdicts]
    results.extra[KEY]["growth"] = [asdict(row) for row in error_growth(results, per_layer=True)]
    results.extra[KEY]["resources"] = [asdict(row) for row in resource_use(results)]
    return verdicts


def failing(verdicts: Iterable[ProbeVerdict]) -> list[ProbeVerdict]:
    return [v for v in verdicts if not v.ok]

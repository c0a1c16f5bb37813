"""Report data: saved ``Results`` (``streaming_parity.judge.results``) condensed into plain rows.

Summary per pair and lookahead, transcripts and WER, degradation of reduced precision, time per chunk,
per-step error grids and provenance. Everything here is text and numbers; the markup lives in the
templates, and the number formats below are the templates' filters.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streaming_parity.judge.compare import PairComparison
from streaming_parity.judge.metrics import token_agreement, word_error_rate
from streaming_parity.judge.results import Results

REFERENCE_BACKEND = "nemo"
FP32 = "float32"
OFFLINE_PAIR = "streaming~offline"
# Taps shown as rows of the per-step error heat maps, in model order (layers.N in between).
HEATMAP_HEAD, HEATMAP_TAIL = ("pre_encode",), ("encoder",)
CACHE_DRIFT_TAPS = ("cache_last_channel", "cache_last_time")


# -- formats ---------------------------------------------------------------------------------------------

def context_label(context: Sequence[int]) -> str:
    return f"[{int(context[0])},{int(context[1])}]"


def base_pair(pair: str) -> str:
    """``streaming~offline@70,0`` -> ``streaming~offline``."""
    return pair.split("@", 1)[0]


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fmt_error(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == 0:
        return "0"
    return f"{value:.2e}"


def fmt_ratio(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not is_finite(value) else f"{value:.{digits}f}"


def fmt_percent(value: float | None) -> str:
    return "–" if value is None or not is_finite(value) else f"{100 * value:.1f}%"


def fmt_signed(value: float | None) -> str:
    return "–" if value is None or not is_finite(value) else f"{value:+.3f}"


def model_name(results: Results) -> str:
    return (results.model or {}).get("name") or "model"


def results_date(results: Results) -> str:
    return (results.extra or {}).get("date") or (results.created or "")[:10]


def model_fingerprints(results_list: Sequence[Results]) -> list[tuple[str, str]]:
    """(model name, first 12 hex digits of its sha256 or ``?``) per results, for the report's header."""
    return [(model_name(r), ((r.model or {}).get("sha256") or "?")[:12]) for r in results_list]


def _short(digest: Any) -> str:
    return digest[:12] if isinstance(digest, str) and digest else "?"


@dataclass
class BackendOrigin:
    """Where one backend's model came from, for the report's header."""

    model: str
    backend: str  # "nemo" or "mlx:float32"
    sha256: str  # first 12 hex digits of the checkpoint's or artifact's sha256
    hub: str | None = None  # ORG/NAME@commit, when it came from the hub
    made_from: str | None = None  # an artifact: first 12 hex digits of the checkpoint its manifest names
    made_by: str | None = None  # an artifact: the software its manifest names
    stale: bool = False  # an artifact made from another checkpoint than the compared one

    def describe(self) -> str:
        text = f"{self.backend} {self.sha256}"
        if self.hub:
            text += f" ({self.hub})"
        if self.made_from:
            text += f", made from {self.made_from}" + (" — another checkpoint" if self.stale else "")
        if self.made_by:
            text += f" by {self.made_by}"
        return text


def _hub(record: dict[str, Any], prefix: str = "") -> str | None:
    repo = record.get(f"{prefix}hub_repo")
    return f"{repo}@{_short(record.get(f'{prefix}hub_revision'))}" if repo else None


def backend_origins(results_list: Sequence[Results]) -> list[BackendOrigin]:
    """Every backend's source per results: the checkpoint, then each candidate's artifact (from the
    results' ``model.backends``, else from the nightly's candidate records)."""
    origins = []
    for results in results_list:
        model = results.model or {}
        name, model_sha = model_name(results), model.get("sha256")
        records = model.get("backends") or [
            {"backend": "nemo", "sha256": model_sha, "hub_repo": model.get("hub_repo"),
             "hub_revision": model.get("hub_revision")},
            *({"backend": f"{c['backend']}:{c['dtype']}", "sha256": c["artifact_sha256"],
               "source_sha256": c.get("source_sha256"), "made_by": c.get("made_by")}
              for c in (results.extra or {}).get("candidates", []) if c.get("artifact_sha256"))]
        for record in records:
            made_from = record.get("source_sha256")
            origins.append(BackendOrigin(
                name, str(record.get("backend")), _short(record.get("sha256")), _hub(record),
                _short(made_from) if made_from else None, record.get("made_by"),
                stale=bool(made_from and model_sha and made_from != model_sha)))
    return origins


def harness_origin(results_list: Sequence[Results]) -> str | None:
    """``streaming-parity 0.1.0 (commit 1234567890ab)`` of the run(s), when recorded."""
    for results in results_list:
        env = results.environment or {}
        if env.get("harness_version"):
            commit = env.get("git_commit")
            return f"streaming-parity {env['harness_version']}" + (f" (commit {commit[:12]})" if commit else "")
    return None


def covers_several_models(results_list: Sequence[Results]) -> bool:
    """Whether tables need a model column (one model: it is in the header already)."""
    return len({model_name(r) for r in results_list}) > 1


# -- summary -----------------------------------------------------------------------------------------------

@dataclass
class PairSummary:
    """Every comparison of one model, pair, candidate dtype and lookahead, condensed to one row."""

    model: str
    pair: str  # without the lookahead suffix
    candidate: str
    dtype: str
    context: tuple[int, int]
    # The first-chunk mode the candidate streamed ("plain", "pad-and-drop"; "offline" for the offline forwards):
    # a candidate compared in both modes has a row for each, so that what the pad-and-drop first chunk costs
    # shows beside NeMo's default.
    mode: str = ""
    comparisons: list[PairComparison] = field(default_factory=list)

    @property
    def is_offline(self) -> bool:
        """NeMo streaming against its own offline forward, not a candidate backend."""
        return self.pair == OFFLINE_PAIR

    @property
    def label(self) -> str:
        if self.is_offline:
            return self.pair
        # NeMo's default (plain) and the offline forwards read as before; another first-chunk mode is named.
        shown = "" if self.mode in ("", "plain", "offline") else f", {self.mode}"
        return f"{self.pair} ({self.dtype}{shown})"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def passed_count(self) -> int:
        return sum(c.passed for c in self.comparisons)

    @property
    def is_fp32(self) -> bool:
        return self.dtype == FP32

    @property
    def gating(self) -> bool:
        """fp32 and this project's artifact: a peer runtime's comparisons are reported, not gating."""
        return self.is_fp32 and all(c.gating for c in self.comparisons)

    def _worst(self, prefix: str) -> float | None:
        values = [v for c in self.comparisons for tap, v in c.worst("max_abs").items()
                  if tap == prefix or tap.startswith(prefix + ".")]
        return max(values) if values else None

    @property
    def worst_layer(self) -> float | None:
        return self._worst("layers")

    @property
    def worst_encoder(self) -> float | None:
        return self._worst("encoder")

    def min_cosine(self, tap: str) -> float | None:
        values = [t.metrics["cosine"] for c in self.comparisons for t in c.taps
                  if t.tap == tap and "cosine" in t.metrics]
        return min(values) if values else None

    @property
    def token_agreement(self) -> float | None:
        if not self.comparisons:
            return None
        return sum(token_agreement(c.reference_tokens, c.candidate_tokens) for c in self.comparisons) / len(
            self.comparisons)

    @property
    def first_failure(self) -> PairComparison | None:
        return next((c for c in self.comparisons if not c.passed), None)

    @property
    def first_divergence(self) -> str | None:
        """The first failure described without the pair/lookahead prefix the summary row already shows."""
        failure = self.first_failure
        if failure is None:
            return None
        text = failure.describe_failure()
        return f"{failure.utterance}: {text.split(': ', 1)[1]}" if ": " in text else text


def pair_summaries(results_list: Sequence[Results]) -> list[PairSummary]:
    groups: dict[tuple, PairSummary] = {}
    for results in results_list:
        for comparison in results.comparisons:
            context = tuple(int(v) for v in comparison.att_context_size)
            mode = "" if base_pair(comparison.pair) == OFFLINE_PAIR else comparison.mode
            key = (model_name(results), base_pair(comparison.pair), comparison.candidate, comparison.dtype, context,
                   mode)
            if key not in groups:
                groups[key] = PairSummary(*key)
            groups[key].comparisons.append(comparison)
    # Offline checks first, then candidates by name and dtype (fp32 first), lookaheads as recorded.
    return sorted(groups.values(), key=lambda s: (s.model, not s.is_offline, s.candidate, s.dtype != FP32, s.dtype,
                                                  s.mode == "pad-and-drop"))


def overall_passed(results_list: Sequence[Results], *, fp32_only: bool = False) -> bool:
    return all(c.passed for r in results_list for c in r.comparisons
               if not fp32_only or (c.dtype == FP32 and c.gating)) and not (
        candidate_errors(results_list, fp32_only=fp32_only))


def candidate_errors(results_list: Sequence[Results], *, fp32_only: bool = False) -> list[dict[str, Any]]:
    """Candidates the run could not prepare or load (recorded by the nightly run in ``extra``)."""
    errors = []
    for results in results_list:
        for entry in (results.extra or {}).get("candidates", []):
            if entry.get("status") == "error" and (not fp32_only or entry.get("dtype") == FP32):
                errors.append({"model": model_name(results), **entry})
    return errors


def reduced_plan_candidates(results_list: Sequence[Results]) -> list[dict[str, Any]]:
    """Candidates judged on a reduced plan (a dtype with no fast path on the machine that ran it), with why."""
    return [{"model": model_name(results), **entry} for results in results_list
            for entry in (results.extra or {}).get("candidates", []) if entry.get("reduced_plan")]


def unavailable_candidates(results_list: Sequence[Results]) -> list[dict[str, Any]]:
    """Candidates the nightly run skipped because their backend cannot run on this machine."""
    return [entry for results in results_list for entry in (results.extra or {}).get("candidates", [])
            if entry.get("status") == "unavailable"]


# -- transcripts and WER -------------------------------------------------------------------------------------

def _decoder(row: dict[str, Any]) -> str:
    """The decoder a transcript row comes from: "rnnt", or "ctc" for a hybrid model's CTC head."""
    return row.get("decoder", "rnnt")


def _transcript_key(row: dict[str, Any]) -> tuple:
    return (row["utterance"], tuple(row["att_context_size"]), row.get("mode", "plain"), _decoder(row))


def reference_transcripts(results: Results) -> dict[tuple, dict[str, Any]]:
    """NeMo's transcript per (utterance, lookahead, first-chunk mode, decoder)."""
    return {_transcript_key(r): r for r in results.transcripts if r["backend"] == REFERENCE_BACKEND}


@dataclass
class AlignedWords:
    """One stretch of a word alignment: ``equal``, ``substitute``, ``delete`` (reference only) or ``insert``."""

    kind: str
    reference: str
    hypothesis: str


def word_alignment(reference: str, hypothesis: str) -> list[AlignedWords]:
    """``hypothesis`` against ``reference`` as stretches of equal and differing words (jiwer's alignment)."""
    import jiwer

    ref_words, hyp_words = reference.split(), hypothesis.split()
    if not ref_words or not hyp_words:
        # jiwer cannot align against an empty side: every word is deleted or inserted.
        return ([AlignedWords("delete", word, "") for word in ref_words]
                + [AlignedWords("insert", "", word) for word in hyp_words])
    alignment = jiwer.process_words(reference, hypothesis).alignments[0]
    return [AlignedWords(chunk.type, " ".join(ref_words[chunk.ref_start_idx:chunk.ref_end_idx]),
                         " ".join(hyp_words[chunk.hyp_start_idx:chunk.hyp_end_idx])) for chunk in alignment]


@dataclass
class CandidateTranscript:
    backend: str
    dtype: str
    mode: str  # first-chunk mode; NeMo's transcript in the same mode is the one compared
    same_as_nemo: bool
    alignment: list[AlignedWords]


@dataclass
class UtteranceTranscripts:
    utterance: str
    reference_text: str
    nemo_text: str  # NeMo's plain-mode transcript, else its transcript in another mode
    candidates: list[CandidateTranscript]


@dataclass
class TranscriptGroup:
    """One model's transcripts at one lookahead, from one decoder (a hybrid model's CTC head has its own)."""

    model: str
    context: tuple[int, int]
    utterances: list[UtteranceTranscripts]
    decoder: str = "rnnt"

    @property
    def differing(self) -> int:
        return sum(not c.same_as_nemo for u in self.utterances for c in u.candidates)


def _utterance_transcripts(utterance: str, context: tuple, nemo: dict[tuple, dict[str, Any]],
                           candidate_rows: Sequence[dict[str, Any]], decoder: str = "rnnt") -> UtteranceTranscripts:
    nemo_row = nemo.get((utterance, context, "plain", decoder)) or next(
        (r for k, r in nemo.items() if k[0] == utterance and k[1] == context and k[3] == decoder), None) or {}
    candidates = []
    for row in candidate_rows:
        against = nemo.get(_transcript_key(row), nemo_row)
        candidates.append(CandidateTranscript(row["backend"], row["dtype"], row.get("mode", "plain"),
                                              row["text"] == against.get("text"),
                                              word_alignment(against.get("text", ""), row["text"])))
    return UtteranceTranscripts(utterance, nemo_row.get("reference_text") or "", nemo_row.get("text", ""),
                                candidates)


def transcript_groups(results_list: Sequence[Results]) -> list[TranscriptGroup]:
    """Each candidate's transcript against NeMo's on the same chunks, per model and lookahead (longest first),
    and per decoder: a hybrid model's CTC transcripts form groups of their own, after the RNNT ones."""
    groups = []
    for results in results_list:
        nemo = reference_transcripts(results)
        by_context: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for row in results.transcripts:
            if row["backend"] != REFERENCE_BACKEND:
                by_context[(tuple(row["att_context_size"]), _decoder(row))].append(row)
        keys = {(k[1], k[3]) for k in nemo} | set(by_context)
        for context, decoder in sorted(keys, key=lambda k: (k[1] != "rnnt", k[1], -k[0][1])):
            rows = by_context[(context, decoder)]
            utterances = sorted({k[0] for k in nemo if k[1] == context and k[3] == decoder}
                                | {r["utterance"] for r in rows})
            groups.append(TranscriptGroup(model_name(results), context, [
                _utterance_transcripts(utterance, context, nemo, [r for r in rows if r["utterance"] == utterance],
                                       decoder)
                for utterance in utterances], decoder))
    return groups


@dataclass
class WerRow:
    model: str
    backend: str
    dtype: str
    context: tuple[int, int]
    utterances: int
    wer_vs_text: float | None  # against the utterances' reference text
    wer_vs_nemo: float | None  # against NeMo's transcript of the same chunks
    mode: str = "plain"  # the first-chunk mode: NeMo has a row per mode its candidates were compared in
    decoder: str = "rnnt"  # "ctc": a hybrid model's CTC greedy transcripts (against NeMo's CTC transcripts)


def wer_rows(results_list: Sequence[Results]) -> list[WerRow]:
    rows = []
    for results in results_list:
        nemo = reference_transcripts(results)
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for row in results.transcripts:
            groups[(row["backend"], row["dtype"], tuple(row["att_context_size"]), row.get("mode", "plain"),
                    _decoder(row))].append(row)
        for (backend, dtype, context, mode, decoder), rows_of in groups.items():
            # One row per backend, dtype, lookahead and first-chunk mode: the pad-and-drop first chunk that
            # ONNX export bakes in costs WER by itself, so NeMo's own figure is shown in each mode.
            with_text = [r for r in rows_of if r.get("reference_text")]
            vs_text = (word_error_rate([r["reference_text"] for r in with_text], [r["text"] for r in with_text])
                       if with_text else None)
            paired = [(nemo[_transcript_key(r)]["text"], r["text"]) for r in rows_of if _transcript_key(r) in nemo]
            vs_nemo = word_error_rate([a for a, _ in paired], [b for _, b in paired]) if paired else None
            rows.append(WerRow(model_name(results), backend, dtype, context, len(rows_of), vs_text, vs_nemo, mode,
                               decoder))
    return sorted(rows, key=lambda r: (r.model, r.decoder != "rnnt", r.backend != REFERENCE_BACKEND, r.backend,
                                       r.dtype != FP32, r.dtype, -r.context[1], r.mode != "plain"))


@dataclass
class Degradation:
    """A reduced-precision candidate against NeMo, next to the same backend at fp32."""

    model: str
    backend: str
    dtype: str
    context: tuple[int, int]
    encoder_cosine: float | None
    joint_cosine: float | None
    token_agreement: float | None
    wer: float | None
    wer_fp32: float | None

    @property
    def wer_delta(self) -> float | None:
        return None if self.wer is None or self.wer_fp32 is None else self.wer - self.wer_fp32


def degradation_rows(results_list: Sequence[Results]) -> list[Degradation]:
    wer = {(r.model, r.backend, r.dtype, r.context): r.wer_vs_text for r in wer_rows(results_list)
           if r.decoder == "rnnt"}
    rows = []
    for summary in pair_summaries(results_list):
        if summary.is_fp32 or summary.is_offline:
            continue
        key = (summary.model, summary.candidate)
        rows.append(Degradation(
            summary.model, summary.candidate, summary.dtype, summary.context,
            summary.min_cosine("encoder"), summary.min_cosine("joint"), summary.token_agreement,
            wer.get((*key, summary.dtype, summary.context)), wer.get((*key, FP32, summary.context))))
    return rows


@dataclass
class TimingRow:
    model: str
    backend: str
    dtype: str
    context: tuple[int, int]
    steps: int
    mean_ms: float
    p95_ms: float
    labels_per_second: float | None = None  # emission rate of the runs timed (None: not recorded)


def timing_rows(results_list: Sequence[Results]) -> list[TimingRow]:
    grouped: dict[tuple, list[float]] = defaultdict(list)
    emitted: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])  # labels, audio seconds
    for results in results_list:
        for row in results.timings:
            key = (model_name(results), row["backend"], row["dtype"], tuple(row["att_context_size"]))
            grouped[key].extend(row["step_seconds"])
            if "labels" in row and row.get("audio_seconds"):
                emitted[key][0] += row["labels"]
                emitted[key][1] += row["audio_seconds"]
    rows = []
    for key, seconds in grouped.items():
        ordered = sorted(seconds)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")
        labels, audio = emitted.get(key, (0.0, 0.0))
        rows.append(TimingRow(*key, len(seconds), 1000 * sum(seconds) / max(len(seconds), 1), 1000 * p95,
                              labels / audio if audio else None))
    return sorted(rows, key=lambda r: (r.model, r.backend != REFERENCE_BACKEND, r.backend, r.dtype, -r.context[1]))


# -- per-step grids -----------------------------------------------------------------------------------------

@dataclass
class StepGrid:
    """Worst value over utterances of ``max_abs`` per tap (rows) and streaming step (columns)."""

    title: str
    rows: list[str]
    values: list[list[float | None]]  # [row][step]


def _per_step_worst(comparisons: Iterable[PairComparison], taps: Sequence[str]) -> list[list[float | None]]:
    worst: dict[tuple[str, int], float] = {}
    steps = 0
    for comparison in comparisons:
        for result in comparison.taps:
            if result.step < 0 or result.tap not in taps or "max_abs" not in result.metrics:
                continue
            key = (result.tap, result.step)
            worst[key] = max(worst.get(key, 0.0), result.metrics["max_abs"])
            steps = max(steps, result.step + 1)
    return [[worst.get((tap, step)) for step in range(steps)] for tap in taps]


def layer_grid(summary: PairSummary) -> StepGrid | None:
    layer_taps = sorted({t.tap for c in summary.comparisons for t in c.taps if t.tap.startswith("layers.")},
                        key=lambda name: int(name.split(".")[1]))
    taps = [*HEATMAP_HEAD, *layer_taps, *HEATMAP_TAIL]
    values = _per_step_worst(summary.comparisons, taps)
    present = [(tap, row) for tap, row in zip(taps, values) if any(v is not None for v in row)]
    if not present or not layer_taps:
        return None
    return StepGrid(f"{summary.label} {context_label(summary.context)}", [t for t, _ in present],
                    [row for _, row in present])


def cache_drift(summary: PairSummary) -> StepGrid | None:
    values = _per_step_worst(summary.comparisons, CACHE_DRIFT_TAPS)
    if not any(v is not None for row in values for v in row):
        return None
    return StepGrid(f"{summary.label} {context_label(summary.context)}", list(CACHE_DRIFT_TAPS), values)


def cache_drift_by_pair(summaries: Sequence[PairSummary]) -> dict[tuple[str, str], list[StepGrid]]:
    """Cache drift grids per (model, pair label), one per lookahead: a pair's lookaheads share a plot."""
    by_pair: dict[tuple[str, str], list[StepGrid]] = defaultdict(list)
    for summary in summaries:
        grid = cache_drift(summary)
        if grid is not None:
            by_pair[(summary.model, summary.label)].append(grid)
    return by_pair


# -- provenance ------------------------------------------------------------------------------------------------

@dataclass
class ProvenanceRow:
    label: str
    value: Any
    code: bool = False  # hashes and paths: shown monospaced


def int8_path_label(results: Results) -> str | None:
    """The CPU's int8 kernel path a run recorded (``environment.int8_kernel_path``), as one phrase; None for a
    results file written before it was recorded."""
    path = (results.environment or {}).get("int8_kernel_path")
    if not path:
        return None
    kind = "saturating u8 x s8" if path.get("saturates_u8s8") else "exact u8 x s8"
    return f"{path.get('name')} ({kind}, {path.get('machine')})"


def int8_paths(results_list: Sequence[Results]) -> list[str]:
    """Every int8 kernel path the runs were made on, in order, each once (the report's header)."""
    return list(dict.fromkeys(label for label in map(int8_path_label, results_list) if label))


def provenance(results: Results) -> list[ProvenanceRow]:
    """Where one run's numbers come from: model file, machine, library versions and candidate artifacts."""
    env = results.environment or {}
    model = results.model or {}
    rows = [ProvenanceRow("model", model.get("name")), ProvenanceRow("model sha256", model.get("sha256"), code=True),
            ProvenanceRow("model path", model.get("path"), code=True)]
    if model.get("hub_repo"):
        rows.append(ProvenanceRow("model on the hub", f"{model['hub_repo']}@{model.get('hub_revision')}", code=True))
    rows += [ProvenanceRow("created", results.created), ProvenanceRow("harness", env.get("harness_version")),
             ProvenanceRow("git commit", env.get("git_commit"), code=True),
             ProvenanceRow("device", env.get("device")), ProvenanceRow("platform", env.get("platform")),
             ProvenanceRow("python", env.get("python")), ProvenanceRow("threads", env.get("threads")),
             ProvenanceRow("CPUs", env.get("cpus")), ProvenanceRow("int8 kernel path", int8_path_label(results)),
             ProvenanceRow("tolerances", results.tolerances, code=True)]
    rows += [ProvenanceRow(package, version) for package, version in (env.get("versions") or {}).items()]
    rows += [ProvenanceRow(f"{entry['backend']}:{entry['dtype']} artifact", entry["artifact_sha256"], code=True)
             for entry in (results.extra or {}).get("candidates", []) if entry.get("artifact_sha256")]
    rows += [ProvenanceRow(f"{entry['backend']} source", entry.get("path"), code=True)
             for entry in model.get("backends") or [] if entry.get("backend") != "nemo" and entry.get("path")]
    return rows


# -- probes -------------------------------------------------------------------------------------------------

PROBE_MARK = {"pass": "✅ pass", "fail": "❌ fail", "refused": "🚫 refused", "n/a": "– n/a"}


@dataclass
class ProbeCell:
    verdict: str
    detail: str
    step: int | None
    tap: str | None

    @property
    def short(self) -> str:
        """The verdict, and for a failure its first divergent step and tap."""
        mark = PROBE_MARK.get(self.verdict, self.verdict)
        if self.verdict == "fail" and self.step is not None:
            return f"{mark} step {self.step} {self.tap}"
        return mark


@dataclass
class ProbeRow:
    name: str
    failure_class: str
    targets: str
    expect: str
    cells: list[ProbeCell]


@dataclass
class ProbeSection:
    """One run of the probe set: a row per probe, a column per backend (the reference's first)."""

    model: str
    lookaheads: list[list[int]]
    backends: list[str]  # backend:dtype, the reference marked
    rows: list[ProbeRow]
    verdicts: list[Any]  # streaming_parity.judge.probes.ProbeVerdict, every backend and probe
    growth: list[Any]  # streaming_parity.judge.probes.GrowthRow
    resources: list[Any]  # streaming_parity.judge.probes.ResourceRow

    @property
    def failures(self) -> list[Any]:
        return [v for v in self.verdicts if v.verdict == "fail"]

    @property
    def refusals(self) -> list[Any]:
        return [v for v in self.verdicts if v.verdict == "refused"]

    @property
    def inapplicable(self) -> list[Any]:
        return [v for v in self.verdicts if v.verdict == "n/a"]


def probe_sections(results_list: Sequence[Results]) -> list[ProbeSection]:
    """The probe verdicts of every probe run among ``results_list``, derived again from the saved comparisons
    and outcomes (``streaming_parity.judge.probes``), so that a re-judged file reports its own verdicts."""
    from streaming_parity.judge.probes import KEY, error_growth, probe_verdicts, resource_use

    sections = []
    for results in results_list:
        section = (results.extra or {}).get(KEY)
        if not section:
            continue
        verdicts = probe_verdicts(results)
        backends = [b["label"] for b in section.get("backends", [])]
        names = {b["label"]: b["label"] + (" (reference)" if b.get("reference") else "" if b.get("gating", True)
                                           else " (peer)") for b in section.get("backends", [])}
        by_key = {(v.probe, v.backend): v for v in verdicts}
        rows = []
        for definition in section.get("definitions", []):
            cells = []
            for backend in backends:
                v = by_key.get((definition["name"], backend))
                cells.append(ProbeCell("n/a", "not run", None, None) if v is None
                             else ProbeCell(v.verdict, v.detail, v.step, v.tap))
            rows.append(ProbeRow(definition["name"], definition["failure_class"], definition["targets"],
                                 definition["expect"], cells))
        sections.append(ProbeSection(model=model_name(results), lookaheads=(results.extra or {}).get("lookaheads", []),
                                     backends=[names[b] for b in backends], rows=rows, verdicts=verdicts,
                                     growth=error_growth(results), resources=resource_use(results)))
    return sections

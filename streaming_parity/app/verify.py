"""The numeric check behind ``parity convert`` and ``parity verify DIR --nemo MODEL.nemo``.

``verify_artifact`` streams the utterances through NeMo and the MLX artifact at every lookahead
(in each requested first-chunk mode) and runs both offline forwards, then judges every tap and
cache at every step against the tolerance file (``streaming_parity.judge.compare``). ``Verification.to_dict`` is
what ``DIR/parity.json`` holds.

The verdict is the judge's one policy (``streaming_parity.judge.compare.verdict``), the same as
``parity compare`` and the nightly: a candidate that takes another greedy decision is decoded again
with NeMo's (teacher forcing) and its taps judged on that run; where the tolerance file bounds a
dtype's tokens by agreement (the bfloat16/float16 ``tokens`` tables), the token sequences are judged
by ``1 - edit distance / reference length`` summed over every comparison of the run
(``token_agreement_failures``), because one flipped decision early in a three-token utterance
scores 0 on its own. float32 requires identical tokens (or near-ties only) in every comparison.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streaming_parity.app.session import compare_backends
from streaming_parity.core.nemo_file import sha256_file
from streaming_parity.core.system.provenance import HubOrigin, Provenance
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import FirstChunkMode
from streaming_parity.judge.compare import PairComparison, aggregate_token_agreement, token_agreement_failures
from streaming_parity.judge.loop import Candidate, LoopProgress
from streaming_parity.judge.metrics import token_edit_distance, word_error_rate
from streaming_parity.judge.tolerances import Tolerances

if TYPE_CHECKING:
    from streaming_parity.judge.recording import Recording

DEFAULT_MODES = (FirstChunkMode.PLAIN.value,)


TAP_GROUPS = ("mel", "pre_encode", "layers", "encoder", "caches", "decoder", "joint")


def tap_group(tap: str) -> str:
    """The column a tap is shown in: every ``layers.N`` in ``layers``, both caches in ``caches``."""
    if tap.startswith("layers."):
        return "layers"
    if tap.startswith("cache_last_") and tap != "cache_last_channel_len":
        return "caches"
    return tap


def grouped_worst(worst: dict[str, float]) -> dict[str, float]:
    """``{tap: worst max_abs}`` -> ``{group: worst max_abs}`` (``TAP_GROUPS``, and any other tap as is)."""
    grouped: dict[str, float] = {}
    for tap, value in worst.items():
        group = tap_group(tap)
        grouped[group] = max(grouped.get(group, 0.0), value)
    return grouped


@dataclass
class Entry:
    """One judged comparison and where it came from."""

    mode: str  # "plain", "pad-and-drop" or "offline" (also ``comparison.mode``)
    comparison: PairComparison


@dataclass
class Verification:
    artifact_dir: Path
    nemo_path: Path | None  # None: judged against a recording of the reference (``reference_record``)
    dtype: str
    tolerances: Tolerances
    utterances: list[str]
    att_context_sizes: list[tuple[int, int]]
    entries: list[Entry] = field(default_factory=list)
    device: str = ""
    blas: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    source_hub: HubOrigin | None = None  # where the checkpoint came from, when from the hub
    transcripts: list[dict[str, Any]] = field(default_factory=list)  # every streamed run's text (the loop's)
    # A recorded reference (``streaming_parity.judge.recording``): its path, checkpoint and how it was made.
    reference_record: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.entries) and not self.failures()

    def failures(self) -> list[str]:
        failures = [f"{e.mode}: {e.comparison.describe_failure()}" for e in self.entries if not e.comparison.passed]
        return failures + token_agreement_failures([e.comparison for e in self.entries], self.tolerances)

    def modes(self) -> list[str]:
        return list(dict.fromkeys(e.mode for e in self.entries))

    @staticmethod
    def _context(context: Sequence[int]) -> str:
        return f"{context[0]},{context[1]}"

    def worst(self, metric: str = "max_abs") -> dict[str, dict[str, dict[str, float]]]:
        """``{lookahead: {mode: {tap: worst value}}}``, worst = max (upper-bound metrics) or min."""
        from streaming_parity.judge.metrics import METRIC_BOUND

        lower = METRIC_BOUND.get(metric) == "min"
        result: dict[str, dict[str, dict[str, float]]] = {}
        for entry in self.entries:
            by_tap = result.setdefault(self._context(entry.comparison.att_context_size), {}).setdefault(entry.mode, {})
            for tap in entry.comparison.taps:
                if metric in tap.metrics:
                    value = tap.metrics[metric]
                    old = by_tap.get(tap.tap)
                    by_tap[tap.tap] = value if old is None else (min(old, value) if lower else max(old, value))
        return result

    def token_summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        summary: dict[str, dict[str, dict[str, Any]]] = {}
        for entry in self.entries:
            c = entry.comparison
            item = summary.setdefault(self._context(c.att_context_size), {}).setdefault(
                entry.mode, {"identical": 0, "total": 0, "reference_tokens": 0, "edits": 0})
            item["total"] += 1
            item["identical"] += int(c.tokens_equal)
            item["reference_tokens"] += len(c.reference_tokens)
            item["edits"] += token_edit_distance(c.reference_tokens, c.candidate_tokens)
        for by_mode in summary.values():
            for item in by_mode.values():
                item["agreement"] = 1.0 - item["edits"] / max(item["reference_tokens"], 1)
        return summary

    def word_error_rates(self) -> dict[str, dict[str, float]]:
        """``{lookahead: {backend: WER}}`` over the utterances with a reference text (plain-mode runs);
        empty when none has one."""
        rows: dict[str, dict[str, tuple[list[str], list[str]]]] = {}
        for row in self.transcripts:
            if not row.get("reference_text") or row.get("mode", "plain") != FirstChunkMode.PLAIN.value \
                    or row.get("decoder", "rnnt") != "rnnt":  # a hybrid's CTC transcripts: not the model's WER
                continue
            references, hypotheses = rows.setdefault(self._context(row["att_context_size"]), {}).setdefault(
                row["backend"], ([], []))
            references.append(row["reference_text"])
            hypotheses.append(row["text"])
        return {context: {backend: word_error_rate(refs, hyps) for backend, (refs, hyps) in by_backend.items()}
                for context, by_backend in rows.items()}

    def summary(self) -> str:
        total = len(self.entries)
        failed = sum(not e.comparison.passed for e in self.entries)
        identical = sum(e.comparison.tokens_equal for e in self.entries)
        agreement = aggregate_token_agreement([e.comparison for e in self.entries])
        worst_layer = max((v for by_mode in self.worst().values() for taps in by_mode.values()
                           for k, v in taps.items() if k.startswith("layers.") or k == "encoder"), default=float("nan"))
        tied = [e.comparison for e in self.entries if e.comparison.near_ties]
        ties = ""
        if tied:
            # A near-tie is where the two correct decoders may part: named, so that "identical tokens in 39/40"
            # never hides which comparison met one and why it still passed.
            first = tied[0]
            where = (f"{first.pair} [{first.att_context_size[0]},{first.att_context_size[1]}] {first.utterance} "
                     f"{first.mode}: {first.near_ties[0].describe()}")
            ties = f", near-ties met in {len(tied)} ({where}{'; ...' if len(tied) > 1 else ''})"
        return (f"{total - failed}/{total} comparisons within tolerance, identical tokens in {identical}/{total} "
                f"(token agreement {agreement:.3f}){ties}, worst encoder-side max_abs {worst_layer:.2e} ({self.dtype})")

    def to_dict(self) -> dict[str, Any]:
        from streaming_parity.judge.results import comparison_to_dict, environment

        record_path = self.artifact_dir / "artifact.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        weights = {name: sha256_file(self.artifact_dir / name)
                   for name in ("model.safetensors", "frontend.safetensors") if (self.artifact_dir / name).exists()}
        recorded = record.get("files", {})
        tolerance_file = Path(self.tolerances.source)
        if self.nemo_path is not None:
            source_name, source_sha256 = self.nemo_path.name, sha256_file(self.nemo_path)
        else:
            source_name, source_sha256 = self.reference_record.get("name"), self.reference_record.get("sha256")
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "created": self.created,
            "source": {"name": source_name, "sha256": source_sha256},
            "provenance": {**Provenance.collect(self.nemo_path, sha256=source_sha256, hub=self.source_hub).to_dict(),
                           "source_name": source_name},
            "reference": self.reference_record or {"backend": "nemo", "live": True},
            "artifact": {
                "dtype": self.dtype,
                "weights_sha256": weights,
                "weights_match_record": all(recorded.get(k) == v for k, v in weights.items()) if recorded else None,
                "tensors_sha256": record.get("tensors", {}),
            },
            "environment": {**environment(), "mlx_device": self.device, "blas": self.blas,
                            "machine": platform.machine()},
            "tolerances": {"path": str(tolerance_file),
                           "sha256": sha256_file(tolerance_file) if tolerance_file.exists() else None},
            "utterances": self.utterances,
            "att_context_sizes": [list(c) for c in self.att_context_sizes],
            "modes": self.modes(),
            "worst_max_abs": self.worst("max_abs"),
            "worst_cosine": self.worst("cosine"),
            "tokens": self.token_summary(),
            "token_agreement": aggregate_token_agreement([e.comparison for e in self.entries]),
            "wer": self.word_error_rates(),
            "failures": self.failures(),
            "comparisons": [{"mode": e.mode, **comparison_to_dict(e.comparison)} for e in self.entries],
        }


def verify_artifact(artifact_dir: str | Path, nemo_path: str | Path | None, *, reference: Backend | Recording,
                    utterances: Sequence[Any], att_context_sizes: Sequence[Sequence[int]] | None = None,
                    tolerances_path: str | Path | None = None, modes: Sequence[str] = DEFAULT_MODES,
                    include_offline: bool = True, device: str = "auto",
                    progress: Callable[[str], None] | LoopProgress | None = None,
                    source_hub: HubOrigin | None = None) -> Verification:
    """Judge the MLX artifact against ``reference`` (NeMo over ``nemo_path``, or a recording of it with
    ``nemo_path`` None: then its lookaheads by default) on ``utterances``.

    ``progress``: a ``callable(text)`` per stream, or the loop's callbacks (a
    ``streaming_parity.core.system.progress.ProgressBar``). ``source_hub``: where the checkpoint came from."""
    from streaming_parity.backends.mlx.backend import MLXBackend
    from streaming_parity.backends.mlx.blas import status

    artifact_dir, nemo_path = Path(artifact_dir), None if nemo_path is None else Path(nemo_path)
    recorded = not isinstance(reference, Backend)
    if nemo_path is None and not recorded:
        raise ValueError("a live reference needs the checkpoint it was loaded from (nemo_path)")
    tolerances = Tolerances.load(tolerances_path)
    candidate = MLXBackend(artifact_dir, device=device)
    utterances = list(utterances)
    default_contexts = reference.contexts if recorded else candidate.info.att_context_sizes
    contexts = [(int(c[0]), int(c[1])) for c in (att_context_sizes or default_contexts)]
    verification = Verification(artifact_dir=artifact_dir, nemo_path=nemo_path, dtype=candidate.dtype,
                                tolerances=tolerances, utterances=[u.name for u in utterances],
                                att_context_sizes=contexts, device=str(candidate.device), blas=status().reason,
                                source_hub=source_hub)
    if recorded:
        verification.reference_record = {"recording": str(reference.directory), **{
            key: reference.model.get(key) for key in ("name", "sha256", "hub_repo", "hub_revision")},
            "made": reference.manifest.get("provenance", {})}

    outcome = compare_backends(
        reference, [Candidate.of(candidate, modes=tuple(FirstChunkMode(m).value for m in modes),
                                 compare_offline=include_offline)],
        utterances, contexts, tolerances, include_offline=False,
        progress=progress if callable(getattr(progress, "advance", None)) else
        LoopProgress(advance=progress) if progress else None)
    verification.entries = [Entry(c.mode, c) for c in outcome.results.comparisons]
    verification.transcripts = list(outcome.results.transcripts)
    candidate.close()
    return verification


def verifier(nemo_path: str | Path, *, reference: Backend | Callable[[], Backend], utterances: Sequence[Any],
             att_context_sizes: Sequence[Sequence[int]] | None = None, tolerances_path: str | Path | None = None,
             progress: Callable[[str], None] | LoopProgress | None = None,
             source_hub: HubOrigin | None = None) -> Callable[[Path], Verification]:
    """``verify_artifact`` bound to everything but the artifact: what ``convert(verify=...)`` calls on the
    written directory before publishing it. ``reference`` may be a callable that opens NeMo only then
    (after the conversion succeeded), so a conversion that fails never pays for loading NeMo."""
    if not utterances:
        raise ValueError("verification needs utterances")

    def verify(artifact_dir: Path) -> Verification:
        backend = reference() if callable(reference) and not isinstance(reference, Backend) else reference
        return verify_artifact(artifact_dir, nemo_path, reference=backend, utterances=utterances,
                               att_context_sizes=att_context_sizes, tolerances_path=tolerances_path,
                               progress=progress, source_hub=source_hub)

    return verify

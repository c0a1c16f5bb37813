"""The results schema: a parity run as JSON data that can be saved, rendered and re-judged.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "created": ISO-8601 UTC,
      "model": {"path", "sha256", "name", "hub_repo", "hub_revision",
                "backends": [{backend, path, sha256, hub_repo, hub_revision, source_sha256, made_by...}]},
      "environment": {"versions": {package: version}, "harness_version", "git_commit", "device", "platform",
                      "cpus", "threads", "int8_kernel_path": {name, machine, flags, saturates_u8s8}},
      "tolerances": path of the tolerance file applied,
      "comparisons": [PairComparison as dict: reference, candidate, pair, dtype, att_context_size,
                      utterance, passed, first_divergence, reference_tokens, candidate_tokens,
                      reference_ctc_tokens, candidate_ctc_tokens, ctc_flips (hybrid RNNT-CTC models),
                      taps: [{step, tap, metrics, limits, violations, reference_shape, candidate_shape}]],
      "transcripts": [{utterance, backend, dtype, att_context_size, text, reference_text, wer,
                       decoder ("rnnt", or "ctc" for a hybrid model's CTC greedy transcript)}],
      "timings": [{backend, dtype, att_context_size, utterance, step_seconds, labels, audio_seconds,
                   step_rss_mb (a run spooled to disk: the process's resident MiB after each step)}],
      "passed": bool
    }
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import InputNotFound, InvalidInput
from streaming_parity.core.system.cpu import int8_kernel_path
from streaming_parity.core.system.provenance import git_commit, harness_version, library_versions
from streaming_parity.core.system.threads import requested_threads
from streaming_parity.judge.compare import PairComparison, TapResult
from streaming_parity.judge.ties import TokenFlip

SCHEMA_VERSION = 1
VERSIONED_PACKAGES = ("torch", "nemo_toolkit", "onnx", "onnxruntime", "mlx", "numpy", "safetensors")


def environment() -> dict[str, Any]:
    return {
        "versions": library_versions(VERSIONED_PACKAGES),
        "harness_version": harness_version(),
        "git_commit": git_commit(),  # None unless running from a git checkout
        "device": "cpu",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": requested_threads() or os.cpu_count(),  # the limit set with --threads, else the libraries' default
        # Which int8 kernel ONNX Runtime runs here (streaming_parity.core.system.cpu): a saturating export's figures depend on it.
        "int8_kernel_path": int8_kernel_path().to_dict(),
    }


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: store them as strings, read back by ``_number``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _number(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_number(v) for v in value]
    return value


def comparison_to_dict(comparison: PairComparison) -> dict[str, Any]:
    divergence = comparison.first_divergence()
    return _finite({
        "reference": comparison.reference,
        "candidate": comparison.candidate,
        "pair": comparison.pair,
        "dtype": comparison.dtype,
        "att_context_size": list(comparison.att_context_size),
        "utterance": comparison.utterance,
        "passed": comparison.passed,
        "tokens_equal": comparison.tokens_equal,
        "require_token_match": comparison.require_token_match,
        "mode": comparison.mode,
        "teacher_forced": comparison.teacher_forced,
        "flips": [f.to_dict() for f in comparison.flips],
        "token_divergence": comparison.token_divergence,
        "gating": comparison.gating,
        "causes": list(comparison.causes),
        "first_divergence": None if divergence is None else {"step": divergence.step, "tap": divergence.tap,
                                                              "violations": divergence.violations},
        "summary": comparison.describe_failure(),
        "reference_tokens": comparison.reference_tokens,
        "candidate_tokens": comparison.candidate_tokens,
        "reference_ctc_tokens": comparison.reference_ctc_tokens,
        "candidate_ctc_tokens": comparison.candidate_ctc_tokens,
        "ctc_flips": [f.to_dict() for f in comparison.ctc_flips],
        "order": comparison.order,
        "taps": [asdict(t) for t in comparison.taps],
    })


def comparison_from_dict(data: dict[str, Any]) -> PairComparison:
    data = _number(data)
    return PairComparison(
        reference=data["reference"], candidate=data["candidate"], pair=data["pair"], dtype=data["dtype"],
        att_context_size=tuple(data["att_context_size"]), utterance=data["utterance"],
        taps=[TapResult(**t) for t in data["taps"]], reference_tokens=data["reference_tokens"],
        candidate_tokens=data["candidate_tokens"], order=data["order"],
        require_token_match=data.get("require_token_match", True), mode=data.get("mode", ""),
        teacher_forced=data.get("teacher_forced", False), flips=[TokenFlip(**f) for f in data.get("flips", [])],
        reference_ctc_tokens=data.get("reference_ctc_tokens"), candidate_ctc_tokens=data.get("candidate_ctc_tokens"),
        ctc_flips=[TokenFlip(**f) for f in data.get("ctc_flips", [])],
        token_divergence=data.get("token_divergence"), gating=data.get("gating", True),
        causes=list(data.get("causes", [])))


@dataclass
class Results:
    model: dict[str, Any]
    tolerances: str
    comparisons: list[PairComparison] = field(default_factory=list)
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=environment)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "model": self.model,
            "environment": self.environment,
            "tolerances": self.tolerances,
            "passed": self.passed,
            "comparisons": [comparison_to_dict(c) for c in self.comparisons],
            "transcripts": _finite(self.transcripts),
            "timings": self.timings,
            "extra": _finite(self.extra),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InvalidInput(f"results schema_version {version!r} is not {SCHEMA_VERSION}")
        return cls(model=data["model"], tolerances=data["tolerances"],
                   comparisons=[comparison_from_dict(c) for c in data["comparisons"]],
                   transcripts=_number(data.get("transcripts", [])), timings=data.get("timings", []),
                   environment=data.get("environment", {}), created=data.get("created", ""),
                   extra=_number(data.get("extra", {})))

    @classmethod
    def load(cls, path: str | Path) -> Results:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputNotFound(f"results file not found: {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidInput(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"{path}: not a parity results file (a JSON {type(data).__name__})")
        try:
            return cls.from_dict(data)
        except InvalidInput as error:
            raise InvalidInput(f"{path}: {error}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            # The file is input: a field missing or of the wrong type means the file is not one this
            # version wrote, not that the harness is wrong.
            raise InvalidInput(f"{path}: not a parity results file ({type(error).__name__}: {error})") from None

"""Diagnosis of a converted model: is it right, and if not, where is it wrong?

Three independent checks, combined into one verdict that names the cause:

1. weight facts vs config claims (``streaming_parity.detect.fingerprint``): needs nothing but the artifact;
2. every tensor against the source checkpoint, mapped back through the backend's own mapping
   (a backend package provides ``tensors_as_source(path)``, handed in by the caller);
3. numeric parity against NeMo (comparisons the caller ran), naming the first divergent step and tap.

``streaming_parity.app.diagnose_path`` puts the three together for a path, with the registered backends.

The suspects are the tensors that differ from the source *and* feed the first divergent tap; when
no tensor differs, every tensor of that tap is a suspect (the cause is then in the runtime code).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.detect.fingerprint import ModelView, contradictions, layer_of, tensors_of_tap
from streaming_parity.judge.compare import PairComparison


@dataclass
class TensorDifference:
    name: str  # the artifact's tensor name
    source_names: tuple[str, ...]
    tap: str | None
    max_abs: float
    detail: str = ""


@dataclass
class Diagnosis:
    path: str
    contradictions: list[str] = field(default_factory=list)
    differing_tensors: list[TensorDifference] = field(default_factory=list)
    first_divergence: dict[str, Any] | None = None  # {"step", "tap", "att_context_size", "utterance", ...}
    suspects: list[str] = field(default_factory=list)
    numeric_checked: bool = False

    @property
    def passed(self) -> bool:
        return not self.contradictions and not self.differing_tensors and self.first_divergence is None

    def sentences(self) -> list[str]:
        lines = [f"contradiction: {c}" for c in self.contradictions]
        for diff in self.differing_tensors:
            lines.append(f"tensor {diff.name} differs from {' + '.join(diff.source_names)} "
                         f"(max abs {diff.max_abs:.3g}{', ' + diff.detail if diff.detail else ''}) -> tap {diff.tap}")
        if self.first_divergence:
            d = self.first_divergence
            lines.append(f"first divergence: step {d['step']}, tap {d['tap']} "
                         f"([{d['att_context_size'][0]},{d['att_context_size'][1]}], {d['utterance']}): "
                         + "; ".join(d["violations"]))
            lines.extend(f"cause: {cause}" for cause in d.get("causes", []))
        if self.suspects:
            lines.append("most likely responsible: " + ", ".join(self.suspects))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "passed": self.passed, "contradictions": self.contradictions,
            "differing_tensors": [d.__dict__ | {"source_names": list(d.source_names)} for d in self.differing_tensors],
            "first_divergence": self.first_divergence, "suspects": self.suspects,
            "numeric_checked": self.numeric_checked,
        }


def compare_tensors_to_source(tensors_as_source: Iterable[tuple[str, Sequence[str], np.ndarray, float]],
                              source_state: dict[str, np.ndarray]) -> list[TensorDifference]:
    """Every artifact tensor mapped back to the source layout (``(name, source names, array, relative
    tolerance)`` from the backend's ``tensors_as_source``) and compared exactly, up to its dtype."""
    differences = []
    for name, source_names, array, tolerance in tensors_as_source:
        missing = [n for n in source_names if n not in source_state]
        if missing:
            differences.append(TensorDifference(name, tuple(source_names), layer_of(source_names[0]), float("inf"),
                                                f"source has no {', '.join(missing)}"))
            continue
        expected = sum(source_state[n].astype(np.float64) for n in source_names)
        if expected.shape != array.shape:
            differences.append(TensorDifference(name, tuple(source_names), layer_of(source_names[0]), float("inf"),
                                                f"shape {list(array.shape)} vs source {list(expected.shape)}"))
            continue
        error = float(np.max(np.abs(expected - array))) if array.size else 0.0
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        if error > tolerance * max(scale, 1.0):
            differences.append(TensorDifference(name, tuple(source_names), layer_of(source_names[0]), error))
    return differences


def source_state(nemo_path: Path) -> dict[str, np.ndarray]:
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

    return {name: tensor.detach().float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
            for name, tensor in load_state_dict(inspect_nemo(nemo_path)).items()}


def diagnose_view(view: ModelView, *, differing_tensors: Sequence[TensorDifference] | None = None,
             comparisons: Sequence[PairComparison] | None = None) -> Diagnosis:
    """The verdict on ``view``: its contradictions, the tensors that differ from the source (when
    compared), and the first divergence among ``comparisons`` (when a numeric check ran)."""
    diagnosis = Diagnosis(path=str(view.path), contradictions=contradictions(view),
                          differing_tensors=list(differing_tensors or []))
    if comparisons is not None:
        diagnosis.numeric_checked = True
        diagnosis.first_divergence = first_divergence(comparisons)
    diagnosis.suspects = _suspects(diagnosis, view)
    return diagnosis


def first_divergence(comparisons: Sequence[PairComparison]) -> dict[str, Any] | None:
    """The earliest failing step and tap over ``comparisons``; a token-only failure names ``tokens``."""
    failing = [c for c in comparisons if not c.passed]
    if not failing:
        return None
    first = min(failing, key=lambda c: (c.first_divergence().step if c.first_divergence() else 1 << 30))
    divergence = first.first_divergence()
    where = {"att_context_size": list(first.att_context_size), "utterance": first.utterance,
             "causes": list(first.causes)}
    if divergence is not None:
        return {"step": divergence.step, "tap": divergence.tap, **where, "violations": divergence.violations}
    return {"step": -1, "tap": "tokens", **where, "violations": [first.describe_failure()]}


def _suspects(diagnosis: Diagnosis, view) -> list[str]:
    tap = diagnosis.first_divergence["tap"] if diagnosis.first_divergence else None
    differing = [d.name for d in diagnosis.differing_tensors]
    if tap is not None:
        kind = tap.split(".")[0]
        in_tap = [d.name for d in diagnosis.differing_tensors if d.tap == tap
                  or (kind in ("encoder", "cache_last_channel", "cache_last_time") and d.tap and d.tap.startswith("layers"))]
        if in_tap:
            return in_tap
        if differing:
            return differing
        return tensors_of_tap(view.tensors, tap)
    return differing

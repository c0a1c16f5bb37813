"""Diagnosis of a converted model: is it right, and if not, where is it wrong?

Three independent checks, combined into one verdict that names the cause:

1. weight facts vs config claims (``harness.detect``): needs nothing but the artifact;
2. every tensor against the source checkpoint, mapped back through the backend's own mapping
   (a backend package provides ``tensors_as_source(path)``);
3. numeric parity against NeMo, naming the first divergent step and tap.

The suspects are the tensors that differ from the source *and* feed the first divergent tap; when
no tensor differs, every tensor of that tap is a suspect (the cause is then in the runtime code).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from harness.detect import contradictions, layer_of, open_view, tensors_of_tap


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


def compare_tensors_to_source(path: Path, kind: str, source_state: dict[str, np.ndarray]) -> list[TensorDifference]:
    """Every artifact tensor mapped back to the source layout and compared exactly (up to its dtype)."""
    module = importlib.import_module(f"backends.{kind}")
    if not hasattr(module, "tensors_as_source"):
        raise ValueError(f"backend {kind!r} cannot map its tensors back to the source checkpoint")
    differences = []
    for name, source_names, array, tolerance in module.tensors_as_source(path):
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
    from harness.nemo_file import inspect_nemo, load_state_dict

    return {name: tensor.detach().float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
            for name, tensor in load_state_dict(inspect_nemo(nemo_path)).items()}


def diagnose(path: str | Path, nemo_path: str | Path | None = None, *, utterances: Sequence | None = None,
             att_context_sizes: Sequence[Sequence[int]] | None = None, tolerances=None,
             numeric: bool = True, reference=None) -> Diagnosis:
    """Check ``path`` (an MLX artifact or ONNX export) alone, and against ``nemo_path`` when given.

    ``reference`` may pass an already loaded NeMo backend of ``nemo_path`` (the suites reuse one).
    """
    from harness.tolerances import Tolerances

    view = open_view(path)
    diagnosis = Diagnosis(path=str(path), contradictions=contradictions(view))
    if nemo_path is None:
        return diagnosis
    nemo_path = Path(nemo_path)
    diagnosis.differing_tensors = compare_tensors_to_source(Path(path), view.kind, source_state(nemo_path))
    if numeric and not diagnosis.contradictions:
        from backends import get
        from harness.parity import compare_backends, fixture_utterances

        reference = reference or get("nemo").load(nemo_path)
        candidate = get(view.kind).load(Path(path), nemo_path=nemo_path)
        tolerances = tolerances or Tolerances.load()
        chosen = list(utterances) if utterances is not None else [min(fixture_utterances(), key=lambda u: len(u.audio))]
        contexts = att_context_sizes or list(reference.info.att_context_sizes)
        report = compare_backends(reference, [candidate], chosen, contexts, tolerances, model_path=nemo_path,
                                  include_offline=False)
        diagnosis.numeric_checked = True
        failing = [c for c in report.results.comparisons if not c.passed]
        if failing:
            first = min(failing, key=lambda c: (c.first_divergence().step if c.first_divergence() else 1 << 30))
            divergence = first.first_divergence()
            if divergence is not None:
                diagnosis.first_divergence = {"step": divergence.step, "tap": divergence.tap,
                                              "att_context_size": list(first.att_context_size),
                                              "utterance": first.utterance, "violations": divergence.violations}
            else:
                diagnosis.first_divergence = {"step": -1, "tap": "tokens", "att_context_size": list(first.att_context_size),
                                              "utterance": first.utterance, "violations": [first.describe_failure()]}
    diagnosis.suspects = _suspects(diagnosis, view)
    return diagnosis


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

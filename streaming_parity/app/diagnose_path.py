"""``diagnose`` for a path: the detection layer's three checks, wired to the registered backends.

The artifact is read by whichever registered backend recognises it; its tensors are mapped back to
the source by that backend's ``tensors_as_source``; the numeric check streams the shortest fixture
utterance (or the given ones) through NeMo and the artifact's backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import InvalidInput
from streaming_parity.detect.diagnose import Diagnosis, compare_tensors_to_source, diagnose_view, source_state
from streaming_parity.detect.fingerprint import open_view
from streaming_parity.interface.model_view import ModelView
from streaming_parity.judge.tolerances import Tolerances


def artifact_readers() -> list[Callable[[Path], ModelView | None]]:
    """Every registered backend's artifact reader, in registry order."""
    from streaming_parity.interface.registry import REGISTRY

    return [reader for entry in REGISTRY.values() if (reader := entry.artifact_reader()) is not None]


def read_view(path: str | Path) -> ModelView:
    return open_view(path, artifact_readers())


def diagnose_path(path: str | Path, nemo_path: str | Path | None = None, *, utterances: Sequence | None = None,
             att_context_sizes: Sequence[Sequence[int]] | None = None, tolerances: Tolerances | None = None,
             numeric: bool = True, reference: Any = None) -> Diagnosis:
    """Check ``path`` (an artifact of any registered backend) alone, and against ``nemo_path`` when given.

    ``reference`` may pass an already loaded NeMo backend of ``nemo_path`` (the suites reuse one).
    The numeric check runs only when the weights and the config agree: otherwise numbers mean nothing.
    """
    from streaming_parity.interface.registry import REFERENCE, get

    view = read_view(path)
    if nemo_path is None:
        return diagnose_view(view)
    nemo_path = Path(nemo_path)
    backend_module = importlib.import_module(get(view.kind).module)
    if not hasattr(backend_module, "tensors_as_source"):
        raise InvalidInput(f"backend {view.kind!r} cannot map its tensors back to the source checkpoint")
    differing = compare_tensors_to_source(backend_module.tensors_as_source(Path(path)), source_state(nemo_path))
    static = diagnose_view(view, differing_tensors=differing)
    if not numeric or static.contradictions:
        return static
    from streaming_parity.app.session import compare_backends, fixture_utterances

    reference = reference or get(REFERENCE).load(nemo_path)
    with get(view.kind).load(Path(path), nemo_path=nemo_path) as candidate:
        chosen = list(utterances) if utterances is not None else [min(fixture_utterances(), key=lambda u: len(u.audio))]
        contexts = att_context_sizes or list(reference.info.att_context_sizes)
        report = compare_backends(reference, [candidate], chosen, contexts, tolerances or Tolerances.load(),
                                  model_path=nemo_path, include_offline=False)
    return diagnose_view(view, differing_tensors=differing, comparisons=report.results.comparisons)

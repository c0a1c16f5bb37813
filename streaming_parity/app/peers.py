"""``parity compare --candidate [BACKEND[:DTYPE]:]PATH``: artifacts of any format, and peer runtimes.

A candidate names its backend, or lets the registry say what the path is: every entry's ``detect``
hook is asked (``backends.BackendEntry.detect``), the first that recognises the path runs it, and the
format it detected is printed. So ``--candidate sherpa-dir`` is driven by the harness's ONNX Runtime
driver (every tap, cache and token), and ``--candidate sherpa-onnx:sherpa-dir`` by sherpa-onnx's own
runtime (tokens only).

When a transcript-level candidate (a peer runtime) runs, its stack is bisected
(``streaming_parity.judge.bisect``): the same files through the first tensor-level backend that recognises
them, the runtime's front end and chunking swapped in one at a time. The result goes to the results'
``extra["peer_bisection"]`` and is printed after the comparison table. Nothing here names a backend.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import InputNotFound, InvalidInput
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.peer import PeerRuntime
from streaming_parity.interface.utterance import Utterance
from streaming_parity.judge.loop import ReferenceRuns
from streaming_parity.judge.results import Results
from streaming_parity.judge.tolerances import Tolerances

EXTRA_KEY = "peer_bisection"


def add_candidate_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", action="append", metavar="[BACKEND[:DTYPE]:]PATH", default=[],
                        help="an artifact or peer directory to compare (repeatable); without BACKEND its format is "
                             "detected (sherpa-onnx, NeMo export, parakeet-rs, this project's ONNX or MLX) and "
                             "printed; sherpa-onnx:PATH runs sherpa-onnx's own runtime")


def parse_candidate(text: str) -> tuple[str | None, str | None, Path]:
    """``[BACKEND[:DTYPE]:]PATH`` -> (backend or None, dtype or None, path)."""
    from streaming_parity.interface.registry import REGISTRY

    parts = text.split(":")
    if len(parts) > 1 and parts[0] in REGISTRY:
        entry = REGISTRY[parts[0]]
        if len(parts) > 2 and parts[1] in entry.dtypes:
            return parts[0], parts[1], Path(":".join(parts[2:]))
        return parts[0], None, Path(":".join(parts[1:]))
    return None, None, Path(text)


def detect_backend(path: Path, only: str | None = None) -> tuple[str, str]:
    """(backend, format) for ``path``: the named backend's detection, else the first registry entry's
    that recognises it (reference excluded)."""
    from streaming_parity.interface.registry import REFERENCE, REGISTRY, get

    if not path.exists():
        raise InputNotFound(f"--candidate {path}: no such file or directory")
    names = [only] if only else [name for name in REGISTRY if name != REFERENCE]
    for name in names:
        entry = get(name)
        if entry.detector is None:
            continue
        if only is None and not entry.available():
            continue
        found = entry.detect(path)
        if found:
            return name, found
    if only:
        raise InvalidInput(f"--candidate {only}:{path}: the {only} backend does not recognise this path")
    known = ", ".join(name for name in REGISTRY if REGISTRY[name].detector and REGISTRY[name].available())
    raise InvalidInput(f"--candidate {path}: no backend recognises it (asked: {known})")


def candidate_sources(args, say: Callable[[str], None] | None = None) -> list[tuple[str, Any, str | None]]:
    """``(backend, source, dtype)`` for every ``--candidate``, as ``streaming_parity.app.cli.named_sources`` gives them."""
    from streaming_parity.core.system.provenance import ResolvedSource

    say = say or (lambda text: print(text, file=sys.stderr))
    sources = []
    for text in getattr(args, "candidate", None) or []:
        name, dtype, path = parse_candidate(text)
        name, found = detect_backend(path, only=name)
        say(f"candidate {path}: {found}, run by the {name} backend")
        sources.append((name, ResolvedSource(path=path, given=text), dtype))
    return sources


def print_notes(backend: Backend, out=None) -> None:
    for line in backend.notes():
        print(f"  {line}", file=out or sys.stderr)


# -- peer runtimes: stack bisection ---------------------------------------------------------------------------

def tensor_driver_for(path: Path, peer: Backend, nemo_path: Path) -> Backend | None:
    """A tensor-level backend that runs the same files as ``peer`` (None when no registry entry does)."""
    from streaming_parity.interface.registry import REFERENCE, REGISTRY

    for name, entry in REGISTRY.items():
        if name in (REFERENCE, peer.name) or not entry.available():
            continue
        capabilities = entry.capabilities
        if not capabilities.tensor_level or capabilities.input != "mel" or not entry.detect(path):
            continue
        dtype = peer.dtype if peer.dtype in entry.dtypes else entry.dtypes[0]
        return entry.load(path, dtype=dtype, nemo_path=nemo_path)
    return None


def bisect_peer_runs(reference: ReferenceRuns, source: Path, peer: Backend, utterances: Sequence[Utterance],
                     contexts: Sequence[Sequence[int]], tolerances: Tolerances, results: Results, *, nemo_path: Path,
                     progress: Callable[[str], None] | None = None) -> list[list[str]]:
    """Bisect the stack of a transcript-level candidate that disagrees with the reference somewhere, against the
    reference's stored runs (``LoopOutcome.reference``: nothing of the reference is streamed again); records each
    bisection in ``results.extra`` and returns the lines."""
    from streaming_parity.judge.bisect import bisect_peer

    say = progress or (lambda _text: None)
    disagreeing = [c for c in results.comparisons if c.candidate == peer.name and not c.tokens_equal]
    if not disagreeing:
        return [[f"{peer.name}:{peer.dtype}: tokens identical to {reference.name}'s everywhere; no bisection"]]
    driver = tensor_driver_for(source, peer, nemo_path)
    if driver is None:
        return [[f"{peer.name}:{peer.dtype}: no tensor-level backend reads {source}; its stack is not bisected"]]
    printed = []
    try:
        for context in contexts:
            say(f"bisecting {peer.name} [{context[0]},{context[1]}]")
            bisection = bisect_peer(reference, driver, peer, utterances, context, tolerances, progress=say)
            results.extra.setdefault(EXTRA_KEY, []).append({**bisection.to_dict(), "lines": bisection.lines()})
            printed.append(bisection.lines())
    finally:
        driver.close()
    return printed


def print_bisections(results: Results, out=None) -> None:
    rows = results.extra.get(EXTRA_KEY) or []
    if rows:
        print("\nstack bisection of the peer runtime(s):", file=out or sys.stdout)
    for row in rows:
        for line in row.get("lines", []):
            print(line, file=out or sys.stdout)


# -- peer runtimes that describe themselves: diagnosis ----------------------------------------------------------

DIAGNOSIS_KEY = "peer_diagnosis"


def diagnose_peer_runtime(reference: Backend, peer: Backend, utterances: Sequence[Utterance],
                          contexts: Sequence[Sequence[int]], tolerances: Tolerances, results: Results, *,
                          checkpoint: Callable[[], dict[str, Any]], prompt: str | None = None,
                          progress: Callable[[str], None] | None = None) -> list[str]:
    """Diagnose an audio-input candidate that can say how it loaded and what it computes differently
    (``streaming_parity.judge.peer_audit``): its parameters against the checkpoint's tensors (``checkpoint``:
    loaded on first use), its front end and its encoder fed the reference's mel. Records it in
    ``results.extra["peer_diagnosis"]``; returns the lines (none for a peer that cannot describe itself)."""
    from streaming_parity.judge.peer_audit import diagnose_peer

    if peer.capabilities.input != "audio" or not isinstance(peer, PeerRuntime):
        return []
    diagnosis = diagnose_peer(reference, peer, utterances, contexts, tolerances, checkpoint=checkpoint(),
                              prompt=prompt, progress=progress)
    results.extra.setdefault(DIAGNOSIS_KEY, []).append({**diagnosis.to_dict(), "lines": diagnosis.lines()})
    return diagnosis.lines()


def checkpoint_tensors(nemo_path: Path) -> Callable[[], dict[str, Any]]:
    """The checkpoint's tensors as numpy arrays, read once on first call (a diagnosis compares a peer's
    loaded parameters with them)."""
    import functools

    @functools.cache
    def load() -> dict[str, Any]:
        from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

        return {name: value.numpy() for name, value in load_state_dict(inspect_nemo(nemo_path)).items()
                if hasattr(value, "numpy")}

    return load


def print_diagnoses(results: Results, out=None) -> None:
    rows = results.extra.get(DIAGNOSIS_KEY) or []
    if rows:
        print("\ndiagnosis of the peer runtime(s):", file=out or sys.stdout)
    for row in rows:
        for line in row.get("lines", []):
            print(line, file=out or sys.stdout)

"""Which foreign ONNX format a directory holds, from its file names only: cheap, nothing is parsed.

``detect`` is the ONNX backend's detector (``streaming_parity.interface.registry``): ``parity compare --candidate
PATH`` asks it what ``PATH`` is. Reading and checking the files is ``foreign_read``'s.
"""

from __future__ import annotations

from pathlib import Path

SHERPA_ONNX = "sherpa-onnx"
NEMO_EXPORT = "nemo-export"
PARAKEET_RS = "parakeet-rs"
FOREIGN_FORMATS = (SHERPA_ONNX, NEMO_EXPORT, PARAKEET_RS)
OWN_FORMAT = "parity"


def _own_format(directory: Path) -> bool:
    return (directory / "frontend.json").is_file() and any(directory.glob("encoder-*_*.onnx"))


# The graphs sherpa-onnx's scripts write per lookahead, by variant. Every script writes the float32
# ones; the int8 copies come from scripts/nemo/fast-conformer-hybrid-transducer-ctc/export-onnx-transducer.py
# (since 6122a678f) and scripts/nemo/nemotron-speech-streaming-en-0.6b/export_onnx.py. The FastConformer
# run script (fast-conformer-hybrid-transducer-ctc/run-transducer.sh) and the Nemotron release workflow
# (.github/workflows/export-nemotron-speech-streaming-en-0.6b.yaml) move the int8 copies into a directory
# of their own (``...-int8``) with tokens.txt and no float32 graph.
SHERPA_GRAPHS = ("encoder", "decoder", "joiner")
SHERPA_SUFFIXES = {"float32": ".onnx", "int8": ".int8.onnx"}
SHERPA_TOKENS = "tokens.txt"


def sherpa_tokens(directory: Path) -> Path | None:
    """``tokens.txt`` beside the graphs, else one level up: the Nemotron script (415b8c2aa on) writes it
    once, then moves each lookahead's graphs into a directory of their own (``mv *.onnx <ms>``)."""
    for candidate in (directory / SHERPA_TOKENS, directory.parent / SHERPA_TOKENS):
        if candidate.is_file():
            return candidate
    return None


def _sherpa_variants(names: set[str]) -> list[str]:
    """The variants whose three graphs are all among ``names``."""
    return [variant for variant, suffix in SHERPA_SUFFIXES.items()
            if all(f"{graph}{suffix}" in names for graph in SHERPA_GRAPHS)]


def lookahead_format(directory: Path) -> str | None:
    """The format of one lookahead's directory, from its file names."""
    directory = Path(directory)
    if not directory.is_dir() or _own_format(directory):
        return None
    names = {p.name for p in directory.iterdir() if p.is_file()}
    if _sherpa_variants(names) and sherpa_tokens(directory) is not None:
        return SHERPA_ONNX
    if {"encoder.onnx", "decoder_joint.onnx"} <= names:
        return PARAKEET_RS
    stems = {n[len("encoder-"):-len(".onnx")] for n in names if n.startswith("encoder-") and n.endswith(".onnx")}
    if any(f"decoder_joint-{stem}.onnx" in names for stem in stems):
        return NEMO_EXPORT
    return None


def lookahead_dirs(path: Path) -> tuple[str, list[Path]] | None:
    """``(format, lookahead directories)`` for ``path`` itself or its subdirectories (one format)."""
    own = lookahead_format(path)
    if own:
        return own, [path]
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink()):
        kind = lookahead_format(sub)
        if kind:
            found.setdefault(kind, []).append(sub)
    if len(found) != 1:
        return None
    (kind, dirs), = found.items()
    return kind, dirs


def detect(path: str | Path) -> str | None:
    """What ``path`` is, for ``parity compare --candidate PATH``: a foreign format, this project's own
    export (``parity``), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if _own_format(path):
        return OWN_FORMAT
    found = lookahead_dirs(path)
    return found[0] if found else None

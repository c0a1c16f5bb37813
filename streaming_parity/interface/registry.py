"""The backend registry. A backend appears in every suite, the CLI and the nightly run by registering here.

Each entry names a module that provides two functions:

- ``prepare(nemo_path, work_dir, *, dtype, att_context_sizes) -> Path``: turn a ``.nemo`` into what
  the backend loads (the ``.nemo`` itself, an ONNX export directory, an MLX artifact directory);
  cached under ``work_dir`` by the caller.
- ``load(source, *, dtype, nemo_path=None) -> streaming_parity.interface.backend.Backend``.

and, optionally:

- ``cli``: a module with ``register(subparsers)`` adding the backend's own commands to ``parity``
  (they receive ``args.context``, a ``streaming_parity.interface.commands.CommandContext``);
- ``reader``: ``"module:function"`` returning a ``streaming_parity.interface.model_view.ModelView`` for an
  artifact of this backend's format, or ``None`` for a path that is not one (``parity fingerprint``,
  ``parity verify``);
- ``source_option`` (``--onnx``) and ``dtype_flags`` (``{"--onnx-int8": "int8"}``): how ``parity
  compare`` and ``parity transcribe`` name an artifact of this backend;
- ``hub_patterns``: the files of its source format (``*.nemo``; an artifact's files), the only
  ones downloaded when a source is named on the hub (``ORG/NAME[@REVISION]``, ``streaming_parity.app.hub``);
- ``manifest``: the JSON file of an artifact that records its ``provenance``
  (``streaming_parity.core.system.provenance``), read for the report and the stale-artifact check;
- ``detector``: ``"module:function"`` saying what a path is for this backend (a format name, printed by
  ``parity compare --candidate PATH``), or ``None`` when the backend does not run it;
- ``prepare_with`` / ``prepare_options``: an artifact written by another entry's ``prepare`` (a peer
  runtime runs files the ONNX exporter writes in the peer's format); the registry wires them, so the
  backend packages stay independent.

``requires`` lists the Python modules the backend imports; suites skip a backend whose modules
cannot be imported, with the reason. ``capabilities`` is what its ``Backend`` class declares (a test
checks they agree): the bounded-memory matrix plans the reference's first-chunk modes from it
before loading any candidate.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import UnknownName
from streaming_parity.interface.backend import Capabilities


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str
    requires: tuple[str, ...]
    dtypes: tuple[str, ...]  # the first is the one compared at fp32 tolerances
    marker: str  # pytest marker selecting this backend's tests
    description: str
    capabilities: Capabilities = Capabilities()
    cli: str | None = None
    reader: str | None = None
    source_option: str | None = None
    source_help: str = ""
    dtype_flags: Mapping[str, str] = field(default_factory=dict)
    hub_patterns: tuple[str, ...] = ()
    manifest: str | None = None
    detector: str | None = None
    prepare_with: str | None = None
    prepare_options: Mapping[str, Any] = field(default_factory=dict)
    # "module:function" -> {dtype: why it has no fast path on this machine}: a night judges such a dtype on a
    # reduced plan (one lookahead, a few utterances) and says so (streaming_parity.app.nightly).
    slow_dtypes: str | None = None

    @property
    def first_chunk_modes(self) -> tuple[str, ...]:
        return self.capabilities.first_chunk_modes

    def missing_requirements(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]

    def available(self) -> bool:
        return not self.missing_requirements()

    def _module(self):
        return importlib.import_module(self.module)

    def prepare(self, nemo_path: Path, work_dir: Path, *, dtype: str = "float32",
                att_context_sizes: Sequence[Sequence[int]] | None = None) -> Path:
        if self.prepare_with is not None:
            return get(self.prepare_with)._module().prepare(Path(nemo_path), Path(work_dir), dtype=dtype,
                                                           att_context_sizes=att_context_sizes,
                                                           **self.prepare_options)
        return self._module().prepare(Path(nemo_path), Path(work_dir), dtype=dtype,
                                      att_context_sizes=att_context_sizes)

    def slow_dtype_reason(self, dtype: str) -> str | None:
        """Why ``dtype`` has no fast path here (a reduced plan is judged), or None when it runs at full speed."""
        if self.slow_dtypes is None or not self.available():
            return None
        module, _, function = self.slow_dtypes.partition(":")
        return getattr(importlib.import_module(module), function)().get(dtype)

    def detect(self, path: Path) -> str | None:
        """What ``path`` is in this backend's terms (a format name), or None when it does not run it."""
        if self.detector is None:
            return None
        module, _, function = self.detector.partition(":")
        return getattr(importlib.import_module(module), function)(Path(path))

    def load(self, source: Path, *, dtype: str | None = None, nemo_path: Path | None = None, **options: Any):
        """Open ``source``; without ``dtype`` the backend uses its default (MLX: the artifact's own)."""
        if dtype is not None:
            options["dtype"] = dtype
        return self._module().load(Path(source), nemo_path=nemo_path, **options)

    def artifact_reader(self) -> Callable[[Path], Any] | None:
        """The function that reads this backend's artifacts as a ``ModelView`` (None: it has no format)."""
        if self.reader is None:
            return None
        module, _, function = self.reader.partition(":")
        return getattr(importlib.import_module(module), function)


REFERENCE = "nemo"

REGISTRY: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> None:
    if entry.name in REGISTRY:
        raise ValueError(f"backend {entry.name!r} registered twice")
    REGISTRY[entry.name] = entry


register(BackendEntry(
    name="nemo", module="streaming_parity.backends.nemo", requires=("torch", "nemo"), dtypes=("float32",), marker="nemo",
    hub_patterns=("*.nemo",),
    description="NeMo PyTorch (the reference): cache_aware_stream_step + NeMo greedy RNNT decoding"))

register(BackendEntry(
    name="onnx", module="streaming_parity.backends.onnx", requires=("onnxruntime", "onnx"), dtypes=("float32", "int8"),
    marker="onnx", capabilities=Capabilities(first_chunk_modes=("plain", "pad-and-drop"), offline=False,
                                             teacher_forcing=True),
    cli="streaming_parity.app.commands.onnx", reader="streaming_parity.backends.onnx.layout:read_view", detector="streaming_parity.backends.onnx.foreign_detect:detect",
    source_option="--onnx", source_help="an ONNX export directory (parity export-onnx)",
    dtype_flags={"--onnx-int8": "int8"},
    hub_patterns=("*.onnx", "*.onnx.data", "*.weights", "tokenizer.model", "vocab.txt", "frontend.npz", "*.json"),
    manifest="export.json",
    description="ONNX Runtime over NeMo's cache-aware encoder + decoder_joint export (plain first-chunk and "
                "steady graphs)"))

register(BackendEntry(
    name="mlx", module="streaming_parity.backends.mlx", requires=("mlx",), dtypes=("float32", "bfloat16", "float16"), marker="mlx",
    capabilities=Capabilities(teacher_forcing=True),
    cli="streaming_parity.app.commands.mlx", reader="streaming_parity.backends.mlx.artifact:read_view", detector="streaming_parity.backends.mlx.detect:detect",
    source_option="--mlx", source_help="an MLX artifact directory (parity convert)",
    hub_patterns=("*.safetensors", "*.json", "tokenizer.model"), manifest="artifact.json",
    slow_dtypes="streaming_parity.backends.mlx.backend:slow_dtypes",
    description="MLX (our port): converted artifact, cache-aware streaming step, greedy RNNT decoding"))


# A peer runtime: transcript-level (no taps, no caches), fed audio; its files come from the ONNX exporter.
register(BackendEntry(
    # onnx and onnxruntime: the backend reads the directory's metadata and probes its encoder's lookahead.
    name="sherpa-onnx", module="streaming_parity.backends.sherpa_onnx", requires=("sherpa_onnx", "onnx", "onnxruntime"),
    dtypes=("float32", "int8"),
    marker="sherpa_onnx", capabilities=Capabilities(first_chunk_modes=("pad-and-drop",), taps=(), caches=False,
                                                    offline=False, teacher_forcing=False, input="audio"),
    detector="streaming_parity.backends.sherpa_onnx:detect", prepare_with="onnx", prepare_options={"format": "sherpa-onnx"},
    source_option="--sherpa-onnx", source_help="a sherpa-onnx directory (parity export-onnx --format sherpa-onnx)",
    hub_patterns=("*.onnx", "*.data", "tokens.txt"),
    description="sherpa-onnx's own OnlineRecognizer (its front end, chunking and greedy decoding) on a "
                "sherpa-onnx export: tokens per chunk"))


# A peer runtime: mlx-audio's own Nemotron-3.5 streaming ASR (its converter, loader, front end and streaming
# generation), fed audio and a prompt locale; its encoder output per chunk, before and after the prompt kernel.
register(BackendEntry(
    name="mlx-audio", module="streaming_parity.backends.mlxaudio", requires=("mlx_audio", "mlx"), dtypes=("float32",),
    marker="mlx_audio", capabilities=Capabilities(first_chunk_modes=("plain",), taps=("encoder", "prompt"),
                                                  caches=False, offline=False, teacher_forcing=False, input="audio"),
    detector="streaming_parity.backends.mlxaudio:detect", source_option="--mlx-audio",
    source_help="a directory written by mlx-audio's converter (python -m mlx_audio.stt.models.nemotron_asr.convert)",
    hub_patterns=("config.json", "model.safetensors", "tokenizer.model", "vocab.txt"),
    description="mlx-audio's own nemotron_asr (its converter, strict=False load, front end and streaming "
                "generation) on a prompt-conditioned Nemotron-3.5 checkpoint: tokens and encoder output per chunk"))



# transformers 5's NemotronAsrStreamingForRNNT / Nemotron3_5AsrForRNNT on a transformers checkpoint directory
# (parity export-transformers): the model driven step by step with its own caches, every tap and cache.
register(BackendEntry(
    name="transformers", module="streaming_parity.backends.transformers", requires=("transformers", "torch"),
    dtypes=("float32", "bfloat16"), marker="transformers",
    capabilities=Capabilities(first_chunk_modes=("plain",), teacher_forcing=True, peer=True),
    cli="streaming_parity.app.commands.transformers", detector="streaming_parity.backends.transformers:detect",
    source_option="--transformers", source_help="a transformers checkpoint directory (parity export-transformers)",
    hub_patterns=("config.json", "model.safetensors", "*.json"), manifest="export.json",
    description="transformers' NemotronAsrStreaming / Nemotron3_5Asr (from_pretrained defaults) fed the harness's "
                "chunks with its own caches: every tap through forward hooks, caches in NeMo's layout"))

# A peer runtime: transformers' own processor and streaming generate() over its chunk generator, fed audio.
register(BackendEntry(
    name="transformers-generate", module="streaming_parity.backends.transformers.runtime",
    requires=("transformers", "torch"), dtypes=("float32", "bfloat16"), marker="transformers",
    capabilities=Capabilities(first_chunk_modes=("plain",), taps=("encoder", "prompt"), caches=False, offline=False,
                              teacher_forcing=False, input="audio"),
    detector="streaming_parity.backends.transformers:detect", prepare_with="transformers",
    hub_patterns=("config.json", "model.safetensors", "*.json"), manifest="export.json",
    description="transformers' own processor and streaming generate() over a chunk generator, as its documentation "
                "streams: tokens and encoder output per chunk"))

def dtypes() -> tuple[str, ...]:
    """Every candidate precision some registered backend runs, in registration order: the dtypes a
    tolerance file may have tables for (``streaming_parity.judge.tolerances``)."""
    return tuple(dict.fromkeys(dtype for entry in REGISTRY.values() for dtype in entry.dtypes))


def get(name: str) -> BackendEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownName(f"unknown backend {name!r}; registered: {', '.join(REGISTRY)}") from None

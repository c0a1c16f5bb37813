"""What the ONNX Runtime backend runs, as read from a directory: the join between reading and running.

Two readers build a ``DescribedExport``, each checking what its files state before anything runs:

- ``layout.describe_export``: this project's export directory (``parity export-onnx``), from the graphs'
  metadata, ``vocab.txt`` and ``frontend.*``;
- ``foreign_read.describe_foreign``: another exporter's files (sherpa-onnx, NeMo's export, parakeet-rs), from the
  graphs' interfaces and the ``.nemo`` they were checked against.

``runtime.OnnxBackend`` is constructed from the description alone: it opens the sessions, checks the graphs'
declared inputs against it, and streams.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streaming_parity.backends.onnx.layout import CacheShapes, GraphInterface
    from streaming_parity.interface.chunking import StreamingConfig
    from streaming_parity.interface.model_info import ModelInfo

    EncoderKey = tuple[tuple[int, int], bool]  # (att_context_size, the plain first chunk's graph)


@dataclass(frozen=True)
class GraphFile:
    """One graph the runtime opens a session on.

    ``path`` is the file the description was read from (named in messages); ``session_path`` the file ONNX Runtime
    loads when it differs (a foreign graph's temporary copy with tap outputs added by graph surgery); ``taps`` the
    outputs it may expose as taps (those the session lacks are ignored).
    """

    path: Path
    taps: tuple[str, ...] = ()
    session_path: Path | None = None

    @property
    def loads(self) -> Path:
        return self.session_path or self.path


@dataclass(frozen=True)
class EncoderGraph:
    """One lookahead's encoder graph: the steady one, or (``first``) the plain first chunk's, which keeps every
    pre-encoded frame; its chunk schedule, its caches' shapes in the graph's own layout, and its input and output
    names."""

    file: GraphFile
    context: tuple[int, int]
    first: bool
    streaming: StreamingConfig
    cache_shapes: CacheShapes
    interface: GraphInterface  # the directory's; a foreign directory's lookaheads may each name their inputs


@dataclass
class DescribedExport:
    """Everything ``OnnxBackend`` needs from a directory, for one dtype (``float32`` or ``int8``).

    ``info`` holds the model's dimensions, the lookaheads the directory has graphs for (``att_context_sizes``), the
    vocabulary and blank, the prediction net, the streaming encoder config, speaker kernels, CTC head and prompt
    settings; ``max_symbols`` is NeMo's per-frame limit (None: none). ``encoders`` holds every encoder graph the
    backend may open, by ``(att_context_size, first)``; the plain first chunk's only where ``first_chunk_modes``
    includes ``plain``. ``joiner``: sherpa-onnx splits ``decoder_joint`` in two (``decoder_joint`` is then its
    ``decoder.onnx``).
    """

    directory: Path
    dtype: str
    info: ModelInfo
    max_symbols: int | None
    interface: GraphInterface
    cache_layout: str
    first_chunk_modes: tuple[str, ...]
    decoder_joint: GraphFile
    encoders: dict[EncoderKey, EncoderGraph]
    frontend: Callable[[Any], Any]  # audio [B, samples] -> (mel [B, n_mels, T], length [B])
    joiner: GraphFile | None = None
    ctc: GraphFile | None = None  # a hybrid model's CTC head
    prompt: GraphFile | None = None  # a prompt-conditioned model's prompt kernel
    int8_graphs: tuple[Path, ...] = ()  # the int8 files it runs (empty for float32)
    # The int8 scheme as the graphs' metadata records it (``Int8Quantization.to_dict``); None: not recorded (read
    # from the weights when asked).
    int8_quantization: Mapping[str, Any] | None = None
    # Taps looked for by graph surgery (a foreign directory's), with why each missing one is missing; None where
    # the tap graphs were exported with their taps.
    unavailable_taps: dict[str, str] | None = None
    notes: tuple[str, ...] = field(default=())  # what the reader says about the directory

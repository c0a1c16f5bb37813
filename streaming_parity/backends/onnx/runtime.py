"""The ONNX Runtime backend: streams from an export directory alone (no torch, no NeMo).

- Chunk schedule: the encoder graphs bake NeMo's pad-and-drop first-chunk mode
  (``forward_for_export`` always drops ``drop_extra_pre_encoded`` frames), so that is the only mode
  offered; the schedule's values come from each graph's metadata and are checked at load against
  ``streaming_parity.interface.chunking``'s derivation from the encoder config.
- Caches cross the interface in the canonical layers-first layout; a batch-first graph gets them
  transposed at this edge. The graph's layout is read from its metadata, never guessed.
- Decoding reproduces NeMo's ``GreedyRNNTInfer._greedy_decode``
  (parts/submodules/rnnt_greedy_decoding.py): for every frame, up to ``max_symbols`` times, run the
  prediction net on the last emitted label (blank with zero LSTM state at the start: the blank is
  the embedding's padding row, as NeMo's SOS), then the joint; a blank ends the frame, a label is
  emitted and only then is the new LSTM state kept. One ``decoder_joint`` call = one prediction-net
  call + one joint call, so the ``decoder`` and ``joint`` taps line up with NeMo's call for call.
- Hybrid RNNT-CTC exports add ``ctc.onnx``, the CTC head, run on each step's encoder output (both
  variants: the int8 encoder's output goes through the float32 head): its log-probabilities are the
  ``ctc`` tap, and its greedy labels continue the previous step's
  (``streaming_parity.interface.decoding.ctc_greedy``).
- Prompt-conditioned exports add ``prompt.onnx`` (``prompt.int8.onnx`` for int8), NeMo's
  ``_apply_prompt_to_encoded``: run on each step's encoder output with the stream's locale mapped to its
  one-hot column through the export's own ``prompt_dictionary`` (metadata), before decoding and the CTC
  head; its output is the ``prompt`` tap. A stream without a locale bypasses it, as NeMo does when
  ``set_inference_prompt`` was never called (the ``prompt`` tap is then the encoder output).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.backends.onnx.layout import (
    ENCODER_OUTPUTS,
    FORMAT,
    FORMAT_FAMILY,
    READABLE_FORMATS,
    CacheShapes,
    ExportDirError,
    GraphInterfaceError,
    MissingGraphError,
    SourceMismatchError,
    ctc_file,
    decoder_joint_file,
    encoder_file,
    interface_of,
    load_graph,
    prompt_file,
    prompt_settings,
    read_graph_metadata,
)
from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.nemo_config import EncoderConfig, normalize_att_context_sizes
from streaming_parity.interface.backend import Backend, Capabilities
from streaming_parity.interface.chunking import Chunk, StreamingConfig
from streaming_parity.interface.decoding import ForcedDecisions, ctc_step
from streaming_parity.interface.frontend import Frontend
from streaming_parity.interface.model_info import ModelInfo
from streaming_parity.interface.quantization import Int8Quantization
from streaming_parity.interface.speakers import SpeakerMaskError, SpeakerTargets, reconciled_pair
from streaming_parity.interface.taps import TAP_CTC, TAP_DECODER, TAP_ENCODER, TAP_JOINT, TAP_PROMPT
from streaming_parity.interface.types import (
    DecoderState,
    OfflineOutput,
    ShapeMismatchError,
    StepOutput,
    StreamingState,
    expect_shape,
)


class CacheLayoutError(ShapeMismatchError):
    """Caches in one layout were fed to a graph exported for the other."""


class _Graph:
    """One ONNX Runtime session with its metadata and interface checks.

    ``role`` is ``"encoder"``, ``"decoder_joint"``, ``"ctc"`` or ``"prompt"``; the names it must have come from the
    interface the graph's metadata declares (``layout.INTERFACES``).
    """

    def __init__(self, path: Path, role: str, session_options):
        import onnxruntime as ort

        self.path = path
        self.metadata = read_graph_metadata(path)
        found = self.metadata.get("format")
        if found not in READABLE_FORMATS:
            older = isinstance(found, str) and found.startswith(FORMAT_FAMILY)
            raise GraphInterfaceError(f"{path.name}: metadata format {found!r}, expected {FORMAT!r} " + (
                "(written by an older parity export-onnx: export again)" if older
                else "(not exported by parity export-onnx?)"))
        self.interface = interface_of(self.metadata)
        inputs = getattr(self.interface, f"{role}_inputs")
        outputs = getattr(self.interface, f"{role}_outputs")
        self.session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing_in = [name for name in inputs if name not in self.inputs]
        missing_out = [name for name in outputs if name not in self.output_names]
        if missing_in or missing_out:
            raise GraphInterfaceError(
                f"{path.name}: graph lacks expected inputs {missing_in} / outputs {missing_out}; "
                f"it has inputs {list(self.inputs)} and outputs {self.output_names}")
        self.taps = [name for name in self.metadata.get("debug_taps") or [] if name in self.output_names]

    def declared_shape(self, name: str) -> list[Any]:
        return list(self.inputs[name].shape)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def _session_options(threads: int | None):
    import onnxruntime as ort

    from streaming_parity.core.system.threads import requested_threads

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = threads or requested_threads()  # ONNX Runtime ignores OMP_NUM_THREADS
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


# An export above this size keeps one encoder session open at a time (OnnxBackend, max_open_encoders).
LARGE_EXPORT_BYTES = 1 << 30


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def _check_declared(graph: _Graph, name: str, expected: Sequence[Any]) -> None:
    """The graph's declared input shape must agree with the metadata on every static axis."""
    declared = graph.declared_shape(name)
    agree = len(declared) == len(expected) and all(
        not isinstance(d, int) or not isinstance(e, int) or d == e for d, e in zip(declared, expected))
    if not agree:
        raise GraphInterfaceError(f"{graph.path.name}: input {name} is declared {declared}, "
                                  f"but the metadata says {list(expected)}")


class OnnxBackend(Backend):
    name = "onnx"
    # What an export of this format streams; an instance states what its own export holds (an older export,
    # or a peer's files, has no plain first-chunk graph: pad-and-drop only).
    capabilities = Capabilities(first_chunk_modes=("plain", "pad-and-drop"), offline=False, teacher_forcing=True)

    def __init__(self, export_dir: str | Path, *, dtype: str = "float32", nemo_path: str | Path | None = None,
                 taps: bool = True, threads: int | None = None, max_open_encoders: int | None = None):
        if dtype not in ("float32", "int8"):
            raise InvalidInput(f"onnx backend runs float32 or int8, not {dtype}")
        self.directory = Path(export_dir)
        if not self.directory.is_dir():
            raise MissingGraphError(f"{self.directory}: ONNX export directory not found")
        self.dtype = dtype
        self._int8_quantization: Int8Quantization | None = None
        self._options = _session_options(threads)
        self._use_taps = taps and dtype == "float32"
        self.decoder_joint = self._open_decoder_joint()
        meta = self.decoder_joint.metadata
        self.metadata = meta
        self.interface = self.decoder_joint.interface
        self.cache_layout = str(meta["cache_layout"])
        if nemo_path is not None:
            self._check_source(Path(nemo_path))
        self.vocabulary = self._read_vocabulary(int(meta["vocab_size"]))
        exported = self._exported_contexts(meta)
        # The export's own copy of the locale -> one-hot column map (a shifted copy shows at the prompt tap).
        num_prompts, prompt_dictionary = prompt_settings(meta, self.decoder_joint.path.name)
        self.info = ModelInfo(
            num_layers=int(meta["num_layers"]), d_model=int(meta["d_model"]), n_mels=int(meta["n_mels"]),
            conv_kernel_size=int(meta["conv_kernel_size"]), subsampling_factor=int(meta["subsampling_factor"]),
            att_context_sizes=exported, vocabulary=tuple(self.vocabulary), blank_id=int(meta["blank_id"]),
            pred_layers=int(meta["pred_rnn_layers"]), pred_hidden=int(meta["pred_hidden"]),
            max_symbols=int(meta["max_symbols"] or 0),
            encoder_config=EncoderConfig.from_mapping(meta["encoder_config"]),  # the export's streaming keys
            speaker_kernel_layers=tuple(int(i) for i in meta.get("speaker_kernel_layers") or ()),
            background_speaker_kernel=bool(meta.get("background_speaker_kernel", False)),
            ctc_head=bool(meta.get("ctc_head")),
            num_prompts=num_prompts, prompt_dictionary=prompt_dictionary,
        )
        if self.info.multitalker != self.interface.speaker_masks:
            raise GraphInterfaceError(f"{self.directory}: speaker_kernel_layers {list(self.info.speaker_kernel_layers)} "
                                      f"contradict the {self.interface.name} interface")
        self._max_symbols = meta["max_symbols"]  # None: no per-frame limit (NeMo's max_symbols=None)
        modes = self._first_chunk_modes(meta)
        if tuple(modes) != type(self).capabilities.first_chunk_modes:
            self.capabilities = replace(type(self).capabilities, first_chunk_modes=tuple(modes))
        # (lookahead, first-chunk graph) -> open session, least recently used first
        self._encoders: dict[tuple[tuple[int, int], bool], _Graph] = {}
        self._streaming: dict[tuple[int, int], StreamingConfig] = {}
        graphs = [(context, first) for context in exported for first in (False, True)
                  if not first or "plain" in modes]
        # Every ONNX Runtime session holds its own copy of the weights, even where the lookaheads' graphs
        # share one file (measured at full size: four open encoders, 10.7 GB). A large export keeps one
        # encoder session open at a time (reopened when the lookahead or the first-chunk graph changes); a
        # small one keeps all.
        self._max_open_encoders = max_open_encoders or (
            1 if _directory_bytes(self.directory) > LARGE_EXPORT_BYTES else len(graphs))
        for context, first in graphs:  # open every encoder now: a broken export fails before anything runs
            self._encoder(context, first=first)
        self.frontend = self._read_frontend()
        self._check_decoder_joint()
        self.ctc_graph = self._open_ctc() if self.info.ctc_head else None
        self.prompt_graph = self._open_prompt() if self.info.prompted else None

    # -- loading and validation ----------------------------------------------------------------------
    def _open(self, file_for, role: str) -> _Graph:
        """``file_for(variant, debug)`` names the graph; the debug (tap) variant is preferred when wanted."""
        candidates = [self.directory / file_for(self.dtype, False)]
        if self._use_taps:
            candidates.insert(0, self.directory / file_for("float32", True))
        for path in candidates:
            if path.is_file():
                return _Graph(path, role, self._options)
        raise MissingGraphError(f"{self.directory}: missing graph {candidates[-1].name} "
                                f"(export with parity export-onnx{' --int8' if self.dtype == 'int8' else ''})")

    def _open_decoder_joint(self):
        return self._open(decoder_joint_file, "decoder_joint")

    def _open_encoder(self, context: tuple[int, int], first: bool = False):
        """The encoder graph of one lookahead, or its plain first chunk's (``streaming_parity.backends.onnx.foreign`` supplies other
        files here)."""
        return self._open(lambda variant, debug: encoder_file(context, variant, debug, first=first), "encoder")

    def _first_chunk_modes(self, meta: dict[str, Any]) -> tuple[str, ...]:
        """The modes the export states it streams (``first_chunk_modes``; a ``/2`` export: pad-and-drop only)."""
        modes = tuple(meta.get("first_chunk_modes") or ("pad-and-drop",))
        unknown = [m for m in modes if m not in ("plain", "pad-and-drop")]
        if unknown or "pad-and-drop" not in modes:
            raise GraphInterfaceError(f"{self.decoder_joint.path.name}: metadata first_chunk_modes {list(modes)}: "
                                      "expected pad-and-drop, and plain where the export has first-chunk graphs")
        return modes

    def _check_source(self, nemo_path: Path) -> None:
        from streaming_parity.core.nemo_file import sha256_file

        actual = sha256_file(nemo_path)
        recorded = self.metadata.get("source_sha256")
        if actual != recorded:
            raise SourceMismatchError(
                f"{self.directory}: graphs were exported from {self.metadata.get('source_name')} "
                f"(sha256 {str(recorded)[:12]}...), not from {nemo_path.name} (sha256 {actual[:12]}...)")

    def _exported_contexts(self, meta: dict[str, Any]) -> tuple[tuple[int, int], ...]:
        model_contexts = normalize_att_context_sizes(meta["att_context_sizes"])  # NeMo's att_context_size format
        exported = tuple(c for c in model_contexts
                         if (self.directory / encoder_file(c, variant=self.dtype)).is_file())
        if not exported:
            expected = ", ".join(encoder_file(c, variant=self.dtype) for c in model_contexts)
            raise MissingGraphError(f"{self.directory}: no encoder graph; expected one of {expected}")
        return exported

    def _read_vocabulary(self, size: int) -> list[str]:
        path = self.directory / "vocab.txt"
        if not path.is_file():
            raise MissingGraphError(f"{self.directory}: vocab.txt not found")
        pieces = path.read_text(encoding="utf-8").split("\n")[:-1]
        if len(pieces) != size:
            raise ExportDirError(f"{path}: {len(pieces)} pieces, metadata vocab_size is {size}")
        return pieces

    def _read_frontend(self) -> Frontend:
        if not (self.directory / "frontend.npz").is_file() or not (self.directory / "frontend.json").is_file():
            raise MissingGraphError(f"{self.directory}: frontend.npz / frontend.json not found")
        frontend = Frontend.load(self.directory)
        if frontend.config.n_mels != self.info.n_mels:
            raise ExportDirError(f"frontend.json: n_mels {frontend.config.n_mels}, encoder expects {self.info.n_mels}")
        return frontend

    def _check_decoder_joint(self) -> None:
        layers, hidden = self.info.pred_layers, self.info.pred_hidden
        for name in ("input_states_1", "input_states_2"):
            _check_declared(self.decoder_joint, name, (layers, "B", hidden))
        self._targets_dtype = np.int64 if "int64" in self.decoder_joint.inputs["targets"].type else np.int32

    def _open_ctc(self) -> _Graph:
        """A hybrid model's CTC head (``ctc.onnx``), checked against the export it belongs to."""
        path = self.directory / ctc_file()
        if not path.is_file():
            raise MissingGraphError(f"{self.directory}: missing graph {path.name} (the metadata declares a CTC head; "
                                    "export with parity export-onnx)")
        graph = _Graph(path, "ctc", self._options)
        for key in ("source_sha256", "vocab_size", "d_model", "ctc_head"):
            if graph.metadata.get(key) != self.metadata.get(key):
                raise ExportDirError(f"{path.name}: metadata {key} = {graph.metadata.get(key)!r}, but "
                                     f"{self.decoder_joint.path.name} has {self.metadata.get(key)!r}")
        return graph

    def _open_prompt(self) -> _Graph:
        """A prompt-conditioned model's ``prompt.onnx`` (``prompt.int8.onnx`` for int8), checked against the
        export it belongs to: the same source, width, one-hot width and dictionary, and a kernel whose weights
        have the shapes those imply."""
        path = self.directory / prompt_file(self.dtype)
        if not path.is_file():
            raise MissingGraphError(
                f"{self.directory}: missing graph {path.name}: {self.decoder_joint.path.name} declares a prompt-"
                f"conditioned model ({self.info.num_prompts} prompts) and its prompt kernel runs in {path.name} "
                f"(export with parity export-onnx{' --int8' if self.dtype == 'int8' else ''})")
        graph = _Graph(path, "prompt", self._options)
        for key in ("source_sha256", "d_model", "num_prompts", "prompt_dictionary"):
            if graph.metadata.get(key) != self.metadata.get(key):
                raise ExportDirError(f"{path.name}: metadata {key} = {graph.metadata.get(key)!r}, but "
                                     f"{self.decoder_joint.path.name} has {self.metadata.get(key)!r}")
        d_model, num_prompts = self.info.d_model, self.info.num_prompts
        _check_declared(graph, graph.interface.prompt_inputs[0], ("B", d_model, "T"))
        _check_declared(graph, graph.interface.prompt_inputs[1], ("B",))
        expected = {"prompt_kernel.0.weight": [2 * d_model, d_model + num_prompts],
                    "prompt_kernel.2.weight": [d_model, 2 * d_model]}
        if self.dtype == "float32":
            shapes = {init.name: list(init.dims) for init in load_graph(path).graph.initializer}
            for name, shape in expected.items():
                if shapes.get(name) != shape:
                    raise GraphInterfaceError(
                        f"{path.name}: {name} has shape {shapes.get(name)}, but d_model {d_model} and num_prompts "
                        f"{num_prompts} (metadata) need {shape}")
        else:  # ONNX Runtime's quantizer renames the weights: found as the graph's matrix products' weights
            from streaming_parity.backends.onnx.graph_tools import check_product_weights

            check_product_weights(load_graph(path).graph, expected, path.name,
                                  f"d_model {d_model} and num_prompts {num_prompts} (metadata)")
        return graph

    def run_prompt(self, encoded: np.ndarray, locale: str | None) -> np.ndarray:
        """NeMo's ``_apply_prompt_to_encoded`` on ``encoded`` ``[B, D, T]`` for ``locale`` (this export's
        ``prompt_dictionary`` gives its column): ``prompt.onnx``'s output; ``encoded`` itself for None (never
        set: the bypass). A locale for a model without a prompt kernel, or one the dictionary lacks, is refused."""
        index = self.info.prompt_index(locale)  # InvalidInput for a non-prompt model or an unknown locale
        if index is None:
            return encoded
        names = self.prompt_graph.interface
        expect_shape(f"{self.prompt_graph.path.name} input {names.prompt_inputs[0]}", encoded,
                     (None, self.info.d_model, None))
        batch = encoded.shape[0]
        out = self.prompt_graph.run({names.prompt_inputs[0]: np.ascontiguousarray(encoded, np.float32),
                                     names.prompt_inputs[1]: np.full((batch,), index, np.int64)})
        prompted = out[names.prompt_outputs[0]]
        expect_shape(f"{self.prompt_graph.path.name} output {names.prompt_outputs[0]}", prompted, encoded.shape)
        return prompted

    def _run_ctc(self, encoded: np.ndarray, encoded_len: np.ndarray,
                 last_labels: list[int]) -> tuple[np.ndarray, list[list[int]], list[int]]:
        """The CTC head on ``encoded [B, D, T]``: log-probabilities over the valid frames ``[B, T_valid, V+1]``,
        and per batch item the greedy labels emitted after ``last_labels`` and the last frame's label."""
        names = self.ctc_graph.interface
        log_probs = self.ctc_graph.run({names.ctc_inputs[0]: np.ascontiguousarray(encoded, np.float32)})[names.ctc_outputs[0]]
        return ctc_step(log_probs, encoded_len, self.info.blank_id, last_labels)

    def _encoder(self, context: Sequence[int], *, first: bool = False) -> _Graph:
        context = (int(context[0]), int(context[1]))
        key = (context, first)
        if key in self._encoders:
            self._encoders[key] = self._encoders.pop(key)  # most recently used last
            return self._encoders[key]
        if context not in self.info.att_context_sizes:
            raise MissingGraphError(
                f"{self.directory}: no encoder graph for att_context_size {list(context)}; exported: "
                f"{[list(c) for c in self.info.att_context_sizes]}")
        if first and "plain" not in self.capabilities.first_chunk_modes:
            raise MissingGraphError(
                f"{self.directory}: no plain first-chunk graph (this export streams "
                f"{', '.join(self.capabilities.first_chunk_modes)} only): compare it in pad-and-drop mode, or export "
                "again with parity export-onnx")
        graph = self._open_encoder(context, first)
        meta = graph.metadata
        if bool(meta.get("first_chunk", False)) != first:
            raise ExportDirError(f"{graph.path.name}: metadata first_chunk = {meta.get('first_chunk', False)!r}, "
                                 f"but it was opened as the {'first' if first else 'later'} chunks' graph")
        for name in ("source_sha256", "cache_layout", "num_layers", "d_model", "interface"):
            if meta.get(name) != self.metadata.get(name):
                raise ExportDirError(f"{graph.path.name}: metadata {name} = {meta.get(name)!r}, but "
                                     f"{self.decoder_joint.path.name} has {self.metadata.get(name)!r}")
        if tuple(meta.get("att_context_size", ())) != context:
            raise ExportDirError(f"{graph.path.name}: metadata att_context_size {meta.get('att_context_size')}, "
                                 f"file name says {list(context)}")
        shapes = self._cache_shapes(meta)
        _check_declared(graph, "cache_last_channel", shapes.channel)
        _check_declared(graph, "cache_last_time", shapes.time)
        streaming = self._streaming_from_metadata(graph)
        if self._streaming.setdefault(context, streaming) != streaming:
            raise ExportDirError(f"{graph.path.name}: streaming metadata {streaming.as_dict()} differs from the "
                                 f"other graph of {list(context)}: {self._streaming[context].as_dict()}")
        self._encoders[key] = graph
        while len(self._encoders) > self._max_open_encoders:
            del self._encoders[next(iter(self._encoders))]  # its session and its copy of the weights go
        return graph

    def _cache_shapes(self, meta: dict[str, Any]) -> CacheShapes:
        shapes = CacheShapes(str(meta["cache_layout"]), tuple(meta["cache_last_channel_shape"]),
                             tuple(meta["cache_last_time_shape"]))
        expected = CacheShapes.for_model(shapes.layout, self.info.num_layers, int(meta["last_channel_cache_size"]),
                                         self.info.d_model, self.info.conv_kernel_size)
        if shapes != expected:
            raise GraphInterfaceError(f"metadata cache shapes {shapes.channel} / {shapes.time} contradict "
                                      f"layout {shapes.layout} of the model ({expected.channel} / {expected.time})")
        return shapes

    def _streaming_from_metadata(self, graph: _Graph) -> StreamingConfig:
        meta = graph.metadata
        pair = lambda key: (int(meta[key][0]), int(meta[key][1]))  # noqa: E731
        recorded = StreamingConfig(
            att_context_size=pair("att_context_size"), chunk_size=pair("chunk_size"), shift_size=pair("shift_size"),
            pre_encode_cache_size=pair("pre_encode_cache_size"),
            drop_extra_pre_encoded=int(meta["drop_extra_pre_encoded"]), valid_out_len=int(meta["valid_out_len"]),
            last_channel_cache_size=int(meta["last_channel_cache_size"]), cache_drop_size=int(meta["cache_drop_size"]),
            subsampling_factor=int(meta["subsampling_factor"]), sampling_frames=pair("sampling_frames"))
        derived = StreamingConfig.from_encoder_config(self.info.encoder_config, recorded.att_context_size)
        if derived != recorded:
            raise GraphInterfaceError(f"{graph.path.name}: streaming metadata {recorded.as_dict()} differs from the "
                                      f"schedule derived from the encoder config {derived.as_dict()}")
        return recorded

    # -- Backend interface ---------------------------------------------------------------------------
    def streaming_config(self, att_context_size: Sequence[int]) -> StreamingConfig:
        context = (int(att_context_size[0]), int(att_context_size[1]))
        if context not in self._streaming:  # read from the graph's metadata when it is first opened
            self._encoder(context)
        return self._streaming[context]

    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.frontend(np.atleast_2d(np.asarray(audio, np.float32)))

    def run_encoder(self, context: Sequence[int], mel: np.ndarray, length: np.ndarray, cache_last_channel: np.ndarray,
                    cache_last_time: np.ndarray, cache_last_channel_len: np.ndarray,
                    speaker_masks: tuple[np.ndarray, np.ndarray] | None = None, *,
                    first: bool = False) -> dict[str, np.ndarray]:
        """One encoder graph call with caches in the graph's own layout (checked against its metadata);
        ``first``: the plain first chunk's graph.

        Outputs are returned under the ``nemo`` interface's names whatever the graph calls them;
        ``speaker_masks`` (target, background), already reconciled, go to a multitalker graph.
        """
        graph = self._encoder(context, first=first)
        batch = mel.shape[0]
        shapes = self._cache_shapes(graph.metadata)
        channel_shape, time_shape = shapes.concrete(batch)
        for name, array, expected in (("cache_last_channel", cache_last_channel, channel_shape),
                                      ("cache_last_time", cache_last_time, time_shape)):
            if tuple(array.shape) != expected:
                swapped = (expected[1], expected[0], *expected[2:])
                other = "layers-first" if shapes.layout == "batch-first" else "batch-first"
                hint = f" ({other} caches fed to a {shapes.layout} graph)" if tuple(array.shape) == swapped else ""
                raise CacheLayoutError(f"{graph.path.name}: {name} expected shape {expected} "
                                       f"({shapes.layout}), got {tuple(array.shape)}{hint}")
        if cache_last_channel_len.shape != (batch,):
            raise ShapeMismatchError(f"cache_last_channel_len: expected shape ({batch},), "
                                     f"got {tuple(cache_last_channel_len.shape)}")
        names = graph.interface.encoder_inputs
        feeds = {
            names[0]: np.ascontiguousarray(mel, np.float32), names[1]: np.asarray(length, np.int64),
            names[2]: np.ascontiguousarray(cache_last_channel, np.float32),
            names[3]: np.ascontiguousarray(cache_last_time, np.float32),
            names[4]: np.asarray(cache_last_channel_len, np.int64),
        }
        if graph.interface.speaker_masks:
            if speaker_masks is None:
                raise SpeakerMaskError(f"{graph.path.name}: this graph takes {names[5]} and {names[6]}; none were given")
            frames = self.streaming_config(context).layer_input_frames(mel.shape[-1], 0 if first else None)
            for name, mask in zip(names[5:], speaker_masks):
                if mask.shape != (batch, frames):
                    raise ShapeMismatchError(f"{name}: expected shape ({batch}, {frames}) (the chunk's encoder "
                                             f"frames), got {tuple(mask.shape)}")
                feeds[name] = np.ascontiguousarray(mask, np.float32)
        elif speaker_masks is not None:
            raise SpeakerMaskError(f"{graph.path.name}: this graph has no speaker-mask inputs")
        out = graph.run(feeds)
        canonical = ENCODER_OUTPUTS  # NeMo's names, whatever the graph calls them
        return {**{name: value for name, value in out.items() if name not in graph.interface.encoder_outputs},
                **{role: out[name] for role, name in zip(canonical, graph.interface.encoder_outputs)}}

    def _speaker_masks(self, context: Sequence[int], chunk: Chunk,
                       speaker_masks: SpeakerTargets | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The step's masks reconciled with the chunk's frames, as NeMo's ``solve_length_mismatch`` would."""
        if not self.info.multitalker:
            return None
        later = [i for i in self.info.speaker_kernel_layers if i > 0]
        if (speaker_masks is None or speaker_masks.target is None) and later:
            raise SpeakerMaskError(
                f"onnx: without target-speaker masks NeMo skips the speaker kernels of layers {later} (its "
                f"post-hooks return early) but still applies layer 0's; the exported graph always applies "
                f"them all, so give explicit masks (SpeakerTargets.single_speaker for NeMo's single-speaker mode)")
        frames = self.streaming_config(context).layer_input_frames(chunk.mel.shape[-1], chunk.drop_extra_pre_encoded)
        return reconciled_pair(speaker_masks, frames, chunk.mel.shape[0])

    def _to_graph_layout(self, array: np.ndarray) -> np.ndarray:
        return np.swapaxes(array, 0, 1) if self.cache_layout == "batch-first" else array

    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks: SpeakerTargets | None = None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        self.check_speaker_masks(speaker_masks, chunk.mel.shape[0])
        context = state.att_context_size
        streaming = self.streaming_config(context)
        streaming.check_chunk(chunk, self.name)
        # NeMo's plain first chunk keeps every pre-encoded frame and has no cache prefix: its own graph. Every
        # other chunk (and pad-and-drop's first) drops what the steady graph bakes in.
        first = chunk.is_first and chunk.drop_extra_pre_encoded == 0 and chunk.cache_frames == 0
        if not first and chunk.drop_extra_pre_encoded != streaming.drop_extra_pre_encoded:
            raise ValueError(f"onnx: chunk {chunk.index} drops {chunk.drop_extra_pre_encoded} pre-encoded frames, "
                             f"the graph bakes {streaming.drop_extra_pre_encoded}")
        self.info.check_state(state)  # canonical layers-first shapes
        started = time.perf_counter()
        masks = self._speaker_masks(context, chunk, speaker_masks)
        out = self.run_encoder(context, chunk.mel, chunk.length, self._to_graph_layout(state.cache_last_channel),
                               self._to_graph_layout(state.cache_last_time), state.cache_last_channel_len, masks,
                               first=first)
        encoded, encoded_len = out["outputs"], out["encoded_lengths"].astype(np.int64)
        decoded_from = self.run_prompt(encoded, state.prompt)  # what the decoder, joint and CTC head read
        decoders, emitted, decoder_taps, joint_taps = [], [], [], []
        if forced_decisions is not None and len(state.decoder) != 1:
            raise ValueError(f"onnx: teacher forcing runs batch 1, not {len(state.decoder)}")
        for index, previous in enumerate(state.decoder):
            decoded = self._greedy(decoded_from[index], int(encoded_len[index]), previous,
                                   ForcedDecisions(forced_decisions, self.name))
            decoders.append(decoded[0])
            emitted.append(decoded[1])
            decoder_taps.extend(decoded[2])
            joint_taps.extend(decoded[3])
        ctc = None if self.ctc_graph is None else self._run_ctc(decoded_from, encoded_len,
                                                                self.info.ctc_labels_before(state))
        seconds = time.perf_counter() - started
        taps = {name: out[name] for name in self._encoder(context, first=first).taps}
        taps[TAP_ENCODER] = encoded
        if self.info.prompted:
            taps[TAP_PROMPT] = decoded_from
        taps[TAP_DECODER] = (np.concatenate(decoder_taps, axis=0) if decoder_taps
                             else np.zeros((0, self.info.pred_hidden), np.float32))
        taps[TAP_JOINT] = (np.concatenate(joint_taps, axis=0) if joint_taps
                           else np.zeros((0, len(self.vocabulary) + 1), np.float32))
        if not self.decoder_joint.taps:
            del taps[TAP_DECODER]  # only the debug decoder_joint exposes the prediction-net output
        if ctc is not None:
            taps[TAP_CTC] = ctc[0]
        new_state = replace(
            state,
            cache_last_channel=self._to_graph_layout(out["cache_last_channel_next"]).copy(),
            cache_last_time=self._to_graph_layout(out["cache_last_time_next"]).copy(),
            cache_last_channel_len=out["cache_last_channel_next_len"].astype(np.int64),
            decoder=decoders, step_index=state.step_index + 1, native=None,
            ctc_last_label=None if ctc is None else ctc[2], prompt=state.prompt)
        return StepOutput(encoded=encoded, encoded_len=encoded_len, state=new_state, tokens=emitted, taps=taps,
                          seconds=seconds, ctc_tokens=None if ctc is None else ctc[1])

    def _greedy(self, encoded: np.ndarray, length: int, state: DecoderState, forced: ForcedDecisions):
        """NeMo's GreedyRNNTInfer loop over ``encoded`` ``[D, T]`` continuing ``state``."""
        blank = self.info.blank_id
        h, c, last = state.h, state.c, int(state.last_token)
        tokens, emitted, decoder_taps, joint_taps = list(state.tokens), [], [], []
        targets = np.zeros((1, 1), self._targets_dtype)
        names, outputs = self.interface.decoder_joint_inputs, self.interface.decoder_joint_outputs
        feeds = {names[1]: targets}
        if self.interface.target_length:
            feeds["target_length"] = np.ones((1,), self._targets_dtype)
        frame_first = self.interface.encoder_frame_layout == "BTD"
        for t in range(length):
            frame = encoded[None, :, t:t + 1]
            feeds[names[0]] = np.ascontiguousarray(frame.transpose(0, 2, 1) if frame_first else frame, np.float32)
            symbols = 0
            while self._max_symbols is None or symbols < self._max_symbols:
                targets[0, 0] = last
                feeds[names[-2]], feeds[names[-1]] = h, c
                out = self.decoder_joint.run(feeds)
                logits = out[outputs[0]].reshape(-1)
                joint_taps.append(logits[None].astype(np.float32))
                if TAP_DECODER in out:
                    decoder_taps.append(out[TAP_DECODER].reshape(-1, self.info.pred_hidden))
                label = forced.choose(int(np.argmax(logits)))  # argmax of logits = argmax of NeMo's log-softmax
                if label == blank:
                    break
                tokens.append(label)
                emitted.append(label)
                h, c, last = out[outputs[2]], out[outputs[3]], label
                symbols += 1
        forced.finish()
        return DecoderState(last_token=last, h=h, c=c, tokens=tokens), emitted, decoder_taps, joint_taps

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks: SpeakerTargets | None = None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        raise NotImplementedError("the ONNX export holds streaming (cache-aware) encoder graphs only; "
                                  "compare ONNX against NeMo streaming, not offline")

    def int8_graph_paths(self) -> list[Path]:
        """The int8 graphs this backend runs: every lookahead's encoder, ``decoder_joint`` and a prompt graph."""
        if self.dtype != "int8":
            return []
        paths = [self.directory / encoder_file(c, variant="int8", first=first) for c in self.info.att_context_sizes
                 for first in (False, True)]
        paths.append(self.directory / decoder_joint_file("int8"))
        if self.info.prompted:
            paths.append(self.directory / prompt_file("int8"))
        return [path for path in paths if path.is_file()]

    def int8_quantization(self) -> Int8Quantization | None:
        """The export's recorded scheme (``int8_quantization`` in the int8 graphs' metadata); an export written
        before the scheme was recorded is read from its weights (``streaming_parity.backends.onnx.quantization``)."""
        if self.dtype != "int8":
            return None
        if self._int8_quantization is None:
            from streaming_parity.backends.onnx.quantization import read_quantization

            recorded = self.decoder_joint.metadata.get("int8_quantization") if self.decoder_joint else None
            self._int8_quantization = (
                Int8Quantization.from_dict(recorded, f"{decoder_joint_file('int8')} metadata") if recorded
                else read_quantization(self.int8_graph_paths()))
        return self._int8_quantization

    def notes(self) -> list[str]:
        scheme = self.int8_quantization()
        return [f"int8: {scheme.describe()} (read from {scheme.read_from})"] if scheme else []

    def close(self) -> None:
        self._encoders.clear()
        self.decoder_joint = None
        self.ctc_graph = None
        self.prompt_graph = None

"""ONNX files written by other exporters, read without this project's metadata: the reading half.

``foreign_detect.detect`` recognises a directory from its file names; ``read_foreign`` reads every lookahead and checks it
against the ``.nemo``; ``describe_foreign`` turns what was read into the ``described.DescribedExport`` the
runtime runs (``foreign_run.ForeignOnnxBackend``), with the graph surgery its taps need.

Three layouts are recognised, each per lookahead (a directory may hold one lookahead, or one
subdirectory per lookahead):

=================  ===========================================================================
``sherpa-onnx``    ``encoder.onnx``, ``decoder.onnx``, ``joiner.onnx`` and/or their ``*.int8.onnx`` copies,
                   ``tokens.txt`` (beside them or one level up); NeMo's own encoder export (batch-first
                   caches) with the metadata keys sherpa-onnx's runtime reads, as any version of its
                   export scripts writes them
``nemo-export``    ``encoder-<name>.onnx``, ``decoder_joint-<name>.onnx`` (NeMo's ``model.export``); no metadata
``parakeet-rs``    ``encoder.onnx``, ``decoder_joint.onnx`` (+ ``config.json``, ``tokenizer.model``): an encoder
                   wrapping ``cache_aware_stream_step`` (``processed_signal`` ... ``encoded``; layers-first caches),
                   or the multitalker one (``spk_targets``, ``bg_spk_targets``; batch-first caches)
=================  ===========================================================================

Nothing is guessed. The interface comes from the graphs' input names; the cache layout from the
static dimensions of the cache inputs (the layers count sits on axis 0 or 1), else from what the
naming implies (NeMo's ``forward_for_export`` is batch-first, ``cache_aware_stream_step`` layers-first);
the lookahead from running the encoder once on zeros (it returns ``valid_out_len = R + 1`` frames,
and accepts only the channel-cache length ``L`` it was exported with). Every value an artifact states
is checked against the ``.nemo`` it claims to come from, and a contradiction is a one-line
``ArtifactContradiction`` naming the file, the key and both values.

The files are untrusted: every graph goes through ``layout.load_graph`` (external data inside the
directory, declared sizes within their files) before ONNX Runtime opens it; ``tokens.txt`` and
``config.json`` are size-limited and a token table with duplicate or missing ids is refused.

Per-layer taps: the graph surgery of ``graph_tools`` (module scopes in node names) runs on a temporary
copy of each fp32 graph; a tap whose scope cannot be found is listed in ``unavailable_taps`` and the
others are still compared. sherpa-onnx's separate ``decoder.onnx`` gives the prediction-net output
(the ``decoder`` tap) without surgery.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.backends.onnx.described import DescribedExport, EncoderGraph, GraphFile
from streaming_parity.backends.onnx.foreign_detect import (
    NEMO_EXPORT,
    PARAKEET_RS,
    SHERPA_GRAPHS,
    SHERPA_ONNX,
    SHERPA_SUFFIXES,
    SHERPA_TOKENS,
    lookahead_dirs,
    sherpa_tokens,
)
from streaming_parity.backends.onnx.layout import (
    DECODER_JOINT_INPUTS,
    DECODER_JOINT_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    INTERFACES,
    MULTITALKER_ENCODER_INPUTS,
    MULTITALKER_ENCODER_OUTPUTS,
    STREAMING_ENCODER_KEYS,
    ArtifactContradiction,
    CacheShapes,
    ForeignArtifactError,
    GraphInterface,
    MissingGraphError,
    load_graph,
)
from streaming_parity.backends.onnx.sessions import session_options
from streaming_parity.core.errors import InvalidInput, UnsafeArtifact
from streaming_parity.core.nemo_config import EncoderConfig, ModelConfig, read_model_config
from streaming_parity.core.nemo_file import inspect_nemo, sha256_file
from streaming_parity.core.safe_files import MAX_TEXT_BYTES, read_text_file, read_token_table
from streaming_parity.interface.chunking import StreamingConfig
from streaming_parity.interface.frontend import Frontend, FrontendConfig
from streaming_parity.interface.model_info import ModelInfo
from streaming_parity.interface.taps import TAP_DECODER, TAP_PRE_ENCODE, layer_tap

SHERPA_BLANK = "<blk>"
PARAKEET_ENCODER_INPUTS = ("processed_signal", "processed_signal_length", "cache_last_channel", "cache_last_time",
                           "cache_last_channel_len")
PARAKEET_ENCODER_OUTPUTS = ("encoded", "encoded_len", "cache_last_channel_next", "cache_last_time_next",
                            "cache_last_channel_len_next")
# The decoder + joint that sherpa-onnx splits in two, presented to the runtime under NeMo's names.
SPLIT_INTERFACE = "sherpa-onnx"


# -- reading untrusted side files -----------------------------------------------------------------------

def read_tokens(path: Path) -> list[str]:
    """sherpa-onnx's ``tokens.txt``, checked (``streaming_parity.core.safe_files.read_token_table``): pieces without the blank."""
    return read_token_table(path, SHERPA_BLANK)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError as error:
        raise UnsafeArtifact(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UnsafeArtifact(f"{path}: not a JSON object")
    return data


@dataclass(frozen=True)
class GraphIO:
    """A graph's interface and metadata, read without its weights (after the external-data checks)."""

    path: Path
    inputs: dict[str, tuple[Any, ...]]  # name -> dims (int, or the symbolic name)
    outputs: dict[str, tuple[Any, ...]]
    metadata: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> GraphIO:
        if not path.is_file():
            raise MissingGraphError(f"{path}: graph not found")
        model = load_graph(path)
        initializers = {init.name for init in model.graph.initializer}

        def dims(value) -> tuple[Any, ...]:
            return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                         for d in value.type.tensor_type.shape.dim)

        return cls(path, {i.name: dims(i) for i in model.graph.input if i.name not in initializers},
                   {o.name: dims(o) for o in model.graph.output},
                   {p.key: p.value for p in model.metadata_props})

    def static(self, name: str, axis: int) -> int | None:
        shape = self.inputs.get(name) or self.outputs.get(name) or ()
        value = shape[axis] if -len(shape) <= axis < len(shape) else None
        return value if isinstance(value, int) and value > 0 else None


# -- what the .nemo says ---------------------------------------------------------------------------------

@dataclass
class NemoFacts:
    """What a foreign artifact is checked against, read from the ``.nemo`` without NeMo."""

    path: Path
    sha256: str
    config: ModelConfig
    vocabulary: tuple[str, ...]

    @classmethod
    def read(cls, nemo_path: Path) -> NemoFacts:
        archive = inspect_nemo(nemo_path)
        config = read_model_config(archive.config)
        vocabulary = config.joint.vocabulary
        if vocabulary is None:
            from streaming_parity.interface.model_view import tokenizer_pieces

            vocabulary = tuple(tokenizer_pieces(archive.tokenizer_model_bytes()))
        return cls(Path(nemo_path), sha256_file(nemo_path), config, tuple(vocabulary))

    @property
    def left_contexts(self) -> list[int]:
        return sorted({c[0] for c in self.config.encoder.att_context_size})

    def streaming(self, context: Sequence[int]) -> StreamingConfig:
        return StreamingConfig.from_encoder_config(self.config.encoder, context)


def _contradiction(where: Path | str, key: str, stated: Any, nemo_key: str, expected: Any) -> ArtifactContradiction:
    return ArtifactContradiction(f"{where}: {key} = {stated!r} contradicts the .nemo's {nemo_key} = {expected!r}")


def _check(where, key: str, stated: Any, nemo_key: str, expected: Any) -> None:
    if stated is not None and stated != expected:
        raise _contradiction(where, key, stated, nemo_key, expected)


def _int_metadata(graph: GraphIO, key: str, *, required: bool = True) -> int | None:
    text = graph.metadata.get(key)
    if text is None:
        if required:
            raise ForeignArtifactError(f"{graph.path}: metadata key {key!r} is missing")
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise ForeignArtifactError(f"{graph.path}: metadata {key} = {text!r} is not an integer") from None


# -- one lookahead ---------------------------------------------------------------------------------------

@dataclass
class ForeignLookahead:
    context: tuple[int, int]
    directory: Path
    encoder: dict[str, Path]  # variant ("float32", "int8") -> graph
    decoder: dict[str, Path]  # sherpa-onnx: decoder.onnx; others: decoder_joint
    joiner: dict[str, Path]  # sherpa-onnx only
    interface: GraphInterface
    layout: str  # "batch-first" or "layers-first"
    notes: list[str] = field(default_factory=list)


@dataclass
class ForeignArtifact:
    format: str
    root: Path
    nemo: NemoFacts
    lookaheads: dict[tuple[int, int], ForeignLookahead]

    @property
    def contexts(self) -> tuple[tuple[int, int], ...]:
        order = self.nemo.config.encoder.att_context_size
        return tuple(c for c in order if c in self.lookaheads)

    def describe(self) -> str:
        contexts = ", ".join(f"[{c[0]},{c[1]}]" for c in self.contexts)
        first = next(iter(self.lookaheads.values()))
        return f"{self.format} directory, {first.layout} caches, lookahead(s) {contexts}"


def _encoder_interface(graph: GraphIO, fmt: str) -> tuple[GraphInterface, str]:
    """The encoder's interface from its input names, and the cache layout its naming implies."""
    names = tuple(graph.inputs)
    outputs = tuple(graph.outputs)
    if names == ENCODER_INPUTS:
        return GraphInterface(fmt, ENCODER_INPUTS, ENCODER_OUTPUTS, DECODER_JOINT_INPUTS, DECODER_JOINT_OUTPUTS,
                              "BDT"), "batch-first"  # ConformerEncoder.forward_for_export transposes to [B, L, ...]
    if names == PARAKEET_ENCODER_INPUTS:
        return GraphInterface(fmt, PARAKEET_ENCODER_INPUTS, PARAKEET_ENCODER_OUTPUTS, DECODER_JOINT_INPUTS,
                              DECODER_JOINT_OUTPUTS, "BDT"), "layers-first"  # cache_aware_stream_step's own layout
    if names == MULTITALKER_ENCODER_INPUTS:
        multitalker = INTERFACES["multitalker"]
        return GraphInterface(fmt, MULTITALKER_ENCODER_INPUTS, MULTITALKER_ENCODER_OUTPUTS,
                              multitalker.decoder_joint_inputs, multitalker.decoder_joint_outputs,
                              "BTD"), "batch-first"
    raise ForeignArtifactError(f"{graph.path}: encoder inputs {list(names)} (outputs {list(outputs)}) are not an "
                               f"interface this reader knows: NeMo's export {list(ENCODER_INPUTS)}, parakeet-rs' "
                               f"{list(PARAKEET_ENCODER_INPUTS)} or its multitalker one")


def _cache_layout(graph: GraphIO, implied: str, facts: NemoFacts) -> str:
    """Which axis holds the layers, read from static dimensions where the graph declares them."""
    layers = facts.config.encoder.n_layers
    channel = graph.inputs["cache_last_channel"]
    if len(channel) != 4:
        raise ForeignArtifactError(f"{graph.path}: cache_last_channel has {len(channel)} axes, expected 4")
    first, second = (d if isinstance(d, int) and d > 0 else None for d in channel[:2])
    if second == layers and first != layers:
        return "batch-first"
    if first == layers and second != layers:
        return "layers-first"
    if first is not None and second is not None and layers not in (first, second):
        raise _contradiction(graph.path, "cache_last_channel layer axis", [first, second], "encoder.n_layers", layers)
    return implied


def _check_encoder_shapes(graph: GraphIO, layout: str, facts: NemoFacts) -> None:
    encoder = facts.config.encoder
    layer_axis = 1 if layout == "batch-first" else 0
    for name in ("cache_last_channel", "cache_last_time"):
        _check(graph.path, f"{name} layers (axis {layer_axis})", graph.static(name, layer_axis),
               "encoder.n_layers", encoder.n_layers)
    _check(graph.path, "cache_last_channel d_model (axis 3)", graph.static("cache_last_channel", 3),
           "encoder.d_model", encoder.d_model)
    _check(graph.path, "cache_last_time d_model (axis 2)", graph.static("cache_last_time", 2),
           "encoder.d_model", encoder.d_model)
    _check(graph.path, "cache_last_time kernel-1 (axis 3)", graph.static("cache_last_time", 3),
           "encoder.conv_kernel_size - 1", encoder.conv_kernel_size - 1)
    signal = next(iter(graph.inputs))
    _check(graph.path, f"{signal} features (axis 1)", graph.static(signal, 1), "encoder.feat_in", encoder.feat_in)
    left = graph.static("cache_last_channel", 2)
    if left is not None and left not in facts.left_contexts:
        raise _contradiction(graph.path, "cache_last_channel left context (axis 2)", left,
                             "encoder.att_context_size left", _one_or_all(facts.left_contexts))


def _one_or_all(values: Sequence[Any]) -> Any:
    return values[0] if len(values) == 1 else list(values)


def probe_lookahead(graph: GraphIO, interface: GraphInterface, layout: str, facts: NemoFacts,
                    left_contexts: Sequence[int], options) -> tuple[int, int]:
    """Run the encoder once on zeros: the graph accepts only the channel-cache length it was exported
    with (``L``), and returns ``valid_out_len = R + 1`` frames for a chunk longer than that."""
    import onnxruntime as ort

    encoder = facts.config.encoder
    widest = max((facts.streaming(c) for c in encoder.att_context_size), key=lambda s: s.chunk_size[1])
    frames = widest.pre_encode_cache_size[1] + widest.chunk_size[1] + widest.subsampling_factor
    session = ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])
    names = interface.encoder_inputs
    failures = []
    for left in left_contexts:
        channel = (1, encoder.n_layers, left, encoder.d_model)
        time_cache = (1, encoder.n_layers, encoder.d_model, encoder.conv_kernel_size - 1)
        if layout == "layers-first":
            channel, time_cache = (channel[1], 1, *channel[2:]), (time_cache[1], 1, *time_cache[2:])
        feeds = {names[0]: np.zeros((1, encoder.feat_in, frames), np.float32), names[1]: np.array([frames]),
                 names[2]: np.zeros(channel, np.float32), names[3]: np.zeros(time_cache, np.float32),
                 names[4]: np.zeros((1,), np.int64)}
        if interface.speaker_masks:
            width = widest.layer_input_frames(frames)
            feeds[names[5]] = np.ones((1, width), np.float32)
            feeds[names[6]] = np.zeros((1, width), np.float32)
        try:
            out = session.run(None, feeds)
        except Exception as error:  # noqa: BLE001 - a left context the graph was not exported with fails in ORT
            failures.append(f"{left}: {str(error).splitlines()[0][:120]}")
            continue
        valid = int(np.asarray(out[1]).reshape(-1)[0])
        return left, valid - 1
    raise ForeignArtifactError(f"{graph.path}: the encoder runs with none of the .nemo's left contexts "
                               f"{list(left_contexts)} ({'; '.join(failures)})")


def _variants(directory: Path, stem: str) -> dict[str, Path]:
    found = {"float32": directory / f"{stem}.onnx"}
    if (directory / f"{stem}.int8.onnx").is_file():
        found["int8"] = directory / f"{stem}.int8.onnx"
    return found


# The keys sherpa-onnx's runtime cannot run without: OnlineTransducerNeMoModel::Impl::InitEncoder
# (sherpa-onnx/csrc/online-transducer-nemo-model.cc) reads each with SHERPA_ONNX_READ_META_DATA
# (sherpa-onnx/csrc/macros.h), which exits when the key is absent or empty. Every version of both export
# scripts writes them. (The runtime picks this model class from decoder.onnx's output count, in
# sherpa-onnx/csrc/online-recognizer-impl.cc, so model_type is never read.)
SHERPA_REQUIRED = ("vocab_size", "window_size", "chunk_shift", "subsampling_factor", "pred_rnn_layers",
                   "pred_hidden", "cache_last_channel_dim1", "cache_last_channel_dim2", "cache_last_channel_dim3",
                   "cache_last_time_dim1", "cache_last_time_dim2", "cache_last_time_dim3")
# "No normalisation" as the scripts and the runtime spell it: "" (the scripts map NeMo's "NA" to it:
# fast-conformer-hybrid-transducer-ctc/export-onnx-transducer.py since 5ed3ec1c0, both Nemotron scripts),
# "NA" (InitEncoder maps it to ""), and "None" (the FastConformer script as first written, 68b25abf2,
# wrote that literal whatever the model used; the later scripts write str(None) for a null normalize).
SHERPA_NO_NORMALIZATION = ("", "NA", "None")
NEMO_NO_NORMALIZATION = ("NA", None, "None", "none", "")


def _sherpa_graphs(directory: Path) -> dict[str, dict[str, Path]]:
    """variant -> graph -> path, float32 first; a variant with one or two of its three graphs is refused."""
    found: dict[str, dict[str, Path]] = {}
    for variant, suffix in SHERPA_SUFFIXES.items():
        paths = {graph: directory / f"{graph}{suffix}" for graph in SHERPA_GRAPHS}
        present = [p.name for p in paths.values() if p.is_file()]
        if present and len(present) != len(paths):
            missing = [p.name for p in paths.values() if not p.is_file()]
            raise MissingGraphError(f"{directory}: {', '.join(present)} without {', '.join(missing)} (sherpa-onnx "
                                    f"writes the {variant} encoder, decoder and joiner together)")
        if present:
            found[variant] = paths
    if not found:
        raise MissingGraphError(f"{directory}: no sherpa-onnx graphs (encoder.onnx, decoder.onnx, joiner.onnx or "
                                "their .int8.onnx copies)")
    return found


def _check_sherpa_metadata(graph: GraphIO, facts: NemoFacts) -> int:
    """The metadata that does not depend on the lookahead, against the .nemo; returns the left context
    (``cache_last_channel_dim2``)."""
    where = graph.path
    missing = [key for key in SHERPA_REQUIRED if not graph.metadata.get(key, "").strip()]
    if missing:
        raise ForeignArtifactError(f"{where}: metadata key{'s' if len(missing) > 1 else ''} "
                                   f"{', '.join(repr(k) for k in missing)} missing (sherpa-onnx's runtime reads "
                                   "every one of them: online-transducer-nemo-model.cc, InitEncoder)")
    required = lambda key: _int_metadata(graph, key)  # noqa: E731
    optional = lambda key: _int_metadata(graph, key, required=False)  # noqa: E731
    config = facts.config
    encoder = config.encoder
    # The online runtime takes the feature dimension from the encoder input's axis 1 (InitEncoder:
    # GetInputTypeInfo(0)...GetShape()[1]), not from metadata: that axis must be static (its value is
    # checked against encoder.feat_in with the other shapes).
    signal = next(iter(graph.inputs))
    if graph.static(signal, 1) is None:
        raise ForeignArtifactError(f"{where}: {signal} axis 1 is {graph.inputs[signal][1]!r}, not a static feature "
                                   "dimension (sherpa-onnx's runtime reads the feature dimension from it)")
    # feat_dim: written only by the Nemotron scripts (scripts/nemo/nemotron-speech-streaming-en-0.6b/
    # export_onnx.py, hard-coded 128); the FastConformer script never writes it.
    _check(where, "feat_dim", optional("feat_dim"), "encoder.feat_in", encoder.feat_in)
    _check(where, "subsampling_factor", required("subsampling_factor"), "encoder.subsampling_factor",
           encoder.subsampling_factor)
    _check(where, "vocab_size", required("vocab_size"), "vocabulary size", len(facts.vocabulary))
    _check(where, "pred_rnn_layers", required("pred_rnn_layers"), "decoder.prednet.pred_rnn_layers",
           config.decoder.pred_rnn_layers)
    _check(where, "pred_hidden", required("pred_hidden"), "decoder.prednet.pred_hidden", config.decoder.pred_hidden)
    for axis, expected, key in ((1, encoder.n_layers, "encoder.n_layers"), (3, encoder.d_model, "encoder.d_model")):
        _check(where, f"cache_last_channel_dim{axis}", required(f"cache_last_channel_dim{axis}"), key, expected)
    for axis, expected, key in ((1, encoder.n_layers, "encoder.n_layers"), (2, encoder.d_model, "encoder.d_model"),
                                (3, encoder.conv_kernel_size - 1, "encoder.conv_kernel_size - 1")):
        _check(where, f"cache_last_time_dim{axis}", required(f"cache_last_time_dim{axis}"), key, expected)
    left = required("cache_last_channel_dim2")
    if left not in facts.left_contexts:
        raise _contradiction(where, "cache_last_channel_dim2 (left context)", left, "encoder.att_context_size left",
                             _one_or_all(facts.left_contexts))
    # normalize_type: read with SHERPA_ONNX_READ_META_DATA_STR_ALLOW_EMPTY (absent reads as ""). The
    # streaming front end never applies it (only offline-stream.cc reads nemo_normalize_type), but it
    # states what the model expects, so it is held to the .nemo.
    normalize = graph.metadata.get("normalize_type")
    stated = "" if normalize is None else normalize.strip()
    expected = config.preprocessor.normalize
    stated_none, expected_none = stated in SHERPA_NO_NORMALIZATION, expected in NEMO_NO_NORMALIZATION
    if stated_none != expected_none or (not stated_none and stated != str(expected)):
        key = "normalize_type" if normalize is not None else "normalize_type (absent, read as '')"
        raise _contradiction(where, key, stated if normalize is None else normalize, "preprocessor.normalize",
                             expected)
    return left


def _check_sherpa_lookahead(graph: GraphIO, context: tuple[int, int], facts: NemoFacts) -> None:
    """The metadata that depends on the lookahead, against the one the graph was probed to run."""
    where = graph.path
    encoder = facts.config.encoder
    lookahead = context[1]
    streaming = facts.streaming(context)
    # chunk_size_ms: written only by the Nemotron script from 415b8c2aa on (its lookahead loop names each
    # directory by it); sherpa-onnx's runtime never reads it.
    expected_ms = (lookahead + 1) * encoder.subsampling_factor * 10
    _check(where, "chunk_size_ms", _int_metadata(graph, "chunk_size_ms", required=False),
           f"lookahead {lookahead} ({lookahead + 1} x {encoder.subsampling_factor} x 10 ms)", expected_ms)
    _check(where, "window_size", _int_metadata(graph, "window_size"),
           f"chunk_size + pre_encode_cache_size at {list(context)}",
           streaming.chunk_size[1] + streaming.pre_encode_cache_size[1])
    _check(where, "chunk_shift", _int_metadata(graph, "chunk_shift"), f"chunk_size at {list(context)}",
           streaming.chunk_size[1])


def _read_sherpa(directory: Path, facts: NemoFacts, options) -> ForeignLookahead:
    """One lookahead of a sherpa-onnx directory, every variant's graphs checked against the .nemo."""
    graphs = _sherpa_graphs(directory)
    tokens_path = sherpa_tokens(directory)
    if tokens_path is None:
        raise MissingGraphError(f"{directory}: {SHERPA_TOKENS} found neither here nor in {directory.parent}")
    found: tuple[tuple[int, int], GraphInterface, str, Path] | None = None
    for files in graphs.values():
        encoder_io = GraphIO.read(files["encoder"])
        interface, implied = _encoder_interface(encoder_io, SHERPA_ONNX)
        layout = _cache_layout(encoder_io, implied, facts)
        _check_encoder_shapes(encoder_io, layout, facts)
        left = _check_sherpa_metadata(encoder_io, facts)
        context = probe_lookahead(encoder_io, interface, layout, facts, [left], options)
        if context not in facts.config.encoder.att_context_size:
            raise ArtifactContradiction(f"{encoder_io.path}: the encoder returns {context[1] + 1} frames per chunk "
                                        f"(lookahead {context[1]}), not one of the .nemo's att_context_size "
                                        f"{[list(c) for c in facts.config.encoder.att_context_size]}")
        _check_sherpa_lookahead(encoder_io, context, facts)
        if found is not None and (context, layout) != (found[0], found[2]):
            raise ArtifactContradiction(f"{encoder_io.path}: lookahead {list(context)} ({layout} caches) contradicts "
                                        f"{found[3].name}'s {list(found[0])} ({found[2]} caches)")
        found = found or (context, interface, layout, encoder_io.path)
        decoder_io = GraphIO.read(files["decoder"])
        joiner_io = GraphIO.read(files["joiner"])
        _check_prediction_net(decoder_io, list(decoder_io.inputs)[2:4], facts)
        joiner_output = next(iter(joiner_io.outputs))
        _check(joiner_io.path, f"{joiner_output} (last axis)", joiner_io.static(joiner_output, -1),
               "vocabulary size + blank", len(facts.vocabulary) + 1)
    tokens = read_tokens(tokens_path)
    _check_vocabulary(tokens_path, tokens, facts)
    context, interface, layout, _ = found
    return ForeignLookahead(context, directory, {v: f["encoder"] for v, f in graphs.items()},
                            {v: f["decoder"] for v, f in graphs.items()}, {v: f["joiner"] for v, f in graphs.items()},
                            interface, layout)


def _check_vocabulary(path: Path, tokens: Sequence[str], facts: NemoFacts) -> None:
    if len(tokens) != len(facts.vocabulary):
        raise _contradiction(path, "pieces (without <blk>)", len(tokens), "vocabulary size", len(facts.vocabulary))
    for index, (piece, expected) in enumerate(zip(tokens, facts.vocabulary)):
        if piece != expected:
            raise _contradiction(path, f"id {index}", piece, f"tokenizer piece {index}", expected)


def _check_prediction_net(graph: GraphIO, states: Sequence[str], facts: NemoFacts) -> None:
    decoder = facts.config.decoder
    for name in states:
        _check(graph.path, f"{name} layers (axis 0)", graph.static(name, 0), "decoder.prednet.pred_rnn_layers",
               decoder.pred_rnn_layers)
        _check(graph.path, f"{name} hidden (axis 2)", graph.static(name, 2), "decoder.prednet.pred_hidden",
               decoder.pred_hidden)


def _decoder_joint_interface(graph: GraphIO, encoder_interface: GraphInterface, facts: NemoFacts) -> GraphInterface:
    names, outputs = tuple(graph.inputs), tuple(graph.outputs)
    if len(names) not in (4, 5) or len(outputs) < 4 or names[1] != "targets":
        raise ForeignArtifactError(f"{graph.path}: decoder_joint inputs {list(names)} / outputs {list(outputs)} are "
                                   "not NeMo's (encoder_outputs, targets, [target_length,] two LSTM states)")
    d_model = facts.config.encoder.d_model
    if graph.static(names[0], 1) == d_model:
        frame = "BDT"
    elif graph.static(names[0], 2) == d_model:
        frame = "BTD"
    else:  # NeMo's RNNTDecoderJoint takes [B, D, T]; the frame-first variant has no target_length
        frame = "BDT" if len(names) == 5 else "BTD"
    _check_prediction_net(graph, names[-2:], facts)
    _check(graph.path, f"{outputs[0]} (last axis)", graph.static(outputs[0], -1), "vocabulary size + blank",
           len(facts.vocabulary) + 1)
    return GraphInterface(encoder_interface.name, encoder_interface.encoder_inputs, encoder_interface.encoder_outputs,
                          names, outputs[:4], frame)


def _read_parakeet_rs(directory: Path, facts: NemoFacts, options) -> ForeignLookahead:
    encoder_io = GraphIO.read(directory / "encoder.onnx")
    interface, implied = _encoder_interface(encoder_io, PARAKEET_RS)
    layout = _cache_layout(encoder_io, implied, facts)
    _check_encoder_shapes(encoder_io, layout, facts)
    left_static = encoder_io.static("cache_last_channel", 2)
    lefts = [left_static] if left_static else facts.left_contexts
    context = probe_lookahead(encoder_io, interface, layout, facts, lefts, options)
    _check_context(encoder_io.path, context, facts)
    streaming = facts.streaming(context)
    _check(encoder_io.path, "chunk_size_output_frames", _int_metadata(encoder_io, "chunk_size_output_frames",
           required=False), f"valid_out_len at {list(context)}", streaming.valid_out_len)
    _check(encoder_io.path, "pre_encode_cache", _int_metadata(encoder_io, "pre_encode_cache", required=False),
           f"pre_encode_cache_size at {list(context)}", streaming.pre_encode_cache_size[1])
    if (directory / "config.json").is_file():
        _check_parakeet_config(directory / "config.json", context, facts)
    if (directory / "tokenizer.model").is_file():
        _check_tokenizer(directory / "tokenizer.model", facts)
    decoder_io = GraphIO.read(directory / "decoder_joint.onnx")
    interface = _decoder_joint_interface(decoder_io, interface, facts)
    return ForeignLookahead(context, directory, _variants(directory, "encoder"),
                            _variants(directory, "decoder_joint"), {}, interface, layout)


def _check_context(where: Path, context: tuple[int, int], facts: NemoFacts) -> None:
    if context not in facts.config.encoder.att_context_size:
        raise ArtifactContradiction(f"{where}: the encoder runs with left context {context[0]} and returns "
                                    f"{context[1] + 1} frames per chunk: att_context_size {list(context)} is not one "
                                    f"of the .nemo's {[list(c) for c in facts.config.encoder.att_context_size]}")


def _check_parakeet_config(path: Path, context: tuple[int, int], facts: NemoFacts) -> None:
    settings = _read_json(path)
    config = facts.config
    streaming = facts.streaming(context)
    normalize = (settings.get("preprocessor") or {}).get("normalize") if isinstance(
        settings.get("preprocessor"), dict) else None
    expected = {
        "att_context_size": (list(context), "the encoder graph (probed)"),
        "n_mels": (config.encoder.feat_in, "encoder.feat_in"),
        "subsampling_factor": (config.encoder.subsampling_factor, "encoder.subsampling_factor"),
        "num_encoder_layers": (config.encoder.n_layers, "encoder.n_layers"),
        "hidden_dim": (config.encoder.d_model, "encoder.d_model"),
        "conv_context": (config.encoder.conv_kernel_size - 1, "encoder.conv_kernel_size - 1"),
        "vocab_size": (len(facts.vocabulary), "vocabulary size"),
        "blank_id": (len(facts.vocabulary), "blank id (vocabulary size)"),
        "chunk_size_output_frames": (streaming.valid_out_len, f"valid_out_len at {list(context)}"),
        "pre_encode_cache": (streaming.pre_encode_cache_size[1], f"pre_encode_cache_size at {list(context)}"),
        "drop_extra_pre_encoded": (streaming.drop_extra_pre_encoded, f"drop_extra_pre_encoded at {list(context)}"),
    }
    for key, (value, source) in expected.items():
        _check(path, key, settings.get(key), source, value)
    if normalize is not None and str(normalize) != str(config.preprocessor.normalize):
        raise _contradiction(path, "preprocessor.normalize", normalize, "preprocessor.normalize",
                             config.preprocessor.normalize)


def _check_tokenizer(path: Path, facts: NemoFacts) -> None:
    from streaming_parity.interface.model_view import tokenizer_pieces

    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise UnsafeArtifact(f"{path}: {size} bytes, more than the {MAX_TEXT_BYTES} a tokenizer here may have")
    try:
        pieces = tokenizer_pieces(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError on a corrupt model
        raise UnsafeArtifact(f"{path}: not a SentencePiece model ({type(error).__name__})") from None
    _check_vocabulary(path, pieces, facts)


def _read_nemo_export(directory: Path, facts: NemoFacts, options) -> ForeignLookahead:
    stems = sorted(p.name[len("encoder-"):-len(".onnx")] for p in directory.glob("encoder-*.onnx")
                   if (directory / f"decoder_joint-{p.name[len('encoder-'):]}").is_file())
    if len(stems) != 1:
        raise ForeignArtifactError(f"{directory}: {len(stems)} encoder/decoder_joint pairs {stems}; NeMo's export "
                                   "writes one per lookahead, in its own directory")
    encoder_io = GraphIO.read(directory / f"encoder-{stems[0]}.onnx")
    interface, implied = _encoder_interface(encoder_io, NEMO_EXPORT)
    layout = _cache_layout(encoder_io, implied, facts)
    _check_encoder_shapes(encoder_io, layout, facts)
    context = probe_lookahead(encoder_io, interface, layout, facts, facts.left_contexts, options)
    _check_context(encoder_io.path, context, facts)
    decoder_io = GraphIO.read(directory / f"decoder_joint-{stems[0]}.onnx")
    interface = _decoder_joint_interface(decoder_io, interface, facts)
    return ForeignLookahead(context, directory, {"float32": encoder_io.path}, {"float32": decoder_io.path}, {},
                            interface, layout)


READERS = {SHERPA_ONNX: _read_sherpa, PARAKEET_RS: _read_parakeet_rs, NEMO_EXPORT: _read_nemo_export}


def read_foreign(path: str | Path, nemo_path: str | Path, options=None) -> ForeignArtifact:
    """Recognise ``path``, read every lookahead and check it against ``nemo_path``."""
    path = Path(path)
    if not path.is_dir():
        raise MissingGraphError(f"{path}: not a directory")
    found = lookahead_dirs(path)
    if found is None:
        raise ForeignArtifactError(f"{path}: not a sherpa-onnx, NeMo-export or parakeet-rs directory (nor one "
                                   "subdirectory per lookahead of one of them)")
    fmt, directories = found
    facts = NemoFacts.read(Path(nemo_path))
    if facts.config.prompt is not None:
        # These exporters export the encoder and decoder_joint modules; prompt_kernel belongs to the model.
        raise ArtifactContradiction(
            f"{path}: a {fmt} directory has no prompt graph, but {facts.path.name} is prompt-conditioned "
            "(model_defaults.initialize_prompt_feature): its files bypass prompt_kernel and ignore the locale")
    options = options or session_options(1)
    lookaheads: dict[tuple[int, int], ForeignLookahead] = {}
    for directory in directories:
        lookahead = READERS[fmt](directory, facts, options)
        if lookahead.context in lookaheads:
            raise ForeignArtifactError(f"{path}: {lookaheads[lookahead.context].directory.name} and "
                                       f"{directory.name} both hold lookahead {list(lookahead.context)}")
        lookaheads[lookahead.context] = lookahead
    layouts = {(la.layout, la.interface.name) for la in lookaheads.values()}
    if len(layouts) != 1:
        raise ForeignArtifactError(f"{path}: lookaheads of different layouts {sorted(layouts)}")
    return ForeignArtifact(fmt, path, facts, lookaheads)


# -- what the runtime runs -------------------------------------------------------------------------------

def describe_foreign(artifact: ForeignArtifact, *, dtype: str = "float32", taps: bool = True,
                     scratch: Path | None = None) -> DescribedExport:
    """What ``OnnxBackend`` runs from a directory ``read_foreign`` read and checked: its ``dtype`` graphs, the model
    as the ``.nemo`` states it (the files state no more than their interfaces and the values already checked
    against it), pad-and-drop only (no plain first-chunk graph), and NeMo's front end from the ``.nemo``.

    ``taps`` (float32): temporary copies of the graphs in ``scratch`` with the taps graph surgery finds as extra
    outputs (``graph_tools``); the ones it cannot find are listed in ``unavailable_taps``.
    """
    if dtype not in ("float32", "int8"):
        raise InvalidInput(f"onnx backend runs float32 or int8, not {dtype}")
    use_taps = taps and dtype == "float32"
    if use_taps and scratch is None:
        raise ValueError("describe_foreign: taps need a scratch directory for the graphs' tap copies")
    facts = artifact.nemo
    info = _model_info(artifact)
    first = next(iter(artifact.lookaheads.values()))
    unavailable: dict[str, str] | None = {} if use_taps else None
    joiner = None
    if artifact.format == SHERPA_ONNX:
        # sherpa-onnx's separate decoder.onnx gives the prediction-net output (the decoder tap) without surgery.
        decoder_joint = GraphFile(_variant_file(artifact, first.decoder, "decoder", dtype),
                                  taps=(TAP_DECODER,) if use_taps else ())
        joiner = GraphFile(_variant_file(artifact, first.joiner, "joiner", dtype))
    else:
        decoder_joint = GraphFile(_variant_file(artifact, first.decoder, "decoder_joint", dtype))
        if use_taps:
            decoder_joint = _with_tap_outputs(decoder_joint.path, _decoder_joint_taps, scratch, unavailable)
    encoder = facts.config.encoder
    encoder_taps = functools.partial(_tap_scopes, num_layers=encoder.n_layers)
    encoders = {}
    for context in artifact.contexts:
        lookahead = artifact.lookaheads[context]
        path = _variant_file(artifact, lookahead.encoder, "encoder", dtype)
        streaming = facts.streaming(context)
        shapes = CacheShapes.for_model(lookahead.layout, encoder.n_layers, streaming.last_channel_cache_size,
                                       encoder.d_model, encoder.conv_kernel_size)
        file = _with_tap_outputs(path, encoder_taps, scratch, unavailable) if use_taps else GraphFile(path)
        encoders[(context, False)] = EncoderGraph(file, context, False, streaming, shapes, lookahead.interface)
    int8_graphs = () if dtype != "int8" else tuple(
        files["int8"] for lookahead in artifact.lookaheads.values()
        for files in (lookahead.encoder, lookahead.decoder, lookahead.joiner) if "int8" in files)
    return DescribedExport(
        directory=artifact.root, dtype=dtype, info=info, max_symbols=facts.config.decoding.max_symbols,
        interface=first.interface, cache_layout=first.layout, first_chunk_modes=("pad-and-drop",),
        decoder_joint=decoder_joint, joiner=joiner, encoders=encoders, frontend=NemoFrontend(facts),
        int8_graphs=int8_graphs, unavailable_taps=unavailable,
        notes=(f"{artifact.root}: {artifact.describe()}, driven by the harness's ONNX Runtime driver",))


def _model_info(artifact: ForeignArtifact) -> ModelInfo:
    """The model as the ``.nemo`` states it, over the lookaheads the directory holds (the encoder config reduced to
    the keys this project's export records, ``STREAMING_ENCODER_KEYS``)."""
    facts = artifact.nemo
    config = facts.config
    encoder = config.encoder
    speakers = config.speaker_kernels
    return ModelInfo(
        num_layers=int(encoder.n_layers), d_model=int(encoder.d_model), n_mels=int(encoder.feat_in),
        conv_kernel_size=int(encoder.conv_kernel_size), subsampling_factor=int(encoder.subsampling_factor),
        att_context_sizes=artifact.contexts, vocabulary=tuple(facts.vocabulary), blank_id=len(facts.vocabulary),
        pred_layers=int(config.decoder.pred_rnn_layers), pred_hidden=int(config.decoder.pred_hidden),
        max_symbols=int(config.decoding.max_symbols or 0),
        encoder_config=EncoderConfig.from_mapping(encoder.as_config(STREAMING_ENCODER_KEYS)),
        speaker_kernel_layers=tuple(int(i) for i in speakers.layers) if speakers else (),
        background_speaker_kernel=bool(speakers and speakers.background),
    )


def _variant_file(artifact: ForeignArtifact, files: dict[str, Path], what: str, dtype: str) -> Path:
    """One lookahead's ``dtype`` graph of a kind (``what``), or why the directory has none."""
    if dtype not in files:
        held = ", ".join(sorted(files))
        raise MissingGraphError(f"{artifact.root}: no {dtype} {what} graph ({artifact.format} directory with "
                                f"{held} graphs: --candidate onnx:{sorted(files)[0]}:{artifact.root})")
    return files[dtype]


# -- graph surgery: the taps as extra outputs ------------------------------------------------------------

def _tap_scopes(graph, num_layers: int) -> tuple[dict[str, str], dict[str, str]]:
    """Encoder taps found by module scope, and the ones that could not be found (tap -> reason)."""
    from streaming_parity.backends.onnx import graph_tools

    found, missing = {}, {}
    for tap, scope in [(TAP_PRE_ENCODE, "pre_encode/out"),
                       *((layer_tap(i), f"layers.{i}/norm_out") for i in range(num_layers))]:
        try:
            found[tap] = graph_tools.find_tap(graph, scope, tap)
        except graph_tools.TapNotFoundError as error:
            missing[tap] = str(error)
    return found, missing


def _decoder_joint_taps(graph) -> tuple[dict[str, str], dict[str, str]]:
    """The prediction-net output (the ``decoder`` tap) in a ``decoder_joint`` graph, or why it cannot be found."""
    from streaming_parity.backends.onnx import graph_tools

    try:
        return graph_tools.decoder_joint_tap_tensors(graph), {}
    except graph_tools.TapNotFoundError as error:
        return {}, {TAP_DECODER: str(error)}


def _with_tap_outputs(path: Path, find, scratch: Path, unavailable: dict[str, str]) -> GraphFile:
    """``path`` to run with the taps ``find(graph)`` locates as extra outputs: a temporary copy in ``scratch`` (the
    graph itself where none is found); the ones not found go into ``unavailable`` (tap -> reason)."""
    import onnx

    from streaming_parity.backends.onnx import graph_tools

    model = load_graph(path)  # external data checked: locations inside the directory, sizes within the files
    found, missing = find(model.graph)
    unavailable.update(missing)
    if not found:
        return GraphFile(path)
    onnx.load_external_data_for_model(model, str(path.parent))
    graph_tools.add_tap_outputs(model, found)
    target = scratch / f"{path.parent.name}-{path.name}"
    graph_tools.save_graph(model, target)
    return GraphFile(path, taps=tuple(found), session_path=target)


class NemoFrontend:
    """NeMo's front end, built from the ``.nemo`` (its stored window and filterbank) on first use:
    the foreign directories carry no front end of their own."""

    def __init__(self, facts: NemoFacts):
        self.facts = facts
        self.config = FrontendConfig.from_nemo_config(facts.config.preprocessor)
        self._frontend: Frontend | None = None

    def __call__(self, audio: np.ndarray):
        if self._frontend is None:
            from streaming_parity.core.nemo_file import load_state_dict

            state = load_state_dict(inspect_nemo(self.facts.path))
            window = state.get("preprocessor.featurizer.window")
            self._frontend = Frontend(self.config, state["preprocessor.featurizer.fb"].float().numpy(),
                                      None if window is None else window.float().numpy())
        return self._frontend(audio)

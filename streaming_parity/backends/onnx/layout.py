"""What an ONNX export directory holds, and the metadata every graph carries.

Shared by the exporter (which writes it) and the runtime, which runs what ``describe_export`` reads from it
(a ``described.DescribedExport``, as the foreign readers build for other exporters' files); imports neither
torch nor NeMo. File names in an export directory:

====================================  ==================================================
``encoder-L_R.onnx``                  cache-aware encoder for att_context_size [L, R]
``encoder-L_R.debug.onnx``            the same graph plus the shared taps as outputs
``encoder-L_R.int8.onnx``             dynamic int8 quantization of the fp32 graph
``encoder-L_R.first.onnx``            the plain first chunk's graph (+ ``.debug``, ``.int8``; ``encoder_file``)
``decoder_joint.onnx`` (+ ``.debug``, ``.int8``)  RNNT prediction net + joint, one step
``ctc.onnx``                          hybrid RNNT-CTC models: the CTC head on encoder outputs (every
                                      lookahead and variant; see ``ctc_file``)
``prompt.onnx`` (+ ``.int8``)         prompt-conditioned models: ``prompt_kernel`` fusing the stream's
                                      locale into the encoder output (every lookahead; ``prompt_file``)
``encoder.weights``, ``encoder.int8.weights``  the encoder weights, once per precision, shared by every lookahead
``*.onnx.data``                       external weights of another graph (models > 2 GB)
``tokenizer.model``, ``vocab.txt``    SentencePiece model and its pieces, one per line
``frontend.npz``, ``frontend.json``   mel filterbank + window, and the front-end settings
``multitalker_config.json``           multitalker exports: model dimensions and speaker-kernel layers
====================================  ==================================================

Every graph's ``metadata_props`` hold JSON-encoded values under the ``METADATA_KEYS`` below: what a
runtime needs to stream without NeMo, and the sha256 of the ``.nemo`` it came from. A prompt-conditioned
model's ``num_prompts`` and ``prompt_dictionary`` (locale -> one-hot column) are among them: the runtime
maps a stream's locale to the ``prompt_index`` it feeds ``prompt.onnx`` through the export's own copy.

Format history: ``/2`` added ``num_prompts``, ``prompt_dictionary`` and ``prompt.onnx``; a ``/1`` export
of a prompt-conditioned model has no prompt graph (and would bypass the prompt), so it is not read.
``/3`` added the plain first-chunk graphs (``first_chunk_modes`` says which modes an export streams) and the
int8 scheme (``int8_quantization``); a ``/2`` export is still read, pad-and-drop only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming_parity.backends.onnx.described import DescribedExport, EncoderGraph, GraphFile
from streaming_parity.core.errors import BadInput, InvalidInput
from streaming_parity.core.nemo_config import EncoderConfig, normalize_att_context_sizes
from streaming_parity.core.safe_files import check_onnx_external_data, load_onnx_graph
from streaming_parity.interface.chunking import StreamingConfig
from streaming_parity.interface.frontend import Frontend
from streaming_parity.interface.model_info import ModelInfo

FORMAT = "parity-nemo-cache-aware-rnnt/3"
FORMAT_FAMILY = "parity-nemo-cache-aware-rnnt/"  # older versions: "export again"
# /2 wrote no plain first-chunk graphs (and, before its scheme was recorded, full-range QInt8 int8 graphs):
# its exports still load, pad-and-drop only. /1 exports lack the prompt graph: export again.
READABLE_FORMATS = (FORMAT, "parity-nemo-cache-aware-rnnt/2")
CACHE_LAYOUTS = ("batch-first", "layers-first")
VARIANTS = ("float32", "int8")

ENCODER_INPUTS = ("audio_signal", "length", "cache_last_channel", "cache_last_time", "cache_last_channel_len")
ENCODER_OUTPUTS = ("outputs", "encoded_lengths", "cache_last_channel_next", "cache_last_time_next",
                   "cache_last_channel_next_len")
DECODER_JOINT_INPUTS = ("encoder_outputs", "targets", "target_length", "input_states_1", "input_states_2")
DECODER_JOINT_OUTPUTS = ("outputs", "prednet_lengths", "output_states_1", "output_states_2")

# The multitalker export's interface (what parakeet-rs runs for multitalker-parakeet-streaming):
# batch-first caches, the speaker masks as real encoder inputs, and a decoder_joint fed one
# encoder frame as [B, T, D] without a target_length input.
MULTITALKER_ENCODER_INPUTS = ("processed_signal", "processed_signal_length", "cache_last_channel",
                              "cache_last_time", "cache_last_channel_len", "spk_targets", "bg_spk_targets")
MULTITALKER_ENCODER_OUTPUTS = ("encoded", "encoded_len", "cache_last_channel_next", "cache_last_time_next",
                               "cache_last_channel_len_next")
MULTITALKER_DECODER_JOINT_INPUTS = ("encoder_outputs", "targets", "input_states_1", "input_states_2")
MULTITALKER_DECODER_JOINT_OUTPUTS = ("outputs", "prednet_lengths", "states_1", "states_2")
MULTITALKER_CONFIG_FILE = "multitalker_config.json"

# A hybrid RNNT-CTC model's CTC head (NeMo's ConvASRDecoder: kernel-1 Conv1d, then log_softmax), a graph
# of its own on the encoder graph's output: NeMo's names (ConvASRDecoder.input_types / output_types),
# ``encoder_output [B, D, T]`` -> ``logprobs [B, T, V+1]``.
CTC_INPUTS = ("encoder_output",)
CTC_OUTPUTS = ("logprobs",)

# A prompt-conditioned model's prompt kernel (``PromptStreamingMixin._apply_prompt_to_encoded``), a graph of
# its own on the encoder graph's output: ``encoder_output [B, D, T]`` and ``prompt_index [B]`` (int64, the
# locale's one-hot column, built inside the graph) -> ``prompted_encoder_output [B, D, T]``. Its weights keep
# NeMo's names and layout (``prompt_kernel.0.weight [2D, D + P]``, ``prompt_kernel.2.weight [D, 2D]``).
PROMPT_INPUTS = ("encoder_output", "prompt_index")
PROMPT_OUTPUTS = ("prompted_encoder_output",)
PROMPT_WEIGHTS = ("prompt_kernel.0.weight", "prompt_kernel.0.bias", "prompt_kernel.2.weight", "prompt_kernel.2.bias")


@dataclass(frozen=True)
class GraphInterface:
    """Input and output names of an export's graphs, by role, so the runtime reads either interface.

    ``nemo``: NeMo's own export names (``forward_for_export``, ``RNNTDecoderJoint``).
    ``multitalker``: the multitalker export's names, with ``spk_targets``/``bg_spk_targets``.
    """

    name: str
    encoder_inputs: tuple[str, ...]  # signal, signal length, channel cache, time cache, channel cache length[, masks]
    encoder_outputs: tuple[str, ...]  # encoded, encoded length, next channel, next time, next channel length
    decoder_joint_inputs: tuple[str, ...]  # encoder frame, targets, [target_length,] states 1, states 2
    decoder_joint_outputs: tuple[str, ...]  # logits, prednet lengths, next states 1, next states 2
    encoder_frame_layout: str  # decoder_joint's encoder_outputs: "BDT" (NeMo) or "BTD"
    ctc_inputs: tuple[str, ...] = CTC_INPUTS  # a hybrid model's CTC head: encoder output [B, D, T]
    ctc_outputs: tuple[str, ...] = CTC_OUTPUTS  # its log-probabilities [B, T, V+1]
    prompt_inputs: tuple[str, ...] = PROMPT_INPUTS  # a prompted model's kernel: encoder output, prompt index
    prompt_outputs: tuple[str, ...] = PROMPT_OUTPUTS  # the prompted encoder output [B, D, T]

    @property
    def speaker_masks(self) -> bool:
        return len(self.encoder_inputs) > 5

    @property
    def target_length(self) -> bool:
        return len(self.decoder_joint_inputs) > 4


INTERFACES = {
    "nemo": GraphInterface("nemo", ENCODER_INPUTS, ENCODER_OUTPUTS, DECODER_JOINT_INPUTS, DECODER_JOINT_OUTPUTS,
                           "BDT"),
    "multitalker": GraphInterface("multitalker", MULTITALKER_ENCODER_INPUTS, MULTITALKER_ENCODER_OUTPUTS,
                                  MULTITALKER_DECODER_JOINT_INPUTS, MULTITALKER_DECODER_JOINT_OUTPUTS, "BTD"),
}


def interface_of(metadata: Mapping[str, Any]) -> GraphInterface:
    """The interface a graph's metadata names (exports without the key use NeMo's names)."""
    name = metadata.get("interface", "nemo")
    if name not in INTERFACES:
        raise GraphInterfaceError(f"unknown graph interface {name!r}; known: {', '.join(INTERFACES)}")
    return INTERFACES[name]

# Keys written on every graph (model-wide) and on encoder graphs (per lookahead).
MODEL_KEYS = (
    "format", "graph", "variant", "source_sha256", "source_name", "cache_layout", "num_layers", "d_model",
    "n_mels", "conv_kernel_size", "subsampling_factor", "att_context_sizes", "vocab_size", "blank_id",
    "pred_rnn_layers", "pred_hidden", "max_symbols", "encoder_config", "debug_taps", "interface",
    "speaker_kernel_layers", "background_speaker_kernel", "ctc_head", "num_prompts", "prompt_dictionary",
    "first_chunk_modes", "int8_quantization",
)
ENCODER_KEYS = (
    "att_context_size", "lookahead", "chunk_size", "shift_size", "pre_encode_cache_size",
    "drop_extra_pre_encoded", "valid_out_len", "last_channel_cache_size", "cache_drop_size", "sampling_frames",
    "cache_last_channel_shape", "cache_last_time_shape", "first_chunk",
)
METADATA_KEYS = MODEL_KEYS + ENCODER_KEYS
# The encoder config keys written as ``encoder_config``: what a runtime needs to rebuild the chunk schedule
# (streaming_parity.interface.chunking).
STREAMING_ENCODER_KEYS = ("att_context_style", "att_context_size", "subsampling", "subsampling_factor",
                          "causal_downsampling", "n_layers", "d_model", "feat_in", "conv_kernel_size")


class ExportDirError(BadInput, ValueError):
    """The export directory is incomplete or inconsistent; nothing was run."""


class MissingGraphError(ExportDirError):
    """A graph the runtime needs is not in the export directory."""


class SourceMismatchError(ExportDirError):
    """The graphs were exported from a different ``.nemo`` than the one being compared."""


class GraphInterfaceError(ExportDirError):
    """A graph lacks an input or output the runtime feeds or reads, or its metadata is incomplete."""


class ForeignArtifactError(ExportDirError):
    """A directory that is not a complete artifact of a recognised foreign format (``foreign_read``)."""


class ArtifactContradiction(ForeignArtifactError):
    """A value the artifact states (metadata, shape, file) contradicts the ``.nemo`` or another file."""


def context_tag(att_context_size: Sequence[int]) -> str:
    return f"{int(att_context_size[0])}_{int(att_context_size[1])}"


# The encoder weights, written once per precision and read by every lookahead's graph (and tap graph).
SHARED_ENCODER_WEIGHTS = "encoder.weights"
SHARED_ENCODER_WEIGHTS_INT8 = "encoder.int8.weights"


def encoder_file(att_context_size: Sequence[int], variant: str = "float32", debug: bool = False, *,
                 first: bool = False) -> str:
    """An encoder graph's file. ``first``: the plain first chunk's graph (``encoder-L_R.first.onnx``): NeMo's
    default streaming gives the first chunk its own size (``chunk_size[0]`` mel frames, no pre-encode cache)
    and keeps every pre-encoded frame (``drop_extra_pre_encoded`` 0), where every later chunk drops the two
    frames its cache prefix adds; the two graphs share their weights file."""
    return _graph_file(f"encoder-{context_tag(att_context_size)}{'.first' if first else ''}", variant, debug)


def decoder_joint_file(variant: str = "float32", debug: bool = False) -> str:
    return _graph_file("decoder_joint", variant, debug)


def ctc_file() -> str:
    """The CTC head's graph. One float32 graph serves every lookahead and the int8 variant too: it is a
    single projection of the encoder output (ONNX Runtime's CPU ConvInteger takes uint8 weights only, so
    dynamic quantization would leave its Conv in float32 anyway)."""
    return "ctc.onnx"


def prompt_file(variant: str = "float32") -> str:
    """A prompt-conditioned model's prompt kernel graph: one per precision, serving every lookahead (no
    debug variant: its one output is the ``prompt`` tap)."""
    return _graph_file("prompt", variant, False)


def _graph_file(stem: str, variant: str, debug: bool) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown graph variant {variant!r}; known: {', '.join(VARIANTS)}")
    if debug and variant != "float32":
        raise ValueError("debug (tap) graphs are exported for float32 only")
    suffix = ".int8" if variant == "int8" else (".debug" if debug else "")
    return f"{stem}{suffix}.onnx"


def prompt_settings(metadata: Mapping[str, Any], where: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    """``num_prompts`` and the ``prompt_dictionary`` as sorted (locale, column) pairs from a graph's decoded
    metadata (0 and empty for a model without a prompt kernel); an index outside the one-hot width, or a
    dictionary without prompts, is refused naming ``where``."""
    try:
        num_prompts = int(metadata.get("num_prompts") or 0)
    except (TypeError, ValueError):
        raise GraphInterfaceError(f"{where}: metadata num_prompts {metadata.get('num_prompts')!r} is not a "
                                  "number") from None
    dictionary = metadata.get("prompt_dictionary") or {}
    if not isinstance(dictionary, Mapping):
        raise GraphInterfaceError(f"{where}: metadata prompt_dictionary is not a mapping of locale to index")
    pairs = []
    for locale, index in dictionary.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_prompts:
            raise GraphInterfaceError(f"{where}: metadata prompt_dictionary[{locale!r}] = {index!r} is not a "
                                      f"one-hot column of the {num_prompts} prompts (num_prompts)")
        pairs.append((str(locale), index))
    if num_prompts < 0 or (pairs and not num_prompts):
        raise GraphInterfaceError(f"{where}: metadata num_prompts {num_prompts} with a prompt_dictionary")
    return num_prompts, tuple(sorted(pairs))


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """JSON-encode every value (ONNX metadata_props are strings)."""
    return {key: json.dumps(value) for key, value in values.items()}


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    decoded = {}
    for key, text in props.items():
        try:
            decoded[key] = json.loads(text)
        except json.JSONDecodeError:
            decoded[key] = text
    return decoded


def check_external_data(model, graph_path: Path) -> None:
    """Every tensor stored outside the graph file must lie in the graph's directory and within its file.

    ONNX Runtime (and ``onnx.load``) open the file an initializer names relative to the graph and read
    ``length`` bytes at ``offset``: a location with ``..``, an absolute path or a symlink would read
    files outside the export, and an offset or length past the file's end (or a byte count that is not
    what the tensor's shape needs) is a lie told before any weight is read
    (``streaming_parity.core.safe_files.check_onnx_external_data``).
    """
    check_onnx_external_data(model, graph_path)


def load_graph(path: Path):
    """A graph's ``ModelProto`` without its external weights, after checking where they lie and their sizes."""
    return load_onnx_graph(path)


def read_graph_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of one graph without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise MissingGraphError(f"{path}: graph not found")
    model = load_graph(path)
    return decode_metadata({p.key: p.value for p in model.metadata_props})


@dataclass(frozen=True)
class CacheShapes:
    """Cache shapes of a graph in its own layout; ``"B"`` marks the batch axis."""

    layout: str
    channel: tuple[Any, ...]
    time: tuple[Any, ...]

    @classmethod
    def for_model(cls, layout: str, num_layers: int, cache_size: int, d_model: int, kernel: int) -> CacheShapes:
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache layout must be one of {', '.join(CACHE_LAYOUTS)}, not {layout!r}")
        if layout == "batch-first":  # ConformerEncoder.forward_for_export transposes to [B, L, ...]
            return cls(layout, ("B", num_layers, cache_size, d_model), ("B", num_layers, d_model, kernel - 1))
        return cls(layout, (num_layers, "B", cache_size, d_model), (num_layers, "B", d_model, kernel - 1))

    def concrete(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        fill = lambda shape: tuple(batch if d == "B" else int(d) for d in shape)  # noqa: E731
        return fill(self.channel), fill(self.time)


def read_view(directory: Path):
    """``parity fingerprint``'s view of an ONNX export directory (None when ``directory`` holds no graph).

    Initializers are named after NeMo parameters where the exporter kept the names.
    """
    from streaming_parity.interface.model_view import ModelView, TensorInfo, tokenizer_pieces

    directory = Path(directory)
    if not directory.is_dir():
        return None
    graphs = sorted(p for p in directory.glob("*.onnx") if ".int8." not in p.name and "debug" not in p.name)
    if not graphs:
        return None
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for graph_path in graphs:
        model = load_graph(graph_path)
        metadata.update({p.key: p.value for p in model.metadata_props})
        for init in model.graph.initializer:
            if init.name in tensors or not init.dims:
                continue
            tensors[init.name] = TensorInfo(tuple(init.dims), str(init.data_type), hashlib.sha256(
                init.raw_data if init.raw_data else init.SerializeToString()).hexdigest())
    config = {}
    config_json = directory / "config.json"
    if config_json.exists():
        config = json.loads(config_json.read_text())
    vocab_txt = directory / "vocab.txt"
    vocabulary = vocab_txt.read_text().splitlines() if vocab_txt.exists() else None
    tokenizer = directory / "tokenizer.model"
    pieces = tokenizer_pieces(tokenizer.read_bytes()) if tokenizer.exists() else None
    view = ModelView("onnx", directory, "pytorch", tensors, config, vocabulary=vocabulary, tokenizer_pieces=pieces)
    view.config.setdefault("onnx_metadata", metadata)
    decoded = decode_metadata(metadata)
    # A multitalker export states its speaker kernels in every graph's metadata (what the runtime streams
    # with, beside the spk_targets / bg_spk_targets inputs); stated as NeMo's config does
    # (SpeakerKernelMixin's top-level keys), so the fingerprint compares them with the kernels' weights
    # rather than reading a config without them as a single-speaker claim.
    layers = decoded.get("speaker_kernel_layers") or []
    if layers:
        for key, value in (("spk_kernel_type", "ff"), ("spk_kernel_layers", [int(i) for i in layers]),
                           ("add_bg_spk_kernel", bool(decoded.get("background_speaker_kernel")))):
            view.config.setdefault(key, value)
    # A prompt-conditioned export states its prompt as NeMo's config does (``model_defaults``), so the
    # fingerprint compares it with the prompt kernel's weights (prompt.onnx keeps their names and shapes).
    try:
        num_prompts, dictionary = prompt_settings(decoded, str(directory))
    except GraphInterfaceError as error:
        view.notes.append(str(error))
        num_prompts, dictionary = 0, ()
    if num_prompts:
        view.config.setdefault("model_defaults", {
            "initialize_prompt_feature": True, "num_prompts": num_prompts, "prompt_dictionary": dict(dictionary)})
    return view


# -- reading an export directory: what the runtime runs (described.DescribedExport) -------------------------

def describe_export(directory: str | Path, *, dtype: str = "float32", taps: bool = True,
                    nemo_path: str | Path | None = None) -> DescribedExport:
    """This project's export directory, read for ``dtype`` (``float32`` or ``int8``) into a ``DescribedExport``.

    Every graph's metadata is checked before anything runs: its format version, its interface, that it belongs
    with ``decoder_joint`` (the same source, layout and model), each encoder's lookahead, cache shapes and chunk
    schedule against the encoder config, the CTC and prompt graphs' settings; and ``vocab.txt``, the front end and,
    given ``nemo_path``, the ``.nemo`` the graphs were exported from (its sha256). ``taps``: run the float32 tap
    graphs (``.debug``) where exported.
    """
    if dtype not in VARIANTS:
        raise InvalidInput(f"onnx backend runs float32 or int8, not {dtype}")
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingGraphError(f"{directory}: ONNX export directory not found")
    return _ExportReader(directory, dtype, taps and dtype == "float32").describe(nemo_path)


class _ExportReader:
    """One export directory read for one dtype; ``decoder_joint``'s metadata holds the model-wide keys every other
    graph is checked against."""

    def __init__(self, directory: Path, dtype: str, use_taps: bool):
        self.directory = directory
        self.dtype = dtype
        self.use_taps = use_taps

    def describe(self, nemo_path: str | Path | None) -> DescribedExport:
        self.decoder_joint, self.metadata = self._graph(decoder_joint_file)
        meta = self.metadata
        if nemo_path is not None:
            self._check_source(Path(nemo_path))
        info = self._model_info(meta)
        modes = self._first_chunk_modes()
        encoders = {}
        for context in info.att_context_sizes:  # every encoder graph now: a broken export fails before anything runs
            for first in (False, True) if "plain" in modes else (False,):
                encoders[(context, first)] = self._encoder(context, first, info, encoders.get((context, False)))
        frontend = self._frontend(info.n_mels)
        return DescribedExport(
            directory=self.directory, dtype=self.dtype, info=info,
            max_symbols=meta["max_symbols"],  # None: no per-frame limit (NeMo's max_symbols=None)
            interface=interface_of(meta), cache_layout=str(meta["cache_layout"]), first_chunk_modes=modes,
            decoder_joint=self.decoder_joint, encoders=encoders, frontend=frontend,
            ctc=self._ctc() if info.ctc_head else None, prompt=self._prompt(info) if info.prompted else None,
            int8_graphs=self._int8_graphs(info), int8_quantization=meta.get("int8_quantization"))

    def _graph(self, file_for) -> tuple[GraphFile, dict[str, Any]]:
        """``file_for(variant, debug)`` names the graph; the debug (tap) variant is preferred when wanted. Returns the
        ``GraphFile`` and the metadata, checked."""
        candidates = [self.directory / file_for(self.dtype, False)]
        if self.use_taps:
            candidates.insert(0, self.directory / file_for("float32", True))
        for path in candidates:
            if path.is_file():
                metadata = own_graph_metadata(path)
                return GraphFile(path, taps=tuple(metadata.get("debug_taps") or ())), metadata
        raise MissingGraphError(f"{self.directory}: missing graph {candidates[-1].name} "
                                f"(export with parity export-onnx{' --int8' if self.dtype == 'int8' else ''})")

    def _check_source(self, nemo_path: Path) -> None:
        from streaming_parity.core.nemo_file import sha256_file

        actual = sha256_file(nemo_path)
        recorded = self.metadata.get("source_sha256")
        if actual != recorded:
            raise SourceMismatchError(
                f"{self.directory}: graphs were exported from {self.metadata.get('source_name')} "
                f"(sha256 {str(recorded)[:12]}...), not from {nemo_path.name} (sha256 {actual[:12]}...)")

    def _model_info(self, meta: Mapping[str, Any]) -> ModelInfo:
        vocabulary = self._vocabulary(int(meta["vocab_size"]))
        exported = self._exported_contexts()
        # The export's own copy of the locale -> one-hot column map (a shifted copy shows at the prompt tap).
        num_prompts, prompt_dictionary = prompt_settings(meta, self.decoder_joint.path.name)
        return ModelInfo(
            num_layers=int(meta["num_layers"]), d_model=int(meta["d_model"]), n_mels=int(meta["n_mels"]),
            conv_kernel_size=int(meta["conv_kernel_size"]), subsampling_factor=int(meta["subsampling_factor"]),
            att_context_sizes=exported, vocabulary=tuple(vocabulary), blank_id=int(meta["blank_id"]),
            pred_layers=int(meta["pred_rnn_layers"]), pred_hidden=int(meta["pred_hidden"]),
            max_symbols=int(meta["max_symbols"] or 0),
            encoder_config=EncoderConfig.from_mapping(meta["encoder_config"]),  # the export's streaming keys
            speaker_kernel_layers=tuple(int(i) for i in meta.get("speaker_kernel_layers") or ()),
            background_speaker_kernel=bool(meta.get("background_speaker_kernel", False)),
            ctc_head=bool(meta.get("ctc_head")),
            num_prompts=num_prompts, prompt_dictionary=prompt_dictionary,
        )

    def _vocabulary(self, size: int) -> list[str]:
        path = self.directory / "vocab.txt"
        if not path.is_file():
            raise MissingGraphError(f"{self.directory}: vocab.txt not found")
        pieces = path.read_text(encoding="utf-8").split("\n")[:-1]
        if len(pieces) != size:
            raise ExportDirError(f"{path}: {len(pieces)} pieces, metadata vocab_size is {size}")
        return pieces

    def _exported_contexts(self) -> tuple[tuple[int, int], ...]:
        # NeMo's att_context_size format
        model_contexts = normalize_att_context_sizes(self.metadata["att_context_sizes"])
        exported = tuple(c for c in model_contexts
                         if (self.directory / encoder_file(c, variant=self.dtype)).is_file())
        if not exported:
            expected = ", ".join(encoder_file(c, variant=self.dtype) for c in model_contexts)
            raise MissingGraphError(f"{self.directory}: no encoder graph; expected one of {expected}")
        return exported

    def _first_chunk_modes(self) -> tuple[str, ...]:
        """The modes the export states it streams (``first_chunk_modes``; a ``/2`` export: pad-and-drop only)."""
        modes = tuple(self.metadata.get("first_chunk_modes") or ("pad-and-drop",))
        unknown = [m for m in modes if m not in ("plain", "pad-and-drop")]
        if unknown or "pad-and-drop" not in modes:
            raise GraphInterfaceError(f"{self.decoder_joint.path.name}: metadata first_chunk_modes {list(modes)}: "
                                      "expected pad-and-drop, and plain where the export has first-chunk graphs")
        return modes

    def _encoder(self, context: tuple[int, int], first: bool, info: ModelInfo,
                 steady: EncoderGraph | None) -> EncoderGraph:
        """The encoder graph of one lookahead, or (``first``) its plain first chunk's, whose schedule must be the
        ``steady`` graph's."""
        file, meta = self._graph(lambda variant, debug: encoder_file(context, variant, debug, first=first))
        name = file.path.name
        if bool(meta.get("first_chunk", False)) != first:
            raise ExportDirError(f"{name}: metadata first_chunk = {meta.get('first_chunk', False)!r}, "
                                 f"but it was opened as the {'first' if first else 'later'} chunks' graph")
        for key in ("source_sha256", "cache_layout", "num_layers", "d_model", "interface"):
            if meta.get(key) != self.metadata.get(key):
                raise ExportDirError(f"{name}: metadata {key} = {meta.get(key)!r}, but "
                                     f"{self.decoder_joint.path.name} has {self.metadata.get(key)!r}")
        if tuple(meta.get("att_context_size", ())) != context:
            raise ExportDirError(f"{name}: metadata att_context_size {meta.get('att_context_size')}, "
                                 f"file name says {list(context)}")
        shapes = _cache_shapes(meta, info)
        streaming = _streaming_from_metadata(name, meta, info)
        if steady is not None and steady.streaming != streaming:
            raise ExportDirError(f"{name}: streaming metadata {streaming.as_dict()} differs from the "
                                 f"other graph of {list(context)}: {steady.streaming.as_dict()}")
        return EncoderGraph(file, context, first, streaming, shapes, interface_of(meta))

    def _frontend(self, n_mels: int) -> Frontend:
        if not (self.directory / "frontend.npz").is_file() or not (self.directory / "frontend.json").is_file():
            raise MissingGraphError(f"{self.directory}: frontend.npz / frontend.json not found")
        frontend = Frontend.load(self.directory)
        if frontend.config.n_mels != n_mels:
            raise ExportDirError(f"frontend.json: n_mels {frontend.config.n_mels}, encoder expects {n_mels}")
        return frontend

    def _belongs(self, path: Path, keys: Sequence[str]) -> GraphFile:
        """A side graph's ``GraphFile``, its metadata checked and agreeing with ``decoder_joint``'s on ``keys``."""
        metadata = own_graph_metadata(path)
        for key in keys:
            if metadata.get(key) != self.metadata.get(key):
                raise ExportDirError(f"{path.name}: metadata {key} = {metadata.get(key)!r}, but "
                                     f"{self.decoder_joint.path.name} has {self.metadata.get(key)!r}")
        return GraphFile(path, taps=tuple(metadata.get("debug_taps") or ()))

    def _ctc(self) -> GraphFile:
        """A hybrid model's CTC head (``ctc.onnx``), checked against the export it belongs to."""
        path = self.directory / ctc_file()
        if not path.is_file():
            raise MissingGraphError(f"{self.directory}: missing graph {path.name} (the metadata declares a CTC head; "
                                    "export with parity export-onnx)")
        return self._belongs(path, ("source_sha256", "vocab_size", "d_model", "ctc_head"))

    def _prompt(self, info: ModelInfo) -> GraphFile:
        """A prompt-conditioned model's ``prompt.onnx`` (``prompt.int8.onnx`` for int8), checked against the
        export it belongs to: the same source, width, one-hot width and dictionary, and a kernel whose weights
        have the shapes those imply (its declared inputs are checked when the runtime opens it)."""
        path = self.directory / prompt_file(self.dtype)
        if not path.is_file():
            raise MissingGraphError(
                f"{self.directory}: missing graph {path.name}: {self.decoder_joint.path.name} declares a prompt-"
                f"conditioned model ({info.num_prompts} prompts) and its prompt kernel runs in {path.name} "
                f"(export with parity export-onnx{' --int8' if self.dtype == 'int8' else ''})")
        file = self._belongs(path, ("source_sha256", "d_model", "num_prompts", "prompt_dictionary"))
        d_model, num_prompts = info.d_model, info.num_prompts
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
        return file

    def _int8_graphs(self, info: ModelInfo) -> tuple[Path, ...]:
        """The int8 graphs an int8 run reads: every lookahead's encoders, ``decoder_joint`` and a prompt graph."""
        if self.dtype != "int8":
            return ()
        paths = [self.directory / encoder_file(c, variant="int8", first=first) for c in info.att_context_sizes
                 for first in (False, True)]
        paths.append(self.directory / decoder_joint_file("int8"))
        if info.prompted:
            paths.append(self.directory / prompt_file("int8"))
        return tuple(path for path in paths if path.is_file())


def own_graph_metadata(path: Path) -> dict[str, Any]:
    """A graph's metadata, refused unless ``parity export-onnx`` wrote it in a format this runtime reads, with an
    interface it knows."""
    metadata = read_graph_metadata(path)
    found = metadata.get("format")
    if found not in READABLE_FORMATS:
        older = isinstance(found, str) and found.startswith(FORMAT_FAMILY)
        raise GraphInterfaceError(f"{path.name}: metadata format {found!r}, expected {FORMAT!r} " + (
            "(written by an older parity export-onnx: export again)" if older
            else "(not exported by parity export-onnx?)"))
    interface_of(metadata)
    return metadata


def _cache_shapes(meta: Mapping[str, Any], info: ModelInfo) -> CacheShapes:
    shapes = CacheShapes(str(meta["cache_layout"]), tuple(meta["cache_last_channel_shape"]),
                         tuple(meta["cache_last_time_shape"]))
    expected = CacheShapes.for_model(shapes.layout, info.num_layers, int(meta["last_channel_cache_size"]),
                                     info.d_model, info.conv_kernel_size)
    if shapes != expected:
        raise GraphInterfaceError(f"metadata cache shapes {shapes.channel} / {shapes.time} contradict "
                                  f"layout {shapes.layout} of the model ({expected.channel} / {expected.time})")
    return shapes


def _streaming_from_metadata(name: str, meta: Mapping[str, Any], info: ModelInfo) -> StreamingConfig:
    """The lookahead's chunk schedule as the graph's metadata records it, which must be the one derived from the
    encoder config (``streaming_parity.interface.chunking``)."""
    pair = lambda key: (int(meta[key][0]), int(meta[key][1]))  # noqa: E731
    recorded = StreamingConfig(
        att_context_size=pair("att_context_size"), chunk_size=pair("chunk_size"), shift_size=pair("shift_size"),
        pre_encode_cache_size=pair("pre_encode_cache_size"),
        drop_extra_pre_encoded=int(meta["drop_extra_pre_encoded"]), valid_out_len=int(meta["valid_out_len"]),
        last_channel_cache_size=int(meta["last_channel_cache_size"]), cache_drop_size=int(meta["cache_drop_size"]),
        subsampling_factor=int(meta["subsampling_factor"]), sampling_frames=pair("sampling_frames"))
    derived = StreamingConfig.from_encoder_config(info.encoder_config, recorded.att_context_size)
    if derived != recorded:
        raise GraphInterfaceError(f"{name}: streaming metadata {recorded.as_dict()} differs from the "
                                  f"schedule derived from the encoder config {derived.as_dict()}")
    return recorded

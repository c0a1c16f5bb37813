"""sherpa-onnx's own runtime as a backend: ``OnlineRecognizer.from_transducer`` on a sherpa-onnx directory.

It runs as a user runs it: sherpa-onnx's front end (kaldi-native-fbank), its chunking and its greedy
decoding, with the audio fed one chunk at a time (``chunk_shift`` mel frames of samples) and the
recognizer decoding whenever it says it is ready. Each ``decode_stream`` call is one step; the step
records the tokens that call added. Nothing else is visible from outside the runtime, so the backend
is transcript-level: no taps, no caches (``Capabilities.input == "audio"``).

How sherpa-onnx cuts a stream (``OnlineRecognizerTransducerNeMoImpl::DecodeStreams`` and ``IsReady``):
chunk ``k`` is the ``window_size`` frames starting at frame ``k * chunk_shift``, decoded once
``k * chunk_shift + window_size < frames ready``; the encoder is fed ``length = window_size``. The
stream ends when no full window is left, so the audio is followed by ``window_size`` frames of silence
(``input_audio``), enough to flush every frame the way NeMo's buffer keeps all outputs of its last chunk.

What a directory must hold is what the runtime reads (``InitEncoder`` in
``online-transducer-nemo-model.cc``): the integer keys of ``REQUIRED_KEYS``, ``normalize_type`` (absent
reads as ""), and a static feature axis on the encoder's first input. Every version of sherpa-onnx's
export scripts writes them; ``feat_dim`` and ``chunk_size_ms``, which only the Nemotron scripts add, are
checked against the graph when present. The lookahead is the graph's own: the encoder is run on the
runtime's first window (and on one a frame longer), and the ``R + 1`` frames it returns per chunk must
be the ``chunk_shift`` the runtime advances by. Given the ``.nemo``, every key is also held to it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.backends.sherpa_onnx.frontend import SAMPLE_RATE, fbank
from streaming_parity.core.errors import InputNotFound, InvalidInput, UnsafeArtifact, Unsupported
from streaming_parity.core.safe_files import load_onnx_graph, read_token_table
from streaming_parity.interface.backend import AudioInputBackend, Capabilities
from streaming_parity.interface.chunking import Chunk, StreamingConfig
from streaming_parity.interface.model_info import ModelInfo
from streaming_parity.interface.types import DecoderState, StepOutput, StreamingState

CAPABILITIES = Capabilities(first_chunk_modes=("pad-and-drop",), taps=(), caches=False, offline=False,
                            teacher_forcing=False, input="audio")
GRAPHS = ("encoder", "decoder", "joiner")
TOKENS = "tokens.txt"
BLANK = "<blk>"
HOP = SAMPLE_RATE // 100  # 10 ms mel frames
# The keys sherpa-onnx's runtime cannot run without: OnlineTransducerNeMoModel::Impl::InitEncoder
# (sherpa-onnx/csrc/online-transducer-nemo-model.cc) reads each with SHERPA_ONNX_READ_META_DATA
# (sherpa-onnx/csrc/macros.h), which ends the whole process (_Exit) when a key is absent or empty or its
# value is negative; so such a directory is refused here, before the runtime opens it. Every version of
# sherpa-onnx's export scripts writes them.
REQUIRED_KEYS = ("vocab_size", "window_size", "chunk_shift", "subsampling_factor", "pred_rnn_layers", "pred_hidden",
                 "cache_last_channel_dim1", "cache_last_channel_dim2", "cache_last_channel_dim3",
                 "cache_last_time_dim1", "cache_last_time_dim2", "cache_last_time_dim3")
# Written only by the Nemotron scripts (feat_dim since 4fa889824, chunk_size_ms since 415b8c2aa) and never
# read by the runtime, which takes the feature dimension from the encoder input's axis 1 and cuts the
# stream by window_size / chunk_shift; what they state is checked against the graph when present.
OPTIONAL_KEYS = ("feat_dim", "chunk_size_ms")
# normalize_type is read with SHERPA_ONNX_READ_META_DATA_STR_ALLOW_EMPTY (absent reads as ""), and the
# runtime maps "NA" to "". "No normalisation" as the scripts write it: "" for NeMo's "NA", or the literal
# "None" (the first FastConformer script, whatever the model used; later ones str(None) for a null one).
NO_NORMALIZATION = ("", "NA", "None")
NEMO_NO_NORMALIZATION = ("NA", None, "None", "none", "")
# RunEncoder feeds the encoder's inputs by position: features (B, C, T), length, cache_last_channel,
# cache_last_time, cache_last_channel_len.
ENCODER_INPUTS = ("features", "length", "cache_last_channel", "cache_last_time", "cache_last_channel_len")


def is_lookahead_dir(directory: Path) -> bool:
    return directory.is_dir() and all((directory / f"{g}.onnx").is_file() for g in GRAPHS) and (
        directory / TOKENS).is_file()


def lookahead_dirs(path: Path) -> list[Path]:
    """``path`` itself when it holds one lookahead's files, else its subdirectories that do."""
    path = Path(path)
    if is_lookahead_dir(path):
        return [path]
    if not path.is_dir():
        return []
    return [sub for sub in sorted(path.iterdir()) if not sub.is_symlink() and is_lookahead_dir(sub)]


def detect(path: str | Path) -> str | None:
    return "sherpa-onnx" if lookahead_dirs(Path(path)) else None


@dataclass
class Lookahead:
    directory: Path
    context: tuple[int, int]
    window: int  # mel frames handed to the encoder per chunk
    shift: int  # mel frames the stream advances per chunk
    metadata: dict[str, int]  # the required keys, and the optional ones the encoder states
    feature_dim: int  # the encoder input's axis 1, which sherpa-onnx reads as its feature dimension
    normalize_type: str  # as the runtime reads it ("" when absent)
    frames: int  # encoder frames the graph returns per window, every one of which the runtime decodes


def _read_metadata(encoder: Path, props: dict[str, str]) -> dict[str, int]:
    missing = [key for key in REQUIRED_KEYS if not props.get(key, "").strip()]
    if missing:
        raise UnsafeArtifact(f"{encoder}: metadata key{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(k) for k in missing)} missing (sherpa-onnx's runtime reads every one "
                             "of them and exits without it: online-transducer-nemo-model.cc, InitEncoder)")
    metadata = {}
    for key in (*REQUIRED_KEYS, *(k for k in OPTIONAL_KEYS if props.get(k, "").strip())):
        try:
            metadata[key] = int(props[key].strip())
        except ValueError:
            raise UnsafeArtifact(f"{encoder}: metadata {key} = {props[key]!r} is not an integer") from None
        if key in REQUIRED_KEYS and metadata[key] < 0:
            raise UnsafeArtifact(f"{encoder}: metadata {key} = {metadata[key]} is negative (sherpa-onnx's runtime "
                                 "exits on it)")
    return metadata


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _check_inputs(encoder: Path, model, metadata: dict[str, int]) -> int:
    """The encoder's inputs as the runtime feeds them; returns the feature dimension (static axis 1 of
    the first input, where InitEncoder reads it)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != len(ENCODER_INPUTS):
        raise UnsafeArtifact(f"{encoder}: {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); sherpa-onnx's "
                             f"runtime feeds NeMo's cache-aware encoder {len(ENCODER_INPUTS)}: "
                             f"{', '.join(ENCODER_INPUTS)}")
    signal = _dims(inputs[0])
    if len(signal) != 3 or not signal[1]:
        raise UnsafeArtifact(f"{encoder}: its first input has no static feature axis (axis 1 of {signal}; "
                             "sherpa-onnx reads the feature dimension from it)")
    # The runtime builds its zero caches from the metadata alone; a static axis of the graph that disagrees
    # would fail inside the runtime's first decode, so it is named here instead.
    for position, cache in ((2, "cache_last_channel"), (3, "cache_last_time")):
        dims = _dims(inputs[position])
        if len(dims) != 4:
            raise UnsafeArtifact(f"{encoder}: input {inputs[position].name} has {len(dims)} axes, sherpa-onnx's "
                                 f"runtime feeds a 4-axis {cache}")
        for axis in (1, 2, 3):
            key = f"{cache}_dim{axis}"
            if dims[axis] is not None and dims[axis] != metadata[key]:
                raise UnsafeArtifact(f"{encoder}: {key} = {metadata[key]} contradicts the graph's "
                                     f"{inputs[position].name} axis {axis} = {dims[axis]}")
    return signal[1]


def _contradiction(encoder: Path, key: str, stated: Any, nemo_key: str, expected: Any) -> UnsafeArtifact:
    return UnsafeArtifact(f"{encoder}: {key} = {stated!r} contradicts the .nemo's {nemo_key} = {expected!r}")


def _check_against_nemo(encoder: Path, metadata: dict[str, int], feature_dim: int, normalize_type: str | None,
                        config) -> None:
    """What the metadata states, against the .nemo it claims to come from. ``window_size`` is held to the
    lookahead ``chunk_shift`` states; the graph is then probed to return as many frames per chunk."""
    encoder_config = config.encoder
    expected = {"subsampling_factor": ("encoder.subsampling_factor", encoder_config.subsampling_factor),
                "pred_rnn_layers": ("decoder.prednet.pred_rnn_layers", config.decoder.pred_rnn_layers),
                "pred_hidden": ("decoder.prednet.pred_hidden", config.decoder.pred_hidden),
                "cache_last_channel_dim1": ("encoder.n_layers", encoder_config.n_layers),
                "cache_last_channel_dim3": ("encoder.d_model", encoder_config.d_model),
                "cache_last_time_dim1": ("encoder.n_layers", encoder_config.n_layers),
                "cache_last_time_dim2": ("encoder.d_model", encoder_config.d_model),
                "cache_last_time_dim3": ("encoder.conv_kernel_size - 1", encoder_config.conv_kernel_size - 1)}
    for key, (nemo_key, value) in expected.items():
        if metadata[key] != value:
            raise _contradiction(encoder, key, metadata[key], nemo_key, value)
    if feature_dim != encoder_config.feat_in:
        raise _contradiction(encoder, "feature dimension (axis 1 of the first input)", feature_dim,
                             "encoder.feat_in", encoder_config.feat_in)
    # The runtime's streaming front end never applies normalize_type (only offline-stream.cc reads it),
    # but it states what the model expects, so it is held to the .nemo.
    stated = "" if normalize_type is None else normalize_type.strip()
    normalize = config.preprocessor.normalize
    stated_none, nemo_none = stated in NO_NORMALIZATION, normalize in NEMO_NO_NORMALIZATION
    if stated_none != nemo_none or (not stated_none and stated != str(normalize)):
        key = "normalize_type" if normalize_type is not None else "normalize_type (absent, read as '')"
        raise _contradiction(encoder, key, stated if normalize_type is None else normalize_type,
                             "preprocessor.normalize", normalize)
    left, shift = metadata["cache_last_channel_dim2"], metadata["chunk_shift"]
    contexts = [c for c in encoder_config.att_context_size if c[0] == left]
    if not contexts:
        lefts = sorted({c[0] for c in encoder_config.att_context_size})
        raise _contradiction(encoder, "cache_last_channel_dim2 (left context)", left, "encoder.att_context_size left",
                             lefts[0] if len(lefts) == 1 else lefts)
    chunks = {c: StreamingConfig.from_encoder_config(encoder_config, c) for c in contexts}
    context = next((c for c, streaming in chunks.items() if streaming.chunk_size[1] == shift), None)
    if context is None:
        sizes = ", ".join(f"{s.chunk_size[1]} at {list(c)}" for c, s in chunks.items())
        raise UnsafeArtifact(f"{encoder}: chunk_shift = {shift} contradicts the .nemo's chunk_size ({sizes})")
    streaming = chunks[context]
    window = streaming.chunk_size[1] + streaming.pre_encode_cache_size[1]
    if metadata["window_size"] != window:
        raise _contradiction(encoder, "window_size", metadata["window_size"],
                             f"chunk_size + pre_encode_cache_size at {list(context)}", window)


def _probe_frames(encoder: Path, metadata: dict[str, int], feature_dim: int, threads: int) -> tuple[int, int]:
    """The encoder frames the graph returns for the runtime's first window, run as RunEncoder runs it
    (``window_size`` frames, all of them valid, zero caches of the metadata's shapes), and for a window
    one encoder frame (``subsampling_factor`` mel frames) longer. NeMo's chunked_limited export returns at
    most ``valid_out_len = R + 1`` frames, so the two counts are equal exactly when the window holds a
    whole chunk of the graph's: then the first is ``R + 1``, whatever the metadata says."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(f"{error}: sherpa-onnx's backend runs the encoder with ONNX Runtime to find its "
                          "lookahead (pip install '.[onnx]')") from error
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # a graph that refuses the window is reported below, in one line
    session = ort.InferenceSession(str(encoder), options, providers=["CPUExecutionProvider"])
    channel = tuple(metadata[f"cache_last_channel_dim{a}"] for a in (1, 2, 3))
    time_cache = tuple(metadata[f"cache_last_time_dim{a}"] for a in (1, 2, 3))
    counts = []
    for window in (metadata["window_size"], metadata["window_size"] + metadata["subsampling_factor"]):
        values = (np.zeros((1, feature_dim, window), np.float32), np.array([window], np.int64),
                  np.zeros((1, *channel), np.float32), np.zeros((1, *time_cache), np.float32),
                  np.zeros((1,), np.int64))
        feeds = {i.name: value for i, value in zip(session.get_inputs(), values)}
        try:
            encoded = session.run(None, feeds)[0]
        except Exception as error:  # noqa: BLE001 - ONNX Runtime's own failure, named with what was fed
            raise UnsafeArtifact(f"{encoder}: the encoder does not run on a window as sherpa-onnx's runtime feeds it "
                                 f"({window} frames; cache_last_channel_dim1..3 = {', '.join(map(str, channel))}, "
                                 f"cache_last_time_dim1..3 = {', '.join(map(str, time_cache))}): "
                                 f"{str(error).splitlines()[0][:200]}") from None
        if encoded.ndim != 3:
            raise UnsafeArtifact(f"{encoder}: its first output has shape {list(encoded.shape)}, not (batch, dim, "
                                 "frames) as sherpa-onnx's runtime reads it")
        counts.append(int(encoded.shape[2]))
    return counts[0], counts[1]


def _read_lookahead(directory: Path, dtype: str, config=None, threads: int = 1) -> Lookahead:
    suffix = ".int8.onnx" if dtype == "int8" else ".onnx"
    for graph in GRAPHS:
        path = directory / f"{graph}{suffix}"
        if not path.is_file():
            raise InputNotFound(f"{directory}: {path.name} not found (sherpa-onnx {dtype} graphs)")
        model = load_onnx_graph(path)  # external data inside the directory, sizes within the files
        if graph == "encoder":
            encoder_model = model
    encoder = directory / f"encoder{suffix}"
    props = {p.key: p.value for p in encoder_model.metadata_props}
    metadata = _read_metadata(encoder, props)
    feature_dim = _check_inputs(encoder, encoder_model, metadata)
    window, shift, factor = metadata["window_size"], metadata["chunk_shift"], metadata["subsampling_factor"]
    if factor <= 0 or window <= 0 or not 0 < shift <= window:
        raise UnsafeArtifact(f"{encoder}: window_size {window} / chunk_shift {shift} / subsampling_factor {factor} "
                             "cannot cut a stream")
    if config is not None:
        _check_against_nemo(encoder, metadata, feature_dim, props.get("normalize_type"), config)
    # The lookahead is the graph's, not the metadata's: the runtime decodes every frame the encoder returns
    # and then advances chunk_shift mel frames, so the two must agree, and a chunk of R + 1 encoder frames
    # is lookahead R (chunked_limited attention).
    frames, longer = _probe_frames(encoder, metadata, feature_dim, threads)
    if longer != frames:
        raise UnsafeArtifact(f"{encoder}: window_size = {window} contradicts the graph, whose chunk is longer: it "
                             f"returns {frames} encoder frames for {window} mel frames and {longer} for "
                             f"{window + factor}, so the runtime would cut its lookahead short")
    if frames * factor != shift:
        raise UnsafeArtifact(f"{encoder}: chunk_shift = {shift} contradicts the graph, which returns {frames} encoder "
                             f"frames per chunk ({frames} x subsampling_factor {factor} = {frames * factor} mel "
                             "frames)")
    if "chunk_size_ms" in metadata and metadata["chunk_size_ms"] != frames * factor * 10:
        raise UnsafeArtifact(f"{encoder}: chunk_size_ms = {metadata['chunk_size_ms']} contradicts the graph's "
                             f"{frames * factor * 10} ({frames} encoder frames per chunk x {factor} x 10 ms)")
    if "feat_dim" in metadata and metadata["feat_dim"] != feature_dim:
        raise UnsafeArtifact(f"{encoder}: feat_dim = {metadata['feat_dim']} contradicts the graph's feature "
                             f"dimension {feature_dim} (its first input's axis 1, which the runtime reads)")
    context = (metadata["cache_last_channel_dim2"], frames - 1)
    normalize_type = props.get("normalize_type", "").strip()
    return Lookahead(directory, context, window, shift, metadata, feature_dim,
                     "" if normalize_type == "NA" else normalize_type, frames)


# Keys that describe the model rather than one lookahead: every lookahead's directory must state the same.
MODEL_KEYS = ("vocab_size", "subsampling_factor", "pred_rnn_layers", "pred_hidden", "cache_last_channel_dim1",
              "cache_last_channel_dim3", "cache_last_time_dim1", "cache_last_time_dim2", "cache_last_time_dim3")


def _check_same_model(first: Lookahead, other: Lookahead) -> None:
    """Without a .nemo the model's description comes from the first lookahead's metadata, so the others
    must agree with it."""
    stated = [(key, first.metadata[key], other.metadata[key]) for key in MODEL_KEYS]
    stated.append(("feature dimension", first.feature_dim, other.feature_dim))
    for key, ours, theirs in stated:
        if ours != theirs:
            raise UnsafeArtifact(f"{other.directory}: {key} = {theirs} contradicts {first.directory}'s {ours}")


class SherpaOnnxBackend(AudioInputBackend):
    name = "sherpa-onnx"
    capabilities = CAPABILITIES

    def __init__(self, path: str | Path, *, dtype: str = "float32", nemo_path: str | Path | None = None,
                 threads: int | None = None):
        if dtype not in ("float32", "int8"):
            raise InvalidInput(f"sherpa-onnx runs float32 or int8 graphs, not {dtype}")
        import sherpa_onnx  # noqa: F401 - fail here, with the import error, not at the first utterance

        self.directory = Path(path)
        self.dtype = dtype
        self.threads = int(threads or 1)
        dirs = lookahead_dirs(self.directory)
        if not dirs:
            raise InputNotFound(f"{self.directory}: not a sherpa-onnx directory (encoder.onnx, decoder.onnx, "
                                "joiner.onnx, tokens.txt; or one subdirectory per lookahead)")
        config = None
        if nemo_path is not None:
            from streaming_parity.core.nemo_config import read_model_config
            from streaming_parity.core.nemo_file import inspect_nemo

            config = read_model_config(inspect_nemo(nemo_path).config)
        self.lookaheads: dict[tuple[int, int], Lookahead] = {}
        vocabulary = None
        for directory in dirs:
            lookahead = _read_lookahead(directory, dtype, config, self.threads)
            pieces = read_token_table(directory / TOKENS, BLANK)
            if vocabulary is not None and pieces != vocabulary:
                raise UnsafeArtifact(f"{directory / TOKENS} differs from {dirs[0] / TOKENS}")
            vocabulary = pieces
            if lookahead.metadata["vocab_size"] != len(pieces):
                raise UnsafeArtifact(f"{directory / TOKENS}: {len(pieces)} pieces, the encoder's vocab_size is "
                                     f"{lookahead.metadata['vocab_size']}")
            if lookahead.context in self.lookaheads:
                raise UnsafeArtifact(f"{self.directory}: two directories hold lookahead {list(lookahead.context)}")
            if self.lookaheads:
                _check_same_model(next(iter(self.lookaheads.values())), lookahead)
            self.lookaheads[lookahead.context] = lookahead
        self.vocabulary = vocabulary
        # sherpa-onnx returns each token as text, with SentencePiece's word marker shown as a space.
        self._ids = {piece.replace("\u2581", " "): index for index, piece in enumerate(vocabulary)}
        self._ids.update({piece: index for index, piece in enumerate(vocabulary)})
        self.info = self._model_info(config)
        self._recognizers: dict[tuple[int, int], Any] = {}

    def _model_info(self, config) -> ModelInfo:
        first = next(iter(self.lookaheads.values()))
        contexts = tuple(self.lookaheads)
        if config is not None:
            expected = config.joint.vocabulary
            if expected is not None and tuple(expected) != tuple(self.vocabulary):
                index = next((i for i, (a, b) in enumerate(zip(expected, self.vocabulary)) if a != b),
                             min(len(expected), len(self.vocabulary)))
                raise UnsafeArtifact(f"{self.directory}: tokens.txt piece {index} contradicts the .nemo's vocabulary "
                                     f"({len(self.vocabulary)} vs {len(expected)} pieces)")
            info = ModelInfo.from_nemo_config(config, self.vocabulary)
            unknown = [list(c) for c in contexts if c not in info.att_context_sizes]
            if unknown:
                raise UnsafeArtifact(f"{self.directory}: lookahead(s) {unknown} are not among the .nemo's "
                                     f"att_context_size {[list(c) for c in info.att_context_sizes]}")
            return replace(info, att_context_sizes=tuple(c for c in info.att_context_sizes if c in self.lookaheads))
        metadata = first.metadata
        return ModelInfo(num_layers=metadata["cache_last_channel_dim1"], d_model=metadata["cache_last_channel_dim3"],
                         n_mels=first.feature_dim, conv_kernel_size=metadata["cache_last_time_dim3"] + 1,
                         subsampling_factor=metadata["subsampling_factor"], att_context_sizes=contexts,
                         vocabulary=tuple(self.vocabulary), blank_id=len(self.vocabulary),
                         pred_layers=metadata["pred_rnn_layers"], pred_hidden=metadata["pred_hidden"], max_symbols=10)

    def _lookahead(self, att_context_size: Sequence[int]) -> Lookahead:
        context = (int(att_context_size[0]), int(att_context_size[1]))
        if context not in self.lookaheads:
            raise InvalidInput(f"{self.directory}: no sherpa-onnx graphs for att_context_size {list(context)}; "
                               f"found {[list(c) for c in self.lookaheads]}")
        return self.lookaheads[context]

    def _recognizer(self, context: tuple[int, int]):
        if context not in self._recognizers:
            import sherpa_onnx

            lookahead = self._lookahead(context)
            suffix = ".int8.onnx" if self.dtype == "int8" else ".onnx"
            files = {g: str(lookahead.directory / f"{g}{suffix}") for g in GRAPHS}
            self._recognizers[context] = sherpa_onnx.OnlineRecognizer.from_transducer(
                tokens=str(lookahead.directory / TOKENS), encoder=files["encoder"], decoder=files["decoder"],
                joiner=files["joiner"], num_threads=self.threads, sample_rate=SAMPLE_RATE,
                feature_dim=self.feature_dim, decoding_method="greedy_search")
        return self._recognizers[context]

    @property
    def feature_dim(self) -> int:
        return next(iter(self.lookaheads.values())).feature_dim

    # -- what a user's run is made of ----------------------------------------------------------------
    def input_audio(self, audio: np.ndarray, att_context_size: Sequence[int]) -> np.ndarray:
        """The utterance followed by one window of silence: sherpa-onnx decodes a chunk only when a whole
        window lies before the last frame ready, so without it the last chunk's audio is never decoded."""
        lookahead = self._lookahead(att_context_size)
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        tail = np.zeros((audio.shape[0], (lookahead.window + 1) * HOP), np.float32)
        return np.concatenate([audio, tail], axis=1)

    def own_chunks(self, mel: np.ndarray, att_context_size: Sequence[int]) -> list[Chunk]:
        """sherpa-onnx's windows over ``mel``: ``window_size`` frames every ``chunk_shift``, the encoder told
        all of them are valid, while a whole window lies before the last frame."""
        lookahead = self._lookahead(att_context_size)
        window, shift = lookahead.window, lookahead.shift
        cache = window - shift
        total = mel.shape[-1]
        drop = 1 + (cache - 1) // self.info.subsampling_factor if cache >= 1 else 0  # NeMo's drop_extra_pre_encoded
        starts = list(range(0, max(total - window, 0), shift))
        chunks = []
        for index, start in enumerate(starts):
            chunks.append(Chunk(index=index, mel=np.ascontiguousarray(mel[:, :, start:start + window], np.float32),
                                length=np.full((mel.shape[0],), window, np.int64), drop_extra_pre_encoded=drop,
                                keep_all_outputs=False, start_frame=start + cache, num_new_frames=shift,
                                cache_frames=cache, is_first=index == 0, is_last=index == len(starts) - 1))
        return chunks

    # -- Backend interface ---------------------------------------------------------------------------
    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """sherpa-onnx's own features (kaldi-native-fbank configured as its NeMo transducer recognizer does)."""
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        mels = [fbank(row, self.feature_dim) for row in audio]
        return np.stack(mels), np.array([m.shape[-1] for m in mels], np.int64)

    def stream_audio(self, audio: np.ndarray, att_context_size: Sequence[int], *,
                     prompt: str | None = None) -> Iterator[StepOutput]:
        if prompt is not None:
            raise Unsupported(f"sherpa-onnx: its NeMo transducer recognizer takes no language prompt ({prompt!r})")
        if audio.shape[0] != 1:
            raise InvalidInput(f"sherpa-onnx: one utterance at a time, not a batch of {audio.shape[0]}")
        context = (int(att_context_size[0]), int(att_context_size[1]))
        lookahead = self._lookahead(context)
        recognizer = self._recognizer(context)
        stream = recognizer.create_stream()
        samples = self.input_audio(audio, context)[0]
        piece = lookahead.shift * HOP
        emitted: list[int] = []
        step = 0
        for start in range(0, len(samples), piece):
            stream.accept_waveform(SAMPLE_RATE, samples[start:start + piece])
            if start + piece >= len(samples):
                stream.input_finished()
            while recognizer.is_ready(stream):
                started = time.perf_counter()
                recognizer.decode_stream(stream)
                seconds = time.perf_counter() - started
                tokens = [self._token_id(t) for t in recognizer.get_result_all(stream).tokens]
                if tokens[:len(emitted)] != emitted:
                    raise RuntimeError(f"sherpa-onnx: the transcript changed its past tokens at step {step}")
                added, emitted = tokens[len(emitted):], tokens
                state = StreamingState(att_context_size=context, decoder=[DecoderState(
                    last_token=emitted[-1] if emitted else self.info.blank_id, h=np.zeros((0,), np.float32),
                    c=np.zeros((0,), np.float32), tokens=list(emitted))], step_index=step + 1)
                yield StepOutput(encoded=np.zeros((1, self.info.d_model, 0), np.float32),
                                 encoded_len=np.zeros((1,), np.int64), state=state, tokens=[added], taps={},
                                 seconds=seconds)
                step += 1

    def _token_id(self, piece: str) -> int:
        try:
            return self._ids[piece]
        except KeyError:
            raise RuntimeError(f"sherpa-onnx returned a token {piece!r} that is not in tokens.txt") from None

    def notes(self) -> list[str]:
        lookaheads = ", ".join(f"[{c[0]},{c[1]}] window {la.window} / shift {la.shift} frames"
                               for c, la in self.lookaheads.items())
        notes = [f"{self.directory}: sherpa-onnx {self.dtype} graphs run by sherpa-onnx's OnlineRecognizer "
                 f"(its front end, chunking and greedy decoding): {lookaheads}"]
        stated = sorted({la.normalize_type for la in self.lookaheads.values()} - set(NO_NORMALIZATION))
        if stated:
            notes.append(f"normalize_type {', '.join(map(repr, stated))}: sherpa-onnx's streaming front end does not "
                         "apply it (only its offline streams do)")
        return notes

    def close(self) -> None:
        self._recognizers.clear()

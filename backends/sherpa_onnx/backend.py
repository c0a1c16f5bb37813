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
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from backends.sherpa_onnx.frontend import SAMPLE_RATE, fbank
from harness.errors import InputNotFound, InvalidInput, UnsafeArtifact, Unsupported
from harness.interface.backend import (
    AudioInputBackend,
    Capabilities,
    DecoderState,
    ModelInfo,
    StepOutput,
    StreamingState,
)
from harness.interface.chunking import Chunk
from harness.safe_files import load_onnx_graph, read_token_table

CAPABILITIES = Capabilities(first_chunk_modes=("pad-and-drop",), taps=(), caches=False, offline=False,
                            teacher_forcing=False, input="audio")
GRAPHS = ("encoder", "decoder", "joiner")
TOKENS = "tokens.txt"
BLANK = "<blk>"
HOP = SAMPLE_RATE // 100  # 10 ms mel frames
METADATA_KEYS = ("vocab_size", "window_size", "chunk_size_ms", "chunk_shift", "subsampling_factor",
                 "cache_last_channel_dim1", "cache_last_channel_dim2", "cache_last_channel_dim3",
                 "cache_last_time_dim3", "pred_rnn_layers", "pred_hidden")


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
    metadata: dict[str, int]
    feature_dim: int  # the encoder input's axis 1, which sherpa-onnx reads as its feature dimension


def _read_lookahead(directory: Path, dtype: str) -> Lookahead:
    suffix = ".int8.onnx" if dtype == "int8" else ".onnx"
    for graph in GRAPHS:
        path = directory / f"{graph}{suffix}"
        if not path.is_file():
            raise InputNotFound(f"{directory}: {path.name} not found (sherpa-onnx {dtype} graphs)")
        model = load_onnx_graph(path)  # external data inside the directory, sizes within the files
        if graph == "encoder":
            props = {p.key: p.value for p in model.metadata_props}
            initializers = {init.name for init in model.graph.initializer}
            signal = next(i for i in model.graph.input if i.name not in initializers)
            dims = signal.type.tensor_type.shape.dim
            feature_dim = dims[1].dim_value if len(dims) == 3 and dims[1].HasField("dim_value") else 0
    metadata = {}
    for key in METADATA_KEYS:
        try:
            metadata[key] = int(props[key])
        except KeyError:
            raise UnsafeArtifact(f"{directory / ('encoder' + suffix)}: metadata key {key!r} is missing") from None
        except ValueError:
            raise UnsafeArtifact(f"{directory / ('encoder' + suffix)}: metadata {key} = {props[key]!r} is not an "
                                 "integer") from None
    factor = metadata["subsampling_factor"]
    frames_ms = factor * 10
    if factor <= 0 or metadata["chunk_size_ms"] % frames_ms:
        raise UnsafeArtifact(f"{directory}: chunk_size_ms {metadata['chunk_size_ms']} is not a whole number of "
                             f"{frames_ms} ms encoder frames")
    context = (metadata["cache_last_channel_dim2"], metadata["chunk_size_ms"] // frames_ms - 1)
    if metadata["window_size"] <= 0 or not 0 < metadata["chunk_shift"] <= metadata["window_size"]:
        raise UnsafeArtifact(f"{directory}: window_size {metadata['window_size']} / chunk_shift "
                             f"{metadata['chunk_shift']} cannot cut a stream")
    if feature_dim <= 0:
        raise UnsafeArtifact(f"{directory / ('encoder' + suffix)}: its first input has no static feature axis "
                             "(sherpa-onnx reads the feature dimension from it)")
    return Lookahead(directory, context, metadata["window_size"], metadata["chunk_shift"], metadata, feature_dim)


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
        self.lookaheads: dict[tuple[int, int], Lookahead] = {}
        vocabulary = None
        for directory in dirs:
            lookahead = _read_lookahead(directory, dtype)
            pieces = read_token_table(directory / TOKENS, BLANK)
            if vocabulary is not None and pieces != vocabulary:
                raise UnsafeArtifact(f"{directory / TOKENS} differs from {dirs[0] / TOKENS}")
            vocabulary = pieces
            if lookahead.metadata["vocab_size"] != len(pieces):
                raise UnsafeArtifact(f"{directory / TOKENS}: {len(pieces)} pieces, the encoder's vocab_size is "
                                     f"{lookahead.metadata['vocab_size']}")
            if lookahead.context in self.lookaheads:
                raise UnsafeArtifact(f"{self.directory}: two directories hold lookahead {list(lookahead.context)}")
            self.lookaheads[lookahead.context] = lookahead
        self.vocabulary = vocabulary
        # sherpa-onnx returns each token as text, with SentencePiece's word marker shown as a space.
        self._ids = {piece.replace("\u2581", " "): index for index, piece in enumerate(vocabulary)}
        self._ids.update({piece: index for index, piece in enumerate(vocabulary)})
        self.info = self._model_info(nemo_path)
        self._recognizers: dict[tuple[int, int], Any] = {}

    def _model_info(self, nemo_path) -> ModelInfo:
        first = next(iter(self.lookaheads.values())).metadata
        contexts = tuple(self.lookaheads)
        if nemo_path is not None:
            from harness.nemo_config import read_model_config
            from harness.nemo_file import inspect_nemo

            config = read_model_config(inspect_nemo(nemo_path).config)
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
        return ModelInfo(num_layers=first["cache_last_channel_dim1"], d_model=first["cache_last_channel_dim3"],
                         n_mels=next(iter(self.lookaheads.values())).feature_dim, conv_kernel_size=first["cache_last_time_dim3"] + 1,
                         subsampling_factor=first["subsampling_factor"], att_context_sizes=contexts,
                         vocabulary=tuple(self.vocabulary), blank_id=len(self.vocabulary),
                         pred_layers=first["pred_rnn_layers"], pred_hidden=first["pred_hidden"], max_symbols=10)

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
        return [f"{self.directory}: sherpa-onnx {self.dtype} graphs run by sherpa-onnx's OnlineRecognizer "
                f"(its front end, chunking and greedy decoding): {lookaheads}"]

    def close(self) -> None:
        self._recognizers.clear()

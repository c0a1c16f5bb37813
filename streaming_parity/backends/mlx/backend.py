"""The MLX backend behind the shared streaming interface, run from an artifact directory alone.

Imports neither torch nor NeMo: ``parity transcribe --backend mlx --mlx DIR`` needs only MLX,
numpy and the artifact. Taps have NeMo's semantics (``streaming_parity/backends/nemo.py``): ``pre_encode`` before
``drop_extra_pre_encoded``, every conformer layer's output for all frames of the chunk, the
post-processed encoder output, one decoder/joint row per NeMo call in call order, and for a hybrid
RNNT-CTC model the CTC head's log-probabilities over the step's valid frames (``ctc``) with its greedy
labels carried across steps (``streaming_parity.interface.decoding.ctc_greedy``). A prompt-conditioned model's
stream locale (``StreamingState.prompt``, ``offline(prompt=)``) becomes a one-hot column through the
artifact's own ``prompt_dictionary`` (``ModelInfo.prompt_index``); the encoder output after the prompt
kernel is the ``prompt`` tap and what the decoder, joint and CTC head read (None: bypassed, as NeMo).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from streaming_parity.backends.mlx.blas import use_optimized_blas
from streaming_parity.core.errors import InputNotFound, InvalidInput, UnsafeArtifact

use_optimized_blas()  # before mlx.core: see streaming_parity/backends/mlx/blas.py

import mlx.core as mx
import numpy as np

from streaming_parity.backends.mlx.artifact import CONFIG_FILE, FRONTEND_FILE, MODEL_FILE, read_artifact_dtype
from streaming_parity.backends.mlx.model import EncoderCache, FrontEnd, GreedyState, ModelArgs, StreamingRNNT
from streaming_parity.core.nemo_config import read_model_config
from streaming_parity.core.safe_files import read_safetensors_header
from streaming_parity.interface.backend import Backend, Capabilities
from streaming_parity.interface.chunking import Chunk, StreamingConfig
from streaming_parity.interface.decoding import ForcedDecisions, ctc_step
from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.speakers import SpeakerTargets
from streaming_parity.interface.taps import TAP_CTC, TAP_DECODER, TAP_ENCODER, TAP_JOINT, TAP_PROMPT
from streaming_parity.interface.types import DecoderState, OfflineOutput, StepOutput, StreamingState

MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def slow_dtypes() -> dict[str, str]:
    """The half precisions MLX runs without a fast path here: on a CPU (no Metal or CUDA device), MLX's CPU backend
    has no fast bfloat16 or float16 matmul; measured at full size on a 2-core x86_64 Linux CPU, a [70,6] step took
    4.5 s in bfloat16 against 0.46 s in float32."""
    if default_device().type == mx.gpu:
        return {}
    why = "MLX on a CPU has no fast {} matmul (full size, [70,6]: 4.5 s per step in bfloat16, 0.46 s in float32)"
    return {dtype: why.format(dtype) for dtype in ("bfloat16", "float16")}


def default_device(choice: str = "auto") -> mx.Device:
    """``auto``: the GPU where MLX has one (Metal, CUDA), else the CPU; ``cpu``/``gpu`` force either."""
    if choice == "cpu":
        return mx.Device(mx.cpu)
    gpu_available = bool(getattr(mx, "is_available", lambda _d: False)(mx.gpu))
    if choice == "gpu":
        if not gpu_available:
            raise InvalidInput("MLX has no GPU on this machine (device='gpu' was requested)")
        return mx.Device(mx.gpu)
    if choice != "auto":
        raise InvalidInput(f"device must be auto, cpu or gpu, not {choice!r}")
    return mx.Device(mx.gpu) if gpu_available else mx.Device(mx.cpu)


def _numpy(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32), copy=True)


class MLXBackend(Backend):
    name = "mlx"
    capabilities = Capabilities(teacher_forcing=True)

    def __init__(self, artifact_dir: str | Path, *, dtype: str | None = None, device: str = "auto",
                 taps: bool = True):
        """``dtype``: must match the artifact's when given; ``device``: auto/cpu/gpu; ``taps``: record the
        intermediate taps (off for timing runs; the step output then carries none)."""
        directory = Path(artifact_dir)
        if not (directory / MODEL_FILE).exists():
            raise InputNotFound(f"{directory}: not an MLX artifact directory (no {MODEL_FILE}); "
                                    f"create one with `parity convert MODEL.nemo --out {directory}`")
        for file in (MODEL_FILE, FRONTEND_FILE):  # mx.load below allocates whatever a header declares
            read_safetensors_header(directory / file)
        artifact_dtype = read_artifact_dtype(directory)
        if dtype is not None and dtype != artifact_dtype:
            raise InvalidInput(f"{directory} holds {artifact_dtype} weights, {dtype} was requested; "
                             f"convert with --dtype {dtype}")
        self.directory = directory
        self.dtype = artifact_dtype
        self.compute_dtype = MX_DTYPES[artifact_dtype]
        self.device = default_device(device)
        self.record_taps = taps
        self.config = json.loads((directory / CONFIG_FILE).read_text())
        model_config = read_model_config(self.config)
        vocabulary = model_config.joint.require_vocabulary()  # the converter embeds it as joint.vocabulary
        self.args = ModelArgs.from_nemo_config(model_config, vocabulary)
        self.info = ModelInfo.from_nemo_config(model_config, vocabulary)
        with mx.stream(self.device):
            self.model = StreamingRNNT(self.args)
            weights = mx.load(str(directory / MODEL_FILE))
            for name, value in weights.items():
                if value.dtype != self.compute_dtype:
                    raise UnsafeArtifact(f"{directory / MODEL_FILE}: {name} is {value.dtype}, the artifact says "
                                     f"{artifact_dtype}")
            self.model.load_weights(list(weights.items()), strict=True)
            self.model.eval()
            frontend = mx.load(str(directory / FRONTEND_FILE))
            self.front_end = FrontEnd(self.args.preprocessor, np.array(frontend["window"]),
                                      np.array(frontend["filterbank"]))
            mx.eval(self.model.parameters())
        self._streaming: dict[tuple[int, int], StreamingConfig] = {}

    def streaming_config(self, att_context_size: Sequence[int]) -> StreamingConfig:
        key = (int(att_context_size[0]), int(att_context_size[1]))
        if key not in self._streaming:
            self._streaming[key] = self.info.streaming_config(key)
        return self._streaming[key]

    def _check_context(self, att_context_size: Sequence[int]) -> tuple[int, int]:
        return self.info.check_att_context(att_context_size)

    # -- decoder state conversion ----------------------------------------------------------------
    def _greedy_state(self, state: DecoderState) -> GreedyState:
        # NeMo starts from "no hypothesis" (zero state, SOS input) until the first emission.
        start = not state.tokens and state.last_token == self.info.blank_id
        h = mx.array(np.asarray(state.h, np.float32)).astype(self.compute_dtype)
        c = mx.array(np.asarray(state.c, np.float32)).astype(self.compute_dtype)
        return GreedyState(None if start else int(state.last_token), h, c, list(state.tokens))

    def _decoder_state(self, state: GreedyState) -> DecoderState:
        last = self.info.blank_id if state.last_token is None else state.last_token
        return DecoderState(last_token=last, h=_numpy(state.h), c=_numpy(state.c), tokens=list(state.tokens))

    def _decode_batch(self, encoded: mx.array, lengths: np.ndarray, states: list[GreedyState],
                      forced: ForcedDecisions | None = None):
        if forced is not None and forced.decisions is not None and encoded.shape[0] != 1:
            raise ValueError(f"mlx: teacher forcing runs batch 1, not {encoded.shape[0]}")
        choose = forced.choose if forced is not None and forced.decisions is not None else None
        results = [self.model.decode(encoded[b], int(lengths[b]), states[b], record=self.record_taps, choose=choose)
                   for b in range(encoded.shape[0])]
        if choose is not None:
            forced.finish()
        decoder_rows = [row for r in results for row in r.decoder_outputs]
        joint_rows = [row for r in results for row in r.joint_outputs]
        return results, decoder_rows, joint_rows

    def _ctc(self, encoded: mx.array, lengths: np.ndarray,
             last_labels: list[int]) -> tuple[np.ndarray, list[list[int]], list[int]]:
        """A hybrid model's CTC head: log-probabilities over the valid frames ``[B, T_valid, V+1]``, and per
        batch item the greedy labels emitted after ``last_labels`` and the last frame's label."""
        return ctc_step(_numpy(self.model.ctc_log_probs(encoded)), lengths, self.info.blank_id, last_labels)

    def _rows(self, rows: list[mx.array], width: int) -> np.ndarray:
        return _numpy(mx.concatenate(rows, axis=0)) if rows else np.zeros((0, width), np.float32)

    def _taps(self, encoder_taps: dict[str, mx.array], encoded: mx.array, prompted: mx.array, decoder_rows,
              joint_rows):
        taps = {name: _numpy(value) for name, value in encoder_taps.items()}
        taps[TAP_ENCODER] = _numpy(encoded)
        if self.info.prompted:
            taps[TAP_PROMPT] = _numpy(prompted)
        taps[TAP_DECODER] = self._rows(decoder_rows, self.info.pred_hidden)
        taps[TAP_JOINT] = self._rows(joint_rows, len(self.info.vocabulary) + 1)
        return taps

    # -- Backend interface -----------------------------------------------------------------------
    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with mx.stream(self.device):
            mel, lengths = self.front_end(np.atleast_2d(np.asarray(audio, np.float32)))
            return _numpy(mel), lengths.astype(np.int64)

    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks: SpeakerTargets | None = None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        self.check_speaker_masks(speaker_masks, chunk.mel.shape[0])
        context = self._check_context(state.att_context_size)
        self.info.check_state(state)
        prompt_index = self.info.prompt_index(state.prompt)  # the artifact's own dictionary
        streaming = self.streaming_config(context)
        streaming.check_chunk(chunk, self.name)
        started = time.perf_counter()
        with mx.stream(self.device):
            cache = EncoderCache(
                channel=mx.array(state.cache_last_channel).astype(self.compute_dtype),
                time=mx.array(state.cache_last_time).astype(self.compute_dtype),
                channel_len=np.asarray(state.cache_last_channel_len, np.int64),
            )
            out = self.model.stream_step(
                mx.array(chunk.mel).astype(self.compute_dtype), np.asarray(chunk.length, np.int64), cache,
                att_context_size=context, valid_out_len=streaming.valid_out_len,
                keep_all_outputs=chunk.keep_all_outputs, drop_extra_pre_encoded=chunk.drop_extra_pre_encoded,
                record_taps=self.record_taps, speaker_masks=speaker_masks)
            # conformer_stream_step: the prompt after the encoder's step, before decoding and the CTC head.
            decoded_from = self.model.apply_prompt(out.encoded, prompt_index)
            mx.eval(out.encoded, decoded_from, out.cache.channel, out.cache.time, *out.taps.values())
            results, decoder_rows, joint_rows = self._decode_batch(
                decoded_from, out.lengths, [self._greedy_state(d) for d in state.decoder],
                ForcedDecisions(forced_decisions, self.name))
            mx.eval(*[r.state.h for r in results], *[r.state.c for r in results])
            ctc = self._ctc(decoded_from, out.lengths, self.info.ctc_labels_before(state)) if self.info.ctc_head else None
            seconds = time.perf_counter() - started
            taps = self._taps(out.taps, out.encoded, decoded_from, decoder_rows, joint_rows) if self.record_taps else {}
            if ctc is not None and self.record_taps:
                taps[TAP_CTC] = ctc[0]
            encoded = _numpy(out.encoded)
            new_state = StreamingState(
                att_context_size=state.att_context_size,
                cache_last_channel=_numpy(out.cache.channel),
                cache_last_time=_numpy(out.cache.time),
                cache_last_channel_len=np.asarray(out.cache.channel_len, np.int64),
                decoder=[self._decoder_state(r.state) for r in results],
                step_index=state.step_index + 1,
                ctc_last_label=None if ctc is None else ctc[2],
                prompt=state.prompt,
            )
        return StepOutput(encoded=encoded, encoded_len=np.asarray(out.lengths, np.int64), state=new_state,
                          tokens=[r.emitted for r in results], taps=taps, seconds=seconds,
                          ctc_tokens=None if ctc is None else ctc[1])

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks: SpeakerTargets | None = None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        context = self._check_context(att_context_size)
        prompt_index = self.info.prompt_index(prompt)
        self.check_speaker_masks(speaker_masks, mel.shape[0])
        with mx.stream(self.device):
            out = self.model.encoder(mx.array(np.asarray(mel, np.float32)).astype(self.compute_dtype),
                                     np.asarray(length, np.int64), context, record_taps=self.record_taps,
                                     inject=self.model.speaker_injection(speaker_masks))
            # EncDecRNNTBPEModelWithPrompt.forward: the prompt kernel over every encoder frame.
            decoded_from = self.model.apply_prompt(out.encoded, prompt_index)
            start = [self.model.initial_greedy_state(self.compute_dtype) for _ in range(mel.shape[0])]
            results, decoder_rows, joint_rows = self._decode_batch(decoded_from, out.lengths, start,
                                                                   ForcedDecisions(forced_decisions, self.name))
            taps = self._taps(out.taps, out.encoded, decoded_from, decoder_rows, joint_rows) if self.record_taps else {}
            ctc = None
            if self.info.ctc_head:
                ctc = self._ctc(decoded_from, out.lengths, [self.info.blank_id] * mel.shape[0])
                if self.record_taps:
                    taps[TAP_CTC] = ctc[0]
            return OfflineOutput(encoded=_numpy(out.encoded), encoded_len=np.asarray(out.lengths, np.int64),
                                 tokens=[r.state.tokens for r in results], taps=taps,
                                 ctc_tokens=None if ctc is None else ctc[1])

    def prompt_kernel(self) -> PromptKernel | None:
        """The artifact's prompt kernel weights as float32 numpy (None for a model without a prompt)."""
        if not self.info.prompted:
            return None
        first, _, last = self.model.prompt_kernel
        return PromptKernel(weight_in=_numpy(first.weight), bias_in=_numpy(first.bias),
                            weight_out=_numpy(last.weight), bias_out=_numpy(last.bias))

    def close(self) -> None:
        self.model = None
        self.front_end = None
        # MLX keeps freed buffers in its own cache for reuse; a closed model's must go back.
        clear_cache = getattr(mx, "clear_cache", None) or getattr(getattr(mx, "metal", None), "clear_cache", None)
        if clear_cache is not None:
            clear_cache()

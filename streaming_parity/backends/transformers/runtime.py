"""transformers' own streaming as its users run it: the ``transformers-generate`` peer backend.

``stream_audio`` follows transformers' documentation for ``NemotronAsrStreaming`` streaming
(``docs/source/en/model_doc/nemotron_asr_streaming.md``, "Streaming transcription"): the processor is set to the
lookahead (``set_num_lookahead_tokens``), the first ``num_samples_first_audio_chunk`` samples go through it with
``is_first_audio_chunk=True`` and its first ``num_mel_frames_first_audio_chunk`` frames are the first chunk, then
every later chunk is ``num_samples_per_audio_chunk`` samples from ``frame * hop - n_fft // 2`` with
``center=False``, for as long as such a chunk ends inside the audio; ``generate()`` is fed that generator with
the processor's other outputs (``num_lookahead_tokens``, and ``prompt_ids`` for Nemotron3_5Asr).

One step per chunk the generator gives: the tokens whose encoder frame lies in the chunk (``generate`` returns
per-step frame advances, ``durations``), and the chunk's encoder output (and prompt-projector output), recorded
by forward hooks. It exposes no caches.

As a ``PeerRuntime`` it says how it loaded (``loaded_parameters``: what ``from_pretrained`` left in the model
against ``model.safetensors``), computes its own features (``features``), cuts its own chunks (``own_chunks``,
for the stack bisection with the ``transformers`` driver), runs its encoder on a mel from elsewhere
(``encode_mel``), and names what it runs otherwise than NeMo that it can run NeMo's way (``corrections``): its
streaming subsampling pads no ``stride - 1`` zeros on the right of a final partial chunk, where NeMo's
``CausalConv2D`` does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.backends.transformers.backend import TransformersBackend, _numpy
from streaming_parity.core.errors import InvalidInput, Unsupported
from streaming_parity.interface.backend import AudioInputBackend, Capabilities
from streaming_parity.interface.chunking import Chunk, ChunkSchedule
from streaming_parity.interface.peer import PART_ENCODER, Correction, LoadedParameters, PeerRuntime
from streaming_parity.interface.taps import TAP_ENCODER, TAP_PROMPT
from streaming_parity.interface.types import DecoderState, StepOutput, StreamingState

CAPABILITIES = Capabilities(first_chunk_modes=("plain",), taps=(TAP_ENCODER, TAP_PROMPT), caches=False,
                            offline=False, teacher_forcing=False, input="audio")
FINAL_CHUNK_RIGHT_PAD = "final-chunk-right-pad"


def load(source: Path, *, dtype: str | None = None, nemo_path: Path | None = None, **options: Any):
    return TransformersGenerateBackend(source, dtype=dtype, nemo_path=nemo_path, **options)


class TransformersGenerateBackend(AudioInputBackend, PeerRuntime):
    name = "transformers-generate"
    capabilities = CAPABILITIES

    def __init__(self, path: str | Path, *, dtype: str | None = None, nemo_path: str | Path | None = None):
        # The same loading as the driver (from_pretrained defaults; the .nemo checks), and the same model object.
        self.driver = TransformersBackend(path, dtype=dtype, nemo_path=nemo_path)
        self.model, self.processor, self.info, self.dtype = (self.driver.model, self.driver.processor,
                                                             self.driver.info, self.driver.dtype)
        self._torch = self.driver._torch
        self.refused_short: list[tuple[int, int]] = []  # (samples, first chunk's samples) of audio generate() refuses

    # -- what a user's run is made of -------------------------------------------------------------------------
    def features(self, audio: np.ndarray, *, corrections: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Its feature extractor over the whole utterance; the documented per-chunk calls reproduce these frames."""
        return self.driver.features(audio)

    def _processor_for(self, lookahead: int):
        processor = self.processor
        processor.set_num_lookahead_tokens(int(lookahead))
        return processor

    def _chunk_starts(self, samples: int, lookahead: int) -> tuple[int, int, list[int]]:
        """The documented generator's chunk boundaries in mel frames: the first chunk's frames, every later
        chunk's, and the first mel frame of each later chunk it yields."""
        processor = self._processor_for(lookahead)
        extractor = processor.feature_extractor
        first, later = processor.num_mel_frames_first_audio_chunk, processor.num_mel_frames_per_audio_chunk
        starts, frame = [], first
        while frame * extractor.hop_length - extractor.n_fft // 2 + processor.num_samples_per_audio_chunk < samples:
            starts.append(frame)
            frame += later
        return first, later, starts

    def own_chunks(self, mel: np.ndarray, att_context_size: Sequence[int]) -> list[Chunk]:
        """The chunks the documented generator feeds, cut from ``mel`` in the harness's form (the plain first
        chunk; later chunks with NeMo's mel prefix, which the driver ignores): the final partial chunk is
        never fed."""
        context = self.info.check_att_context(att_context_size)
        hop = self.processor.feature_extractor.hop_length
        first, later, starts = self._chunk_starts((mel.shape[-1] - 1) * hop + 1, context[1])
        plain = ChunkSchedule(self.info.streaming_config(context), "plain").chunks(mel)
        kept = [c for c in plain if c.is_first or (c.start_frame in starts and c.num_new_frames == later)]
        if kept:
            kept[-1] = Chunk(**{**kept[-1].__dict__, "is_last": True})
        return kept

    def input_audio(self, audio: np.ndarray, att_context_size: Sequence[int]) -> np.ndarray:
        return audio

    def corrections(self) -> list[Correction]:
        return [Correction(FINAL_CHUNK_RIGHT_PAD, PART_ENCODER,
                           "no right padding in the streaming subsampling convs: a final chunk of n mel frames gives "
                           "floor(n / 8) encoder frames (NemotronAsrStreamingEncoderCausalConv2D with a padding cache)",
                           "stride - 1 zeros on the right of every causal subsampling conv (NeMo's CausalConv2D), so "
                           "the final partial chunk gives its last, partial frame")]

    @contextlib.contextmanager
    def _right_padded_subsampling(self):
        """NeMo's right padding of each causal subsampling conv (``CausalConv2D``: ``stride - 1`` zeros after the
        time axis), added in front of transformers' convs for one forward (the final chunk)."""
        from transformers.models.nemotron_asr_streaming.modeling_nemotron_asr_streaming import (
            NemotronAsrStreamingEncoderCausalConv2D,
        )

        torch = self._torch
        handles = []
        for module in self.model.encoder.subsampling.modules():
            if isinstance(module, NemotronAsrStreamingEncoderCausalConv2D):
                def pad(conv, inputs):
                    hidden = inputs[0]
                    return (torch.nn.functional.pad(hidden, (0, 0, 0, conv.stride[0] - 1)), *inputs[1:])

                handles.append(module.register_forward_pre_hook(pad))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def encode_mel(self, mel: np.ndarray, att_context_size: Sequence[int], *, offline: bool = False,
                   corrections: Sequence[str] = ()) -> list[np.ndarray]:
        """Its encoder fed ``mel`` ``[1, n_mels, T]``: streaming, the chunks ``generate`` validates (``1 + 8R`` then
        ``8(R + 1)`` frames) and then the remaining frames as a final chunk, each ``[1, D, T_step]``; ``offline``,
        one forward with the chunked_limited mask."""
        from transformers import DynamicCache
        from transformers.models.nemotron_asr_streaming.modeling_nemotron_asr_streaming import (
            NemotronAsrStreamingEncoderCausalConvPaddingCache,
        )

        context = self.info.check_att_context(att_context_size)
        torch = self._torch
        frames = torch.from_numpy(np.ascontiguousarray(np.asarray(mel, np.float32).transpose(0, 2, 1)))
        encoder = self.model.encoder
        with torch.inference_mode():
            if offline:
                out = encoder(input_features=frames.to(self.model.dtype), num_lookahead_tokens=context[1])
                return [_numpy(out.last_hidden_state).transpose(0, 2, 1)]
            cache, padding = DynamicCache(config=encoder.config), NemotronAsrStreamingEncoderCausalConvPaddingCache()
            first, later = 1 + 8 * context[1], 8 * (context[1] + 1)
            # NeMo's buffer stops at a tail shorter than one encoder frame's worth (``sampling_frames``), as
            # ``ChunkSchedule`` does; transformers' convs cannot take one either (the kernel outgrows the input).
            bounds = [0, min(first, frames.shape[1])]
            while frames.shape[1] - bounds[-1] >= self.info.subsampling_factor:
                bounds.append(min(bounds[-1] + later, frames.shape[1]))
            outputs = []
            for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
                final_partial = index > 0 and end - start < later
                padded = self._right_padded_subsampling() if (
                    final_partial and FINAL_CHUNK_RIGHT_PAD in corrections) else contextlib.nullcontext()
                with padded:
                    out = encoder(input_features=frames[:, start:end].to(self.model.dtype), cache=cache,
                                  padding_cache=padding, use_cache=True, num_lookahead_tokens=context[1])
                outputs.append(_numpy(out.last_hidden_state).transpose(0, 2, 1))
            return outputs

    def loaded_parameters(self) -> LoadedParameters:
        """What ``model.safetensors`` holds (each tensor with the NeMo tensor it stands for) against every
        parameter ``from_pretrained`` left in the model (it loads non-strictly: a missing tensor keeps its
        initial value with a warning, an unexpected one is ignored)."""
        from streaming_parity.backends.transformers import naming
        from streaming_parity.backends.transformers.backend import _version

        artifact = {}
        for name in self.driver.directory.tensor_names():
            try:
                artifact[name] = (naming.nemo_name(name, self.driver.joint_output_index),)
            except KeyError:
                artifact[name] = ()
        parameters = {name: _numpy(value) for name, value in self.model.named_parameters()}
        return LoadedParameters(runtime=f"transformers {_version()} from_pretrained", strict=False, artifact=artifact,
                                parameters=parameters)

    # -- streaming as users stream ----------------------------------------------------------------------------
    def stream_audio(self, audio: np.ndarray, att_context_size: Sequence[int], *,
                     prompt: str | None = None) -> Iterator[StepOutput]:
        torch = self._torch
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        if audio.shape[0] != 1:
            raise InvalidInput(f"{self.name}: one utterance at a time, not a batch of {audio.shape[0]}")
        context = self.info.check_att_context(att_context_size)
        samples = audio[0]
        processor = self._processor_for(context[1])
        extractor = processor.feature_extractor
        rate = extractor.sampling_rate
        language = {}
        if self.info.prompted:
            if prompt is None:
                raise InvalidInput(f"{self.name}: Nemotron3_5Asr's processor needs a language (its default 'auto' "
                                   f"is {'not ' if 'auto' not in dict(self.info.prompt_dictionary) else ''}in this "
                                   "model's prompt dictionary); pass --prompt")
            self.info.prompt_index(prompt)
            language = {"language": prompt}
        first_inputs = processor(samples[:processor.num_samples_first_audio_chunk], sampling_rate=rate,
                                 is_streaming=True, is_first_audio_chunk=True, return_tensors="pt", **language)
        first_inputs = first_inputs.to(self.model.device, dtype=self.model.dtype)
        first_frames, later_frames, starts = self._chunk_starts(len(samples), context[1])
        later_start = first_frames * extractor.hop_length - extractor.n_fft // 2
        if later_start < 0:
            # At num_lookahead_tokens 0 the first chunk is one frame, so the documented second chunk starts at
            # 1 * hop - n_fft // 2 < 0: the slice wraps to the audio's end, the feature extractor gets no sample
            # and torch.stft raises. Users of the documented recipe cannot stream at this lookahead.
            raise Unsupported(f"{self.name}: transformers' documented streaming cannot run at num_lookahead_tokens "
                              f"{context[1]}: its second chunk starts at sample {first_frames} * {extractor.hop_length}"
                              f" - {extractor.n_fft // 2} = {later_start} (the slice wraps to the end of the audio and "
                              "torch.stft gets no sample)")
        if first_inputs.input_features.shape[1] < first_frames:
            # generate() raises on a first chunk shorter than 1 + 8R frames (_validate_stream_chunk): a user gets
            # no transcript for audio shorter than the first chunk. Counted, and streamed as no step at all.
            self.refused_short.append((len(samples), processor.num_samples_first_audio_chunk))
            return

        def input_features():
            yield first_inputs.input_features[:, :first_frames, :]
            for frame in starts:
                start = frame * extractor.hop_length - extractor.n_fft // 2
                inputs = processor(samples[start:start + processor.num_samples_per_audio_chunk], sampling_rate=rate,
                                   is_streaming=True, is_first_audio_chunk=False, return_tensors="pt", **language)
                yield inputs.to(self.model.device, dtype=self.model.dtype).input_features

        encoded_chunks: list[np.ndarray] = []
        prompted_chunks: list[np.ndarray] = []
        handles = [self.model.encoder.register_forward_hook(
            lambda _m, _i, out: encoded_chunks.append(_numpy(out.last_hidden_state)))]
        if self.info.prompted:
            handles.append(self.model.prompt_projector.register_forward_hook(
                lambda _m, _i, out: prompted_chunks.append(_numpy(out))))
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = self.model.generate(**{**first_inputs, "input_features": input_features()})
        finally:
            for handle in handles:
                handle.remove()
        seconds = (time.perf_counter() - started) / max(len(encoded_chunks), 1)
        sequence = output.sequences[0].tolist()
        durations = output.durations[0].tolist()
        frame_of_call = np.cumsum(durations) - np.asarray(durations)  # the encoder frame each call was made at
        chunk_ends = np.cumsum([chunk.shape[1] for chunk in encoded_chunks])
        blank = self.info.blank_id
        per_chunk: list[list[int]] = [[] for _ in encoded_chunks]
        for call, token in enumerate(sequence[1:], start=1):  # sequence[0] is decoder_start_token_id
            if token != blank:
                per_chunk[int(np.searchsorted(chunk_ends, frame_of_call[call], side="right"))].append(int(token))
        emitted: list[int] = []
        for step, (encoded, tokens) in enumerate(zip(encoded_chunks, per_chunk)):
            emitted += tokens
            taps = {TAP_ENCODER: encoded.transpose(0, 2, 1)}
            if prompted_chunks:
                taps[TAP_PROMPT] = prompted_chunks[step].transpose(0, 2, 1)
            state = StreamingState(att_context_size=context, decoder=[DecoderState(
                last_token=emitted[-1] if emitted else blank, h=np.zeros((0,), np.float32),
                c=np.zeros((0,), np.float32), tokens=list(emitted))], step_index=step + 1, prompt=prompt)
            yield StepOutput(encoded=taps[TAP_ENCODER], encoded_len=np.array([encoded.shape[1]], np.int64),
                             state=state, tokens=[tokens], taps=taps, seconds=seconds)

    def notes(self) -> list[str]:
        refused = [f"generate() refused {len(self.refused_short)} utterance(s) shorter than its first chunk "
                   f"({self.refused_short[0][1]} samples; 'Streaming first chunk has N mel frames'): no transcript"
                   ] if self.refused_short else []
        return self.driver.notes() + refused + [
            "streams as transformers documents it: processor chunks of num_samples_first_audio_chunk, then "
            "num_samples_per_audio_chunk while a chunk ends inside the audio (the final partial chunk is not fed: "
            "generate() refuses a short chunk), into generate()"]

    def close(self) -> None:
        self.driver.close()
        self.model = self.processor = None

"""The reference backend: NeMo PyTorch, driven exactly as NeMo's own cache-aware streaming is.

- The model is restored on CPU in eval mode (in train mode NeMo samples a random attention context
  every forward) with dither 0 and ``pad_to`` 0, as ``CacheAwareStreamingAudioBuffer`` sets them.
- Each chunk goes through ``EncDecRNNTModel.conformer_stream_step`` (parts/mixins/mixins.py):
  ``cache_aware_stream_step`` on the encoder, then NeMo's RNNT greedy decoding with the partial
  hypotheses of the previous step. Decoding uses NeMo's ``greedy`` strategy (``GreedyRNNTInfer``),
  whose per-frame loop defines the decoder/joint call order the other backends reproduce.
- Taps come from forward hooks; nothing in NeMo is patched.
- Hybrid RNNT-CTC models (``EncDecHybridRNNTCTCBPEModel``): after each step the CTC head runs on the
  step's encoder output, ``model.ctc_decoder(encoder_output=...)`` (log-probabilities, the ``ctc``
  tap), and its greedy labels continue the previous step's (``streaming_parity.interface.decoding.ctc_greedy``):
  what NeMo's ``conformer_stream_step`` with the CTC decoder gives once ``CTCDecoding`` collapses the
  concatenated labels. The RNNT decoder stays NeMo's default (``cur_decoder`` "rnnt").
- Prompt-conditioned models (``EncDecRNNTBPEModelWithPrompt``): each step does what
  ``conformer_stream_step`` does after the encoder, ``_apply_prompt_to_encoded`` with the index NeMo's
  ``set_inference_prompt(locale)`` set (``PromptStreamingMixin``), before decoding; the result is the
  ``prompt`` tap. Offline is NeMo's ``forward(..., prompt_indices=...)``. A stream without a locale is
  NeMo's without ``set_inference_prompt``: the prompt is bypassed.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.nemo_config import read_model_config
from streaming_parity.core.nemo_file import inspect_nemo
from streaming_parity.core.nemo_restore import restore_for_inference, tokenizer_vocabulary
from streaming_parity.core.system.nemo_quiet import quiet_nemo
from streaming_parity.interface.audio import AudioError
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import Chunk
from streaming_parity.interface.decoding import ctc_step
from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.speakers import SpeakerTargets
from streaming_parity.interface.taps import (
    TAP_CTC,
    TAP_DECODER,
    TAP_ENCODER,
    TAP_JOINT,
    TAP_PRE_ENCODE,
    TAP_PROMPT,
    layer_tap,
)
from streaming_parity.interface.types import DecoderState, OfflineOutput, StepOutput, StreamingState


class _TapRecorder:
    """Forward hooks that record the shared taps of one forward pass."""

    def __init__(self, model):
        self.model = model
        self.records: dict[str, list[np.ndarray]] = {}
        self.handles = []

    def _record(self, name: str, tensor) -> None:
        self.records.setdefault(name, []).append(tensor.detach().float().cpu().numpy().copy())

    def __enter__(self) -> _TapRecorder:
        encoder = self.model.encoder
        self.handles.append(encoder.pre_encode.register_forward_hook(
            lambda _m, _i, out: self._record(TAP_PRE_ENCODE, out[0] if isinstance(out, tuple) else out)))
        for index, layer in enumerate(encoder.layers):
            # prepend: the layer's own output, before a multitalker model's speaker-kernel post-hook
            # (SpeakerKernelMixin hooks layer i-1 to feed layer i) adds to it.
            self.handles.append(layer.register_forward_hook(
                lambda _m, _i, out, name=layer_tap(index): self._record(name, out[0] if isinstance(out, tuple) else out),
                prepend=True))
        # RNNTDecoder.predict runs embedding -> dec_rnn (LSTMDropout); its output [B, U, H] or [U, B, H].
        dec_rnn = self.model.decoder.prediction["dec_rnn"]
        self.handles.append(dec_rnn.register_forward_hook(
            lambda _m, _i, out: self._record(TAP_DECODER, (out[0] if isinstance(out, tuple) else out).reshape(-1, out[0].shape[-1]))))
        # RNNTJoint.joint_after_projection: joint_net(f + g) gives the raw logits (log-softmax comes after).
        self.handles.append(self.model.joint.joint_net.register_forward_hook(
            lambda _m, _i, out: self._record(TAP_JOINT, out.reshape(-1, out.shape[-1]))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def taps(self, num_classes: int, pred_hidden: int) -> dict[str, np.ndarray]:
        taps = {}
        for name, arrays in self.records.items():
            if name in (TAP_DECODER, TAP_JOINT):
                taps[name] = np.concatenate(arrays, axis=0)
            else:
                if len(arrays) != 1:
                    raise RuntimeError(f"tap {name} was recorded {len(arrays)} times in one forward")
                taps[name] = arrays[0]
        taps.setdefault(TAP_DECODER, np.zeros((0, pred_hidden), np.float32))
        taps.setdefault(TAP_JOINT, np.zeros((0, num_classes), np.float32))
        return taps


class NemoBackend(Backend):
    name = "nemo"

    def __init__(self, nemo_path: str | Path, *, device: str = "cpu"):
        import torch

        self._torch = torch
        self.path = Path(nemo_path)
        archive = inspect_nemo(self.path)  # refuses unsafe files before NeMo sees them
        model_config = read_model_config(archive.config)  # and configs the harness cannot read
        model = restore_for_inference(archive, device=device)
        self.model = model
        self.config = archive.config
        self.model_config = model_config
        self.vocabulary = tokenizer_vocabulary(model)
        self.info = ModelInfo.from_nemo_config(model_config, self.vocabulary)
        max_symbols = getattr(model.decoding.decoding, "max_symbols", None)
        if max_symbols is not None:
            self.info = dataclasses.replace(self.info, max_symbols=int(max_symbols))
        self._current_context: tuple[int, int] | None = None

    # -- helpers -----------------------------------------------------------------------------------
    def _ensure_eval(self) -> None:
        """Put the model back in eval mode if something took it out.

        ``ASRModel.transcribe`` ends by calling ``unfreeze()`` on the encoder, decoder and joint, and
        ``NeMoModule.unfreeze`` calls ``train()``: the model reports ``training == False`` while its
        modules run with dropout and the encoder samples a random attention context per forward
        (``att_context_probs``). Measured here: a [70,13] offline WER of 39.4 % became 42.4 % and
        52.5 % after a transcribe() call. The reference must never run that way.
        """
        model = self.model
        ctc_head = getattr(model, "ctc_decoder", None)
        if model.encoder.training or model.decoder.training or model.joint.training or model.preprocessor.training \
                or (ctc_head is not None and ctc_head.training):
            model.eval()

    def _use_context(self, att_context_size: Sequence[int]) -> None:
        context = (int(att_context_size[0]), int(att_context_size[1]))
        if context not in self.info.att_context_sizes:
            raise InvalidInput(f"att_context_size {list(context)} is not one of the model's "
                             f"{[list(c) for c in self.info.att_context_sizes]}")
        if context != self._current_context:
            with quiet_nemo():
                self.model.encoder.set_default_att_context_size(list(context))
            self._current_context = context

    def streaming_config_from_nemo(self, att_context_size: Sequence[int]):
        """NeMo's own ``streaming_cfg`` for a lookahead (tests compare it with ours)."""
        self._use_context(att_context_size)
        return self.model.encoder.streaming_cfg

    def _to_hypotheses(self, state: StreamingState):
        from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

        if state.native is not None:
            return copy.deepcopy(state.native)
        hypotheses = []
        for dec in state.decoder:
            if not dec.tokens and dec.last_token == self.info.blank_id:
                hypotheses.append(None)
                continue
            torch = self._torch
            dec_state = [torch.from_numpy(dec.h.copy()), torch.from_numpy(dec.c.copy())]
            hypotheses.append(Hypothesis(score=0.0, y_sequence=list(dec.tokens), dec_state=dec_state,
                                         timestamp=[], last_token=int(dec.last_token)))
        return None if all(h is None for h in hypotheses) else hypotheses

    def _decoder_states(self, hypotheses) -> list[DecoderState]:
        states = []
        for hyp in hypotheses:
            tokens = [int(t) for t in (hyp.y_sequence.tolist() if hasattr(hyp.y_sequence, "tolist") else hyp.y_sequence)]
            if hyp.dec_state is None:
                states.append(DecoderState.start(self.info.blank_id, self.info.pred_layers, self.info.pred_hidden))
                continue
            h, c = (s.detach().float().cpu().numpy().reshape(self.info.pred_layers, 1, self.info.pred_hidden)
                    for s in hyp.dec_state)
            last = self.info.blank_id if hyp.last_token is None else int(hyp.last_token)
            states.append(DecoderState(last_token=last, h=h.copy(), c=c.copy(), tokens=tokens))
        return states

    def _ctc(self, encoded, encoded_len, last_labels: list[int]) -> tuple[np.ndarray, list[list[int]], list[int]]:
        """The CTC head on ``encoded`` ``[B, D, T]``: its log-probabilities over the valid frames
        ``[B, T_valid, V+1]``, and per batch item the greedy labels emitted after ``last_labels`` and the
        last frame's label."""
        log_probs = self.model.ctc_decoder(encoder_output=encoded).float().cpu().numpy()
        return ctc_step(log_probs, encoded_len, self.info.blank_id, last_labels)

    # -- Backend interface -------------------------------------------------------------------------
    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        if audio.shape[-1] == 0:
            # NeMo's preprocessor indexes the first sample (IndexError): refused here, as the input it is.
            raise AudioError("nemo: no samples; the front end needs at least one")
        lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.int64)
        with torch.inference_mode():
            mel, mel_len = self.model.preprocessor(input_signal=torch.from_numpy(audio), length=lengths)
        return mel.numpy().copy(), mel_len.numpy().astype(np.int64)

    def _set_speaker_targets(self, speaker_masks: SpeakerTargets | None) -> None:
        """What NeMo's multitalker driver does before ``conformer_stream_step``: ``set_speaker_targets``.
        The model's own hooks then reconcile lengths (``solve_length_mismatch``)."""
        if not self.info.multitalker:
            return
        torch = self._torch
        as_tensor = lambda m: None if m is None else torch.from_numpy(np.asarray(m, np.float32).copy())  # noqa: E731
        masks = speaker_masks or SpeakerTargets(None, None)
        self.model.set_speaker_targets(as_tensor(masks.target), as_tensor(masks.background))

    def _apply_prompt(self, encoded, locale: str | None):
        """``conformer_stream_step``'s ``_apply_prompt_to_encoded`` on ``encoded`` ``[B, D, T]`` with the
        index ``set_inference_prompt(locale)`` sets; without a locale, NeMo's bypass (encoded unchanged)."""
        if self.info.prompt_index(locale) is None:  # no locale (a model without a prompt never has one)
            return encoded
        with quiet_nemo():
            self.model.set_inference_prompt(locale)
        return self.model._apply_prompt_to_encoded(encoded)

    def prompt_kernel(self) -> PromptKernel | None:
        if not self.info.prompted:
            return None
        kernel = self.model.prompt_kernel  # Sequential(Linear, ReLU, Linear)
        array = lambda t: t.detach().float().cpu().numpy().copy()  # noqa: E731
        return PromptKernel(array(kernel[0].weight), array(kernel[0].bias), array(kernel[2].weight),
                            array(kernel[2].bias))

    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks: SpeakerTargets | None = None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        if forced_decisions is not None:
            raise ValueError("nemo: the reference decodes freely (no teacher forcing)")
        self.check_speaker_masks(speaker_masks, chunk.mel.shape[0])
        self._set_speaker_targets(speaker_masks)
        torch = self._torch
        self._ensure_eval()
        self._use_context(state.att_context_size)
        self.streaming_config(state.att_context_size).check_chunk(chunk, self.name)
        self.info.check_state(state)
        previous = self._to_hypotheses(state)
        started = time.perf_counter()
        with torch.inference_mode(), _TapRecorder(self.model) as recorder:
            # What EncDecRNNTModel.conformer_stream_step does for a transducer, minus text assembly:
            # the encoder's cache-aware step, then greedy decoding continuing the partial hypotheses.
            encoded, encoded_len, channel, time_cache, channel_len = self.model.encoder.cache_aware_stream_step(
                processed_signal=torch.from_numpy(chunk.mel),
                processed_signal_length=torch.from_numpy(chunk.length),
                cache_last_channel=torch.from_numpy(state.cache_last_channel.copy()),
                cache_last_time=torch.from_numpy(state.cache_last_time.copy()),
                cache_last_channel_len=torch.from_numpy(state.cache_last_channel_len.copy()),
                keep_all_outputs=chunk.keep_all_outputs,
                drop_extra_pre_encoded=chunk.drop_extra_pre_encoded,
            )
            decoded_from = self._apply_prompt(encoded, state.prompt)
            hypotheses = self.model.decoding.rnnt_decoder_predictions_tensor(
                encoder_output=decoded_from, encoded_lengths=encoded_len, return_hypotheses=True,
                partial_hypotheses=previous)
            if self.info.ctc_head:
                ctc_taps, ctc_emitted, ctc_last = self._ctc(decoded_from, encoded_len,
                                                            self.info.ctc_labels_before(state))
        seconds = time.perf_counter() - started
        encoded_np = encoded.numpy().copy()
        new_decoder = self._decoder_states(hypotheses)
        emitted = [new.tokens[len(old.tokens):] for new, old in zip(new_decoder, state.decoder)]
        taps = recorder.taps(len(self.vocabulary) + 1, self.info.pred_hidden)
        taps[TAP_ENCODER] = encoded_np
        if self.info.prompted:
            taps[TAP_PROMPT] = decoded_from.numpy().copy()
        new_state = StreamingState(
            att_context_size=state.att_context_size,
            cache_last_channel=channel.numpy().copy(),
            cache_last_time=time_cache.numpy().copy(),
            cache_last_channel_len=channel_len.numpy().astype(np.int64),
            decoder=new_decoder,
            step_index=state.step_index + 1,
            # NeMo continues partial hypotheses by mutating them: the next step decodes a copy of these
            # (``_to_hypotheses``), so they are kept as they are, not copied twice.
            native=hypotheses,
            ctc_last_label=ctc_last if self.info.ctc_head else None,
            prompt=state.prompt,
        )
        if self.info.ctc_head:
            taps[TAP_CTC] = ctc_taps
        return StepOutput(encoded=encoded_np, encoded_len=encoded_len.numpy().astype(np.int64), state=new_state,
                          tokens=emitted, taps=taps, seconds=seconds,
                          ctc_tokens=ctc_emitted if self.info.ctc_head else None)

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks: SpeakerTargets | None = None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        if forced_decisions is not None:
            raise ValueError("nemo: the reference decodes freely (no teacher forcing)")
        torch = self._torch
        prompt_index = self.info.prompt_index(prompt)
        self.check_speaker_masks(speaker_masks, mel.shape[0])
        self._set_speaker_targets(speaker_masks)
        self._ensure_eval()
        self._use_context(att_context_size)
        with torch.inference_mode(), _TapRecorder(self.model) as recorder:
            mel_t, length_t = torch.from_numpy(mel), torch.from_numpy(np.asarray(length, np.int64))
            if prompt_index is None:
                encoded, encoded_len = self.model.encoder(audio_signal=mel_t, length=length_t)
                decoded_from = encoded
            else:
                # NeMo's own offline path (EncDecRNNTBPEModelWithPrompt.forward): encoder, one-hot prompt
                # concatenated, prompt_kernel. The encoder's own output is taken from a hook.
                seen = []
                hook = self.model.encoder.register_forward_hook(lambda _m, _i, out: seen.append(out[0]))
                try:
                    decoded_from, encoded_len = self.model.forward(
                        processed_signal=mel_t, processed_signal_length=length_t,
                        prompt_indices=torch.full((mel.shape[0],), prompt_index, dtype=torch.long))
                finally:
                    hook.remove()
                encoded = seen[0]
            hypotheses = self.model.decoding.rnnt_decoder_predictions_tensor(
                encoder_output=decoded_from, encoded_lengths=encoded_len, return_hypotheses=True)
            ctc_tokens = None
            if self.info.ctc_head:
                ctc_taps, ctc_tokens, _ = self._ctc(decoded_from, encoded_len, [self.info.blank_id] * mel.shape[0])
        taps = recorder.taps(len(self.vocabulary) + 1, self.info.pred_hidden)
        taps[TAP_ENCODER] = encoded.numpy().copy()
        if self.info.prompted:
            taps[TAP_PROMPT] = decoded_from.numpy().copy()
        if ctc_tokens is not None:
            taps[TAP_CTC] = ctc_taps
        tokens = [[int(t) for t in h.y_sequence.tolist()] for h in hypotheses]
        return OfflineOutput(encoded=encoded.numpy().copy(), encoded_len=encoded_len.numpy().astype(np.int64),
                             tokens=tokens, taps=taps, ctc_tokens=ctc_tokens)

    def close(self) -> None:
        self.model = None


def prepare(nemo_path: Path, work_dir: Path, *, dtype: str = "float32", att_context_sizes=None) -> Path:
    """The reference runs the ``.nemo`` itself."""
    if dtype != "float32":
        raise InvalidInput(f"nemo backend runs float32 only, not {dtype}")
    return Path(nemo_path)


def load(source: Path, *, dtype: str = "float32", nemo_path: Path | None = None, **options) -> NemoBackend:
    if dtype != "float32":
        raise InvalidInput(f"nemo backend runs float32 only, not {dtype}")
    return NemoBackend(source, **options)

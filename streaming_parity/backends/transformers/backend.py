"""transformers' NemotronAsrStreamingForRNNT / Nemotron3_5AsrForRNNT behind the shared streaming interface: the
model loaded as users load it (``AutoModelForRNNT.from_pretrained`` with its defaults, in float32 or
bfloat16), fed the harness's mel chunks step by step with its own explicit caches, every tap read through
forward hooks.

How transformers streams, and what that means for the taps (``modeling_nemotron_asr_streaming.py``):

- **Subsampling.** Each causal conv of the subsampling keeps its own padding cache
  (``NemotronAsrStreamingEncoderCausalConvPaddingCache``), where NeMo prefixes each chunk with 9 earlier mel
  frames and drops the first 2 subsampled frames (``drop_extra_pre_encoded``). So this backend feeds only a
  chunk's new mel frames, and transformers' subsampling output is NeMo's ``pre_encode`` *after* the drop:
  the ``pre_encode`` tap is given for the plain first chunk only (nothing is dropped there), and is absent
  from later steps (the note says so). Its first chunk is NeMo's plain first chunk (``1 + 8R`` frames), so
  only ``plain`` is streamed.
- **Attention cache.** A ``DynamicCache`` with a sliding window of ``left + 1`` holds the keys and values of
  the last frames, where NeMo's ``cache_last_channel`` holds the attention input they are projected from (the
  output of ``norm_self_att``). The canonical cache is that input, recorded by a hook on ``norm_self_att`` at
  every step, over as many frames as transformers' cache holds (``cache_last_channel_len`` is read from its
  cache): inverting ``v_proj`` instead would amplify the cached values' rounding by the projection's condition
  number (measured: rel_l2 0.06 in bfloat16 on tiny-streaming, where the layers are at 0.011).
- **Conv cache.** ``conv.{i}``'s padding cache is NeMo's ``cache_last_time`` exactly (the depthwise conv's
  input, last ``kernel - 1`` frames).
- **Decoding.** NeMo's greedy RNN-T loop (as the MLX backend's) over transformers' own modules
  (``decoder.embedding``, ``decoder.lstm``, ``decoder.decoder_projector``, ``encoder_projector``,
  ``joint``), starting from the blank's embedding row as transformers' ``generate()`` does
  (``decoder_start_token_id``); ``decoder`` is the LSTM's output, ``joint`` the raw logits of every call.
- **Prompt.** The locale goes through the directory's own ``prompt_dictionary``; transformers cannot bypass
  its prompt projector, so a stream without a locale runs ``config.default_prompt_id``.

transformers' own ``generate()`` over its processor's chunks is the ``transformers-generate`` backend
(``streaming_parity.backends.transformers.runtime``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.backends.transformers import naming
from streaming_parity.backends.transformers.directory import HfDirectory, check_against_nemo
from streaming_parity.core.errors import InvalidInput, Unsupported
from streaming_parity.interface.backend import Backend, Capabilities
from streaming_parity.interface.chunking import Chunk
from streaming_parity.interface.decoding import ForcedDecisions
from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.speakers import SpeakerTargets
from streaming_parity.interface.taps import TAP_DECODER, TAP_ENCODER, TAP_JOINT, TAP_PRE_ENCODE, TAP_PROMPT, layer_tap
from streaming_parity.interface.types import DecoderState, OfflineOutput, StepOutput, StreamingState, expect_shape

CAPABILITIES = Capabilities(first_chunk_modes=("plain",), teacher_forcing=True, peer=True)
DTYPES = ("float32", "bfloat16")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InvalidInput(f"transformers: dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return getattr(torch, name)


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().copy()


@dataclass
class NativeState:
    """transformers' own streaming caches, carried from step to step in ``StreamingState.native``."""

    cache: Any  # DynamicCache (attention keys and values)
    padding_cache: Any  # NemotronAsrStreamingEncoderCausalConvPaddingCache
    frames_seen: int
    # Per layer, the attention inputs (norm_self_att outputs) of the last frames, [B, frames, D]: what the cached
    # keys and values were projected from.
    attention_inputs: list[np.ndarray] | None = None


def model_info(directory: HfDirectory, vocabulary: Sequence[str]) -> ModelInfo:
    """What the directory states, in the harness's terms (its encoder restated as the NeMo section it implements)."""
    config = directory.config
    dictionary = directory.prompt_dictionary() if directory.family == naming.FAMILY_PROMPT else {}
    encoder = directory.nemo_encoder_section()
    return ModelInfo(
        num_layers=encoder["n_layers"], d_model=encoder["d_model"], n_mels=encoder["feat_in"],
        conv_kernel_size=encoder["conv_kernel_size"], subsampling_factor=encoder["subsampling_factor"],
        att_context_sizes=tuple(tuple(c) for c in encoder["att_context_size"]), vocabulary=tuple(vocabulary),
        blank_id=int(config["blank_token_id"]), pred_layers=int(config.get("num_decoder_layers", 2)),
        pred_hidden=int(config.get("decoder_hidden_size", 640)), max_symbols=int(config.get("max_symbols_per_step", 10)),
        encoder_config=encoder,
        num_prompts=int(config.get("num_prompts", 128)) if dictionary else 0,
        prompt_dictionary=tuple(sorted(dictionary.items())),
    )


class _Taps:
    """Forward hooks recording what one forward computes, copied as it is computed (transformers scales the
    subsampling output in place right after it)."""

    def __init__(self, model, *, pre_encode: bool, prompted: bool):
        self.records: dict[str, Any] = {}
        self.handles = []
        encoder = model.encoder
        if pre_encode:
            self._hook(encoder.subsampling, TAP_PRE_ENCODE)
        for index, layer in enumerate(encoder.layers):
            self._hook(layer, layer_tap(index))
            self._hook(layer.norm_self_att, f"attention_input.{index}")
        if prompted:
            self._hook(model.prompt_projector, TAP_PROMPT)

    def _hook(self, module, name: str) -> None:
        def record(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if name in self.records:
                raise RuntimeError(f"tap {name} was recorded twice in one forward")
            self.records[name] = _numpy(tensor)

        self.handles.append(module.register_forward_hook(record))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class TransformersBackend(Backend):
    name = "transformers"
    capabilities = CAPABILITIES

    def __init__(self, path: str | Path, *, dtype: str | None = None, nemo_path: str | Path | None = None):
        import torch
        from transformers import AutoModelForRNNT, AutoProcessor

        self._torch = torch
        self.directory = HfDirectory.read(path)
        self.dtype = dtype or "float32"
        self.model = AutoModelForRNNT.from_pretrained(str(self.directory.path), dtype=torch_dtype(self.dtype)).eval()
        self.processor = AutoProcessor.from_pretrained(str(self.directory.path))
        tokenizer = self.processor.tokenizer
        blank = int(self.directory.config["blank_token_id"])
        self.vocabulary = tuple(tokenizer.convert_ids_to_tokens(list(range(blank))))
        self.info = model_info(self.directory, self.vocabulary)
        self._notes = [f"{self.directory.path}: transformers {_version()} {type(self.model).__name__} ({self.dtype}), "
                       "loaded by AutoModelForRNNT.from_pretrained with its defaults",
                       "pre_encode compared at the plain first chunk only: transformers' subsampling keeps a cache per "
                       "conv (no 9-frame mel prefix), so its later output is NeMo's pre_encode after "
                       "drop_extra_pre_encoded",
                       "cache_last_channel: the attention input (norm_self_att) of the frames transformers' key/value "
                       "cache holds, NeMo's layout; cache_last_channel_len read from its cache"]
        if self.info.prompted:
            self._notes.append(f"a stream without a locale runs prompt column {self.model.config.default_prompt_id} "
                               "(transformers applies its prompt projector always; NeMo bypasses it)")
        self.nemo_check = None
        # NeMo's index of the joint's output layer (joint_net.1 without a Dropout): from the .nemo when given,
        # else transformers' own conversion's assumption (joint_net.2).
        self.joint_output_index = 2
        if nemo_path is not None:
            from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

            self.joint_output_index = naming.joint_output_index(load_state_dict(inspect_nemo(nemo_path)))
            self.nemo_check = check_against_nemo(self.directory, nemo_path, list(self.model.state_dict()))
            if self.nemo_check.contradictions:
                raise InvalidInput(f"{self.directory.path}: " + "; ".join(self.nemo_check.contradictions))
            self._notes += self.nemo_check.lines()

    # -- pieces of transformers' model -----------------------------------------------------------------------
    def _prompt_ids(self, locale: str | None):
        if not self.info.prompted:
            return None
        index = self.info.prompt_index(locale)
        if index is None:
            index = int(self.model.config.default_prompt_id)
        return self._torch.tensor([index], dtype=self._torch.long)

    def _encode(self, features, *, attention_mask=None, native: NativeState | None, lookahead: int,
                prompt: str | None, pre_encode: bool):
        """transformers' ``get_audio_features`` on ``features`` ``[B, T, n_mels]``: the encoder output ``[B, T', D]``,
        what the joint reads (``encoder_projector`` of the encoder or prompt output) and the taps."""
        kwargs: dict[str, Any] = {"num_lookahead_tokens": lookahead, "output_attention_mask": False}
        if native is not None:
            kwargs.update(cache=native.cache, padding_cache=native.padding_cache, use_cache=True)
        if self.info.prompted:
            kwargs["prompt_ids"] = self._prompt_ids(prompt)
        taps = _Taps(self.model, pre_encode=pre_encode, prompted=self.info.prompted)
        try:
            with self._torch.inference_mode():
                out = self.model.get_audio_features(input_features=features.to(self.model.dtype),
                                                    attention_mask=attention_mask, **kwargs)
        finally:
            taps.close()
        return out, taps.records

    def _decoder_step(self, token: int, h, c):
        """One prediction-net call of transformers' decoder (``NemotronAsrStreamingRNNTDecoder.forward`` without its
        cache bookkeeping): the LSTM output (the ``decoder`` tap), its projection, and the new state."""
        decoder = self.model.decoder
        ids = self._torch.tensor([[token]], dtype=self._torch.long)
        lstm_out, (h_next, c_next) = decoder.lstm(decoder.embedding(ids), (h, c))
        return lstm_out[:, 0], decoder.decoder_projector(lstm_out)[:, 0], h_next, c_next

    def _greedy(self, projected, length: int, state: DecoderState, forced: ForcedDecisions):
        """NeMo's greedy RNN-T loop (``GreedyRNNTInfer._greedy_decode``) over transformers' modules for one
        utterance's projected encoder frames ``[T, H]``: at most ``max_symbols`` joint calls per frame, the
        prediction net's state committed on an emission only."""
        torch = self._torch
        dtype = self.model.dtype
        tokens, emitted, decoder_rows, joint_rows = list(state.tokens), [], [], []
        h = torch.from_numpy(np.asarray(state.h, np.float32)).to(dtype)
        c = torch.from_numpy(np.asarray(state.c, np.float32)).to(dtype)
        last = int(state.last_token)
        with torch.inference_mode():
            g, g_projected, h_next, c_next = self._decoder_step(last, h, c)
            frame, symbols = 0, 0
            while frame < length:
                if symbols >= self.info.max_symbols:
                    frame, symbols = frame + 1, 0
                    continue
                logits = self.model.joint(decoder_hidden_states=g_projected, encoder_hidden_states=projected[frame:frame + 1])
                label = forced.choose(int(torch.argmax(logits.float(), dim=-1)[0]))
                decoder_rows.append(_numpy(g))
                joint_rows.append(_numpy(logits))
                if label == self.info.blank_id:
                    frame, symbols = frame + 1, 0
                    continue
                tokens.append(label)
                emitted.append(label)
                last, h, c = label, h_next, c_next
                g, g_projected, h_next, c_next = self._decoder_step(last, h, c)
                symbols += 1
        forced.finish()
        new_state = DecoderState(last_token=last, h=_numpy(h), c=_numpy(c), tokens=tokens)
        width = len(self.vocabulary) + 1
        return (new_state, emitted, np.concatenate(decoder_rows) if decoder_rows else np.zeros((0, self.info.pred_hidden), np.float32),
                np.concatenate(joint_rows) if joint_rows else np.zeros((0, width), np.float32))

    def _canonical_caches(self, native: NativeState, records: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """transformers' caches in NeMo's layout (``streaming_parity.interface.types``): the attention input of the
        frames its attention cache holds, and its depthwise conv cache."""
        left = self.info.att_context_sizes[0][0]
        d_model, kernel = self.info.d_model, self.info.conv_kernel_size
        channel = np.zeros((self.info.num_layers, batch, left, d_model), np.float32)
        time_cache = np.zeros((self.info.num_layers, batch, d_model, kernel - 1), np.float32)
        if native.attention_inputs is None:
            native.attention_inputs = [np.zeros((batch, 0, d_model), np.float32)] * self.info.num_layers
        held = 0
        for index in range(self.info.num_layers):
            seen = np.concatenate([native.attention_inputs[index], records.pop(f"attention_input.{index}")], axis=1)
            native.attention_inputs[index] = seen[:, -left:]
            held = int(native.cache.layers[index].values.shape[2])  # [B, heads, frames, head_dim]
            if held > left or held > seen.shape[1]:
                raise ValueError(f"transformers' attention cache of layer {index} holds {held} frames; the left "
                                 f"context is {left} and {seen.shape[1]} frames were seen")
            if held:
                channel[index, :, left - held:] = seen[:, -held:]
            conv = _numpy(native.padding_cache.layers[f"conv.{index}"].cache)  # [B, D, kernel - 1]
            expect_shape(f"transformers padding cache conv.{index}", conv, (batch, d_model, kernel - 1))
            time_cache[index] = conv
        return {"cache_last_channel": channel, "cache_last_time": time_cache,
                "cache_last_channel_len": np.full((batch,), held, np.int64)}

    # -- Backend interface ------------------------------------------------------------------------------------
    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """transformers' feature extractor over the whole utterance (``center=True``) -> ``[B, n_mels, T]``."""
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        extractor = self.processor.feature_extractor
        out = extractor(list(audio), sampling_rate=extractor.sampling_rate, return_tensors="pt",
                        return_attention_mask=True)
        mel = _numpy(out["input_features"]).transpose(0, 2, 1)
        return np.ascontiguousarray(mel), out["attention_mask"].sum(-1).numpy().astype(np.int64)

    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks: SpeakerTargets | None = None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        self.check_speaker_masks(speaker_masks, chunk.mel.shape[0])
        context = self.info.check_att_context(state.att_context_size)
        streaming = self.streaming_config(context)
        streaming.check_chunk(chunk, self.name)
        batch = chunk.mel.shape[0]
        if batch != 1:
            raise InvalidInput(f"transformers: one stream at a time, not a batch of {batch}")
        native = state.native
        if native is None:
            if state.step_index != 0:
                raise Unsupported("transformers streams from its own caches (a padding cache per subsampling conv "
                                  "has no NeMo counterpart): it cannot continue from another backend's state")
            from transformers import DynamicCache
            from transformers.models.nemotron_asr_streaming.modeling_nemotron_asr_streaming import (
                NemotronAsrStreamingEncoderCausalConvPaddingCache,
            )

            native = NativeState(DynamicCache(config=self.model.encoder.config),
                                 NemotronAsrStreamingEncoderCausalConvPaddingCache(), 0)
        if chunk.is_first and chunk.drop_extra_pre_encoded:
            raise Unsupported("transformers streams the plain first chunk only (1 + 8R frames, nothing dropped)")
        new = chunk.mel[:, :, chunk.cache_frames:]
        valid = int(chunk.length[0]) - chunk.cache_frames
        if valid != new.shape[-1]:
            raise InvalidInput(f"transformers: chunk {chunk.index} has {new.shape[-1]} new frames of which {valid} "
                               "valid; a stream's frames are all valid")
        started = time.perf_counter()
        features = self._torch.from_numpy(np.ascontiguousarray(new.transpose(0, 2, 1)))
        out, taps = self._encode(features, native=native, lookahead=context[1], prompt=state.prompt,
                                 pre_encode=chunk.is_first)
        frames = out.last_hidden_state.shape[1]
        keep = frames if chunk.keep_all_outputs else min(frames, streaming.valid_out_len)
        native.frames_seen += frames
        decoded_state, emitted, decoder_rows, joint_rows = self._greedy(
            out.pooler_output[0, :keep], keep, state.decoder[0], ForcedDecisions(forced_decisions, self.name))
        seconds = time.perf_counter() - started
        encoded = _numpy(out.last_hidden_state[:, :keep]).transpose(0, 2, 1)
        taps[TAP_ENCODER] = encoded
        if TAP_PROMPT in taps:
            taps[TAP_PROMPT] = taps[TAP_PROMPT][:, :keep].transpose(0, 2, 1)
        taps[TAP_DECODER], taps[TAP_JOINT] = decoder_rows, joint_rows
        caches = self._canonical_caches(native, taps, batch)
        new_state = StreamingState(att_context_size=state.att_context_size, decoder=[decoded_state],
                                   step_index=state.step_index + 1, native=native, prompt=state.prompt, **caches)
        return StepOutput(encoded=encoded, encoded_len=np.array([keep], np.int64), state=new_state, tokens=[emitted],
                          taps=taps, seconds=seconds)

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks: SpeakerTargets | None = None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        """transformers' whole-utterance forward (``get_audio_features`` without caches: the chunked_limited
        mask of the lookahead), then the greedy loop."""
        self.check_speaker_masks(speaker_masks, mel.shape[0])
        context = self.info.check_att_context(att_context_size)
        if mel.shape[0] != 1:
            raise InvalidInput(f"transformers: one utterance at a time, not a batch of {mel.shape[0]}")
        torch = self._torch
        features = torch.from_numpy(np.ascontiguousarray(np.asarray(mel, np.float32).transpose(0, 2, 1)))
        mask = torch.arange(features.shape[1])[None, :] < torch.from_numpy(np.asarray(length, np.int64))[:, None]
        out, taps = self._encode(features, attention_mask=mask, native=None, lookahead=context[1], prompt=prompt,
                                 pre_encode=True)
        frames = int(self.model.encoder._get_subsampling_output_length(torch.as_tensor(np.asarray(length)))[0])
        start = DecoderState.start(self.info.blank_id, self.info.pred_layers, self.info.pred_hidden)
        decoded, _, decoder_rows, joint_rows = self._greedy(out.pooler_output[0, :frames], frames, start,
                                                            ForcedDecisions(forced_decisions, self.name))
        encoded = _numpy(out.last_hidden_state[:, :frames]).transpose(0, 2, 1)
        taps = {name: value for name, value in taps.items() if not name.startswith("attention_input.")}
        taps[TAP_ENCODER] = encoded
        if TAP_PROMPT in taps:
            taps[TAP_PROMPT] = taps[TAP_PROMPT][:, :frames].transpose(0, 2, 1)
        taps[TAP_DECODER], taps[TAP_JOINT] = decoder_rows, joint_rows
        return OfflineOutput(encoded=encoded, encoded_len=np.array([frames], np.int64), tokens=[decoded.tokens],
                             taps=taps)

    def prompt_kernel(self) -> PromptKernel | None:
        if not self.info.prompted:
            return None
        projector = self.model.prompt_projector
        return PromptKernel(weight_in=_numpy(projector.linear_1.weight), bias_in=_numpy(projector.linear_1.bias),
                            weight_out=_numpy(projector.linear_2.weight), bias_out=_numpy(projector.linear_2.bias))

    def notes(self) -> list[str]:
        return list(self._notes)

    def close(self) -> None:
        self.model = None
        self.processor = None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version("transformers")
    return "unknown"

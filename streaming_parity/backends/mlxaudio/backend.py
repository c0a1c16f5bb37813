"""mlx-audio's Nemotron-3.5 streaming ASR as a peer backend: ``mlx_audio.stt.load`` on the directory its
converter wrote, then ``Model.stream_generate`` (what ``generate`` runs for one utterance) on the audio with
the prompt locale.

Each encoder chunk ``stream_generate`` decodes is one step: the tokens its cumulative result gained, and
the chunk's encoder output before (``encoder``) and after (``prompt``) the prompt kernel, recorded by
wrapping the model's ``apply_prompt`` for the duration of the run (the computation is mlx-audio's own).
Its front end is ``log_mel_spectrogram`` with the model's ``PreprocessArgs`` (``features``), and its encoder can
be fed a mel from elsewhere (``encode_mel``: its cache-aware streaming state, or its offline encoder), so
that the harness can clear or blame each part. It exposes no caches.

What it does not carry over from a NeMo checkpoint is declared as ``corrections`` (the STFT's padding
mode; the streaming path's input scaling), each of which ``features`` / ``encode_mel`` can apply, so that
``streaming_parity.judge.peer_audit`` measures which one accounts for a difference instead of assuming it.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from streaming_parity.core.errors import InputNotFound, InvalidInput
from streaming_parity.interface.backend import AudioInputBackend, Capabilities
from streaming_parity.interface.model_info import ModelInfo
from streaming_parity.interface.peer import PART_ENCODER, PART_FRONT_END, Correction, LoadedParameters, PeerRuntime
from streaming_parity.interface.taps import TAP_ENCODER, TAP_PROMPT
from streaming_parity.interface.types import DecoderState, StepOutput, StreamingState

CAPABILITIES = Capabilities(first_chunk_modes=("plain",), taps=(TAP_ENCODER, TAP_PROMPT), caches=False,
                            offline=False, teacher_forcing=False, input="audio")
STFT_PAD_CONSTANT = "stft-pad-constant"
STREAMING_XSCALE = "streaming-xscale"
_LSTM = re.compile(r"^(?P<stem>.*\.dec_rnn\.lstm)\.(?P<layer>\d+)\.(?P<kind>Wx|Wh|bias)$")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-audio")
    except PackageNotFoundError:
        return "unknown"


def checkpoint_names(artifact_name: str) -> tuple[str, ...]:
    """The NeMo tensor(s) mlx-audio's converter made ``artifact_name`` from (``_convert_weights``)."""
    match = _LSTM.match(artifact_name)
    if match is None:
        return (artifact_name,)
    stem, layer, kind = match["stem"], match["layer"], match["kind"]
    if kind == "bias":
        return (f"{stem}.bias_ih_l{layer}", f"{stem}.bias_hh_l{layer}")
    return (f"{stem}.weight_{'ih' if kind == 'Wx' else 'hh'}_l{layer}",)


def checkpoint_layout(array: np.ndarray) -> np.ndarray:
    """Undo the converter's transposes: Conv2d (O, kH, kW, I) -> (O, I, kH, kW), Conv1d (O, k, I) -> (O, I, k)."""
    if array.ndim == 4:
        return array.transpose(0, 3, 1, 2)
    if array.ndim == 3:
        return array.transpose(0, 2, 1)
    return array


class MlxAudioBackend(AudioInputBackend, PeerRuntime):
    name = "mlx-audio"
    capabilities = CAPABILITIES

    def __init__(self, path: str | Path, *, dtype: str | None = None, nemo_path: str | Path | None = None):
        self.directory = Path(path)
        if not (self.directory / "config.json").is_file():
            raise InputNotFound(f"{self.directory}: not an mlx-audio model directory (no config.json)")
        from mlx_audio.stt import load

        self.config = json.loads((self.directory / "config.json").read_text())
        self.model = load(str(self.directory))  # exactly as its users load it: strict=False
        self.strict = False
        self.dtype = dtype or self._weights_dtype()
        self.info = self._model_info(nemo_path)

    def _weights_dtype(self) -> str:
        from mlx.utils import tree_flatten

        first = next(value for _, value in tree_flatten(self.model.parameters()))
        return str(first.dtype).rsplit(".", 1)[-1]

    def _model_info(self, nemo_path) -> ModelInfo:
        prompt = self.config.get("prompt", {})
        extra = {"num_prompts": int(prompt.get("num_prompts", 0)),
                 "prompt_dictionary": dict(prompt.get("prompt_dictionary", {}))}
        vocabulary = tuple(self.config["vocabulary"])
        if nemo_path is not None:
            from streaming_parity.core.nemo_config import read_model_config
            from streaming_parity.core.nemo_file import inspect_nemo

            config = read_model_config(inspect_nemo(nemo_path).config)
            return replace(ModelInfo.from_nemo_config(config, vocabulary), **extra)
        encoder, decoder = self.config["encoder"], self.config["decoder"]
        return ModelInfo(num_layers=encoder["n_layers"], d_model=encoder["d_model"], n_mels=encoder["feat_in"],
                         conv_kernel_size=encoder["conv_kernel_size"],
                         subsampling_factor=encoder["subsampling_factor"],
                         att_context_sizes=tuple(tuple(c) for c in encoder["att_context_size"]),
                         vocabulary=vocabulary, blank_id=len(vocabulary), pred_layers=decoder["pred_rnn_layers"],
                         pred_hidden=decoder["pred_hidden"], max_symbols=int(self.config.get("max_symbols", 10)),
                         **extra)

    # -- what a user's run is made of, and what it says about itself (PeerRuntime) -------------------
    def features(self, audio: np.ndarray, *, corrections: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """mlx-audio's log-mel front end (``log_mel_spectrogram``) -> ``[B, n_mels, T]``; every frame is used."""
        import mlx.core as mx
        from mlx_audio.stt.models.nemotron_asr.audio import log_mel_spectrogram

        args = self.model.preprocessor_config
        if STFT_PAD_CONSTANT in corrections:
            args = replace(args, pad_mode="constant")
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        mels = [np.array(log_mel_spectrogram(mx.array(row), args))[0].T for row in audio]
        return np.stack(mels).astype(np.float32), np.array([m.shape[-1] for m in mels], np.int64)

    def corrections(self) -> list[Correction]:
        """The settings this runtime does not take from the checkpoint, each runnable the reference's way."""
        found = []
        pad_mode = self.model.preprocessor_config.pad_mode
        if pad_mode != "constant":
            found.append(Correction(STFT_PAD_CONSTANT, PART_FRONT_END,
                                    f"{pad_mode} padding of the STFT (PreprocessArgs.pad_mode default; its converter "
                                    "does not write one)",
                                    "constant (zero) padding, as NeMo's FilterbankFeatures (torch.stft pad_mode)"))
        scale = float(getattr(self.model.encoder.pos_enc, "scale", 1.0))
        if scale != 1.0:
            found.append(Correction(STREAMING_XSCALE, PART_ENCODER,
                                    "the streaming encoder (ConformerStreamingState) feeds the subsampling output to "
                                    "the layers unscaled",
                                    f"xscaling: x * sqrt(d_model) = {scale:.4g} before the layers, as NeMo and "
                                    "mlx-audio's own offline encoder do"))
        return found

    @contextlib.contextmanager
    def _patched(self, *, record: list | None = None, corrections: Sequence[str] = ()):
        """Record ``apply_prompt``'s input and output; scale the streaming subsampling output when corrected."""
        model = self.model
        patched = []
        if record is not None:
            original = model.apply_prompt

            def apply_prompt(encoded, language):
                prompted = original(encoded, language)
                record.append((encoded, prompted))
                return prompted

            object.__setattr__(model, "apply_prompt", apply_prompt)
            patched.append((model, "apply_prompt"))
        if STREAMING_XSCALE in corrections:
            pre_encode, scale = model.encoder.pre_encode, model.encoder.pos_enc.scale

            class Scaled:
                def __call__(self, x, lengths):
                    out, out_lengths = pre_encode(x, lengths)
                    return out * scale, out_lengths

            object.__setattr__(model.encoder, "pre_encode", Scaled())
            patched.append((model.encoder, "pre_encode"))
        try:
            yield
        finally:
            for owner, attribute in patched:
                object.__delattr__(owner, attribute)

    def encode_mel(self, mel: np.ndarray, att_context_size: Sequence[int], *, offline: bool = False,
                   corrections: Sequence[str] = ()) -> list[np.ndarray]:
        """mlx-audio's encoder fed ``mel`` ``[1, n_mels, T]`` (all frames): its cache-aware streaming state (one
        ``[1, D, T_step]`` per chunk, as ``stream_generate`` cuts them) or, ``offline``, its whole-utterance forward
        with the chunked-limited mask (one array)."""
        import mlx.core as mx
        from mlx_audio.stt.models.nemotron_asr.streaming import ConformerStreamingState

        context = self.info.check_att_context(att_context_size)
        frames = mx.array(np.ascontiguousarray(np.asarray(mel, np.float32)[0].T[None]))
        if offline:
            encoded, _ = self.model.encoder(frames, att_context_size=list(context))
            return [np.array(encoded).transpose(0, 2, 1).astype(np.float32)]
        with self._patched(corrections=corrections):
            state = ConformerStreamingState(self.model.encoder, att_context_size=list(context))
            outputs = state.push(frames, final=True)
            return [np.array(o).transpose(0, 2, 1).astype(np.float32) for o in outputs]

    def stream_audio(self, audio: np.ndarray, att_context_size: Sequence[int], *,
                     prompt: str | None = None) -> Iterator[StepOutput]:
        """``Model.stream_generate(audio, language=prompt, att_context_size=...)``: one step per encoder chunk."""
        import mlx.core as mx

        audio = np.atleast_2d(np.asarray(audio, np.float32))
        if audio.shape[0] != 1:
            raise InvalidInput(f"mlx-audio: one utterance at a time, not a batch of {audio.shape[0]}")
        context = self.info.check_att_context(att_context_size)
        if prompt is not None and prompt not in self.info.prompt_dictionary:
            raise InvalidInput(f"mlx-audio: prompt {prompt!r} is not one of the model's "
                               f"{sorted(self.info.prompt_dictionary)}")
        record: list = []
        emitted: list[int] = []
        with self._patched(record=record):
            results = self.model.stream_generate(mx.array(audio[0]), language=prompt, att_context_size=list(context))
            started = time.perf_counter()
            for step, result in enumerate(results):
                seconds = time.perf_counter() - started
                tokens = [token.id for sentence in result.sentences for token in sentence.tokens]
                if tokens[:len(emitted)] != emitted:
                    raise RuntimeError(f"mlx-audio: the transcript changed its past tokens at step {step}")
                added, emitted = tokens[len(emitted):], tokens
                encoded, prompted = record[step]
                taps = {TAP_ENCODER: np.array(encoded).transpose(0, 2, 1).astype(np.float32),
                        TAP_PROMPT: np.array(prompted).transpose(0, 2, 1).astype(np.float32)}
                state = StreamingState(att_context_size=context, decoder=[DecoderState(
                    last_token=emitted[-1] if emitted else self.info.blank_id, h=np.zeros((0,), np.float32),
                    c=np.zeros((0,), np.float32), tokens=list(emitted))], step_index=step + 1)
                yield StepOutput(encoded=taps[TAP_PROMPT], encoded_len=np.array([taps[TAP_PROMPT].shape[-1]], np.int64),
                                 state=state, tokens=[added], taps=taps, seconds=seconds)
                started = time.perf_counter()

    def loaded_parameters(self) -> LoadedParameters:
        """What the converter wrote (``model.safetensors``) against what ``load`` left in the model."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        written = mx.load(str(self.directory / "model.safetensors"))
        parameters = {name: checkpoint_layout(np.array(value.astype(mx.float32)))
                      for name, value in tree_flatten(self.model.parameters())}
        return LoadedParameters(runtime=f"mlx-audio {_version()}", strict=self.strict,
                                artifact={name: checkpoint_names(name) for name in written}, parameters=parameters)

    # -- Backend interface ---------------------------------------------------------------------------
    def notes(self) -> list[str]:
        default = self.model.default_language
        fallback = "" if default in self.info.prompt_dictionary else (
            f" (not in the prompt dictionary: without a prompt it silently uses index "
            f"{self.model._resolve_prompt_index(None)})")
        return [f"{self.directory}: mlx-audio {_version()} nemotron_asr ({self.dtype}), loaded by mlx_audio.stt.load "
                f"with strict={self.strict}; default language {default!r}{fallback}; its transcripts drop <unk>, "
                "<pad>, <s>, </s> and language tags"]

    def close(self) -> None:
        self.model = None

"""What the harness knows about a model independently of the backend that runs it (``ModelInfo``: sizes,
vocabulary, lookaheads, heads, prompt dictionary; the initial streaming state and its checks), and the
prompt kernel's numpy forward (``PromptKernel``), with which a candidate's ``prompt`` tap is explained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.nemo_config import EncoderConfig, ModelConfig, read_model_config
from streaming_parity.interface.chunking import StreamingConfig
from streaming_parity.interface.types import DecoderState, StreamingState, expect_shape


@dataclass(frozen=True)
class ModelInfo:
    """What the harness needs to know about a model, independent of the backend that runs it."""

    num_layers: int
    d_model: int
    n_mels: int
    conv_kernel_size: int
    subsampling_factor: int
    att_context_sizes: tuple[tuple[int, int], ...]
    vocabulary: tuple[str, ...]
    blank_id: int
    pred_layers: int
    pred_hidden: int
    max_symbols: int
    # The typed encoder config the streaming schedule is derived from (a mapping given here is read).
    encoder_config: EncoderConfig | None = field(default=None, compare=False, hash=False)
    # Multitalker models (SpeakerKernelMixin): encoder layers whose input gets the speaker kernels,
    # and whether a background-speaker kernel is added too. Empty for single-speaker models.
    speaker_kernel_layers: tuple[int, ...] = ()
    background_speaker_kernel: bool = False
    # Hybrid RNNT-CTC models: a CTC head (``aux_ctc``) over the same vocabulary, blank id included.
    ctc_head: bool = False
    # Prompt-conditioned models: the one-hot width and the locale -> column map (sorted pairs); 0 and
    # empty for a model without a prompt kernel.
    num_prompts: int = 0
    prompt_dictionary: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.encoder_config is not None and not isinstance(self.encoder_config, EncoderConfig):
            object.__setattr__(self, "encoder_config", EncoderConfig.from_mapping(self.encoder_config))

    @classmethod
    def from_nemo_config(cls, config: ModelConfig | Mapping[str, Any], vocabulary: Sequence[str]) -> ModelInfo:
        """From a NeMo model config (the ``.nemo``'s or an artifact's ``config.json``), read by
        ``streaming_parity.core.nemo_config``, or from the ``ModelConfig`` already read."""
        model = read_model_config(config)
        encoder, speakers = model.encoder, model.speaker_kernels
        return cls(
            num_layers=encoder.n_layers,
            d_model=encoder.d_model,
            n_mels=encoder.feat_in,
            conv_kernel_size=encoder.conv_kernel_size,
            subsampling_factor=encoder.subsampling_factor,
            att_context_sizes=encoder.att_context_size,
            vocabulary=tuple(vocabulary),
            blank_id=len(vocabulary),
            pred_layers=model.decoder.pred_rnn_layers,
            pred_hidden=model.decoder.pred_hidden,
            max_symbols=model.decoding.max_symbols,
            encoder_config=encoder,
            speaker_kernel_layers=speakers.layers if speakers else (),
            background_speaker_kernel=speakers.background if speakers else False,
            ctc_head=model.ctc is not None,
            num_prompts=model.prompt.num_prompts if model.prompt else 0,
            prompt_dictionary=model.prompt.dictionary if model.prompt else (),
        )

    @property
    def multitalker(self) -> bool:
        return bool(self.speaker_kernel_layers)

    @property
    def prompted(self) -> bool:
        """Whether the model has a prompt kernel (and so takes a locale per stream)."""
        return self.num_prompts > 0

    @property
    def default_prompt(self) -> str | None:
        """The locale a stream gets when nobody names one: en-US, the fixture speech's language (NeMo has
        no default: its transcribe raises without ``target_lang``). None for a model without a prompt."""
        if not self.prompted:
            return None
        locales = dict(self.prompt_dictionary)
        if "en-US" not in locales:
            raise InvalidInput(f"the model's prompt_dictionary has no en-US; name a locale "
                               f"(one of {sorted(locales)[:20]})")
        return "en-US"

    def prompt_index(self, locale: str | None) -> int | None:
        """The one-hot column of ``locale`` (NeMo's ``set_inference_prompt``); None for None (never set).
        A locale on a model without a prompt, or one the dictionary lacks, is refused."""
        if locale is None:
            return None
        if not self.prompted:
            raise InvalidInput(f"prompt {locale!r} given to a model without a prompt kernel")
        locales = dict(self.prompt_dictionary)
        if locale not in locales:
            raise InvalidInput(f"unknown prompt locale {locale!r}; the model's prompt_dictionary has "
                               f"{sorted(locales)[:20]}{' ...' if len(locales) > 20 else ''}")
        return locales[locale]

    def prompt_locale(self, index: int) -> str | None:
        """The locale whose column is ``index`` (None when the dictionary names none)."""
        return next((locale for locale, column in self.prompt_dictionary if column == index), None)

    def streaming_config(self, att_context_size: Sequence[int]) -> StreamingConfig:
        self.check_att_context(att_context_size)
        if self.encoder_config is None:
            raise ValueError("this ModelInfo has no encoder config: the streaming schedule cannot be derived")
        return StreamingConfig.from_encoder_config(self.encoder_config, att_context_size)

    def check_att_context(self, att_context_size: Sequence[int]) -> tuple[int, int]:
        """The lookahead as a pair, refused (bad input) when the model was not trained for it."""
        context = (int(att_context_size[0]), int(att_context_size[1]))
        if context not in self.att_context_sizes:
            raise InvalidInput(f"att_context_size {list(context)} is not one of the model's "
                               f"{[list(c) for c in self.att_context_sizes]}")
        return context

    def initial_state(self, att_context_size: Sequence[int], batch_size: int = 1, *,
                      prompt: str | None = None) -> StreamingState:
        """Zero caches, as NeMo's ``get_initial_cache_state`` returns them (layers-first), and the stream's
        prompt locale (checked against the model's dictionary)."""
        streaming = self.streaming_config(att_context_size)
        self.prompt_index(prompt)
        return StreamingState(
            att_context_size=tuple(att_context_size),
            cache_last_channel=np.zeros(
                (self.num_layers, batch_size, streaming.last_channel_cache_size, self.d_model), np.float32),
            cache_last_time=np.zeros((self.num_layers, batch_size, self.d_model, self.conv_kernel_size - 1), np.float32),
            cache_last_channel_len=np.zeros((batch_size,), np.int64),
            decoder=[DecoderState.start(self.blank_id, self.pred_layers, self.pred_hidden) for _ in range(batch_size)],
            ctc_last_label=[self.blank_id] * batch_size if self.ctc_head else None,
            prompt=prompt,
        )

    def ctc_labels_before(self, state: StreamingState) -> list[int]:
        """The CTC greedy label of the frame before this step, per batch item: the state's, else the
        blank (a stream's start, or a state made without a CTC head)."""
        if state.ctc_last_label is not None:
            return [int(label) for label in state.ctc_last_label]
        return [self.blank_id] * len(state.decoder)

    def check_state(self, state: StreamingState) -> None:
        """Fail loudly when caches handed to a backend contradict the model."""
        batch = state.cache_last_channel_len.shape[0] if state.cache_last_channel_len.ndim == 1 else None
        streaming = self.streaming_config(state.att_context_size)
        expect_shape("cache_last_channel", state.cache_last_channel,
                     (self.num_layers, batch, streaming.last_channel_cache_size, self.d_model))
        expect_shape("cache_last_time", state.cache_last_time,
                     (self.num_layers, batch, self.d_model, self.conv_kernel_size - 1))
        expect_shape("cache_last_channel_len", state.cache_last_channel_len, (batch,))


@dataclass(frozen=True)
class PromptKernel:
    """A prompt-conditioned model's ``prompt_kernel`` (Linear(D + P, 2D), ReLU, Linear(2D, D)) as numpy
    arrays in PyTorch's ``[out, in]`` layout: enough to say which prompt index, if any, a candidate's
    ``prompt`` tap was computed with (``streaming_parity.judge.prompts``)."""

    weight_in: np.ndarray  # [2D, D + P]
    bias_in: np.ndarray  # [2D]
    weight_out: np.ndarray  # [D, 2D]
    bias_out: np.ndarray  # [D]

    @property
    def num_prompts(self) -> int:
        return self.weight_in.shape[1] - self.weight_out.shape[0]

    def apply(self, encoded: np.ndarray, index: int | None) -> np.ndarray:
        """``_apply_prompt_to_encoded`` on ``encoded`` ``[B, D, T]`` with one-hot column ``index`` (float64);
        None: the bypass (``encoded`` unchanged)."""
        if index is None:
            return np.asarray(encoded, np.float64)
        features = np.swapaxes(np.asarray(encoded, np.float64), 1, 2)  # [B, T, D]
        one_hot = np.zeros(features.shape[:2] + (self.num_prompts,), np.float64)
        one_hot[..., index] = 1.0
        hidden = np.concatenate([features, one_hot], axis=-1) @ self.weight_in.T.astype(np.float64) + self.bias_in
        fused = np.maximum(hidden, 0.0) @ self.weight_out.T.astype(np.float64) + self.bias_out
        return np.swapaxes(fused, 1, 2)

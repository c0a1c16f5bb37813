"""The streaming interface every backend implements, and the types that cross it.

Nothing backend-specific lives here. A backend takes identical mel chunks (cut by
``streaming_parity.interface.chunking.ChunkSchedule``) and returns a ``StepOutput`` per chunk; comparison is done
elsewhere (``streaming_parity.judge.compare``) on the returned arrays, so results are data that can be saved
and re-judged.

Canonical layouts (NeMo's internal ones; a backend whose native layout differs converts at its edge):

====================  =====================  ==========================================
tensor                shape                  notes
====================  =====================  ==========================================
cache_last_channel    [L, B, C, D]           C = left attention context (70)
cache_last_time       [L, B, D, K-1]         K = depthwise conv kernel (9)
cache_last_channel_len [B] int64             valid frames in the channel cache
decoder h, c          [layers, B, H]         RNNT prediction-net LSTM state
====================  =====================  ==========================================

Tap names shared by all backends (all float32 numpy arrays, batch first):

- ``mel``            front-end output ``[B, n_mels, T]`` (``Backend.features``)
- ``pre_encode``     subsampling output before ``drop_extra_pre_encoded`` ``[B, T_sub, D]``
- ``layers.{i}``     output of conformer layer ``i`` ``[B, T, D]`` (all frames of the chunk)
                     (the layer's own output: a multitalker speaker kernel feeding layer
                     ``i + 1`` is added after it and shows in ``layers.{i+1}``)
- ``encoder``        final encoder output after streaming post-processing ``[B, D, T_valid]``
- ``prompt``         prompt-conditioned models only: the encoder output after ``prompt_kernel`` fused the
                     stream's locale into it, what the decoder and joint read ``[B, D, T_valid]``
- ``decoder``        prediction-net output of every decoder call in the step, in call order ``[N, H]``
- ``joint``          joint logits (before log-softmax) of every joint call, in call order ``[N, V+1]``
- ``ctc``            hybrid RNNT-CTC models only: the CTC head's log-probabilities (NeMo's
                     ``ConvASRDecoder`` applies log_softmax) over the step's valid encoder frames
                     ``[B, T_valid, V+1]``, the blank last

A hybrid model's CTC greedy transcript is carried the way NeMo's streaming CTC decoding builds it
(``conformer_stream_step`` concatenates every step's argmax labels, then ``CTCDecoding`` collapses
repeats and drops blanks): each step emits the labels of its frames that are neither the blank nor
the label of the frame before, and ``StreamingState.ctc_last_label`` carries the last frame's label
(blank included) into the next step (``ctc_greedy``).

A prompt-conditioned model (Nemotron-3.5, ``EncDecRNNTBPEModelWithPrompt``) takes a locale per stream
(``StreamingState.prompt``, set by ``initial_state(..., prompt=...)``; ``offline(..., prompt=...)``).
Each backend maps it to a one-hot column through its own copy of the model's ``prompt_dictionary``,
so a converted artifact with a shifted dictionary shows at the ``prompt`` tap. ``None`` means the
prompt was never set: NeMo's ``_apply_prompt_to_encoded`` then passes the encoder output through
unchanged (``set_inference_prompt`` skipped), and the ``prompt`` tap equals the ``encoder`` tap.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from streaming_parity.core.errors import InvalidInput, Unsupported
from streaming_parity.core.nemo_config import EncoderConfig, ModelConfig, read_model_config
from streaming_parity.core.system.cpu import Int8KernelPath
from streaming_parity.interface.chunking import Chunk, StreamingConfig
from streaming_parity.interface.speakers import SpeakerMaskError, SpeakerTargets

TAP_MEL = "mel"
TAP_PRE_ENCODE = "pre_encode"
TAP_ENCODER = "encoder"
TAP_DECODER = "decoder"
TAP_JOINT = "joint"
TAP_CTC = "ctc"
TAP_PROMPT = "prompt"


def layer_tap(index: int) -> str:
    return f"layers.{index}"


class ShapeMismatchError(ValueError):
    """A tensor crossing the interface does not have the shape the interface promises."""


def expect_shape(name: str, array: np.ndarray, expected: Sequence[int | None]) -> None:
    """Raise with the tensor name and both shapes when ``array`` does not have ``expected`` shape.

    ``None`` in ``expected`` matches any size on that axis.
    """
    actual = tuple(array.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ShapeMismatchError(f"{name}: expected shape {shown}, got {actual}")


@dataclass
class DecoderState:
    """RNNT greedy-decoding state carried across chunks (one utterance).

    ``last_token`` is the label fed to the prediction net next; the start of a sequence is the
    blank id with zero LSTM states (NeMo's ``blank_as_pad`` makes the blank embedding zero).
    """

    last_token: int
    h: np.ndarray  # [layers, 1, H]
    c: np.ndarray  # [layers, 1, H]
    tokens: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, blank_id: int, layers: int, hidden: int) -> DecoderState:
        zeros = np.zeros((layers, 1, hidden), dtype=np.float32)
        return cls(last_token=blank_id, h=zeros, c=zeros.copy(), tokens=[])


@dataclass
class StreamingState:
    """Everything a backend needs to continue a stream, in the canonical layout.

    ``native`` lets a backend keep its own objects (NeMo's partial ``Hypothesis``) between steps;
    it never crosses to another backend and is not compared.
    """

    att_context_size: tuple[int, int]
    # None for a transcript-level backend (``Capabilities.caches`` false): it exposes no caches.
    cache_last_channel: np.ndarray | None = None  # [L, B, C, D]
    cache_last_time: np.ndarray | None = None  # [L, B, D, K-1]
    cache_last_channel_len: np.ndarray | None = None  # [B] int64
    decoder: list[DecoderState] = field(default_factory=list)  # one per batch item
    step_index: int = 0
    native: Any = None
    # Hybrid RNNT-CTC models: the CTC greedy label of the last frame so far (the blank id at the start),
    # per batch item; None for a model without a CTC head.
    ctc_last_label: list[int] | None = None
    # Prompt-conditioned models: the stream's locale (every batch item's, as NeMo's
    # ``set_inference_prompt`` sets one index per model); None: never set, the prompt is bypassed.
    prompt: str | None = None

    def caches(self) -> dict[str, np.ndarray]:
        caches = {
            "cache_last_channel": self.cache_last_channel,
            "cache_last_time": self.cache_last_time,
            "cache_last_channel_len": self.cache_last_channel_len,
        }
        return {name: value for name, value in caches.items() if value is not None}

    def canonical(self) -> StreamingState:
        """A copy without backend-native objects, safe to hand to another backend."""
        return replace(self, native=None)


@dataclass
class StepOutput:
    encoded: np.ndarray  # [B, D, T_valid]
    encoded_len: np.ndarray  # [B] int64
    state: StreamingState
    tokens: list[list[int]]  # tokens emitted in this step, per batch item
    taps: dict[str, np.ndarray]
    seconds: float = 0.0  # wall time of the step, for benchmarks and the demo table
    # Hybrid RNNT-CTC models: the CTC greedy labels this step emitted, per batch item (``ctc_greedy``).
    ctc_tokens: list[list[int]] | None = None


@dataclass
class OfflineOutput:
    encoded: np.ndarray  # [B, D, T]
    encoded_len: np.ndarray  # [B] int64
    tokens: list[list[int]]
    taps: dict[str, np.ndarray]
    ctc_tokens: list[list[int]] | None = None  # hybrid RNNT-CTC models: the CTC greedy transcript


def ctc_greedy(log_probs: np.ndarray, length: int, blank_id: int, last_label: int) -> tuple[list[int], int]:
    """CTC greedy decoding of one utterance's frames ``[T, V+1]`` (the first ``length``), continuing from
    ``last_label`` (the label of the frame before them; the blank id at the start).

    Returns the emitted labels and the label of the last frame. Fed step by step it gives exactly what
    NeMo's ``CTCDecoding`` greedy gives on the concatenated frames: a label is emitted where it is not
    the blank and differs from the frame before (repeats collapse unless a blank separates them).
    """
    emitted = []
    previous = int(last_label)
    for label in (int(i) for i in np.argmax(np.asarray(log_probs)[:length], axis=-1)):
        if label != blank_id and label != previous:
            emitted.append(label)
        previous = label
    return emitted, previous


def ctc_step(log_probs: np.ndarray, lengths, blank_id: int,
             last_labels: list[int]) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """A step's CTC head output ``[B, T, V+1]`` with each item's valid ``lengths``: the ``ctc`` tap over
    the valid frames ``[B, T_valid, V+1]``, per item the labels emitted after ``last_labels`` and the
    label of its last frame (``ctc_greedy``)."""
    lengths = [int(n) for n in lengths]
    emitted, last = [], []
    for index, length in enumerate(lengths):
        labels, final = ctc_greedy(log_probs[index], length, blank_id, last_labels[index])
        emitted.append(labels)
        last.append(final)
    return np.asarray(log_probs[:, :max(lengths, default=0)], np.float32).copy(), emitted, last


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


@dataclass(frozen=True)
class Int8Quantization:
    """How an int8 candidate's weights were quantized, read from its files (``Backend.int8_quantization``).

    Dynamic int8 (``onnxruntime.quantization.quantize_dynamic``) quantizes activations to u8 at run time;
    ``weight_type`` is the weights' type (``QInt8``: s8, ``QUInt8``: u8) and ``weight_bits`` their range
    (7 with ``reduce_range``). u8 x s8 products at full range can overflow an int16 pair sum, which MLAS
    saturates on x86 CPUs without VNNI (``streaming_parity.core.system.cpu``): ``saturation_prone``.
    """

    weight_type: str  # "QInt8" or "QUInt8"
    activation_type: str = "QUInt8"
    weight_bits: int = 8
    per_channel: bool = False
    read_from: str = ""  # "export" (the export's record) or the graph file the weights were read from
    widest_weight: int | None = None  # the largest |stored integer weight| found, when read from the weights

    @property
    def saturation_prone(self) -> bool:
        """u8 activations x s8 weights at full range: 2 x 255 x 128 > 32,767."""
        return self.activation_type == "QUInt8" and self.weight_type == "QInt8" and self.weight_bits >= 8

    def saturates_on(self, path: Int8KernelPath) -> bool:
        return self.saturation_prone and path.saturates_u8s8

    def describe(self) -> str:
        weights = {"QInt8": "s8", "QUInt8": "u8"}.get(self.weight_type, self.weight_type)
        text = (f"{self.weight_type} weights ({weights}, {self.weight_bits}-bit"
                f"{', per channel' if self.per_channel else ''}) x u8 activations")
        if self.saturation_prone:
            text += ": saturates on x86 CPUs without VNNI"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"weight_type": self.weight_type, "activation_type": self.activation_type,
                "weight_bits": self.weight_bits, "per_channel": self.per_channel, "read_from": self.read_from,
                "widest_weight": self.widest_weight, "saturation_prone": self.saturation_prone}

    def same_scheme(self, other: Int8Quantization) -> bool:
        """The same arithmetic (where the description was read from aside)."""
        return (self.weight_type, self.activation_type, self.weight_bits, self.per_channel) == (
            other.weight_type, other.activation_type, other.weight_bits, other.per_channel)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], read_from: str) -> Int8Quantization:
        """A recorded scheme (``export.json``, graph metadata); an unknown type or width is refused."""
        weight_type = data.get("weight_type")
        if weight_type not in ("QInt8", "QUInt8"):
            raise InvalidInput(f"{read_from}: int8 weight_type {weight_type!r} is neither QInt8 nor QUInt8")
        bits = data.get("weight_bits")
        if bits not in (7, 8):
            raise InvalidInput(f"{read_from}: int8 weight_bits {bits!r} is neither 7 nor 8")
        activation = data.get("activation_type", "QUInt8")
        if activation != "QUInt8":
            raise InvalidInput(f"{read_from}: int8 activation_type {activation!r}: dynamic quantization runs u8")
        return cls(weight_type=weight_type, activation_type=activation, weight_bits=int(bits),
                   per_channel=bool(data.get("per_channel", False)), read_from=read_from)


TAP_LAYERS = "layers"  # the tap kind of every ``layers.{i}`` tap
TENSOR_TAP_KINDS = (TAP_MEL, TAP_PRE_ENCODE, TAP_LAYERS, TAP_ENCODER, TAP_PROMPT, TAP_DECODER, TAP_JOINT, TAP_CTC)
# The caches, compared like taps after every step under these names (``StreamingState.caches``).
CACHE_TAPS = ("cache_last_channel", "cache_last_time", "cache_last_channel_len")


def tap_kind(tap: str) -> str:
    """``layers.3`` -> ``layers``; every other tap is its own kind."""
    return tap.split(".", 1)[0]


@dataclass(frozen=True)
class Capabilities:
    """What a backend produces, declared so that suites, the nightly and reports read it instead of
    special-casing backend names.

    - ``first_chunk_modes``: the ``FirstChunkMode`` values it streams (an ONNX export bakes
      pad-and-drop into its graph);
    - ``taps``: the tap kinds it returns (``TENSOR_TAP_KINDS`` or a subset; empty for a
      transcript-level backend, e.g. a peer runtime that only gives tokens); ``ctc`` is returned
      only for a model that has a CTC head and ``prompt`` only for a prompt-conditioned model
      (``Capabilities.for_model``, ``Backend.produced_taps``);
    - ``caches``: whether its ``StreamingState`` carries the encoder caches in canonical layout;
    - ``offline``: whether ``Backend.offline`` is implemented;
    - ``teacher_forcing``: whether ``step`` accepts ``forced_decisions`` (the reference's greedy
      decision at each joint call, fed to its prediction net instead of its own argmax), so that its
      decoder and joint rows stay comparable after a near-tie (``streaming_parity.judge.ties``);
    - ``input``: ``"mel"`` (``step`` takes the harness's mel chunks) or ``"audio"`` (a peer runtime with
      its own front end, chunking and decoding: ``stream_audio`` takes the utterance's samples and
      yields one ``StepOutput`` per chunk it decoded, its tokens only).
    """

    first_chunk_modes: tuple[str, ...] = ("plain", "pad-and-drop")
    taps: tuple[str, ...] = TENSOR_TAP_KINDS
    caches: bool = True
    offline: bool = True
    teacher_forcing: bool = False
    input: str = "mel"

    @property
    def tensor_level(self) -> bool:
        return bool(self.taps) or self.caches

    def produces(self, tap: str) -> bool:
        return tap_kind(tap) in self.taps

    def for_model(self, info: ModelInfo) -> Capabilities:
        """What the backend produces for one model: ``ctc`` only when the model has a CTC head, ``prompt``
        only when it has a prompt kernel."""
        absent = (() if info.ctc_head else (TAP_CTC,)) + (() if info.prompted else (TAP_PROMPT,))
        return replace(self, taps=tuple(kind for kind in self.taps if kind not in absent))


class Backend(abc.ABC):
    """A runner of one model on one framework, behind the shared streaming interface.

    Backends are registered in ``backends.REGISTRY``; the suites are parametrized over that
    registry, so a new backend appears in every suite by registering. A backend is a context
    manager: ``with entry.load(path) as backend:`` closes it (and frees its model) on exit.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    dtype: str = "float32"
    info: ModelInfo

    @property
    def first_chunk_modes(self) -> tuple[str, ...]:
        return self.capabilities.first_chunk_modes

    def produced_taps(self) -> tuple[str, ...]:
        """The tap kinds this backend returns for the model it runs (``capabilities`` declares what it can
        produce for any model, and is what the registry entry holds)."""
        return self.capabilities.for_model(self.info).taps

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def initial_state(self, att_context_size: Sequence[int], batch_size: int = 1, *,
                      prompt: str | None = None) -> StreamingState:
        return self.info.initial_state(att_context_size, batch_size, prompt=prompt)

    def streaming_config(self, att_context_size: Sequence[int]) -> StreamingConfig:
        return self.info.streaming_config(att_context_size)

    @abc.abstractmethod
    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Front end: float32 audio ``[B, samples]`` at 16 kHz -> (mel ``[B, n_mels, T]``, lengths ``[B]``)."""

    @abc.abstractmethod
    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks: SpeakerTargets | None = None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        """Run one chunk of the schedule; return encoder output, new state, tokens and taps.

        ``speaker_masks`` (multitalker models only) is this step's slice of the utterance masks
        (``SpeakerTargets.for_step``); the backend reconciles it with the chunk's frames as NeMo's
        ``solve_length_mismatch`` does. ``None`` means "not set", NeMo's behaviour without targets.
        ``forced_decisions`` (backends declaring ``teacher_forcing``; batch 1): the decision (blank id
        or label) to take at each joint call of this step instead of the argmax; the joint tap still
        holds the backend's own logits. A backend without teacher forcing refuses it.
        """

    @abc.abstractmethod
    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks: SpeakerTargets | None = None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        """Whole-utterance forward with the attention mask of ``att_context_size``, then greedy decoding;
        ``prompt``: a prompt-conditioned model's locale (None: bypassed, as in streaming).
        ``forced_decisions`` (backends declaring ``teacher_forcing``; batch 1): the decision at every joint call
        of the whole decode, in call order, instead of the argmax, as in ``step``."""

    def close(self) -> None:  # noqa: B027 - optional: a backend without resources need not override it
        """Release the model (the bounded-memory runs load one backend at a time)."""

    def stream_audio(self, audio: np.ndarray, att_context_size: Sequence[int], *,
                     prompt: str | None = None) -> Iterator[StepOutput]:
        """``Capabilities.input == "audio"``: run the utterance ``[1, samples]`` (16 kHz float32) through the
        backend's own front end, chunking and decoding (with ``prompt``, a prompt-conditioned model's
        locale); yield one ``StepOutput`` per chunk with the tokens it added and the taps it exposes."""
        raise Unsupported(f"{self.name} streams the harness's mel chunks (Backend.step), not audio")

    def notes(self) -> list[str]:
        """Lines saying what was loaded (a detected format, taps that could not be exposed)."""
        return []

    def int8_quantization(self) -> Int8Quantization | None:
        """An int8 candidate's quantization scheme, read from its files, so that a failure can be explained by
        the CPU's int8 kernel path (``streaming_parity.judge.int8``); None for a backend that is not int8."""
        return None

    def prompt_kernel(self) -> PromptKernel | None:
        """The model's prompt kernel weights, where the backend can give them (the reference does), so that a
        candidate's ``prompt`` divergence can be explained; None otherwise."""
        return None

    # A peer runtime (``Capabilities.input == "audio"``) says how it runs, so that its stack can be
    # rebuilt piece by piece from the harness's own parts (``streaming_parity.judge.bisect``).
    def input_audio(self, audio: np.ndarray, att_context_size: Sequence[int]) -> np.ndarray:
        """The samples ``stream_audio`` actually decodes for ``audio`` ``[1, samples]`` (its tail padding added)."""
        return audio

    def own_chunks(self, mel: np.ndarray, att_context_size: Sequence[int]) -> list[Chunk] | None:
        """The chunks this backend's own streaming cuts from ``mel`` ``[1, n_mels, T]`` (None: the harness's
        ``ChunkSchedule``)."""
        return None

    def check_speaker_masks(self, speaker_masks: SpeakerTargets | None, batch: int) -> None:
        """Refuse masks for a single-speaker model, and masks of another batch size."""
        if speaker_masks is None:
            return
        if not self.info.multitalker:
            raise SpeakerMaskError(f"{self.name}: this model has no speaker kernels; speaker masks are not accepted")
        if not isinstance(speaker_masks, SpeakerTargets):
            raise SpeakerMaskError(f"{self.name}: speaker masks must be streaming_parity.interface.speakers.SpeakerTargets, "
                                   f"not {type(speaker_masks).__name__}")
        speaker_masks.check_batch(batch)


class AudioInputBackend(Backend):
    """A peer runtime with its own front end, chunking and decoding (``Capabilities.input == "audio"``): it
    implements ``features`` and ``stream_audio``; the harness's mel chunks and an offline forward are refused."""

    def step(self, chunk: Chunk, state: StreamingState, **_options) -> StepOutput:
        raise Unsupported(f"{self.name} runs its own front end and chunking: it takes audio (stream_audio), "
                          "not the harness's mel chunks")

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int],
                **_options) -> OfflineOutput:
        raise Unsupported(f"{self.name} is run as its users run it, streaming audio: no offline forward")


def decode_tokens(vocabulary: Sequence[str], tokens: Sequence[int]) -> str:
    """SentencePiece detokenisation from the embedded vocabulary ("▁" starts a word)."""
    text = "".join(vocabulary[t] for t in tokens if 0 <= t < len(vocabulary))
    return text.replace("\u2581", " ").strip()


class ForcedDecisions:
    """The reference's decisions fed to a teacher-forced greedy loop, one joint call at a time."""

    def __init__(self, decisions: Sequence[int] | None, backend: str):
        self.decisions = None if decisions is None else [int(d) for d in decisions]
        self.backend = backend
        self.calls = 0

    def choose(self, own_choice: int) -> int:
        """The decision to take at the next joint call: the forced one, else ``own_choice``."""
        if self.decisions is None:
            return own_choice
        if self.calls >= len(self.decisions):
            raise ShapeMismatchError(f"{self.backend}: teacher forcing gave {len(self.decisions)} decisions for "
                                     "this step; the greedy loop made more joint calls")
        decision = self.decisions[self.calls]
        self.calls += 1
        return decision

    def finish(self) -> None:
        """Every forced decision must have been used: otherwise the two loops did not correspond."""
        if self.decisions is not None and self.calls != len(self.decisions):
            raise ShapeMismatchError(f"{self.backend}: teacher forcing gave {len(self.decisions)} decisions for "
                                     f"this step; the greedy loop made {self.calls} joint calls")

"""Reading NeMo model configs: the one place that knows their keys and NeMo's defaults.

A config comes from a ``.nemo``'s ``model_config.yaml`` or an MLX artifact's ``config.json`` (the
same format). Everything above this module reads typed values from here instead of indexing the
raw mapping, so a default NeMo applies (``conv_kernel_size`` 31, ``subsampling_factor`` 4, ...) is
written once: as the default of a dataclass field below.

``read_model_config(config)`` (``ModelConfig.from_mapping``) reads the sections a cache-aware
FastConformer transducer has, each as a frozen dataclass built the way parakeet-mlx builds its
arguments: a key the config states is converted to the field's type, an absent key takes NeMo's
default (the signatures of NeMo 3.0.0's ``ConformerEncoder``, ``AudioToMelSpectrogramPreprocessor``,
``RNNTDecoder``, ``RNNTJoint`` and, for hybrid RNNT-CTC models, ``ConvASRDecoder``, checked by
tests/test_nemo_config.py), and a key NeMo requires
raises. Every failure is a one-line ``NemoConfigError`` (bad input, a ``ValueError``) naming the key
and the value; a missing key is also a ``KeyError`` and an unsupported value also a
``NotImplementedError``, as the readers it replaces raised.

``stated_config(config)`` is the other reading: only what the config says, converted the same way,
no defaults and no refusals (``parity fingerprint`` compares a config's claims with the weights, and
an absent key claims nothing).

The defaults that are the harness's rather than NeMo's are marked where they are set:
``decoder.prednet.pred_rnn_layers`` (required by NeMo, 1 here) and ``decoding.greedy.max_symbols``
(10 when the config sets no limit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, ClassVar

from streaming_parity.core.errors import InvalidInput, Unsupported

# -- errors -------------------------------------------------------------------------------------------


class NemoConfigError(InvalidInput):
    """A NeMo model config that cannot be read (bad input, a ``ValueError``): the message names the key
    and its value."""


class MissingKeyError(NemoConfigError, KeyError):
    """A key NeMo requires is absent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedValueError(NemoConfigError, Unsupported):
    """A value NeMo (or this harness) does not support (also a ``NotImplementedError``)."""


def require_one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``UnsupportedValueError`` naming ``key`` and ``value`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise UnsupportedValueError(f"{key} = {value!r} is not supported (supported: {tuple(allowed)})")


# -- conversions (each takes the key, for the error, and the raw value) ---------------------------------

Converter = Callable[[str, Any], Any]


def _int(key: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise NemoConfigError(f"{key} = {value!r} is not an integer") from None


def _float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise NemoConfigError(f"{key} = {value!r} is not a number") from None


def _bool(_key: str, value: Any) -> bool:
    return bool(value)


def _str(_key: str, value: Any) -> str:
    return str(value)


def _optional(convert: Converter) -> Converter:
    return lambda key, value: None if value is None else convert(key, value)


def _plain(value: Any) -> Any:
    """A plain dict / list / scalar from a mapping or sequence (an OmegaConf container included)."""
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")
                                            and not isinstance(value, (str, bytes))):
        return [_plain(v) for v in value]
    return value


def normalize_att_context_sizes(value: Any) -> tuple[tuple[int, int], ...]:
    """NeMo accepts one ``[L, R]`` or a list of them (several lookaheads in one checkpoint); none means
    unlimited, ``[[-1, -1]]`` (``ConformerEncoder._calc_context_sizes``)."""
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        return ((-1, -1),)
    items = list(value)
    if items and not isinstance(items[0], (list, tuple)) and not hasattr(items[0], "__len__"):
        items = [items]
    return tuple((int(a), int(b)) for a, b in items)


def _att_context_sizes(key: str, value: Any) -> tuple[tuple[int, int], ...]:
    try:
        return normalize_att_context_sizes(value)
    except (TypeError, ValueError):
        raise NemoConfigError(f"{key} = {_plain(value)!r} is neither [left, right] nor a list of them") from None


def _int_tuple(key: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise NemoConfigError(f"{key} = {_plain(value)!r} is not a list of integers") from None


def _conv_context(key: str, value: Any) -> str | tuple[int, int] | None:
    if value is None or value == "causal":
        return value
    try:
        left, right = (int(v) for v in value)
    except (TypeError, ValueError):
        raise NemoConfigError(f"{key} = {_plain(value)!r} is neither 'causal' nor [left, right]") from None
    return left, right


def _normalize(_key: str, value: Any) -> Any:
    """``preprocessor.normalize``: a name ("per_feature", "all_features", "NA", ...) or a fixed mean/std."""
    return _plain(value) if hasattr(value, "items") else value


def _guard(key: str, value: Any) -> float | str:
    """``log_zero_guard_value``: a number, or "tiny" / "eps" (resolved by NeMo from the dtype)."""
    return value if isinstance(value, str) else _float(key, value)


def _pad_to(key: str, value: Any) -> int | str:
    return value if value == "max" else _int(key, value)


def _vocabulary(_key: str, value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(piece) for piece in value)


def _max_symbols(key: str, greedy: Any) -> int:
    """``decoding.greedy``: ``max_symbols``, else ``max_symbols_per_step``; no limit set means 10 here."""
    greedy = greedy or {}
    return _int(key, greedy.get("max_symbols", greedy.get("max_symbols_per_step", 10)) or 10)


# -- reading a section ----------------------------------------------------------------------------------

_ABSENT = object()


def _lookup(mapping: Any, path: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``; ``_ABSENT`` when any step is missing (or ``None``)."""
    value = mapping
    for part in path.split("."):
        if value is None or not hasattr(value, "get"):
            return _ABSENT
        value = value.get(part, _ABSENT)
        if value is _ABSENT:
            return _ABSENT
    return value


def _section(config: Any, key: str) -> Mapping[str, Any]:
    """``config[key]``, which must be a mapping."""
    value = _lookup(config, key)
    if value is _ABSENT or value is None:
        raise MissingKeyError(f"{key} is missing from the model config")
    if not hasattr(value, "get"):
        raise NemoConfigError(f"{key} = {value!r} is not a mapping")
    return value


class _Reader:
    """Reading of one config section into a frozen dataclass.

    ``KEYS`` maps each field to the key path(s) inside the section (alternatives tried in order) and
    the conversion. A field without a dataclass default is one NeMo requires.
    """

    SECTION: ClassVar[str]
    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]]

    @classmethod
    def _values(cls, mapping: Any, *, lenient: bool) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, (paths, convert) in cls.KEYS.items():
            for path in paths:
                raw = _lookup(mapping, path)
                if raw is _ABSENT:
                    continue
                key = f"{cls.SECTION}.{path}" if cls.SECTION else path
                try:
                    values[name] = convert(key, raw)
                except NemoConfigError:
                    if not lenient:
                        raise
                break
        return values

    @classmethod
    def stated(cls, mapping: Any) -> dict[str, Any]:
        """The values ``mapping`` states, converted; an absent key (or one whose value does not convert)
        is left out: no defaults, no refusals."""
        return cls._values(mapping, lenient=True)

    @classmethod
    def _read(cls, mapping: Any, **defaults: Any):
        """The dataclass from the stated values, ``defaults`` (defaults that depend on another section),
        then the dataclass defaults; a required key that is absent raises ``MissingKeyError``."""
        values = {**{k: v for k, v in defaults.items() if v is not None}, **cls._values(mapping, lenient=False)}
        for item in fields(cls):  # type: ignore[arg-type]
            required = item.default is MISSING and item.default_factory is MISSING and item.init
            if required and item.name not in values:
                where = f"{cls.SECTION}.{cls.KEYS[item.name][0][0]}" if cls.SECTION else cls.KEYS[item.name][0][0]
                raise MissingKeyError(f"{where} is missing from the model config")
        return cls(**values)


def _set(instance: Any, name: str, value: Any) -> None:
    object.__setattr__(instance, name, value)


# -- the sections ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderConfig(_Reader):
    """``ConformerEncoder`` (modules/conformer_encoder.py); defaults are its signature's.

    Resolved as the encoder resolves them: ``att_context_size`` is a tuple of ``(left, right)``
    pairs (``normalize_att_context_sizes``), ``subsampling_conv_channels`` -1 is ``d_model``, and
    ``conv_context_size`` is the ``(left, right)`` padding of the depthwise conv ("causal" is
    ``(K-1, 0)``, none is symmetric; ``_calc_context_sizes``).
    """

    SECTION: ClassVar[str] = "encoder"
    STYLES: ClassVar[tuple[str, ...]] = ("regular", "chunked_limited")  # chunked_limited_with_rc: 3-part contexts

    feat_in: int
    n_layers: int
    d_model: int
    feat_out: int = -1
    causal_downsampling: bool = False
    subsampling: str | None = "striding"
    subsampling_factor: int = 4
    subsampling_conv_chunking_factor: int = 1
    subsampling_conv_channels: int = -1
    reduction: str | None = None
    reduction_position: int | None = None
    reduction_factor: int = 1
    ff_expansion_factor: int = 4
    self_attention_model: str = "rel_pos"
    n_heads: int = 4
    att_context_size: tuple[tuple[int, int], ...] = ((-1, -1),)
    att_context_style: str = "regular"
    xscaling: bool = True
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 31
    conv_norm_type: str = "batch_norm"
    conv_context_size: Any = None  # "causal", [left, right] or None in the config; (left, right) once read
    use_bias: bool = True

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "feat_in": (("feat_in",), _int),
        "n_layers": (("n_layers",), _int),
        "d_model": (("d_model",), _int),
        "feat_out": (("feat_out",), lambda key, value: -1 if value is None else _int(key, value)),
        "causal_downsampling": (("causal_downsampling",), _bool),
        "subsampling": (("subsampling",), _optional(_str)),
        "subsampling_factor": (("subsampling_factor",), _int),
        "subsampling_conv_chunking_factor": (("subsampling_conv_chunking_factor",), _int),
        "subsampling_conv_channels": (("subsampling_conv_channels",), _int),
        "reduction": (("reduction",), _optional(_str)),
        "reduction_position": (("reduction_position",), _optional(_int)),
        "reduction_factor": (("reduction_factor",), _int),
        "ff_expansion_factor": (("ff_expansion_factor",), _int),
        "self_attention_model": (("self_attention_model",), _str),
        "n_heads": (("n_heads",), _int),
        "att_context_size": (("att_context_size",), _att_context_sizes),
        "att_context_style": (("att_context_style",), _str),
        "xscaling": (("xscaling",), _bool),
        "untie_biases": (("untie_biases",), _bool),
        "pos_emb_max_len": (("pos_emb_max_len",), _int),
        "conv_kernel_size": (("conv_kernel_size",), _int),
        "conv_norm_type": (("conv_norm_type",), _str),
        "conv_context_size": (("conv_context_size",), _conv_context),
        "use_bias": (("use_bias",), _bool),
    }

    def __post_init__(self) -> None:
        require_one_of("encoder.att_context_style", self.att_context_style, self.STYLES)
        _set(self, "att_context_size", _att_context_sizes("encoder.att_context_size", self.att_context_size))
        if self.subsampling_conv_channels == -1:
            _set(self, "subsampling_conv_channels", self.d_model)
        kernel, context = self.conv_kernel_size, _conv_context("encoder.conv_context_size", self.conv_context_size)
        if context == "causal":
            context = (kernel - 1, 0)
        elif context is None:
            context = ((kernel - 1) // 2, (kernel - 1) // 2)
        elif context[0] + context[1] + 1 != kernel:
            raise NemoConfigError(f"encoder.conv_context_size = {list(context)} does not fit conv_kernel_size {kernel} "
                                  "(left + right + 1 must equal it)")
        _set(self, "conv_context_size", context)

    @classmethod
    def from_mapping(cls, encoder: Mapping[str, Any]) -> EncoderConfig:
        """From the ``encoder`` section (or any mapping with its keys, e.g. an ONNX export's metadata)."""
        return cls._read(encoder)

    def as_config(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """The section back in NeMo's format (plain JSON values), all keys or only ``keys``."""
        result = {}
        for name in keys if keys is not None else self.KEYS:
            value = getattr(self, name)
            result[name] = [list(pair) for pair in value] if name == "att_context_size" else (
                list(value) if isinstance(value, tuple) else value)
        return result


@dataclass(frozen=True)
class PreprocessorConfig(_Reader):
    """``AudioToMelSpectrogramPreprocessor`` (modules/audio_preprocessing.py) and the
    ``FilterbankFeatures`` it builds (parts/preprocessing/features.py); defaults are its signature's.

    ``win_length`` / ``hop_length`` are the window in samples (``window_size`` seconds, truncated as
    NeMo does, else ``n_window_size``); ``n_fft`` none is the next power of two of the window.
    The STFT is centred with constant (zero) padding in NeMo 3.0.0: no config key chooses it.
    """

    SECTION: ClassVar[str] = "preprocessor"

    sample_rate: int = 16000
    window_size: float | None = 0.02
    window_stride: float | None = 0.01
    n_window_size: int | None = None
    n_window_stride: int | None = None
    window: str | None = "hann"
    normalize: Any = "per_feature"
    n_fft: int | None = None
    preemph: float | None = 0.97
    features: int = 64
    lowfreq: float = 0.0
    highfreq: float | None = None
    log: bool = True
    log_zero_guard_type: str = "add"
    log_zero_guard_value: float | str = 2.0 ** -24
    dither: float = 1e-5
    pad_to: int | str = 16
    frame_splicing: int = 1
    exact_pad: bool = False
    pad_value: float = 0.0
    mag_power: float = 2.0
    mel_norm: str | None = "slaney"
    win_length: int = field(init=False)
    hop_length: int = field(init=False)

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "sample_rate": (("sample_rate",), _int),
        "window_size": (("window_size",), _optional(_float)),
        "window_stride": (("window_stride",), _optional(_float)),
        "n_window_size": (("n_window_size",), _optional(_int)),
        "n_window_stride": (("n_window_stride",), _optional(_int)),
        "window": (("window",), _optional(_str)),
        "normalize": (("normalize",), _normalize),
        "n_fft": (("n_fft",), _optional(_int)),
        "preemph": (("preemph",), _optional(_float)),
        "features": (("features", "nfilt"), _int),
        "lowfreq": (("lowfreq",), _float),
        "highfreq": (("highfreq",), _optional(_float)),
        "log": (("log",), _bool),
        "log_zero_guard_type": (("log_zero_guard_type",), _str),
        "log_zero_guard_value": (("log_zero_guard_value",), _guard),
        "dither": (("dither",), _float),
        "pad_to": (("pad_to",), _pad_to),
        "frame_splicing": (("frame_splicing",), _int),
        "exact_pad": (("exact_pad",), _bool),
        "pad_value": (("pad_value",), _float),
        "mag_power": (("mag_power",), _float),
        "mel_norm": (("mel_norm",), _optional(_str)),
    }

    def __post_init__(self) -> None:
        _set(self, "win_length", self._samples("window_size", self.window_size, self.n_window_size))
        _set(self, "hop_length", self._samples("window_stride", self.window_stride, self.n_window_stride))
        if self.n_fft is None:
            _set(self, "n_fft", 2 ** math.ceil(math.log2(self.win_length)))
        require_one_of("preprocessor.log_zero_guard_type", self.log_zero_guard_type, ("add", "clamp"))

    def _samples(self, key: str, seconds: float | None, samples: int | None) -> int:
        """``AudioToMelSpectrogramPreprocessor.__init__``: seconds (``int(seconds * sample_rate)``) or samples."""
        if seconds and samples:
            raise NemoConfigError(f"preprocessor.{key} = {seconds} and preprocessor.n_{key} = {samples}: "
                                  "only one may be set")
        if seconds:
            return int(seconds * self.sample_rate)
        if samples is None:
            raise MissingKeyError(f"preprocessor.{key} (or n_{key}) is missing from the model config")
        return int(samples)

    @property
    def n_mels(self) -> int:
        return self.features

    @classmethod
    def from_mapping(cls, preprocessor: Mapping[str, Any]) -> PreprocessorConfig:
        """From the ``preprocessor`` section."""
        return cls._read(preprocessor)


@dataclass(frozen=True)
class DecoderConfig(_Reader):
    """``RNNTDecoder`` (modules/rnnt.py): the prediction network, an embedding and stacked LSTMs.

    ``vocab_size`` (without the blank) is set by the model from its tokenizer, so a config written
    before the model was built has none.
    """

    SECTION: ClassVar[str] = "decoder"

    pred_hidden: int
    pred_rnn_layers: int = 1  # required by NeMo; the harness has always read a missing one as 1
    vocab_size: int | None = None
    blank_as_pad: bool = True

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "pred_hidden": (("prednet.pred_hidden",), _int),
        "pred_rnn_layers": (("prednet.pred_rnn_layers",), _int),
        "vocab_size": (("vocab_size",), _optional(_int)),
        "blank_as_pad": (("blank_as_pad",), _bool),
    }

    @classmethod
    def from_mapping(cls, decoder: Mapping[str, Any]) -> DecoderConfig:
        """From the ``decoder`` section."""
        return cls._read(decoder)


@dataclass(frozen=True)
class JointConfig(_Reader):
    """``RNNTJoint`` (modules/rnnt.py): encoder and prediction projections, then
    ``joint_net = Sequential(activation, [Dropout when dropout > 0], Linear)``.

    ``num_classes`` is the vocabulary without the blank (set by the model from its tokenizer, as
    is ``vocabulary``); ``encoder_hidden`` missing is the encoder's ``d_model``.
    """

    SECTION: ClassVar[str] = "joint"
    ACTIVATIONS: ClassVar[tuple[str, ...]] = ("relu", "sigmoid", "tanh")

    pred_hidden: int
    joint_hidden: int
    encoder_hidden: int | None = None
    activation: str = "relu"
    dropout: float = 0.0
    num_classes: int | None = None
    num_extra_outputs: int = 0  # TDT durations
    vocabulary: tuple[str, ...] | None = None

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "pred_hidden": (("jointnet.pred_hidden",), _int),
        "joint_hidden": (("jointnet.joint_hidden",), _int),
        "encoder_hidden": (("jointnet.encoder_hidden",), _optional(_int)),
        "activation": (("jointnet.activation",), lambda _key, value: str(value).lower()),
        "dropout": (("jointnet.dropout",), lambda key, value: _float(key, value or 0.0)),
        "num_classes": (("num_classes",), _optional(_int)),
        "num_extra_outputs": (("num_extra_outputs",), lambda key, value: _int(key, value or 0)),
        "vocabulary": (("vocabulary",), _vocabulary),
    }

    def __post_init__(self) -> None:
        require_one_of("joint.jointnet.activation", self.activation, self.ACTIVATIONS)

    @property
    def has_dropout(self) -> bool:
        return self.dropout > 0.0

    @property
    def output_index(self) -> int:
        """Index of the output ``Linear`` in ``joint_net``: 2 after a Dropout, else 1."""
        return 2 if self.has_dropout else 1

    @property
    def output_size(self) -> int:
        """Logits per frame: vocabulary + blank + extra (TDT duration) outputs."""
        if self.num_classes is None:
            raise MissingKeyError("joint.num_classes is missing from the model config")
        return self.num_classes + 1 + self.num_extra_outputs

    def require_vocabulary(self) -> tuple[str, ...]:
        if self.vocabulary is None:
            raise MissingKeyError("joint.vocabulary is missing from the model config")
        return self.vocabulary

    @classmethod
    def from_mapping(cls, joint: Mapping[str, Any], *, encoder_hidden: int | None = None) -> JointConfig:
        """From the ``joint`` section; ``encoder_hidden`` is used when ``jointnet.encoder_hidden`` is absent."""
        return cls._read(joint, encoder_hidden=encoder_hidden)


@dataclass(frozen=True)
class DecodingConfig(_Reader):
    """The ``decoding`` section: what greedy decoding and a TDT model read from it."""

    SECTION: ClassVar[str] = "decoding"

    max_symbols: int = 10  # the harness's limit when the config sets none (NeMo's would be unlimited)
    model_type: str = "rnnt"
    durations: tuple[int, ...] = ()

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "max_symbols": (("greedy",), _max_symbols),
        "model_type": (("model_type",), _str),
        "durations": (("durations",), _int_tuple),
    }

    @classmethod
    def from_mapping(cls, decoding: Mapping[str, Any] | None) -> DecodingConfig:
        """From the ``decoding`` section (absent: all defaults)."""
        return cls._read(decoding or {})


@dataclass(frozen=True)
class SpeakerKernelConfig(_Reader):
    """``SpeakerKernelMixin._init_speaker_kernel_config`` (parts/mixins/multitalker_asr_mixins.py):
    kernels exist when ``spk_kernel_type`` is set (NeMo defines "ff" only); ``spk_kernel_layers``
    defaults to [0] and ``add_bg_spk_kernel`` to true. Top-level keys of the model config."""

    SECTION: ClassVar[str] = ""
    TYPES: ClassVar[tuple[str, ...]] = ("ff",)

    kernel_type: str
    layers: tuple[int, ...] = (0,)
    background: bool = True
    hidden: int = 0  # model_defaults.enc_hidden (the kernels' input and output width), else d_model
    d_model: int = 0  # encoder.d_model (their inner width)

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "kernel_type": (("spk_kernel_type",), _optional(_str)),
        "layers": (("spk_kernel_layers",), lambda key, value: _int_tuple(key, value) or (0,)),
        "background": (("add_bg_spk_kernel",), _bool),
        "hidden": (("model_defaults.enc_hidden",), _optional(_int)),
    }

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any], encoder: EncoderConfig) -> SpeakerKernelConfig | None:
        """The speaker kernels of ``config`` (the whole model config); None for a single-speaker model."""
        stated = cls._values(config, lenient=False)
        if stated.get("kernel_type") is None:
            return None
        require_one_of("spk_kernel_type", stated["kernel_type"], cls.TYPES)
        layers = stated.get("layers", (0,))
        if any(not 0 <= i < encoder.n_layers for i in layers):
            raise NemoConfigError(f"spk_kernel_layers {list(layers)} outside the encoder's {encoder.n_layers} layers")
        return cls(kernel_type=stated["kernel_type"], layers=layers, background=stated.get("background", True),
                   hidden=stated.get("hidden") or encoder.d_model, d_model=encoder.d_model)


@dataclass(frozen=True)
class CtcConfig(_Reader):
    """``aux_ctc.decoder`` of a hybrid RNNT-CTC model (``EncDecHybridRNNTCTCModel``): NeMo's
    ``ConvASRDecoder`` (modules/conv_asr.py), ``Conv1d(feat_in, num_classes + 1, kernel_size=1)`` on the
    encoder output ``[B, D, T]``, then log_softmax over the classes; the blank is the last class.

    ``feat_in`` missing (or null) is the encoder's output width, as ``EncDecHybridRNNTCTCModel.__init__``
    sets it; ``num_classes`` below 1 (the configs' -1 placeholder) and an empty ``vocabulary`` are unset:
    the model fills both from its tokenizer (``EncDecHybridRNNTCTCBPEModel``), so a config written
    before the model was built has neither.
    """

    SECTION: ClassVar[str] = "aux_ctc.decoder"

    feat_in: int | None = None
    num_classes: int | None = None
    vocabulary: tuple[str, ...] | None = None

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "feat_in": (("feat_in",), _optional(_int)),
        "num_classes": (("num_classes",), lambda key, value: None if value is None or _int(key, value) < 1
                        else _int(key, value)),
        "vocabulary": (("vocabulary",), lambda key, value: _vocabulary(key, value) or None),
    }

    @property
    def output_size(self) -> int:
        """Log-probabilities per frame: vocabulary + blank."""
        if self.num_classes is None:
            raise MissingKeyError("aux_ctc.decoder.num_classes is missing from the model config")
        return self.num_classes + 1

    @classmethod
    def from_mapping(cls, decoder: Mapping[str, Any], *, feat_in: int | None = None) -> CtcConfig:
        """From the ``aux_ctc.decoder`` section; ``feat_in`` is used when the section leaves it unset."""
        return cls._read(decoder, feat_in=feat_in)

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any], encoder: EncoderConfig) -> CtcConfig | None:
        """The CTC head of ``config`` (the whole model config); None for a model without ``aux_ctc``."""
        if _lookup(config, "aux_ctc") is _ABSENT:
            return None
        feat_out = encoder.feat_out if encoder.feat_out > 0 else encoder.d_model  # ConformerEncoder._feat_out
        read = cls.from_mapping(_section(config, "aux_ctc.decoder"), feat_in=feat_out)
        return replace(read, feat_in=read.feat_in or feat_out)


def _prompt_dictionary(key: str, value: Any) -> tuple[tuple[str, int], ...]:
    """``model_defaults.prompt_dictionary`` (locale -> one-hot index) as sorted (locale, index) pairs."""
    if not hasattr(value, "items"):
        raise NemoConfigError(f"{key} = {value!r} is not a mapping of locale to prompt index")
    pairs = tuple(sorted((str(locale), _int(f"{key}.{locale}", index)) for locale, index in value.items()))
    return pairs


@dataclass(frozen=True)
class PromptConfig(_Reader):
    """Nemotron-3.5's language-ID prompt (``EncDecRNNTBPEModelWithPrompt``, ``PromptStreamingMixin`` in
    parts/mixins/mixins.py): ``model_defaults.num_prompts`` (NeMo's default 128) one-hot columns appended
    to the encoder output ``[B, T, D]``, fused back to ``D`` by ``prompt_kernel`` = Linear(D + P, 2D),
    ReLU, Linear(2D, D). NeMo builds the kernel only when ``model_defaults.initialize_prompt_feature``
    is true; ``prompt_dictionary`` maps a locale to its column. Keys under ``model_defaults``."""

    SECTION: ClassVar[str] = "model_defaults"

    initialize: bool = False
    num_prompts: int = 128
    dictionary: tuple[tuple[str, int], ...] = ()
    hidden: int = 0  # model_defaults.enc_hidden (the kernel's width D), else the encoder's d_model

    KEYS: ClassVar[dict[str, tuple[tuple[str, ...], Converter]]] = {
        "initialize": (("initialize_prompt_feature",), _bool),
        "num_prompts": (("num_prompts",), _int),
        "dictionary": (("prompt_dictionary",), _prompt_dictionary),
        "hidden": (("enc_hidden",), _optional(_int)),
    }

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise NemoConfigError(f"model_defaults.num_prompts = {self.num_prompts}: a prompt model needs at least one")
        for locale, index in self.dictionary:
            if not 0 <= index < self.num_prompts:
                raise NemoConfigError(f"model_defaults.prompt_dictionary.{locale} = {index} is outside the "
                                      f"{self.num_prompts} prompts (model_defaults.num_prompts)")

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any], encoder: EncoderConfig) -> PromptConfig | None:
        """The prompt of ``config`` (the whole model config); None when NeMo builds no prompt kernel."""
        defaults = _lookup(config, "model_defaults")
        if defaults is _ABSENT or not cls._values(defaults, lenient=False).get("initialize", False):
            return None
        read = cls._read(defaults)
        return replace(read, hidden=read.hidden or encoder.d_model)


DECODER_KINDS = ("rnnt", "tdt", "rnnt+ctc", "tdt+ctc")


def decoder_kind(kind: str, ctc: bool) -> str:
    """The model's decoders by name: its transducer ("rnnt", "tdt"), with "+ctc" for a hybrid's CTC head."""
    return f"{kind}+ctc" if ctc else kind


def transducer_kind(config: Mapping[str, Any]) -> str:
    """"tdt" when the config describes a TDT model (``model_defaults.tdt_durations``,
    ``decoding.model_type``, or the ``tdt`` loss), else "rnnt"."""
    durations = _lookup(config, "model_defaults.tdt_durations")
    tdt = (durations is not _ABSENT and bool(durations)) or _lookup(config, "decoding.model_type") == "tdt" \
        or _lookup(config, "loss.loss_name") == "tdt"
    return "tdt" if tdt else "rnnt"


# -- the whole model config -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """A cache-aware FastConformer transducer's config, every section read (``read_model_config``)."""

    target: str | None
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    decoder: DecoderConfig
    joint: JointConfig
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    speaker_kernels: SpeakerKernelConfig | None = None
    tdt_durations: tuple[int, ...] = ()  # model_defaults.tdt_durations
    kind: str = "rnnt"  # "rnnt" or "tdt" (transducer_kind)
    ctc: CtcConfig | None = None  # a hybrid RNNT-CTC model's CTC head (aux_ctc.decoder)
    prompt: PromptConfig | None = None  # a prompt-conditioned model's language-ID prompt

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Read a NeMo model config (``model_config.yaml`` or an artifact's ``config.json``, parsed)."""
        if not hasattr(config, "get"):
            raise NemoConfigError(f"a model config must be a mapping, not {type(config).__name__}")
        encoder = EncoderConfig.from_mapping(_section(config, "encoder"))
        durations = _lookup(config, "model_defaults.tdt_durations")
        target = config.get("target")
        return cls(
            target=None if target is None else str(target),
            preprocessor=PreprocessorConfig.from_mapping(_section(config, "preprocessor")),
            encoder=encoder,
            decoder=DecoderConfig.from_mapping(_section(config, "decoder")),
            joint=JointConfig.from_mapping(_section(config, "joint"), encoder_hidden=encoder.d_model),
            decoding=DecodingConfig.from_mapping(config.get("decoding")),
            speaker_kernels=SpeakerKernelConfig.from_model_config(config, encoder),
            tdt_durations=_int_tuple("model_defaults.tdt_durations", None if durations is _ABSENT else durations),
            kind=transducer_kind(config),
            ctc=CtcConfig.from_model_config(config, encoder),
            prompt=PromptConfig.from_model_config(config, encoder),
        )

    @property
    def multitalker(self) -> bool:
        return self.speaker_kernels is not None

    @property
    def decoder_kind(self) -> str:
        """"rnnt", "tdt", or either with "+ctc" for a hybrid model (``DECODER_KINDS``)."""
        return decoder_kind(self.kind, self.ctc is not None)

    def with_vocabulary(self, vocabulary: Sequence[str]) -> ModelConfig:
        """The config of the model as built for ``vocabulary`` (tokenizer pieces, without the blank):
        ``decoder.vocab_size``, ``joint.num_classes`` and ``joint.vocabulary`` from it, as NeMo sets them,
        and a hybrid's ``aux_ctc.decoder.num_classes`` and ``vocabulary`` (``EncDecHybridRNNTCTCBPEModel``)."""
        pieces = tuple(str(piece) for piece in vocabulary)
        ctc = None if self.ctc is None else replace(self.ctc, num_classes=len(pieces), vocabulary=pieces)
        return replace(self, decoder=replace(self.decoder, vocab_size=len(pieces)),
                       joint=replace(self.joint, num_classes=len(pieces), vocabulary=pieces), ctc=ctc)


def read_model_config(config: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """``ModelConfig.from_mapping``; a ``ModelConfig`` is returned as it is."""
    return config if isinstance(config, ModelConfig) else ModelConfig.from_mapping(config)


# -- what a config states (claims), without defaults ----------------------------------------------------

@dataclass(frozen=True)
class StatedConfig:
    """What a config says, section by section (each section's ``stated``): keys it does not state are
    absent, nothing is refused. For comparing a config's claims with the weights."""

    target: Any
    preprocessor: dict[str, Any]
    encoder: dict[str, Any]
    decoder: dict[str, Any]
    joint: dict[str, Any]
    kind: str
    speaker_kernel_layers: tuple[int, ...]  # empty for a single-speaker config
    background_speaker_kernel: bool
    ctc: dict[str, Any] | None = None  # aux_ctc.decoder's stated keys; None without an aux_ctc section
    prompt: dict[str, Any] = field(default_factory=dict)  # model_defaults' prompt keys it states

    @property
    def decoder_kind(self) -> str:
        return decoder_kind(self.kind, self.ctc is not None)


def stated_config(config: Mapping[str, Any]) -> StatedConfig:
    """What ``config`` states (any mapping: a partial or foreign config states less)."""
    config = config if hasattr(config, "get") else {}
    speakers = SpeakerKernelConfig.stated(config)
    multitalker = speakers.get("kernel_type") is not None
    return StatedConfig(
        target=config.get("target"),
        preprocessor=PreprocessorConfig.stated(config.get("preprocessor")),
        encoder=EncoderConfig.stated(config.get("encoder")),
        decoder=DecoderConfig.stated(config.get("decoder")),
        joint=JointConfig.stated(config.get("joint")),
        kind=transducer_kind(config),
        speaker_kernel_layers=tuple(sorted(speakers.get("layers", (0,)))) if multitalker else (),
        background_speaker_kernel=multitalker and speakers.get("background", True),
        ctc=None if _lookup(config, "aux_ctc") is _ABSENT else CtcConfig.stated(_lookup(config, "aux_ctc.decoder")),
        prompt=PromptConfig.stated(config.get("model_defaults")),
    )


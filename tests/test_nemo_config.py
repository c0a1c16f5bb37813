"""The NeMo config reader (streaming_parity.core.nemo_config): NeMo's defaults, one-line errors naming the key, and
the typed values every consumer (ModelInfo, the chunk schedule, the front end, the MLX model) reads."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_parity.core.nemo_config import (
    DecoderConfig,
    EncoderConfig,
    JointConfig,
    MissingKeyError,
    ModelConfig,
    NemoConfigError,
    PreprocessorConfig,
    UnsupportedValueError,
    normalize_att_context_sizes,
    read_model_config,
    stated_config,
)
from streaming_parity.fixtures.models import FIXTURES
from streaming_parity.interface.chunking import StreamingConfig
from streaming_parity.interface.model_info import ModelInfo


def minimal_config() -> dict:
    """Only the keys NeMo requires (and the sections a transducer has)."""
    return {
        "encoder": {"feat_in": 80, "n_layers": 2, "d_model": 32},
        "preprocessor": {},
        "decoder": {"prednet": {"pred_hidden": 24}},
        "joint": {"jointnet": {"pred_hidden": 24, "joint_hidden": 40}},
    }


# -- the fixture configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_fixture_config_reads(name):
    spec = FIXTURES[name]
    config = read_model_config(spec.config("tokenizer"))
    encoder = config.encoder
    for key in ("feat_in", "n_layers", "d_model", "n_heads", "subsampling", "subsampling_factor",
                "subsampling_conv_channels", "causal_downsampling", "conv_kernel_size", "conv_norm_type",
                "att_context_style", "xscaling", "untie_biases", "pos_emb_max_len", "ff_expansion_factor"):
        assert getattr(encoder, key) == spec.encoder[key], key
    assert encoder.att_context_size == normalize_att_context_sizes(spec.encoder["att_context_size"])
    kernel = spec.encoder["conv_kernel_size"]
    causal = spec.encoder["conv_context_size"] == "causal"
    assert encoder.conv_context_size == ((kernel - 1, 0) if causal else ((kernel - 1) // 2, (kernel - 1) // 2))

    pre = config.preprocessor
    assert (pre.sample_rate, pre.win_length, pre.hop_length, pre.n_fft, pre.n_mels) == (16000, 400, 160, 512, 128)
    assert (pre.normalize, pre.window, pre.pad_to, pre.dither) == ("NA", "hann", 0, 1e-5)

    assert config.decoder.pred_hidden == config.joint.pred_hidden == spec.transducer["model_defaults"]["pred_hidden"]
    assert config.decoder.pred_rnn_layers == 2 and config.decoder.blank_as_pad
    assert config.joint.encoder_hidden == encoder.d_model
    # The fixtures' joint dropout is 0.2, as in released checkpoints; tiny-prompt's is 0 (joint_net.1).
    assert config.joint.output_index == (1 if name == "tiny-prompt" else 2)
    assert config.decoding.max_symbols == 10
    assert config.kind == ("tdt" if name == "tiny-tdt" else "rnnt")
    if name == "tiny-tdt":
        assert config.tdt_durations == (0, 1, 2, 3, 4) and config.joint.num_extra_outputs == 5
    prompt = spec.extra_config.get("model_defaults", {})
    assert (config.prompt is not None) == bool(prompt.get("initialize_prompt_feature"))
    if config.prompt is not None:
        assert config.prompt.num_prompts == prompt["num_prompts"] and config.prompt.hidden == encoder.d_model
        assert dict(config.prompt.dictionary) == prompt["prompt_dictionary"]
    speakers = spec.extra_config.get("spk_kernel_layers")
    assert config.multitalker == bool(speakers)
    if speakers:
        assert config.speaker_kernels.layers == tuple(speakers) and config.speaker_kernels.background
        assert config.speaker_kernels.hidden == config.speaker_kernels.d_model == encoder.d_model


def test_streaming_fixture_gives_the_model_info_the_harness_has_always_used():
    config = FIXTURES["tiny-streaming"].config("tokenizer")
    info = ModelInfo.from_nemo_config(config, ["x"] * 128)
    assert (info.num_layers, info.d_model, info.n_mels, info.conv_kernel_size, info.subsampling_factor) == (3, 64, 128, 9, 8)
    assert info.att_context_sizes == ((70, 13), (70, 6), (70, 1), (70, 0))
    assert (info.blank_id, info.pred_layers, info.pred_hidden, info.max_symbols) == (128, 2, 64, 10)
    assert isinstance(info.encoder_config, EncoderConfig) and not info.multitalker
    assert ModelInfo.from_nemo_config(read_model_config(config), ["x"] * 128) == info


@pytest.mark.nemo
def test_a_built_nemo_reads_as_its_spec(tiny_nemo):
    """The ``.nemo``'s model_config.yaml (what NeMo saved) reads as the config the fixture was built from,
    plus the vocabulary fields NeMo fills in from the tokenizer."""
    from streaming_parity.core.nemo_file import inspect_nemo

    saved = read_model_config(inspect_nemo(tiny_nemo).config)
    spec = read_model_config(FIXTURES["tiny-streaming"].config("tokenizer"))
    assert saved.encoder == spec.encoder and saved.preprocessor == spec.preprocessor
    assert saved.decoding == spec.decoding and saved.speaker_kernels == spec.speaker_kernels
    assert saved.decoder.vocab_size == saved.joint.num_classes == 128
    assert saved == spec.with_vocabulary(saved.joint.require_vocabulary())


# -- defaults ---------------------------------------------------------------------------------------

def test_absent_keys_take_nemos_defaults():
    config = read_model_config(minimal_config())
    encoder = config.encoder
    assert (encoder.conv_kernel_size, encoder.subsampling_factor, encoder.subsampling, encoder.n_heads) == (31, 4, "striding", 4)
    assert encoder.att_context_size == ((-1, -1),) and encoder.att_context_style == "regular"
    assert encoder.conv_context_size == (15, 15) and encoder.subsampling_conv_channels == 32  # -1: d_model
    assert (encoder.causal_downsampling, encoder.xscaling, encoder.untie_biases, encoder.use_bias) == (False, True, True, True)
    assert (encoder.conv_norm_type, encoder.self_attention_model, encoder.pos_emb_max_len) == ("batch_norm", "rel_pos", 5000)
    assert (encoder.feat_out, encoder.reduction, encoder.ff_expansion_factor) == (-1, None, 4)

    pre = config.preprocessor
    assert (pre.sample_rate, pre.win_length, pre.hop_length, pre.n_fft, pre.features) == (16000, 320, 160, 512, 64)
    assert (pre.window, pre.normalize, pre.preemph, pre.mag_power, pre.log) == ("hann", "per_feature", 0.97, 2.0, True)
    assert (pre.log_zero_guard_type, pre.log_zero_guard_value, pre.dither, pre.pad_to) == ("add", 2.0 ** -24, 1e-5, 16)
    assert (pre.frame_splicing, pre.exact_pad, pre.pad_value, pre.mel_norm) == (1, False, 0.0, "slaney")

    assert (config.decoder.pred_rnn_layers, config.decoder.blank_as_pad, config.decoder.vocab_size) == (1, True, None)
    joint = config.joint
    assert (joint.activation, joint.dropout, joint.output_index, joint.encoder_hidden) == ("relu", 0.0, 1, 32)
    assert (joint.num_extra_outputs, joint.num_classes, joint.vocabulary) == (0, None, None)
    assert config.decoding.max_symbols == 10 and config.kind == "rnnt" and config.speaker_kernels is None


@pytest.mark.parametrize("greedy, expected", [
    ({"max_symbols": 3}, 3), ({"max_symbols_per_step": 5}, 5), ({"max_symbols": None}, 10), ({}, 10)])
def test_max_symbols(greedy, expected):
    config = minimal_config()
    config["decoding"] = {"greedy": greedy}
    assert read_model_config(config).decoding.max_symbols == expected


def test_preprocessor_window_in_samples_and_fft_size():
    assert PreprocessorConfig.from_mapping({"n_window_size": 400, "window_size": None}).win_length == 400
    pre = PreprocessorConfig.from_mapping({"window_size": 0.025, "window_stride": 0.01, "sample_rate": 8000})
    assert (pre.win_length, pre.hop_length, pre.n_fft) == (200, 80, 256)
    assert PreprocessorConfig.from_mapping({"nfilt": 80}).n_mels == 80


def test_speaker_kernel_defaults():
    config = minimal_config()
    config["spk_kernel_type"] = "ff"
    speakers = read_model_config(config).speaker_kernels
    assert (speakers.layers, speakers.background, speakers.hidden) == ((0,), True, 32)
    config.update(spk_kernel_layers=[1], add_bg_spk_kernel=False, model_defaults={"enc_hidden": 48})
    speakers = read_model_config(config).speaker_kernels
    assert (speakers.layers, speakers.background, speakers.hidden, speakers.d_model) == ((1,), False, 48, 32)


def test_defaults_are_the_signatures_of_nemos_modules():
    """Each default written here is the one NeMo 3.0.0's module signature has."""
    import inspect

    pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor, ConformerEncoder, RNNTDecoder

    def check(config_class, module, resolved=()):
        signature = inspect.signature(module.__init__).parameters
        for item in dataclasses.fields(config_class):
            if item.init and item.name in signature and item.name not in resolved:
                nemo_default = signature[item.name].default
                if item.default is dataclasses.MISSING:
                    assert nemo_default is inspect.Parameter.empty, item.name
                else:
                    assert item.default == nemo_default, f"{config_class.__name__}.{item.name}"

    # att_context_size: NeMo's None is the normalized ((-1, -1),)
    check(EncoderConfig, ConformerEncoder, resolved=("att_context_size",))
    check(PreprocessorConfig, AudioToMelSpectrogramPreprocessor)
    check(DecoderConfig, RNNTDecoder, resolved=("vocab_size",))  # the model sets it from its tokenizer
    assert EncoderConfig.from_mapping({"feat_in": 1, "n_layers": 1, "d_model": 4}).att_context_size == ((-1, -1),)


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["encoder.feat_in", "encoder.n_layers", "encoder.d_model",
                                  "decoder.prednet.pred_hidden", "joint.jointnet.joint_hidden",
                                  "joint.jointnet.pred_hidden", "encoder", "preprocessor", "decoder", "joint"])
def test_a_missing_required_key_is_named(path):
    config = minimal_config()
    *parents, leaf = path.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    del section[leaf]
    with pytest.raises(MissingKeyError, match=rf"^{path.replace('.', '[.]')} is missing") as raised:
        read_model_config(config)
    assert isinstance(raised.value, KeyError) and isinstance(raised.value, ValueError)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("path, value", [
    ("encoder.att_context_style", "chunked_limited_with_rc"),
    ("joint.jointnet.activation", "gelu"),
    ("preprocessor.log_zero_guard_type", "max"),
    ("spk_kernel_type", "conv"),
])
def test_an_unsupported_value_is_named_with_the_value(path, value):
    config = minimal_config()
    *parents, leaf = path.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    section[leaf] = value
    with pytest.raises(UnsupportedValueError, match=rf"^{path.replace('.', '[.]')} = '{value}' is not supported") as raised:
        read_model_config(config)
    assert isinstance(raised.value, NotImplementedError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["encoder"].update(n_layers="three"), r"encoder\.n_layers = 'three' is not an integer"),
    (lambda c: c["encoder"].update(att_context_size=[[70, 1, 2]]), r"encoder\.att_context_size = \[\[70, 1, 2\]\]"),
    (lambda c: c["encoder"].update(conv_kernel_size=9, conv_context_size=[2, 2]),
     r"encoder\.conv_context_size = \[2, 2\] does not fit conv_kernel_size 9"),
    (lambda c: c.update(spk_kernel_type="ff", spk_kernel_layers=[2]), r"spk_kernel_layers \[2\] outside the encoder's 2 layers"),
    (lambda c: c["preprocessor"].update(n_window_size=400), r"preprocessor\.window_size = 0\.02 and preprocessor\.n_window_size"),
])
def test_invalid_values_are_named(edit, message):
    config = minimal_config()
    edit(config)
    with pytest.raises(NemoConfigError, match=message):
        read_model_config(config)


def test_consumers_keep_their_refusals():
    """The MLX port and the numpy front end refuse what they do not implement, naming the key."""
    from streaming_parity.interface.frontend import FrontendConfig

    with pytest.raises(NotImplementedError, match="preprocessor.frame_splicing"):
        FrontendConfig.from_nemo_config({"frame_splicing": 2})
    with pytest.raises(NotImplementedError, match="preprocessor.normalize"):
        FrontendConfig.from_nemo_config(PreprocessorConfig.from_mapping({"normalize": "median"}))
    with pytest.raises(ValueError, match="cache-aware streaming needs att_context_style 'chunked_limited'"):
        StreamingConfig.from_encoder_config(read_model_config(minimal_config()).encoder, (-1, -1))


# -- what a config states -----------------------------------------------------------------------------

def test_stated_config_claims_only_what_the_config_says():
    config = minimal_config()
    config["encoder"]["causal_downsampling"] = True
    stated = stated_config(config)
    assert stated.encoder == {"feat_in": 80, "n_layers": 2, "d_model": 32, "causal_downsampling": True}
    assert "conv_kernel_size" not in stated.encoder and "pred_rnn_layers" not in stated.decoder
    assert stated.kind == "rnnt" and stated.speaker_kernel_layers == () and not stated.background_speaker_kernel
    assert stated_config({}).encoder == {} and stated_config({"encoder": {"inputs": [1]}}).encoder == {}
    config.update(spk_kernel_type="ff", spk_kernel_layers=[5, 1], model_defaults={"tdt_durations": [0, 1]})
    config["encoder"]["att_context_style"] = "anything"  # refused by the reader, claimed here as stated
    stated = stated_config(config)
    assert stated.speaker_kernel_layers == (1, 5) and stated.background_speaker_kernel and stated.kind == "tdt"
    assert stated.encoder["att_context_style"] == "anything"


def test_att_context_forms_and_the_name_kept_in_chunking():
    from streaming_parity.interface import chunking

    assert chunking.normalize_att_context_sizes is normalize_att_context_sizes
    assert normalize_att_context_sizes(None) == normalize_att_context_sizes([]) == ((-1, -1),)
    assert normalize_att_context_sizes([70, 13]) == ((70, 13),)
    assert normalize_att_context_sizes([[70, 13], (70, 0)]) == ((70, 13), (70, 0))


def test_typed_config_round_trips_through_its_mapping():
    config = read_model_config(FIXTURES["tiny-streaming"].config("tokenizer"))
    assert EncoderConfig.from_mapping(config.encoder.as_config()) == config.encoder
    assert read_model_config(config) is config
    assert isinstance(config, ModelConfig) and dataclasses.is_dataclass(config.joint)
    assert JointConfig.from_mapping({"jointnet": {"pred_hidden": 1, "joint_hidden": 2, "dropout": None}}).output_index == 1
    built = config.with_vocabulary(["a", "b"])
    assert (built.decoder.vocab_size, built.joint.num_classes, built.joint.output_size) == (2, 2, 3)


# -- random encoder shapes: the streaming schedule NeMo derives --------------------------------------

@st.composite
def encoder_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kernel = draw(st.sampled_from([3, 5, 7, 9, 15, 31]))
    causal = draw(st.booleans())
    contexts = draw(st.lists(st.tuples(st.sampled_from([-1, 0, 10, 70, 140]), st.integers(0, 16)),
                             min_size=1, max_size=4, unique=True))
    encoder = {
        "feat_in": draw(st.sampled_from([64, 80, 128])),
        "n_layers": draw(st.integers(1, 24)),
        "d_model": heads * draw(st.sampled_from([8, 16, 64])),
        "n_heads": heads,
        "subsampling": draw(st.sampled_from(["dw_striding", "striding"])),
        "subsampling_factor": draw(st.sampled_from([4, 8])),
        "causal_downsampling": causal,
        "conv_kernel_size": kernel,
        "conv_context_size": "causal" if causal else None,
        "att_context_size": [list(c) for c in contexts] if len(contexts) > 1 else list(contexts[0]),
        "att_context_style": "chunked_limited",
    }
    return encoder, draw(st.sampled_from(contexts))


@settings(max_examples=80, deadline=None)
@given(drawn=encoder_configs())
def test_random_encoder_shapes_give_nemos_streaming_schedule(drawn):
    raw, (left, right) = drawn
    encoder = EncoderConfig.from_mapping(raw)
    factor, kernel = raw["subsampling_factor"], raw["conv_kernel_size"]
    assert (encoder.n_layers, encoder.d_model, encoder.n_heads, encoder.conv_kernel_size) == (
        raw["n_layers"], raw["d_model"], raw["n_heads"], kernel)
    assert (left, right) in encoder.att_context_size
    assert encoder.conv_context_size == ((kernel - 1, 0) if raw["causal_downsampling"] else ((kernel - 1) // 2,) * 2)

    streaming = StreamingConfig.from_encoder_config(encoder, (left, right))
    assert streaming == StreamingConfig.from_encoder_config(raw, (left, right))  # a mapping reads the same
    # ConformerEncoder.setup_streaming_params with ConvSubsampling's sampling frames and cache size:
    # causal striding needs 1 frame for the first output and `factor` for each later one.
    first = 1 if raw["causal_downsampling"] else factor
    assert streaming.sampling_frames == (first, factor)
    assert streaming.chunk_size == (first + factor * right, factor + factor * right)
    assert streaming.shift_size == streaming.chunk_size
    assert streaming.valid_out_len == right + 1
    assert streaming.pre_encode_cache_size == ((0, factor + 1) if raw["causal_downsampling"] else (0, 0))
    assert streaming.drop_extra_pre_encoded == (2 if raw["causal_downsampling"] else 0)
    assert streaming.last_channel_cache_size == (left if left >= 0 else 10000)
    assert streaming.subsampling_factor == factor and streaming.cache_drop_size == 0

    config = copy.deepcopy(minimal_config())
    config["encoder"] = raw
    info = ModelInfo.from_nemo_config(config, ["x"] * 8)
    state = info.initial_state((left, right), batch_size=2)
    assert state.cache_last_channel.shape == (raw["n_layers"], 2, streaming.last_channel_cache_size, raw["d_model"])
    assert state.cache_last_time.shape == (raw["n_layers"], 2, raw["d_model"], kernel - 1)

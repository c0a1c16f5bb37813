"""A catalog of the conversion bugs the field actually ships, as seeded corruptions of an artifact.

Each ``Mutation`` takes a correct MLX artifact directory (weights in MLX layout, see
``streaming_parity/backends/mlx/mapping.py``) and corrupts it the way a buggy converter or a mislabeled upload
would. The suites require every one to be *caught* (by ``streaming_parity.detect.diagnose``) and *localized*
(to the tap and the tensors named here). The same catalog, run on a trained model, shows the WER
each corruption costs: the silent degradation made visible.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streaming_parity.backends.mlx.artifact import CONFIG_FILE, MODEL_FILE


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    apply: Callable[[Path, dict], None]  # (artifact dir, context) -> None, edits in place
    # How it must be found: a weight/config contradiction (no source needed), or tensors that differ
    # from the source and a first divergent tap.
    expect_contradiction: str | None = None  # a phrase of the contradiction sentence
    expect_tap: str | None = None  # the tap the numeric divergence must be localized to
    expect_tensors: tuple[str, ...] = ()  # artifact tensor names that must be blamed
    expect_cause: str | None = None  # a phrase of the cause named at the first divergence (PairComparison.causes)
    needs: str | None = None  # context the mutation needs: "source_state" (NeMo tensors) or "tdt_artifact"
    # The artifact it corrupts: "streaming", "multitalker" (speaker kernels), "hybrid" (a CTC head) or
    # "prompt" (a prompt-conditioned Nemotron-3.5 model, joint dropout 0).
    model: str = "streaming"


def _edit_weights(directory: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    from safetensors.numpy import load_file, save_file

    path = directory / MODEL_FILE
    tensors = load_file(str(path))
    if any(t.dtype != np.float32 for t in tensors.values()):
        raise ValueError(f"{path}: mutations are applied to float32 artifacts")
    edit(tensors)
    save_file(tensors, str(path))


def _edit_config(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=1))


def _transpose(name: str):
    def edit(tensors):
        weight = tensors[name]
        if weight.shape[0] != weight.shape[1]:
            raise ValueError(f"{name}: not square {weight.shape}")
        tensors[name] = np.ascontiguousarray(weight.T)
    return lambda directory, _context: _edit_weights(directory, edit)


def _swap(first: str, second: str):
    def edit(tensors):
        tensors[first], tensors[second] = tensors[second].copy(), tensors[first].copy()
    return lambda directory, _context: _edit_weights(directory, edit)


def _flip_depthwise(name: str):
    # MLX depthwise kernel [D, K, 1] (OKI): flipping K turns the causal convolution around in time.
    return lambda directory, _context: _edit_weights(
        directory, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name][:, ::-1, :])))


def _reorder_lstm_gates(layer: int):
    """Gate blocks i, f, g, o written as i, g, f, o in every LSTM tensor of one layer."""
    prefix = f"decoder.prediction.dec_rnn.lstm.{layer}"

    def edit(tensors):
        for leaf in ("Wx", "Wh", "bias"):
            tensor = tensors[f"{prefix}.{leaf}"]
            i, f, g, o = np.split(tensor, 4, axis=0)
            tensors[f"{prefix}.{leaf}"] = np.ascontiguousarray(np.concatenate([i, g, f, o], axis=0))
    return lambda directory, _context: _edit_weights(directory, edit)


def _drop_bias_hh(layer: int):
    """The summed LSTM bias written as bias_ih alone (the converter forgot bias_hh)."""
    def apply(directory, context):
        bias_ih = context["source_state"][f"decoder.prediction.dec_rnn.lstm.bias_ih_l{layer}"]
        _edit_weights(directory, lambda t: t.__setitem__(
            f"decoder.prediction.dec_rnn.lstm.{layer}.bias", np.ascontiguousarray(bias_ih, dtype=np.float32)))
    return apply


def _permute_output_channels(conv: str, seed: int = 0):
    def edit(tensors):
        weight = tensors[f"{conv}.weight"]
        order = np.random.default_rng(seed).permutation(weight.shape[0])
        tensors[f"{conv}.weight"] = np.ascontiguousarray(weight[order])
        tensors[f"{conv}.bias"] = np.ascontiguousarray(tensors[f"{conv}.bias"][order])
    return lambda directory, _context: _edit_weights(directory, edit)


def _swap_speaker_kernels(layer: int):
    """The target-speaker and background-speaker kernels of one layer exchanged (every tensor)."""
    def edit(tensors):
        for leaf in ("0.weight", "0.bias", "3.weight", "3.bias"):
            target, background = f"spk_kernels.{layer}.{leaf}", f"bg_spk_kernels.{layer}.{leaf}"
            tensors[target], tensors[background] = tensors[background].copy(), tensors[target].copy()
    return lambda directory, _context: _edit_weights(directory, edit)


def _relabel_as_multitalker(directory: Path, _context) -> None:
    """Single-speaker (nemotron) weights published under a multitalker config."""
    def edit(config):
        config.update({"target": "nemo.collections.asr.models.multitalker_asr_models.EncDecMultiTalkerRNNTBPEModel",
                       "spk_kernel_type": "ff", "spk_kernel_layers": [0], "add_bg_spk_kernel": True})
    _edit_config(directory, edit)


def _relabel_as_single_speaker(directory: Path, _context) -> None:
    """Multitalker weights published under a single-speaker config (the kernels would be ignored)."""
    def edit(config):
        config["target"] = "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel"
        for key in ("spk_kernel_type", "spk_kernel_layers", "add_bg_spk_kernel"):
            config.pop(key, None)
    _edit_config(directory, edit)


def _ctc_head_blank_first(directory: Path, _context) -> None:
    """The CTC head's outputs renumbered blank-first (k2's, torchaudio's and sherpa-onnx's CTC convention,
    blank id 0) while NeMo's blank is last: every row of the weight and the bias moves down one label."""
    def edit(tensors):
        for leaf in ("weight", "bias"):
            name = f"ctc_decoder.decoder_layers.0.{leaf}"
            tensors[name] = np.ascontiguousarray(np.roll(tensors[name], 1, axis=0))
    _edit_weights(directory, edit)


def _relabel_as_transducer_only(directory: Path, _context) -> None:
    """Hybrid RNNT-CTC weights published under a transducer-only config (the CTC head would be ignored)."""
    def edit(config):
        config["target"] = "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel"
        config.pop("aux_ctc", None)
    _edit_config(directory, edit)


def _relabel_joint_output(directory: Path, _context) -> None:
    """The joint's output layer written under the other ``joint_net`` index than the config builds (a
    converter assuming the released checkpoints' dropout; mlx-audio expects ``joint_net.2``)."""
    def edit(tensors):
        names = [n for n in tensors if n.startswith("joint.joint_net.")]
        indices = {n.split(".")[2] for n in names}
        if len(indices) != 1:
            raise ValueError(f"joint output layer under several indices: {sorted(names)}")
        index = indices.pop()
        other = "2" if index == "1" else "1"
        for name in names:
            tensors[name.replace(f"joint_net.{index}.", f"joint_net.{other}.")] = tensors.pop(name)
    _edit_weights(directory, edit)


def _swap_prompt_concat_order(directory: Path, _context) -> None:
    """``prompt_kernel.0`` written for ``cat([one_hot, encoded])`` while the runtime concatenates
    ``cat([encoded, one_hot])`` as NeMo does: its input columns rotated by the number of prompts."""
    def edit(tensors):
        weight = tensors["prompt_kernel.0.weight"]  # [2D, D + P]
        d_model = tensors["prompt_kernel.2.weight"].shape[0]
        tensors["prompt_kernel.0.weight"] = np.ascontiguousarray(
            np.concatenate([weight[:, d_model:], weight[:, :d_model]], axis=1))
    _edit_weights(directory, edit)


def _shift_prompt_dictionary(directory: Path, _context) -> None:
    """Every locale's prompt index moved up by one (a prompt_dictionary from another release)."""
    def edit(config):
        defaults = config["model_defaults"]
        count = int(defaults.get("num_prompts", 128))
        defaults["prompt_dictionary"] = {locale: (int(index) + 1) % count
                                         for locale, index in defaults["prompt_dictionary"].items()}
    _edit_config(directory, edit)


def _drop_prompt_feature(directory: Path, _context) -> None:
    """A prompt model's config published without ``initialize_prompt_feature``: NeMo (and any runtime
    reading the config) builds no prompt kernel and ignores the locale."""
    _edit_config(directory, lambda config: config["model_defaults"].pop("initialize_prompt_feature"))


def _scale(name: str, factor: float):
    return lambda directory, _context: _edit_weights(
        directory, lambda t: t.__setitem__(name, (t[name] * np.float32(factor)).astype(np.float32)))


def _shift_vocabulary(directory: Path, _context) -> None:
    def edit(config):
        vocabulary = config["joint"]["vocabulary"]
        config["joint"]["vocabulary"] = vocabulary[1:] + vocabulary[:1]
    _edit_config(directory, edit)


def _flip_causal_flag(directory: Path, _context) -> None:
    def edit(config):
        config["encoder"]["causal_downsampling"] = not config["encoder"]["causal_downsampling"]
    _edit_config(directory, edit)


def _tdt_weights_as_rnnt(directory: Path, context) -> None:
    """Replace the artifact by a TDT model's, relabeled with an RNNT config (a mislabeled upload)."""
    import shutil

    tdt = Path(context["tdt_artifact"])
    for item in directory.iterdir():
        if item.is_file():
            item.unlink()
    for item in tdt.iterdir():
        if item.is_file():
            shutil.copy2(item, directory / item.name)

    def relabel(config):
        config["target"] = "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel"
        config.get("model_defaults", {}).pop("tdt_durations", None)
        config.get("model_defaults", {}).pop("num_tdt_durations", None)
        config.get("decoding", {}).pop("model_type", None)
        config.get("decoding", {}).pop("durations", None)
        config["loss"] = {"loss_name": "default"}
    _edit_config(directory, relabel)


CATALOG: tuple[Mutation, ...] = (
    Mutation("transposed-linear", "a square attention projection written transposed",
             _transpose("encoder.layers.1.self_attn.linear_q.weight"),
             expect_tap="layers.1", expect_tensors=("encoder.layers.1.self_attn.linear_q.weight",)),
    Mutation("pos-bias-swapped", "pos_bias_u and pos_bias_v exchanged",
             _swap("encoder.layers.2.self_attn.pos_bias_u", "encoder.layers.2.self_attn.pos_bias_v"),
             expect_tap="layers.2", expect_tensors=("encoder.layers.2.self_attn.pos_bias_u",
                                                    "encoder.layers.2.self_attn.pos_bias_v")),
    Mutation("depthwise-flipped", "the causal depthwise kernel flipped in time",
             _flip_depthwise("encoder.layers.0.conv.depthwise_conv.weight"),
             expect_tap="layers.0", expect_tensors=("encoder.layers.0.conv.depthwise_conv.weight",)),
    Mutation("lstm-gates-reordered", "LSTM gate blocks i,f,g,o written as i,g,f,o",
             _reorder_lstm_gates(0), expect_tap="decoder",
             expect_tensors=("decoder.prediction.dec_rnn.lstm.0.Wx", "decoder.prediction.dec_rnn.lstm.0.Wh",
                             "decoder.prediction.dec_rnn.lstm.0.bias")),
    Mutation("lstm-bias-hh-dropped", "the summed LSTM bias missing bias_hh",
             _drop_bias_hh(1), expect_tap="decoder",
             expect_tensors=("decoder.prediction.dec_rnn.lstm.1.bias",), needs="source_state"),
    Mutation("subsampling-channels-permuted", "output channels of the first subsampling conv permuted",
             _permute_output_channels("encoder.pre_encode.conv.0"),
             expect_tap="pre_encode", expect_tensors=("encoder.pre_encode.conv.0.weight",
                                                      "encoder.pre_encode.conv.0.bias")),
    Mutation("norm-scaled-1pct", "one LayerNorm weight scaled by 1 %",
             _scale("encoder.layers.1.norm_feed_forward1.weight", 1.01),
             expect_tap="layers.1", expect_tensors=("encoder.layers.1.norm_feed_forward1.weight",)),
    Mutation("vocabulary-shifted", "the embedded vocabulary shifted by one",
             _shift_vocabulary, expect_contradiction="tokenizer's pieces differ from the embedded vocabulary"),
    Mutation("causal-flag-flipped", "causal_downsampling flipped in the config",
             _flip_causal_flag, expect_contradiction="subsampling"),
    Mutation("tdt-as-rnnt", "Parakeet-TDT weights published under an RNNT config",
             _tdt_weights_as_rnnt, expect_contradiction="TDT weights", needs="tdt_artifact"),
    Mutation("speaker-kernels-swapped", "target- and background-speaker kernels of layer 0 exchanged",
             _swap_speaker_kernels(0), expect_tap="layers.0",
             expect_tensors=tuple(f"{kind}.0.{leaf}" for kind in ("spk_kernels", "bg_spk_kernels")
                                  for leaf in ("0.weight", "0.bias", "3.weight", "3.bias")),
             model="multitalker"),
    Mutation("single-speaker-as-multitalker", "nemotron weights published under a multitalker config",
             _relabel_as_multitalker, expect_contradiction="weights hold no speaker kernels"),
    Mutation("multitalker-as-single-speaker", "multitalker weights published under a single-speaker config",
             _relabel_as_single_speaker, expect_contradiction="describes a single-speaker model",
             model="multitalker"),
    Mutation("ctc-head-blank-first", "a hybrid's CTC head renumbered blank-first (rows rolled by one label)",
             _ctc_head_blank_first, expect_tap="ctc",
             expect_tensors=("ctc_decoder.decoder_layers.0.weight", "ctc_decoder.decoder_layers.0.bias"),
             model="hybrid"),
    Mutation("hybrid-as-transducer-only", "hybrid RNNT-CTC weights published under a transducer-only config",
             _relabel_as_transducer_only, expect_contradiction="hybrid RNNT-CTC weights under a transducer-only",
             model="hybrid"),
    Mutation("joint-output-relabeled", "the joint's output layer written as joint_net.2 for a dropout-0 joint "
             "(joint_net.1)", _relabel_joint_output, expect_contradiction="leaves the joint output layer randomly",
             model="prompt"),
    Mutation("prompt-concat-order-swapped", "prompt_kernel.0's input columns ordered [one-hot, encoder] instead of "
             "NeMo's [encoder, one-hot]", _swap_prompt_concat_order, expect_tap="prompt",
             expect_tensors=("prompt_kernel.0.weight",), expect_cause="matches no prompt index", model="prompt"),
    Mutation("prompt-dictionary-shifted", "every locale's prompt index moved up by one in the config",
             _shift_prompt_dictionary, expect_tap="prompt", expect_cause="off by +1", model="prompt"),
    Mutation("prompt-feature-dropped", "a prompt model's config without initialize_prompt_feature",
             _drop_prompt_feature, expect_contradiction="the prompt would be bypassed", model="prompt"),
)


def by_name(name: str) -> Mutation:
    for mutation in CATALOG:
        if mutation.name == name:
            return mutation
    raise KeyError(f"unknown mutation {name!r}; known: {', '.join(m.name for m in CATALOG)}")

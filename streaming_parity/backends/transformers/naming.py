"""NeMo <-> transformers correspondence for the cache-aware FastConformer-RNNT families, read from the modules
transformers 5 builds (``models/nemotron_asr_streaming/modeling_nemotron_asr_streaming.py``,
``models/nemotron3_5_asr/modeling_nemotron3_5_asr.py``), without importing transformers:

- tensor names both ways (``hf_name``, ``nemo_names``);
- the NeMo config values each transformers config field states (``expressed_config``), and the NeMo values
  no transformers field can state, which the writer refuses (``inexpressible``).

The module layout: NeMo's ``pre_encode.conv`` is one ``Sequential`` (conv, ReLU, then for each further
stride-2 stage a depthwise conv, a pointwise conv and a ReLU); transformers splits it into ``conv_in`` and
``layers.{i}.depthwise_conv`` / ``pointwise_conv``. The joint's two projections move: ``joint.enc`` is the
model's ``encoder_projector`` and ``joint.pred`` the decoder's ``decoder_projector``; the joint's output
layer is ``joint.head`` whatever index NeMo's ``Sequential`` gives it (``joint_net.2`` after a Dropout,
``joint_net.1`` without).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streaming_parity.core.nemo_config import ModelConfig

FAMILY_STREAMING = "nemotron_asr_streaming"  # NemotronAsrStreamingForRNNT
FAMILY_PROMPT = "nemotron3_5_asr"  # Nemotron3_5AsrForRNNT (the prompt-conditioned family)
FAMILIES = (FAMILY_STREAMING, FAMILY_PROMPT)
ENCODER_MODEL_TYPE = "nemotron_asr_streaming_encoder"

# NeMo tensors no transformers module holds: the front end's window and filterbank (transformers' feature
# extractor computes its own), batch-norm counters and the positional-encoding table (recomputed).
_SKIPPED = (re.compile(r"^preprocessor\."), re.compile(r"\.num_batches_tracked$"), re.compile(r"^encoder\.pos_enc\.pe$"))

_LAYER_RENAMES = (
    (".self_attn.linear_q.", ".self_attn.q_proj."),
    (".self_attn.linear_k.", ".self_attn.k_proj."),
    (".self_attn.linear_v.", ".self_attn.v_proj."),
    (".self_attn.linear_out.", ".self_attn.o_proj."),
    (".self_attn.linear_pos.", ".self_attn.relative_k_proj."),
    (".self_attn.pos_bias_u", ".self_attn.bias_u"),
    (".self_attn.pos_bias_v", ".self_attn.bias_v"),
    (".conv.batch_norm.", ".conv.norm."),
)
_FIXED = {
    "encoder.pre_encode.out.": "encoder.subsampling.linear.",
    "decoder.prediction.embed.": "decoder.embedding.",
    "decoder.prediction.dec_rnn.lstm.": "decoder.lstm.",
    "joint.enc.": "encoder_projector.",
    "joint.pred.": "decoder.decoder_projector.",
    "prompt_kernel.0.": "prompt_projector.linear_1.",
    "prompt_kernel.2.": "prompt_projector.linear_2.",
}
_PRE_ENCODE_CONV = re.compile(r"^encoder\.pre_encode\.conv\.(\d+)\.(.+)$")
_JOINT_OUT = re.compile(r"^joint\.joint_net\.(\d+)\.(.+)$")


def skipped(nemo_name: str) -> bool:
    return any(pattern.search(nemo_name) for pattern in _SKIPPED)


def hf_name(nemo_name: str) -> str:
    """The transformers parameter made from the NeMo tensor ``nemo_name`` (see ``skipped`` first)."""
    match = _PRE_ENCODE_CONV.match(nemo_name)
    if match:
        index, rest = int(match[1]), match[2]
        if index == 0:
            return f"encoder.subsampling.conv_in.{rest}"
        # conv.0, ReLU(1), then per stage: depthwise (2 + 3i), pointwise (3 + 3i), ReLU (4 + 3i)
        stage, position = divmod(index - 2, 3)
        if index < 2 or position == 2:
            raise KeyError(f"{nemo_name}: no weights at this position of NeMo's dw_striding pre_encode.conv")
        return f"encoder.subsampling.layers.{stage}.{'depthwise_conv' if position == 0 else 'pointwise_conv'}.{rest}"
    match = _JOINT_OUT.match(nemo_name)
    if match:
        return f"joint.head.{match[2]}"
    for prefix, target in _FIXED.items():
        if nemo_name.startswith(prefix):
            return target + nemo_name[len(prefix):]
    if nemo_name.startswith("encoder.layers."):
        name = nemo_name
        for old, new in _LAYER_RENAMES:
            name = name.replace(old, new)
        return name
    raise KeyError(f"{nemo_name}: no transformers counterpart in NemotronAsrStreaming/Nemotron3_5Asr")


_HF_SUBSAMPLING_STAGE = re.compile(r"^encoder\.subsampling\.layers\.(\d+)\.(depthwise_conv|pointwise_conv)\.(.+)$")


def nemo_name(hf: str, joint_output: int = 2) -> str:
    """The NeMo tensor a transformers parameter stands for (``hf_name`` inverted); ``joint_output``: the index of
    the joint's output layer in NeMo's ``joint_net`` (2 after a Dropout, 1 without)."""
    if hf.startswith("encoder.subsampling.conv_in."):
        return "encoder.pre_encode.conv.0." + hf[len("encoder.subsampling.conv_in."):]
    match = _HF_SUBSAMPLING_STAGE.match(hf)
    if match:
        stage, kind, rest = int(match[1]), match[2], match[3]
        return f"encoder.pre_encode.conv.{2 + 3 * stage + (0 if kind == 'depthwise_conv' else 1)}.{rest}"
    if hf.startswith("joint.head."):
        return f"joint.joint_net.{joint_output}.{hf[len('joint.head.'):]}"
    for prefix, target in _FIXED.items():
        if hf.startswith(target):
            return prefix + hf[len(target):]
    if hf.startswith("encoder.layers."):
        name = hf
        for old, new in _LAYER_RENAMES:
            name = name.replace(new, old)
        return name
    raise KeyError(f"{hf}: no NeMo counterpart")


def nemo_names(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """transformers parameter -> the NeMo tensor it is made from, for every tensor of ``checkpoint``
    that transformers holds."""
    names = {}
    for name in checkpoint:
        if skipped(name):
            continue
        target = hf_name(name)
        if target in names:
            raise KeyError(f"{name} and {names[target]} would both become {target}")
        names[target] = name
    return names


def joint_output_index(checkpoint: Mapping[str, Any]) -> int:
    """The index of the joint's output Linear in NeMo's ``joint_net`` (2 after a Dropout, 1 without), read
    from the weights."""
    found = sorted({int(m[1]) for m in (_JOINT_OUT.match(n) for n in checkpoint) if m})
    if len(found) != 1:
        raise KeyError(f"expected one joint output layer under joint.joint_net, found indices {found}")
    return found[0]


@dataclass(frozen=True)
class Refusal:
    """A NeMo setting transformers' classes cannot express: the field, the model's value, what transformers
    builds instead."""

    field: str
    value: Any
    transformers: str

    def text(self) -> str:
        return f"{self.field} = {self.value!r}: {self.transformers}"


def inexpressible(config: ModelConfig, checkpoint: Mapping[str, Any] | None = None) -> list[Refusal]:
    """Every setting of ``config`` that NemotronAsrStreaming / Nemotron3_5Asr cannot express."""
    encoder, refusals = config.encoder, []

    def refuse(field: str, value: Any, instead: str) -> None:
        refusals.append(Refusal(field, value, instead))

    if config.kind != "rnnt":
        refuse("transducer kind", config.kind, "transformers' Nemotron families are RNN-T (no TDT durations)")
    if config.ctc is not None:
        refuse("aux_ctc", "a CTC head", "the transformers classes have no CTC head (it would be dropped)")
    if config.speaker_kernels is not None:
        refuse("spk_kernel_type", config.speaker_kernels.kernel_type, "no speaker kernels in transformers")
    if encoder.conv_norm_type != "layer_norm":
        refuse("encoder.conv_norm_type", encoder.conv_norm_type,
               "the conformer conv module's norm is always LayerNorm (NemotronAsrStreamingEncoderConvolutionModule.norm)")
    kernel = encoder.conv_kernel_size
    if tuple(encoder.conv_context_size or ()) != (kernel - 1, 0):
        refuse("encoder.conv_context_size", encoder.conv_context_size,
               f"the depthwise conv is always fully causal, left context kernel - 1 = {kernel - 1}")
    if not encoder.causal_downsampling:
        refuse("encoder.causal_downsampling", False, "the subsampling convs are always causal (CausalConv2D)")
    if encoder.subsampling != "dw_striding":
        refuse("encoder.subsampling", encoder.subsampling, "only dw_striding (conv_in + depthwise-separable stages)")
    if encoder.att_context_style != "chunked_limited":
        refuse("encoder.att_context_style", encoder.att_context_style, "the attention mask is always chunked_limited")
    if encoder.self_attention_model != "rel_pos":
        refuse("encoder.self_attention_model", encoder.self_attention_model, "relative-position attention only")
    if not encoder.untie_biases:
        refuse("encoder.untie_biases", False, "pos_bias_u/v are per layer (bias_u, bias_v of every attention)")
    lefts = sorted({left for left, _ in encoder.att_context_size})
    if len(lefts) != 1 or lefts[0] < 0:
        refuse("encoder.att_context_size", [list(c) for c in encoder.att_context_size],
               "one left context for every lookahead (sliding_window = left + 1), and no unlimited context")
    if encoder.reduction is not None:
        refuse("encoder.reduction", encoder.reduction, "no time reduction inside the stack")
    joint = config.joint
    if joint.joint_hidden != config.decoder.pred_hidden:
        refuse("joint.jointnet.joint_hidden", joint.joint_hidden,
               f"the joint projects to decoder_hidden_size = pred_hidden ({config.decoder.pred_hidden}): "
               "encoder_projector and decoder_projector are Linear(*, decoder_hidden_size)")
    if not config.decoder.blank_as_pad:
        refuse("decoder.blank_as_pad", False, "generate() starts the prediction net from the blank's embedding row")
    pre = config.preprocessor
    normalize = pre.normalize if isinstance(pre.normalize, str) else str(pre.normalize)
    if normalize not in ("NA", "None", ""):
        refuse("preprocessor.normalize", pre.normalize, "the feature extractor never normalizes the mel")
    checks = (("preprocessor.log", pre.log, True), ("preprocessor.log_zero_guard_type", pre.log_zero_guard_type, "add"),
              ("preprocessor.log_zero_guard_value", float(pre.log_zero_guard_value), 2.0 ** -24),
              ("preprocessor.mag_power", pre.mag_power, 2.0), ("preprocessor.mel_norm", pre.mel_norm, "slaney"),
              ("preprocessor.window", pre.window, "hann"), ("preprocessor.lowfreq", pre.lowfreq, 0.0),
              ("preprocessor.frame_splicing", pre.frame_splicing, 1), ("preprocessor.exact_pad", pre.exact_pad, False))
    for field, value, fixed in checks:
        if value != fixed:
            refuse(field, value, f"the feature extractor always uses {fixed!r}")
    if pre.highfreq not in (None, pre.sample_rate / 2):
        refuse("preprocessor.highfreq", pre.highfreq, f"the mel filters always reach sample_rate / 2 = {pre.sample_rate / 2}")
    if config.prompt is not None and checkpoint is not None and "prompt_kernel.0.weight" not in checkpoint:
        refuse("model_defaults.initialize_prompt_feature", config.prompt.initialize,
               "Nemotron3_5Asr always applies its prompt projector; this checkpoint has no prompt_kernel")
    return refusals

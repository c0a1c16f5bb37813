"""What the weights alone say about a model, and where that contradicts what its config claims.

Catches the failures the field suffers that no numeric run against the wrong reference would:
Parakeet-TDT weights published as a Nemotron (RNNT) model, a causal flag that does not match the
subsampling, a vocabulary off by one, a tokenizer that is not the one the joint was trained with.

Facts are read from tensor *shapes* (layout-aware: NeMo's PyTorch layout, MLX's layout), never
from names the config supplies:

- layers: distinct ``encoder.layers.N``; heads and d_model from ``pos_bias_u`` ``[H, d_k]``
- subsampling: ``pre_encode.out`` input width = conv channels x frequency bins; causal dw_striding
  pads (k-1, s-1) so 128 mels -> 65 -> 33 -> 17 bins (4352 for 256 channels), symmetric padding
  gives 64 -> 32 -> 16 (4096)
- conv kernel from the depthwise conv; conv norm: batch_norm has running statistics, layer_norm not
- decoder kind from the joint's output width: vocabulary + 1 = RNNT, + durations = TDT; a hybrid's
  CTC head (``ctc_decoder.decoder_layers.0.weight``, a kernel-1 conv of vocabulary + 1 outputs) adds
  "+ctc"
- vocabulary from the prediction-net embedding (blank_as_pad adds the blank row)
- LSTM layers and width; the layers holding target- and background-speaker kernels
- the joint's output layer index (``joint_net.2`` after a Dropout, ``joint_net.1`` without), which the
  config's ``jointnet.dropout`` decides: a loader matching names non-strictly leaves the other one random
- a prompt-conditioned model's ``prompt_kernel`` (Linear(D + P, 2D), ReLU, Linear(2D, D)): its shapes and
  the number of prompts P = the first layer's input width - the second's output width
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import InputNotFound, InvalidInput
from streaming_parity.core.nemo_config import StatedConfig, stated_config
from streaming_parity.interface.model_view import (
    ArtifactReader,
    ModelView,
    TensorInfo,
    tensor_hash,
    tokenizer_pieces,
)

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# -- loading ----------------------------------------------------------------------------------------

def view_nemo(path: Path) -> ModelView:
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict

    archive = inspect_nemo(path)
    state = load_state_dict(archive)
    tensors = {}
    for name, tensor in state.items():
        array = tensor.detach().cpu()
        if array.dtype.is_floating_point and str(array.dtype) == "torch.bfloat16":
            array = array.float()
        array = array.numpy()
        tensors[name] = TensorInfo(tuple(array.shape), str(array.dtype), tensor_hash(array))
    pieces = None
    try:
        pieces = tokenizer_pieces(archive.tokenizer_model_bytes())
    except Exception:  # noqa: BLE001 - a checkpoint without a SentencePiece model: nothing to compare
        pass
    return ModelView("nemo", path, "pytorch", tensors, archive.config, vocabulary=pieces, tokenizer_pieces=pieces)


def open_view(path: str | Path, readers: Sequence[ArtifactReader] = ()) -> ModelView:
    """A ``.nemo``, or an artifact one of ``readers`` recognises (each backend contributes one)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".nemo":
        return view_nemo(path)
    for reader in readers:
        view = reader(path)
        if view is not None:
            return view
    raise InvalidInput(f"{path}: not a .nemo and not an artifact any registered backend reads")


# -- facts from the weights -------------------------------------------------------------------------

def _find(tensors: Mapping[str, TensorInfo], pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted((n for n in tensors if regex.search(n)), key=_natural)


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def weight_facts(view: ModelView) -> dict[str, Any]:
    """Everything derivable from tensor shapes; ``None`` where the weights do not say."""
    t = view.tensors
    facts: dict[str, Any] = {}
    layers = {int(m.group(1)) for n in t if n.startswith("encoder.") and (m := LAYER_RE.search(n))}
    facts["num_layers"] = (max(layers) + 1) if layers else None

    pos_bias = _find(t, r"encoder\.layers\.0\.self_attn\.pos_bias_u$")
    if pos_bias:
        heads, d_k = t[pos_bias[0]].shape
        facts["n_heads"], facts["d_model"] = heads, heads * d_k
    else:
        facts["n_heads"] = facts["d_model"] = None

    # Subsampling: the first conv's output channels and pre_encode.out's input width.
    out = _find(t, r"encoder\.pre_encode\.out\.weight$")
    conv0 = _find(t, r"encoder\.pre_encode\.conv\.0\.weight$")
    facts["subsampling_input_width"] = t[out[0]].shape[1] if out else None
    channels = t[conv0[0]].shape[0] if conv0 else None
    facts["subsampling_conv_channels"] = channels
    n_mels = _n_mels(view)
    facts["subsampling"] = None
    if out and channels:
        bins = facts["subsampling_input_width"] / channels
        facts["subsampling_frequency_bins"] = bins
        causal_bins, symmetric_bins = _frequency_bins(n_mels, causal=True), _frequency_bins(n_mels, causal=False)
        facts["subsampling"] = ("causal" if bins == causal_bins else "non-causal" if bins == symmetric_bins
                                else f"unknown ({bins:g} bins for {n_mels} mels)")

    depthwise = _find(t, r"encoder\.layers\.0\.conv\.depthwise_conv\.(conv\.)?weight$")
    if depthwise:
        shape = t[depthwise[0]].shape  # pytorch [D, 1, K]; mlx [D, K, 1]
        facts["conv_kernel_size"] = shape[2] if view.layout == "pytorch" else shape[1]
    else:
        facts["conv_kernel_size"] = None
    has_running = bool(_find(t, r"encoder\.layers\.0\.conv\.batch_norm\.running_mean$"))
    has_norm = bool(_find(t, r"encoder\.layers\.0\.conv\.batch_norm\.weight$"))
    facts["conv_norm_type"] = "batch_norm" if has_running else ("layer_norm" if has_norm else None)

    embed = _find(t, r"decoder\.prediction\.embed\.weight$")
    facts["vocabulary_size"] = t[embed[0]].shape[0] - 1 if embed else None  # the blank_as_pad row
    joint_out = [n for n in _find(t, r"joint\.joint_net\.\d+\.weight$")]
    facts["joint_output_width"] = t[joint_out[-1]].shape[0] if joint_out else None
    facts["joint_output_index"] = int(joint_out[-1].rsplit(".", 2)[-2]) if joint_out else None
    if facts["vocabulary_size"] is not None and facts["joint_output_width"] is not None:
        extra = facts["joint_output_width"] - (facts["vocabulary_size"] + 1)
        facts["transducer_kind"] = "rnnt" if extra == 0 else ("tdt" if extra > 0 else "inconsistent")
        facts["tdt_durations"] = extra if extra > 0 else 0
    else:
        facts["transducer_kind"] = None
    # A hybrid RNNT-CTC model's CTC head: ConvASRDecoder's Conv1d(d_model, V + 1, 1), pytorch [V+1, D, 1],
    # mlx [V+1, 1, D]; the blank is its last output, as the joint's.
    ctc = _find(t, r"(?:^|\.)ctc_decoder\.decoder_layers\.0\.weight$")
    facts["ctc_head"] = bool(ctc)
    facts["ctc_output_width"] = t[ctc[0]].shape[0] if ctc else None
    facts["ctc_input_width"] = (t[ctc[0]].shape[1] if view.layout == "pytorch" else t[ctc[0]].shape[-1]) if ctc else None
    kind = facts["transducer_kind"]
    facts["decoder_kind"] = kind if not ctc or kind in (None, "inconsistent") else f"{kind}+ctc"

    if view.layout == "pytorch":
        lstm = _find(t, r"decoder\.prediction\.dec_rnn\.lstm\.weight_hh_l\d+$")
        facts["lstm_layers"] = len(lstm) or None
        facts["lstm_hidden"] = t[lstm[0]].shape[1] if lstm else None
    else:
        lstm = _find(t, r"decoder\.prediction\.dec_rnn\.lstm\.\d+\.Wh$")
        facts["lstm_layers"] = len(lstm) or None
        facts["lstm_hidden"] = t[lstm[0]].shape[-1] if lstm else None
    # SpeakerKernelMixin's ModuleDicts: spk_kernels.{layer}.*, bg_spk_kernels.{layer}.*
    kernels = {kind: sorted({int(m.group(1)) for n in t for m in [re.match(rf"{kind}\.(\d+)\.", n)] if m})
               for kind in ("spk_kernels", "bg_spk_kernels")}
    facts["speaker_kernel_layers"] = kernels["spk_kernels"]
    facts["background_speaker_kernel_layers"] = kernels["bg_spk_kernels"]
    facts.update(_prompt_facts(t))
    return facts


def _prompt_facts(t: Mapping[str, TensorInfo]) -> dict[str, Any]:
    """``prompt_kernel.{0,2}.weight`` (``[out, in]`` in PyTorch and MLX alike): the kernel's shapes and P."""
    shapes = {name: list(t[name].shape) for name in sorted(_find(t, r"(?:^|\.)prompt_kernel\.\d+\.(weight|bias)$"))}
    first = next((s for n, s in shapes.items() if n.endswith("0.weight")), None)
    last = next((s for n, s in shapes.items() if n.endswith("2.weight")), None)
    num_prompts = first[1] - last[0] if first and last and len(first) == 2 and len(last) == 2 else None
    return {"prompt_kernel": shapes or None, "num_prompts": num_prompts}


def _n_mels(view: ModelView) -> int:
    stated = stated_config(view.config)
    return int(stated.encoder.get("feat_in") or stated.preprocessor.get("features") or 128)


def _frequency_bins(n_mels: int, *, causal: bool) -> int:
    bins = n_mels
    for _ in range(3):  # three stride-2 convolutions of dw_striding 8x
        bins = bins // 2 + 1 if causal else (bins - 1) // 2 + 1
    return bins


# -- claims and contradictions ----------------------------------------------------------------------

def config_claims(view: ModelView) -> dict[str, Any]:
    """What the config states (``streaming_parity.core.nemo_config.stated_config``): a key it leaves out claims
    nothing (``None``), whatever NeMo's default for it."""
    stated = stated_config(view.config)
    encoder, decoder = stated.encoder, stated.decoder
    vocabulary = view.vocabulary
    return {
        "target": stated.target,
        "num_layers": encoder.get("n_layers"),
        "d_model": encoder.get("d_model"),
        "n_heads": encoder.get("n_heads"),
        "subsampling": None if "causal_downsampling" not in encoder else (
            "causal" if encoder["causal_downsampling"] else "non-causal"),
        "conv_kernel_size": encoder.get("conv_kernel_size"),
        "conv_norm_type": encoder.get("conv_norm_type"),
        "decoder_kind": stated.decoder_kind,
        "transducer_kind": stated.kind,
        **_ctc_claims(stated),
        "vocabulary_size": len(vocabulary) if vocabulary is not None else decoder.get("vocab_size"),
        "lstm_layers": decoder.get("pred_rnn_layers"),
        "lstm_hidden": decoder.get("pred_hidden"),
        **_speaker_claims(stated),
        "joint_output_index": None if "dropout" not in stated.joint else (2 if stated.joint["dropout"] > 0 else 1),
        **_prompt_claims(stated),
    }


def _prompt_claims(stated: StatedConfig) -> dict[str, Any]:
    """A prompt kernel is claimed by ``model_defaults.initialize_prompt_feature`` (NeMo builds none without
    it), with ``num_prompts`` (NeMo's default 128) and the locales of ``prompt_dictionary``."""
    prompt = stated.prompt
    if not prompt.get("initialize"):
        return {"prompted": False if "initialize" in prompt else None, "num_prompts": None, "prompt_locales": None}
    dictionary = dict(prompt.get("dictionary", ()))
    return {"prompted": True, "num_prompts": prompt.get("num_prompts", 128), "prompt_locales": len(dictionary),
            "prompt_max_index": max(dictionary.values(), default=None)}


def _ctc_claims(stated: StatedConfig) -> dict[str, Any]:
    """A CTC head is claimed by an ``aux_ctc`` section (NeMo's hybrid models require one) or a hybrid
    model class; a config that describes no model at all (an export without one) claims nothing."""
    describes_model = bool(stated.target or stated.encoder or stated.decoder or stated.joint)
    hybrid = stated.ctc is not None or "HybridRNNTCTC" in str(stated.target or "")
    ctc = stated.ctc or {}
    return {"ctc_head": hybrid if describes_model or stated.ctc is not None else None,
            "ctc_num_classes": ctc.get("num_classes"), "ctc_feat_in": ctc.get("feat_in")}


def _speaker_claims(stated: StatedConfig) -> dict[str, Any]:
    """SpeakerKernelMixin's reading of the config (kernels only with ``spk_kernel_type``; layers default
    to [0], the background kernel to on), as ``streaming_parity.core.nemo_config`` reads it."""
    layers = list(stated.speaker_kernel_layers)
    return {"speaker_kernel_layers": layers,
            "background_speaker_kernel_layers": layers if stated.background_speaker_kernel else []}


def contradictions(view: ModelView, facts: Mapping[str, Any] | None = None,
                   claims: Mapping[str, Any] | None = None) -> list[str]:
    """Sentences naming each way the config's claims and the weights' facts disagree."""
    facts = facts or weight_facts(view)
    claims = claims or config_claims(view)
    found = []
    if facts.get("transducer_kind") == "tdt" and claims.get("transducer_kind") == "rnnt":
        found.append(
            f"the joint outputs {facts['joint_output_width']} values for a vocabulary of {facts['vocabulary_size']}: "
            f"{facts['tdt_durations']} extra duration outputs make these TDT weights, but the config describes an "
            f"RNNT model ({claims.get('target')})")
    if facts.get("transducer_kind") == "rnnt" and claims.get("transducer_kind") == "tdt":
        found.append("the config describes a TDT model but the joint has no duration outputs (RNNT weights)")
    if facts.get("transducer_kind") == "inconsistent":
        found.append(f"the joint outputs {facts['joint_output_width']} values, fewer than the vocabulary "
                     f"{facts['vocabulary_size']} + blank")
    subsampling = facts.get("subsampling")
    if claims.get("subsampling") and subsampling and subsampling != claims["subsampling"]:
        found.append(
            f"the config says {claims['subsampling']} subsampling (causal_downsampling: "
            f"{claims['subsampling'] == 'causal'}) but pre_encode.out takes {facts['subsampling_input_width']} inputs "
            f"= {facts['subsampling_conv_channels']} channels x {facts['subsampling_frequency_bins']:g} bins, "
            f"which is {subsampling} subsampling")
    for key, label in (("num_layers", "conformer layers"), ("d_model", "d_model"), ("n_heads", "attention heads"),
                       ("conv_kernel_size", "conv kernel size"), ("conv_norm_type", "conv norm"),
                       ("lstm_layers", "LSTM layers"), ("lstm_hidden", "LSTM width")):
        claim, fact = claims.get(key), facts.get(key)
        if claim is not None and fact is not None and claim != fact:
            found.append(f"the config says {label} = {claim} but the weights have {fact}")
    vocab_claim, vocab_fact = claims.get("vocabulary_size"), facts.get("vocabulary_size")
    if vocab_claim is not None and vocab_fact is not None and vocab_claim != vocab_fact:
        found.append(f"the vocabulary has {vocab_claim} entries but the prediction-net embedding has "
                     f"{vocab_fact} + blank rows (joint width - 1 = {facts.get('joint_output_width', 0) - 1})")
    if view.tokenizer_pieces is not None and view.vocabulary is not None and view.kind != "nemo":
        if list(view.tokenizer_pieces) != list(view.vocabulary):
            first = next((i for i, (a, b) in enumerate(zip(view.tokenizer_pieces, view.vocabulary)) if a != b),
                         min(len(view.tokenizer_pieces), len(view.vocabulary)))
            found.append(f"the tokenizer's pieces differ from the embedded vocabulary from index {first} "
                         f"(tokenizer {view.tokenizer_pieces[first:first + 2]} vs vocabulary "
                         f"{view.vocabulary[first:first + 2]})")
    found.extend(_speaker_contradictions(facts, claims))
    found.extend(_ctc_contradictions(facts, claims))
    found.extend(_joint_index_contradictions(facts, claims))
    found.extend(_prompt_contradictions(facts, claims))
    return found


def _joint_index_contradictions(facts: Mapping[str, Any], claims: Mapping[str, Any]) -> list[str]:
    weights, config = facts.get("joint_output_index"), claims.get("joint_output_index")
    if weights is None or config is None or weights == config:
        return []
    return [f"the joint's output layer is stored as joint.joint_net.{weights} but the config's jointnet.dropout "
            f"builds it as joint_net.{config}: a loader matching names non-strictly (mlx-audio's strict=False) "
            f"leaves the joint output layer randomly initialised"]


def _prompt_contradictions(facts: Mapping[str, Any], claims: Mapping[str, Any]) -> list[str]:
    kernel, prompted = facts.get("prompt_kernel"), claims.get("prompted")
    if prompted and not kernel:
        return ["the config describes a prompt-conditioned model (model_defaults.initialize_prompt_feature) but "
                "the weights hold no prompt_kernel: the locale would be ignored"]
    if kernel and (prompted is False or (prompted is None and claims.get("target"))):
        return [f"the weights hold a prompt_kernel ({facts.get('num_prompts')} prompts) but the config builds "
                "none (no model_defaults.initialize_prompt_feature): the prompt would be bypassed"]
    found = []
    weights_p, config_p = facts.get("num_prompts"), claims.get("num_prompts")
    if kernel and config_p is not None and weights_p is not None and weights_p != config_p:
        found.append(f"the config says model_defaults.num_prompts = {config_p} but the prompt_kernel takes "
                     f"{weights_p} one-hot columns")
    top = claims.get("prompt_max_index")
    if kernel and top is not None and weights_p is not None and top >= weights_p:
        found.append(f"the config's prompt_dictionary uses index {top}, outside the prompt_kernel's {weights_p} "
                     "prompts")
    return found


def _ctc_contradictions(facts: Mapping[str, Any], claims: Mapping[str, Any]) -> list[str]:
    """A hybrid's CTC head: claimed by the config and present in the weights alike, over the vocabulary
    the joint decodes (its width = vocabulary + blank), on the encoder's output."""
    found = []
    weights, config = facts.get("ctc_head"), claims.get("ctc_head")
    if config and weights is False:
        found.append("the config describes a hybrid RNNT-CTC model (aux_ctc) but the weights hold no CTC head "
                     "(no ctc_decoder.decoder_layers.0.weight): transducer-only weights under a hybrid config")
    if weights and config is False:
        found.append(f"the weights hold a CTC head (ctc_decoder.decoder_layers.0.weight, {facts['ctc_output_width']} "
                     f"outputs) but the config has no aux_ctc section: hybrid RNNT-CTC weights under a "
                     f"transducer-only config ({claims.get('target')})")
    if not weights:
        return found
    width, vocabulary = facts.get("ctc_output_width"), facts.get("vocabulary_size")
    if vocabulary is not None and width != vocabulary + 1:
        found.append(f"the CTC head outputs {width} values but the prediction-net embedding has {vocabulary} + blank "
                     f"rows (the joint outputs {facts.get('joint_output_width')}): the two decoders do not share "
                     f"one vocabulary")
    claimed = claims.get("ctc_num_classes")
    if claimed is not None and width != claimed + 1:
        found.append(f"the config says aux_ctc.decoder.num_classes = {claimed} but the CTC head outputs {width} "
                     f"values ({width - 1} + blank)")
    inputs, feat_in, d_model = facts.get("ctc_input_width"), claims.get("ctc_feat_in"), facts.get("d_model")
    if feat_in is not None and inputs != feat_in:
        found.append(f"the config says aux_ctc.decoder.feat_in = {feat_in} but the CTC head takes {inputs} inputs")
    if d_model is not None and inputs != d_model:
        found.append(f"the CTC head takes {inputs} inputs but the encoder outputs {d_model} values per frame")
    return found


def _speaker_contradictions(facts: Mapping[str, Any], claims: Mapping[str, Any]) -> list[str]:
    weights, config = facts.get("speaker_kernel_layers"), claims.get("speaker_kernel_layers")
    if weights is None or config is None:
        return []
    if weights and not config:
        return [f"the weights hold speaker kernels at layers {weights} but the config describes a "
                f"single-speaker model (no spk_kernel_type)"]
    if config and not weights:
        return [f"the config describes a multitalker model (speaker kernels at layers {config}) but the "
                f"weights hold no speaker kernels: single-speaker weights under a multitalker config"]
    found = []
    if weights != config:
        found.append(f"the config puts speaker kernels at layers {config} (spk_kernel_layers) but the weights "
                     f"have them at layers {weights}")
    background_weights = facts.get("background_speaker_kernel_layers")
    background_config = claims.get("background_speaker_kernel_layers")
    if background_weights is not None and background_config is not None and background_weights != background_config:
        found.append(f"the config {'adds' if background_config else 'has no'} background-speaker kernels "
                     f"(add_bg_spk_kernel) but the weights have them at layers {background_weights or 'none'}")
    return found


def fingerprint(path: str | Path, readers: Sequence[ArtifactReader] = ()) -> dict[str, Any]:
    view = open_view(path, readers)
    facts, claims = weight_facts(view), config_claims(view)
    return {
        "path": str(view.path),
        "kind": view.kind,
        "layout": view.layout,
        "weights": facts,
        "config": claims,
        "contradictions": contradictions(view, facts, claims),
        "tensors": {name: {"shape": list(info.shape), "dtype": info.dtype, "sha256": info.sha256}
                    for name, info in sorted(view.tensors.items(), key=lambda kv: _natural(kv[0]))},
    }


def layer_of(name: str) -> str | None:
    """The shared tap a tensor belongs to: ``encoder.layers.3.x`` -> ``layers.3``."""
    if match := LAYER_RE.search(name):
        if name.startswith("encoder."):
            return f"layers.{match.group(1)}"
    if name.startswith("encoder.pre_encode."):
        return "pre_encode"
    if name.startswith("decoder."):
        return "decoder"
    if name.startswith("joint."):
        return "joint"
    if name.startswith("ctc_decoder."):
        return "ctc"
    if name.startswith("prompt_kernel."):
        return "prompt"
    if name.startswith("preprocessor."):
        return "mel"
    return None


def tensors_of_tap(names: Iterable[str], tap: str) -> list[str]:
    """Tensors whose computation produces ``tap`` (the candidates blamed for a divergence there)."""
    return sorted((n for n in names if layer_of(n) == tap), key=_natural)

"""``parity export-transformers MODEL --out DIR``: a ``.nemo`` written as a transformers 5 checkpoint that
``from_pretrained`` loads: ``NemotronAsrStreamingForRNNT`` for the English streaming family,
``Nemotron3_5AsrForRNNT`` for the prompt-conditioned one.

transformers' own conversion script is not in its wheel, so this writer builds the checkpoint from
transformers' configuration, model, feature-extractor, tokenizer and processor classes and the NeMo config
(``streaming_parity.core.nemo_config``):

- every config field is written from the model, none left to a default (``num_mel_bins`` would be 80 and
  ``scale_input`` true);
- every lookahead of ``att_context_size`` goes to the processor's ``supported_num_lookahead_tokens`` (the
  first is its default, as NeMo's), the shared left context to ``sliding_window``;
- the weights are loaded into the model with ``strict=True`` before ``save_pretrained``, so that no
  parameter is left at its initial value; the joint's output layer is read from the weights
  (``joint_net.1`` or ``joint_net.2``), not assumed;
- a setting transformers cannot express (``naming.inexpressible``) is refused, naming the field, the value
  and what transformers builds instead.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming_parity.backends.transformers import naming
from streaming_parity.core.errors import Unsupported
from streaming_parity.core.nemo_config import ModelConfig, read_model_config

MANIFEST = "export.json"
BLANK_TOKEN = "<blank>"


class ExportRefused(Unsupported):
    """The model has settings transformers' classes cannot express; the message lists each."""


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    family: str
    notes: tuple[str, ...]


def _dropout(section: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = section.get(key, default)
    return float(default if value is None else value)


def encoder_config_values(config: ModelConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """``NemotronAsrStreamingEncoderConfig`` keyword arguments from the NeMo encoder section, every field stated."""
    encoder = config.encoder
    contexts = encoder.att_context_size
    raw_encoder = raw.get("encoder", {})
    return {
        "hidden_size": encoder.d_model,
        "num_hidden_layers": encoder.n_layers,
        "num_attention_heads": encoder.n_heads,
        "intermediate_size": encoder.d_model * encoder.ff_expansion_factor,
        "hidden_act": "silu",  # NeMo's ConformerFeedForward and conv module use Swish
        "attention_bias": encoder.use_bias,
        "convolution_bias": encoder.use_bias,
        "conv_kernel_size": encoder.conv_kernel_size,
        "subsampling_factor": encoder.subsampling_factor,
        "subsampling_conv_channels": (encoder.subsampling_conv_channels if encoder.subsampling_conv_channels > 0
                                      else encoder.d_model),
        "num_mel_bins": encoder.feat_in,
        "subsampling_conv_kernel_size": 3,  # ConvSubsampling dw_striding: kernel 3, stride 2 per stage
        "subsampling_conv_stride": 2,
        "dropout": _dropout(raw_encoder, "dropout", 0.1),
        "dropout_positions": _dropout(raw_encoder, "dropout_emb"),
        "attention_dropout": _dropout(raw_encoder, "dropout_att", 0.1),
        "activation_dropout": _dropout(raw_encoder, "dropout", 0.1),
        "layerdrop": _dropout(raw_encoder, "stochastic_depth_drop_prob"),
        "max_position_embeddings": encoder.pos_emb_max_len,
        "scale_input": encoder.xscaling,
        "sliding_window": contexts[0][0] + 1,
        "default_num_lookahead_tokens": contexts[0][1],
    }


def model_config_values(config: ModelConfig, vocabulary: Sequence[str], checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``NemotronAsrStreamingConfig`` / ``Nemotron3_5AsrConfig`` keyword arguments (the encoder's apart)."""
    blank = len(vocabulary)
    values = {
        "vocab_size": blank + 1,
        "decoder_hidden_size": config.decoder.pred_hidden,
        "num_decoder_layers": config.decoder.pred_rnn_layers,
        "hidden_act": config.joint.activation,
        "max_symbols_per_step": config.decoding.max_symbols,
        "pad_token_id": blank,
        "blank_token_id": blank,
    }
    if config.prompt is not None:
        dictionary = dict(config.prompt.dictionary)
        values.update({
            "num_prompts": config.prompt.num_prompts,
            "prompt_intermediate_size": int(checkpoint["prompt_kernel.0.weight"].shape[0]),
        })
        if "auto" in dictionary:  # NeMo's default target language; otherwise transformers' default slot stays
            values["default_prompt_id"] = int(dictionary["auto"])
    return values


def family_of(config: ModelConfig) -> str:
    return naming.FAMILY_PROMPT if config.prompt is not None else naming.FAMILY_STREAMING


def build_model(config: ModelConfig, raw: dict[str, Any], vocabulary: Sequence[str], checkpoint: dict[str, Any]):
    """The transformers model with the checkpoint's weights, loaded strictly (refusals first)."""
    import torch
    from transformers import (
        Nemotron3_5AsrConfig,
        Nemotron3_5AsrForRNNT,
        NemotronAsrStreamingConfig,
        NemotronAsrStreamingEncoderConfig,
        NemotronAsrStreamingForRNNT,
    )

    refusals = naming.inexpressible(config, checkpoint)
    if refusals:
        raise ExportRefused("transformers cannot express this model: " + "; ".join(r.text() for r in refusals))
    encoder_config = NemotronAsrStreamingEncoderConfig(**encoder_config_values(config, raw))
    values = model_config_values(config, vocabulary, checkpoint)
    if family_of(config) == naming.FAMILY_PROMPT:
        model = Nemotron3_5AsrForRNNT(Nemotron3_5AsrConfig(encoder_config=encoder_config.to_dict(), **values))
    else:
        model = NemotronAsrStreamingForRNNT(NemotronAsrStreamingConfig(encoder_config=encoder_config.to_dict(), **values))
    state = {}
    expected = model.state_dict()
    for target, source in naming.nemo_names(checkpoint).items():
        tensor = checkpoint[source].detach().to(torch.float32)
        if target not in expected:
            raise KeyError(f"{source} -> {target}: transformers' model has no such parameter")
        if tuple(expected[target].shape) != tuple(tensor.shape):
            raise ValueError(f"{source} -> {target}: shape {tuple(tensor.shape)}, transformers expects "
                             f"{tuple(expected[target].shape)}")
        state[target] = tensor.contiguous()
    # Buffers transformers computes itself (the positional encoding's inv_freq) are not in the checkpoint.
    computed = {name for name, _ in model.named_buffers()}
    missing = sorted(set(expected) - set(state) - computed)
    if missing:
        raise KeyError(f"no NeMo tensor for transformers parameter(s) {', '.join(missing)}")
    model.load_state_dict(state, strict=False)
    model.generation_config.decoder_start_token_id = values["blank_token_id"]
    return model.eval()


def build_processor(config: ModelConfig, tokenizer_model: Path, vocabulary: Sequence[str]):
    """transformers' feature extractor (the NeMo front end's settings), a fast tokenizer converted from the
    ``.nemo``'s SentencePiece model with ``<blank>`` appended, and the family's processor."""
    from tokenizers import AddedToken
    from transformers import NemotronAsrStreamingFeatureExtractor, NemotronAsrStreamingProcessor, ParakeetTokenizer
    from transformers.convert_slow_tokenizer import ParakeetConverter

    pre = config.preprocessor
    feature_extractor = NemotronAsrStreamingFeatureExtractor(
        feature_size=pre.features, sampling_rate=pre.sample_rate, hop_length=pre.hop_length, n_fft=pre.n_fft,
        win_length=pre.win_length, preemphasis=pre.preemph if pre.preemph is not None else 0.0,
        padding_value=pre.pad_value)
    tokenizer = ParakeetTokenizer(tokenizer_object=ParakeetConverter(str(tokenizer_model)).converted(),
                                  clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(BLANK_TOKEN, normalized=False, special=True)])
    tokenizer.add_special_tokens({"pad_token": BLANK_TOKEN})
    blank = tokenizer.convert_tokens_to_ids(BLANK_TOKEN)
    if blank != len(vocabulary):
        raise ValueError(f"tokenizer: {BLANK_TOKEN} got id {blank}, the model's blank is {len(vocabulary)}")
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
    differing = [i for i, (ours, theirs) in enumerate(zip(vocabulary, pieces)) if ours != theirs]
    if differing:
        i = differing[0]
        raise ValueError(f"tokenizer: piece {i} is {pieces[i]!r}, the .nemo's vocabulary has {vocabulary[i]!r} "
                         f"({len(differing)} pieces differ)")
    lookaheads = [right for _, right in config.encoder.att_context_size]
    common = {"supported_num_lookahead_tokens": lookaheads, "default_num_lookahead_tokens": lookaheads[0],
              "blank_token": BLANK_TOKEN}
    if family_of(config) == naming.FAMILY_PROMPT:
        from transformers import Nemotron3_5AsrProcessor

        return Nemotron3_5AsrProcessor(feature_extractor, tokenizer, prompt_dictionary=dict(config.prompt.dictionary),
                                       num_prompts=config.prompt.num_prompts, **common)
    return NemotronAsrStreamingProcessor(feature_extractor, tokenizer, **common)


def export_transformers(nemo_path: str | Path, out_dir: str | Path, *,
                        progress: Callable[[str], None] | None = None, source_hub=None) -> ExportResult:
    """Write ``out_dir`` (replaced atomically) from ``nemo_path``; ``ExportRefused`` for an inexpressible model."""
    from streaming_parity.backends.transformers.directory import nemo_vocabulary
    from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict
    from streaming_parity.core.system.provenance import Provenance

    say = progress or (lambda _m: None)
    nemo_path, out_dir = Path(nemo_path), Path(out_dir)
    archive = inspect_nemo(nemo_path)
    config = read_model_config(archive.config)
    say("reading the checkpoint")
    checkpoint = load_state_dict(archive)
    refusals = naming.inexpressible(config, checkpoint)
    if refusals:
        raise ExportRefused(f"{nemo_path}: transformers cannot express this model: "
                            + "; ".join(r.text() for r in refusals))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer_model = staging / "nemo-tokenizer.model"
        tokenizer_model.write_bytes(archive.tokenizer_model_bytes())
        vocabulary = nemo_vocabulary(archive, config)
        say("building the transformers model")
        model = build_model(config, archive.config, vocabulary, checkpoint)
        processor = build_processor(config, tokenizer_model, vocabulary)
        target = staging / "out"
        say("writing")
        model.save_pretrained(target)
        processor.save_pretrained(target)
        notes = []
        index = naming.joint_output_index(checkpoint)
        notes.append(f"joint output layer: joint.joint_net.{index} -> joint.head")
        if config.prompt is not None and "auto" not in dict(config.prompt.dictionary):
            notes.append(f"no 'auto' in the prompt dictionary: a stream without a language runs prompt column "
                         f"{model.config.default_prompt_id} (transformers' default), where NeMo bypasses the prompt")
        manifest = {"format": "transformers", "family": family_of(config), "notes": notes,
                    "provenance": Provenance.collect(nemo_path, hub=source_hub).to_dict()}
        (target / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        target.replace(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(directory=out_dir, family=family_of(config), notes=tuple(notes))

"""``parity export-onnx``: a cache-aware streaming ``.nemo`` to ONNX graphs a runtime can use alone.

What NeMo's own export does (core/classes/exportable.py, ConformerEncoder.forward_for_export,
RNNTDecoderJoint in modules/rnnt.py) and how it is used here:

- ``model.set_export_config({"cache_support": True})`` gives the encoder cache inputs and outputs.
  ``forward_for_export`` always calls ``streaming_post_process(keep_all_outputs=False)`` (output
  cut to ``valid_out_len``) and drops ``drop_extra_pre_encoded`` frames, i.e. the graph bakes the
  pad-and-drop first-chunk mode and one lookahead: one graph per lookahead, each exported after
  ``encoder.set_default_att_context_size``.
- Batch-first caches (``[B, L, ...]``) are what ``forward_for_export`` produces; that layout is
  exported by ``Exportable.export`` itself (legacy TorchScript exporter, ``dynamo=False``, opset
  17). Layers-first caches (``[L, B, ...]``, NeMo's internal layout) go through a thin wrapper that
  transposes around ``forward_for_export`` and is exported with the same exporter settings.
- ``decoder_joint`` is NeMo's ``RNNTDecoderJoint`` export (its export sets ``log_softmax=False``:
  the graph returns raw logits).
- A hybrid RNNT-CTC model's CTC head (``ctc_decoder``, NeMo's ``ConvASRDecoder``) is a graph of its
  own, ``ctc.onnx``: ``encoder_output [B, D, T]`` -> ``logprobs [B, T, V+1]`` (log_softmax included,
  as NeMo's forward), fed the encoder graph's output. The encoder graphs stay exactly NeMo's
  cache-aware export (what peer runtimes load), and one CTC graph serves every lookahead.
- A prompt-conditioned model's ``prompt_kernel`` (``EncDecRNNTBPEModelWithPrompt``, NeMo's
  ``PromptStreamingMixin._apply_prompt_to_encoded``) is ``prompt.onnx`` the same way:
  ``encoder_output [B, D, T]`` and ``prompt_index [B]`` -> ``prompted_encoder_output [B, D, T]``, the one-hot
  column built inside the graph; the runtime feeds it between the encoder and ``decoder_joint`` (and a
  hybrid's CTC head). It is built node by node from the kernel's weights, which keep NeMo's names and
  layout (``graph_tools.prompt_kernel_graph``); its int8 variant quantizes both ``MatMul`` weights. The
  model's ``num_prompts`` and ``prompt_dictionary`` are written into every graph's metadata.
- Debug variants add the shared taps as graph outputs, found by module scope
  (``streaming_parity.backends.onnx.graph_tools``); int8 variants come from ``onnxruntime.quantization``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streaming_parity.backends.onnx import graph_tools, quantization
from streaming_parity.backends.onnx.layout import (
    CACHE_LAYOUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    FORMAT,
    INTERFACES,
    MULTITALKER_CONFIG_FILE,
    SHARED_ENCODER_WEIGHTS,
    SHARED_ENCODER_WEIGHTS_INT8,
    STREAMING_ENCODER_KEYS,
    CacheShapes,
    GraphInterface,
    ctc_file,
    decoder_joint_file,
    encode_metadata,
    encoder_file,
    prompt_file,
)
from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.nemo_config import EncoderConfig, ModelConfig, read_model_config
from streaming_parity.core.nemo_file import NemoArchive, inspect_nemo, sha256_file
from streaming_parity.core.nemo_restore import restore_for_inference, tokenizer_vocabulary
from streaming_parity.core.system.memory import peak_rss_mb, trim
from streaming_parity.core.system.nemo_quiet import quiet_nemo
from streaming_parity.core.system.provenance import HubOrigin, Provenance
from streaming_parity.interface.chunking import StreamingConfig

OPSET = 17
EXPORT_FILE = "export.json"  # what was exported, from which checkpoint, with what (its provenance)


@dataclass
class ExportResult:
    out_dir: Path
    graphs: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


@contextlib.contextmanager
def quiet_export():
    """The TorchScript exporter warns about every traced branch; keep the CLI readable."""
    with quiet_nemo(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _model_metadata(model, config: ModelConfig, nemo_path: Path, sha256: str, layout: str,
                    vocabulary: Sequence[str]) -> dict[str, Any]:
    encoder = config.encoder
    max_symbols = getattr(model.decoding.decoding, "max_symbols", None)
    return {
        "format": FORMAT,
        "source_sha256": sha256,
        "source_name": nemo_path.name,
        "cache_layout": layout,
        "num_layers": len(model.encoder.layers),
        "d_model": int(model.encoder.d_model),
        "n_mels": encoder.feat_in,
        "conv_kernel_size": encoder.conv_kernel_size,
        "subsampling_factor": encoder.subsampling_factor,
        "att_context_sizes": [list(c) for c in encoder.att_context_size],
        "vocab_size": len(vocabulary),
        "blank_id": int(model.decoding.decoding._blank_index),
        "pred_rnn_layers": config.decoder.pred_rnn_layers,
        "pred_hidden": config.decoder.pred_hidden,
        "max_symbols": None if max_symbols is None else int(max_symbols),
        "encoder_config": encoder.as_config(STREAMING_ENCODER_KEYS),
    }


def _encoder_metadata(model, encoder_config: EncoderConfig, context: tuple[int, int], layout: str) -> dict[str, Any]:
    """NeMo's own ``streaming_cfg`` for this lookahead (set by ``set_default_att_context_size``)."""
    cfg = model.encoder.streaming_cfg
    pair = lambda v: list(v) if isinstance(v, (list, tuple)) else [int(v), int(v)]  # noqa: E731
    sampling = model.encoder.pre_encode.get_sampling_frames()
    shapes = CacheShapes.for_model(layout, len(model.encoder.layers), int(cfg.last_channel_cache_size),
                                   int(model.encoder.d_model), encoder_config.conv_kernel_size)
    return {
        "att_context_size": list(context),
        "lookahead": context[1],
        "chunk_size": pair(cfg.chunk_size),
        "shift_size": pair(cfg.shift_size),
        "pre_encode_cache_size": pair(cfg.pre_encode_cache_size),
        "drop_extra_pre_encoded": int(cfg.drop_extra_pre_encoded),
        "valid_out_len": int(cfg.valid_out_len),
        "last_channel_cache_size": int(cfg.last_channel_cache_size),
        "cache_drop_size": int(cfg.cache_drop_size),
        "sampling_frames": pair(sampling),
        "cache_last_channel_shape": list(shapes.channel),
        "cache_last_time_shape": list(shapes.time),
    }


def _layers_first_wrapper(encoder):
    """``forward_for_export`` with NeMo's internal ``[L, B, ...]`` cache layout at the graph's edge."""
    import torch

    class LayersFirstStreamingEncoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.encoder = inner

        def forward(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
            outputs, lengths, channel, time_cache, channel_len = self.encoder.forward_for_export(
                audio_signal, length, cache_last_channel.transpose(0, 1), cache_last_time.transpose(0, 1),
                cache_last_channel_len)
            return outputs, lengths, channel.transpose(0, 1), time_cache.transpose(0, 1), channel_len

    return LayersFirstStreamingEncoder(encoder)


def _multitalker_wrapper(model):
    """The encoder with the speaker masks as real inputs (the multitalker export's interface).

    NeMo feeds the masks through ``set_speaker_targets`` and forward hooks (SpeakerKernelMixin), which
    the standard export cannot see; here the traced forward sets them from its own inputs, so the
    hooks' ``x * mask`` products are traced on graph inputs and nothing is constant-folded. The
    kernels are registered on the wrapper so their initializers keep NeMo's names.
    """
    import torch

    class MultitalkerStreamingEncoder(torch.nn.Module):
        def __init__(self, asr_model):
            super().__init__()
            self.encoder = asr_model.encoder
            self.spk_kernels = asr_model.spk_kernels
            if getattr(asr_model, "add_bg_spk_kernel", False):
                self.bg_spk_kernels = asr_model.bg_spk_kernels
            object.__setattr__(self, "_asr_model", asr_model)  # not a submodule: only its hooks are used

        def forward(self, processed_signal, processed_signal_length, cache_last_channel, cache_last_time,
                    cache_last_channel_len, spk_targets, bg_spk_targets):
            self._asr_model.set_speaker_targets(spk_targets, bg_spk_targets)
            try:
                return self.encoder.forward_for_export(processed_signal, processed_signal_length, cache_last_channel,
                                                       cache_last_time, cache_last_channel_len)
            finally:
                self._asr_model.clear_speaker_targets()

    return MultitalkerStreamingEncoder(model)


def _frame_first_decoder_joint(decoder_joint):
    """``RNNTDecoderJoint`` fed one encoder frame as ``[B, T, D]`` and no ``target_length`` (every target
    is valid), the multitalker export's decoder interface."""
    import torch

    class FrameFirstDecoderJoint(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.decoder = inner.decoder
            self.joint = inner.joint
            object.__setattr__(self, "_inner", inner)

        def forward(self, encoder_outputs, targets, input_states_1, input_states_2):
            target_length = torch.ones_like(targets).sum(dim=1)
            return self._inner(encoder_outputs.transpose(1, 2), targets, target_length, input_states_1, input_states_2)

    return FrameFirstDecoderJoint(decoder_joint)


def _trace_export(wrapper, exportable_root, example, path: Path, input_names, output_names, dynamic) -> None:
    """Export a thin wrapper around NeMo modules with the settings ``Exportable.export`` uses."""
    import torch
    from nemo.core.classes.common import typecheck
    from nemo.core.classes.exportable import Exportable

    for module in exportable_root.modules():  # what Exportable._export prepares on every enclosed Exportable
        if isinstance(module, Exportable) and module is not exportable_root:
            module._prepare_for_export(noreplace=True)
    exportable_root._prepare_for_export()
    typecheck.set_typecheck_enabled(enabled=False)
    try:
        with torch.inference_mode():
            torch.onnx.export(wrapper.eval(), tuple(example), str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
    finally:
        typecheck.set_typecheck_enabled(enabled=True)
        exportable_root._export_teardown()


def _encoder_example(model, first: bool = False):
    """NeMo's own example (a later chunk: ``chunk_size[1]`` frames after the pre-encode cache's), or for the
    first-chunk graph the plain first chunk alone (``chunk_size[0]`` frames, no cache prefix)."""
    import torch

    torch.manual_seed(0)
    example = list(model.encoder.input_example(max_batch=1))  # batch-first caches, from NeMo
    if first:
        chunk = model.encoder.streaming_cfg.chunk_size
        example[0] = example[0][..., : int(chunk[0] if isinstance(chunk, (list, tuple)) else chunk)].contiguous()
    example[1] = torch.full_like(example[1], example[0].shape[-1])  # a full chunk
    return example


@contextlib.contextmanager
def _keeping_pre_encoded(encoder):
    """The encoder traced as ``cache_aware_stream_step(drop_extra_pre_encoded=0)`` runs it for NeMo's plain first
    chunk: ``forward_internal`` drops ``streaming_cfg.drop_extra_pre_encoded`` frames after pre-encoding, a
    Python int read at trace time, which NeMo's own stream step sets and restores the same way."""
    kept = encoder.streaming_cfg.drop_extra_pre_encoded
    encoder.streaming_cfg.drop_extra_pre_encoded = 0
    try:
        yield
    finally:
        encoder.streaming_cfg.drop_extra_pre_encoded = kept


def _export_encoder(model, encoder_config: EncoderConfig, path: Path, layout: str, interface: GraphInterface, *,
                    first: bool = False) -> None:
    """One lookahead's encoder graph (the default set by ``set_default_att_context_size``); ``first``: the
    plain first chunk's graph, which keeps every pre-encoded frame."""
    if first:
        with _keeping_pre_encoded(model.encoder):
            _export_encoder_graph(model, encoder_config, path, layout, interface, first=True)
    else:
        _export_encoder_graph(model, encoder_config, path, layout, interface, first=False)


def _export_encoder_graph(model, encoder_config: EncoderConfig, path: Path, layout: str, interface: GraphInterface,
                          *, first: bool) -> None:
    encoder = model.encoder
    example = _encoder_example(model, first)
    if interface.speaker_masks:
        import torch

        # Masks as long as the layer input, so solve_length_mismatch traces no pad or slice: the
        # runtime reconciles lengths before feeding (streaming_parity.interface.speakers.reconcile).
        frames = StreamingConfig.from_encoder_config(encoder_config, model.encoder.att_context_size
                                                     ).layer_input_frames(example[0].shape[-1],
                                                                          0 if first else None)
        generator = torch.Generator().manual_seed(0)
        masks = [(torch.rand(1, frames, generator=generator) > 0.5).float() for _ in range(2)]
        names_in, names_out = interface.encoder_inputs, interface.encoder_outputs
        dynamic = {names_in[0]: {0: "B", 2: "T"}, names_in[1]: {0: "B"}, names_in[2]: {0: "B"},
                   names_in[3]: {0: "B"}, names_in[4]: {0: "B"}, names_in[5]: {0: "B", 1: "T_enc"},
                   names_in[6]: {0: "B", 1: "T_enc"}, names_out[0]: {0: "B", 2: "T_out"}, names_out[1]: {0: "B"},
                   names_out[2]: {0: "B"}, names_out[3]: {0: "B"}, names_out[4]: {0: "B"}}
        _trace_export(_multitalker_wrapper(model), encoder, [*example, *masks], path, names_in, names_out, dynamic)
        return
    if layout == "batch-first":
        encoder.export(str(path), input_example=tuple(example), check_trace=False, onnx_opset_version=OPSET)
        return
    example[2], example[3] = example[2].transpose(0, 1), example[3].transpose(0, 1)
    dynamic = {
        "audio_signal": {0: "B", 2: "T"}, "length": {0: "B"},
        "cache_last_channel": {1: "B"}, "cache_last_time": {1: "B"}, "cache_last_channel_len": {0: "B"},
        "outputs": {0: "B", 2: "T_out"}, "encoded_lengths": {0: "B"},
        "cache_last_channel_next": {1: "B"}, "cache_last_time_next": {1: "B"},
        "cache_last_channel_next_len": {0: "B"},
    }
    _trace_export(_layers_first_wrapper(encoder), encoder, example, path, ENCODER_INPUTS, ENCODER_OUTPUTS, dynamic)


def _export_decoder_joint(model, path: Path, interface: GraphInterface) -> None:
    import torch

    torch.manual_seed(0)
    if interface.target_length:
        model.decoder_joint.export(str(path), check_trace=False, onnx_opset_version=OPSET)
        return
    decoder_joint = model.decoder_joint
    frame, targets, _target_length, states_1, states_2 = decoder_joint.input_example()
    names_in, names_out = interface.decoder_joint_inputs, interface.decoder_joint_outputs
    dynamic = {names_in[0]: {0: "B", 1: "T"}, names_in[1]: {0: "B", 1: "U"}, names_in[2]: {1: "B"},
               names_in[3]: {1: "B"}, names_out[0]: {0: "B", 1: "T", 2: "U"}, names_out[1]: {0: "B"},
               names_out[2]: {1: "B"}, names_out[3]: {1: "B"}}
    _trace_export(_frame_first_decoder_joint(decoder_joint), decoder_joint,
                  (frame.transpose(1, 2).contiguous(), targets, states_1, states_2), path, names_in, names_out, dynamic)


def _export_ctc(model, path: Path, interface: GraphInterface) -> None:
    """The CTC head alone, traced through a wrapper that keeps NeMo's parameter names
    (``ctc_decoder.decoder_layers.0.weight``) for the initializers, with NeMo's input and output names."""
    import torch

    class CTCHead(torch.nn.Module):
        def __init__(self, ctc_decoder):
            super().__init__()
            self.ctc_decoder = ctc_decoder

        def forward(self, encoder_output):
            return self.ctc_decoder(encoder_output=encoder_output)

    torch.manual_seed(0)
    (example,) = model.ctc_decoder.input_example(max_batch=1, max_dim=16)
    names_in, names_out = interface.ctc_inputs, interface.ctc_outputs
    dynamic = {names_in[0]: {0: "B", 2: "T"}, names_out[0]: {0: "B", 1: "T"}}
    _trace_export(CTCHead(model.ctc_decoder), model.ctc_decoder, (example,), path, names_in, names_out, dynamic)


def _prompt_kernel_arrays(model, config: ModelConfig):
    """The model's ``prompt_kernel`` = Linear(D + P, 2D), ReLU, Linear(2D, D) as float32 numpy arrays in
    NeMo's ``[out, in]`` layout, checked against the config's ``num_prompts``."""
    import torch

    kernel = getattr(model, "prompt_kernel", None)
    if config.prompt is None:
        if isinstance(kernel, torch.nn.Module):
            raise InvalidInput("the model has a prompt_kernel but its config does not set "
                               "model_defaults.initialize_prompt_feature: its prompt cannot be exported")
        return None
    layers = list(kernel) if isinstance(kernel, torch.nn.Sequential) else []
    if [type(layer) for layer in layers] != [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]:
        raise InvalidInput(f"prompt_kernel is {type(kernel).__name__ if kernel is not None else 'missing'}; "
                           "expected NeMo's Sequential(Linear, ReLU, Linear) (PromptStreamingMixin)")
    array = lambda t: t.detach().float().cpu().numpy().copy()  # noqa: E731
    arrays = (array(layers[0].weight), array(layers[0].bias), array(layers[2].weight), array(layers[2].bias))
    width = arrays[0].shape[1] - arrays[2].shape[0]
    if width != config.prompt.num_prompts or getattr(model, "num_prompts", width) != width:
        raise InvalidInput(f"prompt_kernel.0.weight {list(arrays[0].shape)} takes {width} prompt columns, the "
                           f"config's model_defaults.num_prompts is {config.prompt.num_prompts}")
    return arrays


def _export_prompt(arrays, path: Path, interface: GraphInterface) -> None:
    model = graph_tools.prompt_kernel_graph(*arrays, opset=OPSET, inputs=tuple(interface.prompt_inputs),
                                            output=interface.prompt_outputs[0])
    graph_tools.save_graph(model, path)


def _write_prompt_int8(path: Path, int8_path: Path, metadata: dict[str, Any],
                       scheme: quantization.QuantScheme = quantization.EXPORT_SCHEME) -> None:
    """Dynamic int8 of ``prompt.onnx`` like the other graphs (its ``MatMul`` weights), from a copy whose
    weight transposes are folded (the quantizer reads only a ``MatMul`` fed an initializer directly)."""
    import onnx

    folded = path.with_name(path.stem + ".folded.onnx")
    try:
        onnx.save(graph_tools.fold_weight_transposes(onnx.load(str(path))), str(folded))
        _write_int8(folded, int8_path, metadata, ("MatMul",), scheme=scheme)
    finally:
        folded.unlink(missing_ok=True)


def _finish_graph(path: Path, metadata: dict[str, Any], expected_inputs: Sequence[str],
                  expected_outputs: Sequence[str], weights: graph_tools.SharedWeights | None = None) -> None:
    """Check the interface, write metadata, and gather the weights: into ``weights`` (shared by the
    graphs of every lookahead), else into one external file of its own when the graph needs one."""
    import onnx

    if weights is not None:
        weights.absorb(path)
    else:
        graph_tools.consolidate_external_data(path)
    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = graph_tools.graph_io_names(model)
    if list(inputs) != list(expected_inputs) or list(outputs)[:len(expected_outputs)] != list(expected_outputs):
        raise RuntimeError(f"{path.name}: exported interface {inputs} -> {outputs}, "
                           f"expected {list(expected_inputs)} -> {list(expected_outputs)}")
    graph_tools.set_metadata(model, encode_metadata(metadata))
    graph_tools.save_graph(model, path)


def _write_debug(path: Path, debug_path: Path, taps: Callable, metadata: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # shares the fp32 graph's .data file, if any
    found = taps(model.graph)
    graph_tools.add_tap_outputs(model, found)
    graph_tools.set_metadata(model, encode_metadata({**metadata, "debug_taps": list(found)}))
    graph_tools.save_graph(model, debug_path)


def _write_int8(path: Path, int8_path: Path, metadata: dict[str, Any], op_types: Sequence[str],
               weights: graph_tools.SharedWeights | None = None,
               scheme: quantization.QuantScheme = quantization.EXPORT_SCHEME) -> None:
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    large = any(t.data_location == onnx.TensorProto.EXTERNAL
                for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    # MatMul/Gemm (and the prediction LSTM) carry nearly all weights; convolutions stay fp32 (the
    # depthwise and subsampling convolutions are a small share of the weights and of the time).
    # The weights are s8 within 7 bits (``quantization.EXPORT_SCHEME``, reduce_range): a pair of u8 x s8
    # products stays within int16 (2 x 255 x 64 < 32,767), so the arithmetic is exact on every int8
    # kernel path, the saturating x86 ones without VNNI included (streaming_parity.core.system.cpu), and VNNI/AMX
    # keep their u8 x s8 kernels. u8 weights would not cover the LSTM: ONNX Runtime's LSTM quantizer
    # writes s8 weights whatever weight_type says.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger about optional pre-processing
    try:
        quantize_dynamic(str(path), str(int8_path), **scheme.options(),
                         op_types_to_quantize=list(op_types), use_external_data_format=large)
    finally:
        root.setLevel(level)
    if weights is not None:
        weights.absorb(int8_path)
    else:
        graph_tools.consolidate_external_data(int8_path)
    model = onnx.load(str(int8_path), load_external_data=False)
    graph_tools.set_metadata(model, encode_metadata({**metadata, "variant": "int8",
                                                      "int8_quantization": scheme.recorded().to_dict()}))
    graph_tools.save_graph(model, int8_path)


# Both of NeMo's first-chunk modes: plain (its default; the first-chunk graphs) and pad-and-drop (the steady
# graphs alone, as every peer export).
FIRST_CHUNK_MODES = ("plain", "pad-and-drop")


def write_int8_variant(export_dir: str | Path, out_dir: str | Path, scheme: quantization.QuantScheme) -> Path:
    """A copy of an export in ``out_dir`` whose int8 graphs are quantized under ``scheme`` from its float32
    graphs, as the export would have written them (the encoders' int8 weights shared again): what
    ``bench/int8_quantization.py`` measures, and how the tests make an export of another scheme (an older
    full-range QInt8 one) without NeMo."""
    from streaming_parity.backends.onnx.layout import read_graph_metadata

    source, target = Path(export_dir), Path(out_dir)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.int8.onnx", SHARED_ENCODER_WEIGHTS_INT8))
    shared = graph_tools.SharedWeights(target / SHARED_ENCODER_WEIGHTS_INT8)
    for fp32 in sorted(target.glob("encoder-*.onnx")):
        if ".debug." not in fp32.name:
            _write_int8(fp32, target / fp32.name.replace(".onnx", ".int8.onnx"), read_graph_metadata(fp32),
                        ("MatMul", "Gemm"), shared, scheme=scheme)
    fp32 = target / decoder_joint_file()
    _write_int8(fp32, target / decoder_joint_file("int8"), read_graph_metadata(fp32), ("MatMul", "Gemm", "LSTM"),
                scheme=scheme)
    if (target / prompt_file()).is_file():
        _write_prompt_int8(target / prompt_file(), target / prompt_file("int8"),
                           read_graph_metadata(target / prompt_file()), scheme=scheme)
    return target


def export_onnx(nemo_path: str | Path, out_dir: str | Path, *,
                att_context_sizes: Sequence[Sequence[int]] | None = None, cache_layout: str = "batch-first",
                int8: bool = False, debug_taps: bool = False,
                progress: Callable[[str], None] | None = None, source_hub: HubOrigin | None = None) -> ExportResult:
    """Export every requested lookahead's encoder, ``decoder_joint`` and the runtime's side files.

    ``progress`` is called once per graph (and once at the end); one that has a ``total`` method
    (``streaming_parity.core.system.progress.ProgressBar``) is told that number first. ``source_hub``: the hub
    repository and commit the checkpoint came from, for ``export.json``'s provenance.

    The ``.nemo`` is restored once (``_start``); each graph is a step over that model (``_add_encoder``,
    ``_add_first_chunk_encoder``, ``_add_decoder_joint``, ``_add_prompt``, ``_add_ctc``), the tap and int8
    graphs made from the written graphs once the model is released (``_write_derived``), and ``export.json``
    last (``_write_export_record``)."""
    import torch

    if cache_layout not in CACHE_LAYOUTS:
        raise InvalidInput(f"--cache-layout must be one of {', '.join(CACHE_LAYOUTS)}, not {cache_layout!r}")
    started = time.perf_counter()
    run = _start(Path(nemo_path), Path(out_dir), att_context_sizes, cache_layout, int8=int8, debug_taps=debug_taps,
                 progress=progress)
    prompt_arrays = _prompt_kernel_arrays(run.model, run.config)
    with quiet_export(), torch.inference_mode():
        run.model.set_export_config({"cache_support": True})
        for context in run.contexts:
            run.model.encoder.set_default_att_context_size(list(context))
            metadata = _add_encoder(run, context)
            _add_first_chunk_encoder(run, context, metadata)
        _add_decoder_joint(run)
        if prompt_arrays is not None:
            _add_prompt(run, prompt_arrays)
        if run.config.ctc is not None:
            _add_ctc(run)

    _write_side_files(run.model, run.archive, run.out_dir, run.vocabulary)
    if run.config.speaker_kernels:
        _write_multitalker_config(run.model, run.base, run.contexts, run.out_dir)
    _release_model(run)
    _write_derived(run)
    result = run.result
    result.seconds = time.perf_counter() - started
    result.peak_rss_mb = peak_rss_mb()
    _write_export_record(run, source_hub)
    run.say(f"exported {len(result.graphs)} graphs in {result.seconds:.1f} s (peak RSS {result.peak_rss_mb:.0f} MB)")
    return result


@dataclass
class _Export:
    """One ``export_onnx`` run: the checkpoint restored once, what every graph's metadata shares, the graphs
    written so far, and the graphs made from them once the model is released."""

    nemo_path: Path
    sha256: str
    archive: NemoArchive
    config: ModelConfig
    model: Any  # NeMo's ASRModel; None once released (_release_model)
    contexts: list[tuple[int, int]]
    out_dir: Path
    cache_layout: str
    int8: bool
    debug_taps: bool
    say: Callable[[str], None]
    vocabulary: list[str]
    interface: GraphInterface
    base: dict[str, Any]  # the model-wide metadata every graph carries
    result: ExportResult
    # The encoder graphs of every lookahead hold the same weights: written once per precision.
    shared: graph_tools.SharedWeights
    shared_int8: graph_tools.SharedWeights | None
    # Graphs made from written graphs (int8, debug taps) load a whole fp32 graph each: they are written
    # once the NeMo model is released, so that the two never share the peak. (progress line, or None: not a
    # counted step; the writer)
    derived: list[tuple[str | None, Callable[[], None]]] = field(default_factory=list)


def _start(nemo_path: Path, out_dir: Path, att_context_sizes: Sequence[Sequence[int]] | None, cache_layout: str, *,
           int8: bool, debug_taps: bool, progress: Callable[[str], None] | None) -> _Export:
    """The one NeMo restore every graph step uses (``restore_for_inference``), after the archive and its config are
    checked; the requested lookaheads checked against the model's, ``progress`` told how many steps follow, and the
    model-wide metadata."""
    say = progress or (lambda _m: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    sha256 = sha256_file(nemo_path)
    archive = inspect_nemo(nemo_path)  # refuse unsafe archives before NeMo instantiates anything
    config = read_model_config(archive.config)  # a config the harness cannot read fails before NeMo loads
    model = restore_for_inference(archive)
    available = config.encoder.att_context_size
    contexts = [tuple(int(v) for v in c) for c in (att_context_sizes or available)]
    for context in contexts:
        if context not in available:
            raise InvalidInput(f"att_context_size {list(context)} is not one of the model's {[list(c) for c in available]}")
    if callable(getattr(progress, "total", None)):
        # one step per encoder (and its int8 graph), decoder_joint, a hybrid's CTC head, the end
        progress.total(2 * len(contexts) * (1 + int(int8)) + 2 + int(getattr(config, "ctc", None) is not None)
                       + int(getattr(config, "prompt", None) is not None) * (1 + int(int8)))
    vocabulary = tokenizer_vocabulary(model)
    speakers = config.speaker_kernels
    interface = INTERFACES["multitalker" if speakers else "nemo"]
    if speakers and cache_layout != "batch-first":
        raise InvalidInput("a multitalker model is exported with the multitalker interface, whose caches are "
                         f"batch-first; --cache-layout {cache_layout} is not available for it")
    base = {**_model_metadata(model, config, nemo_path, sha256, cache_layout, vocabulary),
            "interface": interface.name, "first_chunk_modes": list(FIRST_CHUNK_MODES),
            "speaker_kernel_layers": list(speakers.layers) if speakers else [],
            "background_speaker_kernel": bool(speakers and speakers.background),
            "ctc_head": None if config.ctc is None else {"file": ctc_file(), "num_classes": len(vocabulary),
                                                          "feat_in": config.ctc.feat_in},
            "num_prompts": config.prompt.num_prompts if config.prompt else 0,
            "prompt_dictionary": dict(config.prompt.dictionary) if config.prompt else {}}
    return _Export(
        nemo_path=nemo_path, sha256=sha256, archive=archive, config=config, model=model, contexts=contexts,
        out_dir=out_dir, cache_layout=cache_layout, int8=int8, debug_taps=debug_taps, say=say,
        vocabulary=vocabulary, interface=interface, base=base, result=ExportResult(out_dir),
        shared=graph_tools.SharedWeights(out_dir / SHARED_ENCODER_WEIGHTS),
        shared_int8=graph_tools.SharedWeights(out_dir / SHARED_ENCODER_WEIGHTS_INT8) if int8 else None)


def _add_encoder(run: _Export, context: tuple[int, int]) -> dict[str, Any]:
    """The steady encoder graph of the lookahead the model is set to (``set_default_att_context_size``): NeMo's
    ``forward_for_export``, which drops ``drop_extra_pre_encoded`` frames (every chunk after the first, and
    pad-and-drop's first). Its tap and int8 graphs are queued; returns its metadata."""
    path = run.out_dir / encoder_file(context)
    run.say(f"encoder {list(context)} ({run.cache_layout}) -> {path.name}")
    metadata = {**run.base, "graph": "encoder", "variant": "float32", "debug_taps": [],
                **_encoder_metadata(run.model, run.config.encoder, context, run.cache_layout)}
    _export_encoder(run.model, run.config.encoder, path, run.cache_layout, run.interface)
    _finish_graph(path, metadata, run.interface.encoder_inputs, run.interface.encoder_outputs, run.shared)
    run.result.graphs.append(path)
    _queue_tap_graph(run, path, run.out_dir / encoder_file(context, debug=True), _encoder_taps(run), metadata)
    _queue_int8_graph(run, f"encoder {list(context)}", path, run.out_dir / encoder_file(context, "int8"), metadata,
                      ("MatMul", "Gemm"), run.shared_int8)
    return metadata


def _add_first_chunk_encoder(run: _Export, context: tuple[int, int], steady_metadata: dict[str, Any]) -> None:
    """NeMo's default (plain) first chunk's graph for the lookahead: its own size, every pre-encoded frame kept
    (``first_chunk`` in its metadata, the steady graph's otherwise). It shares the weights file with the steady
    one (SharedWeights stores each payload once); its tap and int8 graphs are queued."""
    first = run.out_dir / encoder_file(context, first=True)
    run.say(f"encoder {list(context)} first chunk ({run.cache_layout}) -> {first.name}")
    metadata = {**steady_metadata, "first_chunk": True}
    _export_encoder(run.model, run.config.encoder, first, run.cache_layout, run.interface, first=True)
    _finish_graph(first, metadata, run.interface.encoder_inputs, run.interface.encoder_outputs, run.shared)
    run.result.graphs.append(first)
    _queue_tap_graph(run, first, run.out_dir / encoder_file(context, debug=True, first=True), _encoder_taps(run),
                     metadata)
    _queue_int8_graph(run, f"encoder {list(context)} first chunk", first,
                      run.out_dir / encoder_file(context, "int8", first=True), metadata, ("MatMul", "Gemm"),
                      run.shared_int8)


def _encoder_taps(run: _Export) -> Callable:
    """What finds the encoder's shared taps in a written graph (module scopes: ``pre_encode``, each layer)."""
    return functools.partial(graph_tools.encoder_tap_tensors, num_layers=run.base["num_layers"])


def _add_decoder_joint(run: _Export) -> None:
    """``decoder_joint``: the prediction net and the joint in one step graph (NeMo's ``RNNTDecoderJoint``, raw
    logits); its tap graph (the prediction-net output) and int8 graph (the LSTM quantized too) are queued."""
    path = run.out_dir / decoder_joint_file()
    run.say(f"decoder_joint -> {path.name}")
    metadata = {**run.base, "graph": "decoder_joint", "variant": "float32", "debug_taps": []}
    _export_decoder_joint(run.model, path, run.interface)
    _finish_graph(path, metadata, run.interface.decoder_joint_inputs, run.interface.decoder_joint_outputs)
    run.result.graphs.append(path)
    _queue_tap_graph(run, path, run.out_dir / decoder_joint_file(debug=True), graph_tools.decoder_joint_tap_tensors,
                     metadata)
    _queue_int8_graph(run, "decoder_joint", path, run.out_dir / decoder_joint_file("int8"), metadata,
                      ("MatMul", "Gemm", "LSTM"))


def _add_prompt(run: _Export, arrays) -> None:
    """A prompt-conditioned model's ``prompt.onnx``, built from the kernel's weights (no NeMo tracing), and its int8
    graph, written now: it is small, and its int8 needs no NeMo model either."""
    path = run.out_dir / prompt_file()
    run.say(f"prompt kernel -> {path.name}")
    metadata = {**run.base, "graph": "prompt", "variant": "float32", "debug_taps": []}
    _export_prompt(arrays, path, run.interface)
    _finish_graph(path, metadata, run.interface.prompt_inputs, run.interface.prompt_outputs)
    run.result.graphs.append(path)
    if run.int8:
        quantized = run.out_dir / prompt_file("int8")
        run.say(f"prompt kernel int8 -> {quantized.name}")
        _write_prompt_int8(path, quantized, metadata)
        run.result.graphs.append(quantized)


def _add_ctc(run: _Export) -> None:
    """A hybrid RNNT-CTC model's CTC head, ``ctc.onnx``: one float32 graph for every lookahead and variant."""
    path = run.out_dir / ctc_file()
    run.say(f"CTC head -> {path.name}")
    _export_ctc(run.model, path, run.interface)
    _finish_graph(path, {**run.base, "graph": "ctc", "variant": "float32", "debug_taps": []},
                  run.interface.ctc_inputs, run.interface.ctc_outputs)
    run.result.graphs.append(path)


def _queue_tap_graph(run: _Export, path: Path, debug_path: Path, tap_tensors: Callable,
                     metadata: dict[str, Any]) -> None:
    """With debug taps: ``debug_path``, the float32 graph ``path`` with the taps ``tap_tensors(graph)`` finds as extra
    outputs, queued for ``_write_derived``."""
    if not run.debug_taps:
        return
    run.derived.append((None, functools.partial(_write_debug, path, debug_path, tap_tensors, metadata)))
    run.result.graphs.append(debug_path)


def _queue_int8_graph(run: _Export, label: str, path: Path, int8_path: Path, metadata: dict[str, Any],
                      op_types: Sequence[str], weights: graph_tools.SharedWeights | None = None) -> None:
    """With int8: ``int8_path``, the dynamic int8 quantization of the float32 graph ``path`` (``op_types``; its
    weights into ``weights`` when shared), queued for ``_write_derived`` with its progress line."""
    if not run.int8:
        return
    run.derived.append((f"{label} int8 -> {int8_path.name}", functools.partial(
        _write_int8, path, int8_path, metadata, op_types, weights)))
    run.result.graphs.append(int8_path)


def _release_model(run: _Export) -> None:
    """Drop the NeMo model (and give its memory back) before the derived graphs load the written ones."""
    run.model = None
    gc.collect()
    trim()


def _write_derived(run: _Export) -> None:
    """The queued tap and int8 graphs, in the order they were queued."""
    for text, write in run.derived:
        if text:
            run.say(text)
        write()


def _write_export_record(run: _Export, source_hub: HubOrigin | None) -> None:
    """``export.json``: the options, the graphs written, the first-chunk modes, the int8 scheme, the shared weights'
    sizes, and where the checkpoint came from (its provenance)."""
    (run.out_dir / EXPORT_FILE).write_text(json.dumps({
        "format": FORMAT, "source_sha256": run.sha256,
        "options": {"att_context_sizes": [list(c) for c in run.contexts], "cache_layout": run.cache_layout,
                    "int8": run.int8, "debug_taps": run.debug_taps},
        "first_chunk_modes": list(FIRST_CHUNK_MODES),
        "int8_quantization": quantization.EXPORT_SCHEME.recorded().to_dict() if run.int8 else None,
        "graphs": [path.name for path in run.result.graphs],
        "shared_weights": {weights.path.name: {"stored_bytes": weights.stored_bytes,
                                               "referenced_bytes": weights.referenced_bytes}
                           for weights in (run.shared, run.shared_int8) if weights is not None},
        "provenance": Provenance.collect(run.nemo_path, sha256=run.sha256, hub=source_hub).to_dict(),
    }, indent=2) + "\n")


def _write_side_files(model, archive, out_dir: Path, vocabulary: Sequence[str]) -> None:
    from streaming_parity.interface.frontend import frontend_from_featurizer

    (out_dir / "tokenizer.model").write_bytes(archive.tokenizer_model_bytes())
    (out_dir / "vocab.txt").write_text("".join(f"{piece}\n" for piece in vocabulary), encoding="utf-8")
    frontend_from_featurizer(model.preprocessor.featurizer).save(out_dir)


def _write_multitalker_config(model, base: dict[str, Any], contexts, out_dir: Path) -> None:
    """``multitalker_config.json``: the dimensions a runtime of the multitalker export needs."""
    interface = INTERFACES["multitalker"]
    lookaheads = {}
    for context in contexts:
        model.encoder.set_default_att_context_size(list(context))
        cfg = model.encoder.streaming_cfg
        pair = lambda v: list(v) if isinstance(v, (list, tuple)) else [int(v), int(v)]  # noqa: E731
        lookaheads[f"{context[0]}_{context[1]}"] = {
            "att_context_size": list(context), "encoder_file": Path(encoder_file(context)).name,
            "chunk_size": pair(cfg.chunk_size), "shift_size": pair(cfg.shift_size),
            "pre_encode_cache_size": pair(cfg.pre_encode_cache_size),
            "valid_out_len": int(cfg.valid_out_len), "speaker_mask_frames_per_step": int(context[1]) + 1,
        }
    config = {
        "model_type": "multitalker-cache-aware-rnnt",
        "source_name": base["source_name"], "source_sha256": base["source_sha256"],
        "num_layers": base["num_layers"], "d_model": base["d_model"], "n_mels": base["n_mels"],
        "subsampling_factor": base["subsampling_factor"], "frame_shift_seconds": 0.01 * base["subsampling_factor"],
        "conv_kernel_size": base["conv_kernel_size"], "conv_cache_frames": base["conv_kernel_size"] - 1,
        "left_context_frames": int(contexts[0][0]), "vocab_size": base["vocab_size"], "blank_id": base["blank_id"],
        "pred_rnn_layers": base["pred_rnn_layers"], "pred_hidden": base["pred_hidden"],
        "max_symbols": base["max_symbols"], "spk_kernel_type": "ff",
        "spk_kernel_layers": base["speaker_kernel_layers"], "add_bg_spk_kernel": base["background_speaker_kernel"],
        "cache_layout": "batch-first",
        "encoder": {"inputs": list(interface.encoder_inputs), "outputs": list(interface.encoder_outputs),
                    "encoded_layout": "[B, D, T]",
                    "speaker_masks": "[B, T_enc], one value per encoder frame of the chunk after the "
                                     "pre-encoded frames are dropped; target speaker 1 = active, background "
                                     "1 = another speaker active"},
        "decoder_joint": {"inputs": list(interface.decoder_joint_inputs),
                          "outputs": list(interface.decoder_joint_outputs),
                          "encoder_outputs_layout": "[B, T, D]", "outputs_are": "raw logits (no log-softmax)"},
        "lookaheads": lookaheads,
        "files": {"float32": sorted(p.name for p in out_dir.glob("*.onnx") if ".int8." not in p.name
                                    and ".debug." not in p.name),
                  "int8": sorted(p.name for p in out_dir.glob("*.int8.onnx"))},
        "tokenizer": "tokenizer.model",
    }
    (out_dir / MULTITALKER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def cached_directory(target: Path, record_name: str, sha256: str, write: Callable[[Path], dict], *,
                     fmt: str | None = None) -> Path:
    """``target`` when it already holds a finished export of the checkpoint ``sha256`` (its record
    ``record_name`` says so, and, given ``fmt``, that it was written in that format version), else
    ``write(staging)`` into a sibling staging directory, which is renamed to ``target`` only once
    complete: an interrupted export never looks finished. ``write`` returns the record to store,
    ``source_sha256`` added."""
    done = target / record_name
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("source_sha256") == sha256 and (fmt is None or record.get("format") == fmt):
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        record = write(staging)
        (staging / record_name).write_text(json.dumps({**record, "source_sha256": sha256}, default=list) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def export_cached(nemo_path: Path, work_dir: Path, **options: Any) -> Path:
    """Export into ``work_dir/onnx-<sha256[:16]>-<options>``, reusing a finished export of the same ``.nemo``."""
    sha256 = sha256_file(nemo_path)
    layout = options.get("cache_layout", "batch-first")
    # The int8 scheme is in the name: an export quantized another way (full-range QInt8, before) is written
    # again rather than reused.
    scheme = quantization.EXPORT_SCHEME
    int8_tag = f"-int8-{scheme.weight_type.lower()}{'-rr' if scheme.reduce_range else ''}" if options.get("int8") else ""
    tag = f"{layout}{int8_tag}{'-taps' if options.get('debug_taps') else ''}"
    contexts = options.get("att_context_sizes")
    if contexts:
        tag += "-" + "-".join(f"{int(c[0])}_{int(c[1])}" for c in contexts)

    def write(staging: Path) -> dict:
        export_onnx(nemo_path, staging, **options)
        record = json.loads((staging / EXPORT_FILE).read_text())  # export_onnx's record, with its provenance
        return {**record, **{k: v for k, v in options.items() if k not in ("progress", "source_hub")}}

    # An export of an older format version is written again (a /1 export of a prompted model has no prompt graph).
    return cached_directory(Path(work_dir) / f"onnx-{sha256[:16]}-{tag}", EXPORT_FILE, sha256, write, fmt=FORMAT)

"""``parity export-onnx --format sherpa-onnx|nemo|parakeet-rs``: the ONNX files other projects write.

Users of NeMo's cache-aware streaming models mostly run files written by someone else's exporter.
These writers reproduce three of them from their public sources, so that the harness can build
those artifacts offline from its own fixtures and check what users actually run:

``sherpa-onnx`` (k2-fsa/sherpa-onnx, one of ``SHERPA_SCRIPTS``; by default the newest,
``scripts/nemo/nemotron-speech-streaming-en-0.6b/export_onnx.py``)
    Per lookahead: ``set_default_att_context_size([L, R])``, ``set_export_config({"cache_support":
    True})``, then NeMo's own ``encoder.export("encoder.onnx")``, ``decoder.export("decoder.onnx")`` and
    ``joint.export("joiner.onnx")`` (batch-first caches, raw logits). The encoder carries the metadata the
    runtime reads (``window_size`` = chunk_size + pre_encode_cache_size in mel frames, ``chunk_shift`` =
    chunk_size, ``cache_last_*_dim1..3``, ``normalize_type`` ("" for NA), ...), plus the keys only some
    versions of the script write (``feat_dim``, ``chunk_size_ms``); the Nemotron scripts save its weights
    in ``encoder.data``, the older FastConformer script inside ``encoder.onnx``. ``tokens.txt`` holds
    ``piece id`` lines with ``<blk> V`` last; ``*.int8.onnx`` are ``quantize_dynamic(...,
    weight_type=QuantType.QUInt8)`` copies. The scripts hard-code ``subsampling_factor`` 8, ``feat_dim``
    128 and ``model_type`` ``EncDecHybridRNNTCTCBPEModel``; here they are the model's own (the same values
    for the checkpoints the scripts were written for).
``nemo``
    NeMo's plain ``model.export("model.onnx")`` with cache support: ``encoder-model.onnx`` and
    ``decoder_joint-model.onnx``, no metadata, no vocabulary (the ``.nemo`` supplies both).
``parakeet-rs`` (altunenes/parakeet-rs ``scripts/export_nemotron_streaming.py``)
    The encoder is ``cache_aware_stream_step`` wrapped and traced directly: layers-first caches
    ``[L, 1, C, D]`` with static shapes, inputs ``processed_signal``, ``processed_signal_length``,
    ``cache_last_channel``, ``cache_last_time``, ``cache_last_channel_len``, outputs ``encoded``,
    ``encoded_len``, ``cache_*_next``, ``cache_last_channel_len_next``; weights in ``encoder.onnx.data``;
    metadata ``chunk_size_output_frames`` and ``pre_encode_cache``. ``decoder_joint.onnx`` is NeMo's own
    ``decoder_joint`` export. ``config.json`` and ``tokenizer.model`` beside them. (The upstream script
    writes ``"normalize": "per_feature"`` into ``config.json`` whatever the model uses; this writer writes
    the model's own value, and ``streaming_parity.backends.onnx.foreign_read`` refuses a directory whose value contradicts the
    ``.nemo``.)

Several lookaheads go to one subdirectory each (sherpa-onnx: the chunk in milliseconds, ``1120``, as
its script does; the others: ``70_13``); a single lookahead is written into ``DIR`` itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming_parity.backends.onnx.export import OPSET, ExportResult, cached_directory, quiet_export
from streaming_parity.backends.onnx.layout import context_tag
from streaming_parity.core.errors import InvalidInput, Unsupported
from streaming_parity.core.nemo_config import read_model_config
from streaming_parity.core.nemo_file import inspect_nemo, sha256_file
from streaming_parity.core.nemo_restore import restore_for_inference, tokenizer_vocabulary
from streaming_parity.core.system.memory import peak_rss_mb

PEER_FORMATS = ("sherpa-onnx", "nemo", "parakeet-rs")

SHERPA_TOKENS = "tokens.txt"
SHERPA_BLANK = "<blk>"
SHERPA_GRAPHS = ("encoder", "decoder", "joiner")
NEMO_EXPORT_GRAPHS = ("encoder-model.onnx", "decoder_joint-model.onnx")
PARAKEET_RS_GRAPHS = ("encoder.onnx", "decoder_joint.onnx")
PARAKEET_RS_CONFIG = "config.json"


def chunk_ms(context: Sequence[int], subsampling_factor: int) -> int:
    """sherpa-onnx's name for a lookahead: the chunk's audio in ms ((R + 1) encoder frames of 10 ms x factor)."""
    return (int(context[1]) + 1) * subsampling_factor * 10


def lookahead_dir(out_dir: Path, fmt: str, context: Sequence[int], subsampling_factor: int, several: bool) -> Path:
    if not several:
        return out_dir
    name = str(chunk_ms(context, subsampling_factor)) if fmt == "sherpa-onnx" else context_tag(context)
    return out_dir / name


def _pair_last(value: Any) -> int:
    return int(value[1]) if isinstance(value, (list, tuple)) else int(value)


@dataclass(frozen=True)
class SherpaScript:
    """One version of sherpa-onnx's export script for cache-aware NeMo transducers: what it writes.

    Every version writes the keys sherpa-onnx's runtime reads (``vocab_size``, ``window_size``,
    ``chunk_shift``, ``normalize_type``, ``cache_last_*_dim1..3``, ``pred_rnn_layers``, ``pred_hidden``,
    ``subsampling_factor``); they differ in the keys only some write, in how they spell "no
    normalisation" and in where the encoder's weights go."""

    name: str
    source: str  # the script, by path and commit in k2-fsa/sherpa-onnx
    normalize_literal: str | None  # written whatever the model uses; None: the model's own ("" for NA)
    feat_dim: bool  # writes "feat_dim"
    chunk_size_ms: bool  # writes "chunk_size_ms"
    encoder_data: bool  # saves the encoder's weights in encoder.data (else inside encoder.onnx)
    int8: bool  # writes the *.int8.onnx copies


FAST_CONFORMER_SCRIPT = "scripts/nemo/fast-conformer-hybrid-transducer-ctc/export-onnx-transducer.py"
NEMOTRON_SCRIPT = "scripts/nemo/nemotron-speech-streaming-en-0.6b/export_onnx.py"
SHERPA_SCRIPTS = {script.name: script for script in (
    # The script behind the stt_en_fastconformer_hybrid_large_streaming_* releases, as first written
    # (68b25abf2): the literal "None" for normalize_type; no feat_dim, no chunk_size_ms; add_meta_data
    # saves the encoder with its weights inside; no int8 copies.
    SherpaScript("fast-conformer-2024-05", f"{FAST_CONFORMER_SCRIPT} @ 68b25abf2", "None", feat_dim=False,
                 chunk_size_ms=False, encoder_data=False, int8=False),
    # The same script from 5ed3ec1c0 on: the model's normalize ("" for NA); int8 copies since 6122a678f.
    SherpaScript("fast-conformer", f"{FAST_CONFORMER_SCRIPT} @ 5ed3ec1c0, 6122a678f", None, feat_dim=False,
                 chunk_size_ms=False, encoder_data=False, int8=True),
    # The first Nemotron script (4fa889824): adds feat_dim (hard-coded 128) and saves the encoder's
    # weights in encoder.data; one lookahead, the model's default.
    SherpaScript("nemotron-2026-01", f"{NEMOTRON_SCRIPT} @ 4fa889824", None, feat_dim=True, chunk_size_ms=False,
                 encoder_data=True, int8=True),
    # The Nemotron script from 415b8c2aa on: adds chunk_size_ms and loops over the lookaheads, one
    # directory per chunk in ms (it leaves tokens.txt beside those directories, its release workflow
    # copies it into each).
    SherpaScript("nemotron", f"{NEMOTRON_SCRIPT} @ 415b8c2aa", None, feat_dim=True, chunk_size_ms=True,
                 encoder_data=True, int8=True),
)}
SHERPA_SCRIPT = "nemotron"


def sherpa_script(name: str | None) -> SherpaScript:
    """The script version called ``name`` (None: the newest)."""
    chosen = SHERPA_SCRIPT if name is None else name
    if chosen not in SHERPA_SCRIPTS:
        raise InvalidInput(f"sherpa-onnx script version {chosen!r} is not one of {', '.join(SHERPA_SCRIPTS)}")
    return SHERPA_SCRIPTS[chosen]


def sherpa_metadata(model, context: Sequence[int], config, script: SherpaScript | None = None) -> dict[str, Any]:
    """The encoder metadata ``script`` writes (values as it computes them, keys in its order)."""
    script = script or SHERPA_SCRIPTS[SHERPA_SCRIPT]
    cfg = model.encoder.streaming_cfg
    pre_encode_cache_size = _pair_last(cfg.pre_encode_cache_size)
    chunk_size = _pair_last(cfg.chunk_size)
    normalize_type = script.normalize_literal
    if normalize_type is None:
        normalize = config.preprocessor.normalize
        # The scripts map "NA" to "" and write anything else with str(): a null normalize becomes "None".
        normalize_type = "" if normalize == "NA" else str(normalize)
    metadata: dict[str, Any] = {
        "vocab_size": int(model.decoder.vocab_size),
        "window_size": chunk_size + pre_encode_cache_size,
    }
    if script.chunk_size_ms:
        metadata["chunk_size_ms"] = chunk_ms(context, config.encoder.subsampling_factor)
    metadata.update({
        "chunk_shift": chunk_size,
        "normalize_type": normalize_type,
        "cache_last_channel_dim1": len(model.encoder.layers),
        "cache_last_channel_dim2": int(cfg.last_channel_cache_size),
        "cache_last_channel_dim3": int(model.encoder.d_model),
        "cache_last_time_dim1": len(model.encoder.layers),
        "cache_last_time_dim2": int(model.encoder.d_model),
        "cache_last_time_dim3": int(model.encoder.conv_context_size[0]),
        "pred_rnn_layers": int(model.decoder.pred_rnn_layers),
        "pred_hidden": int(model.decoder.pred_hidden),
        "subsampling_factor": int(config.encoder.subsampling_factor),
    })
    if script.feat_dim:
        metadata["feat_dim"] = int(config.encoder.feat_in)
    metadata.update({
        "model_type": type(model).__name__,
        "version": "1",
        "model_author": "NeMo",
        "url": "",
        "comment": "Only the transducer branch is exported",
    })
    return metadata


def write_tokens(path: Path, vocabulary: Sequence[str]) -> None:
    """``tokens.txt`` as sherpa-onnx's script writes it: ``piece id`` per line, ``<blk> V`` last."""
    lines = [f"{piece} {index}\n" for index, piece in enumerate(vocabulary)]
    lines.append(f"{SHERPA_BLANK} {len(vocabulary)}\n")
    path.write_text("".join(lines), encoding="utf-8")


def _set_metadata(path: Path, metadata: dict[str, Any], location: str | None, size_threshold: int = 1024) -> None:
    """Replace the metadata and save (sherpa's ``add_meta_data``): with every weight in one external file
    ``location``, or (None) inside the graph."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    if location is None:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                  size_threshold=size_threshold)


def _quantize_quint8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger about optional pre-processing
    try:
        quantize_dynamic(model_input=str(source), model_output=str(target), weight_type=QuantType.QUInt8)
    finally:
        root.setLevel(level)


def _write_sherpa(model, config, context, directory: Path, vocabulary, int8: bool, say,
                  script: SherpaScript) -> list[Path]:
    encoder, decoder, joiner = (directory / f"{name}.onnx" for name in SHERPA_GRAPHS)
    # The FastConformer script also passes {"decoder_type": "rnnt"} to set_export_config (the hybrid
    # models' transducer branch for model.export); the module exports below do not depend on it.
    model.encoder.export(str(encoder))
    model.decoder.export(str(decoder))
    model.joint.export(str(joiner))
    _set_metadata(encoder, sherpa_metadata(model, context, config, script),
                  "encoder.data" if script.encoder_data else None)
    write_tokens(directory / SHERPA_TOKENS, vocabulary)
    graphs = [encoder, decoder, joiner]
    if int8:
        for graph in list(graphs):
            quantized = graph.with_suffix(".int8.onnx")
            say(f"  {graph.name} -> {quantized.name} (QUInt8)")
            _quantize_quint8(graph, quantized)
            graphs.append(quantized)
    return graphs


def _write_nemo(model, directory: Path) -> list[Path]:
    model.export(str(directory / "model.onnx"), check_trace=False)
    return [directory / name for name in NEMO_EXPORT_GRAPHS]


def _parakeet_encoder_wrapper(encoder, drop_extra: int):
    import torch

    class EncoderWrapper(torch.nn.Module):  # parakeet-rs' own wrapper, as its script defines it
        def __init__(self, inner, drop):
            super().__init__()
            self.encoder = inner
            self.drop_extra = drop

        def forward(self, processed_signal, processed_signal_length, cache_last_channel, cache_last_time,
                    cache_last_channel_len):
            return self.encoder.cache_aware_stream_step(
                processed_signal=processed_signal, processed_signal_length=processed_signal_length,
                cache_last_channel=cache_last_channel, cache_last_time=cache_last_time,
                cache_last_channel_len=cache_last_channel_len, keep_all_outputs=False,
                drop_extra_pre_encoded=self.drop_extra)

    return EncoderWrapper(encoder, drop_extra)


def _write_parakeet_rs(model, config, archive, context, directory: Path, say) -> list[Path]:
    import onnx
    import torch
    from nemo.core.classes.common import typecheck

    streaming = model.encoder.streaming_cfg
    output_frames = int(context[1]) + 1
    # What the upstream script does after choosing the lookahead (it leaves NeMo's schedule unchanged
    # for chunked_limited models: chunk and shift of R + 1 encoder frames).
    model.encoder.setup_streaming_params(chunk_size=output_frames, shift_size=output_frames)
    drop_extra = int(getattr(streaming, "drop_extra_pre_encoded", 0))
    pre_encode_cache = _pair_last(streaming.pre_encode_cache_size)
    channel, time_cache, channel_len = model.encoder.get_initial_cache_state(batch_size=1)
    frames = pre_encode_cache + _pair_last(streaming.chunk_size)
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(1, config.encoder.feat_in, frames, generator=generator)
    signal[..., :pre_encode_cache] = 0.0  # the first pad-and-drop chunk, as NeMo's buffer hands it over
    length = torch.tensor([frames], dtype=torch.int64)
    names_in = ["processed_signal", "processed_signal_length", "cache_last_channel", "cache_last_time",
                "cache_last_channel_len"]
    names_out = ["encoded", "encoded_len", "cache_last_channel_next", "cache_last_time_next",
                 "cache_last_channel_len_next"]
    staging = Path(tempfile.mkdtemp(prefix="parakeet-rs-", dir=directory))
    try:
        temp = staging / "encoder_temp.onnx"
        enabled = typecheck.is_typecheck_enabled() if hasattr(typecheck, "is_typecheck_enabled") else True
        typecheck.set_typecheck_enabled(False)
        try:
            torch.onnx.export(_parakeet_encoder_wrapper(model.encoder, drop_extra).eval(),
                              (signal, length, channel, time_cache, channel_len), str(temp),
                              input_names=names_in, output_names=names_out, opset_version=OPSET,
                              dynamic_axes={"processed_signal": {0: "batch", 2: "time"},
                                            "processed_signal_length": {0: "batch"},
                                            "encoded": {0: "batch", 1: "time"}, "encoded_len": {0: "batch"}},
                              dynamo=False)
        finally:
            typecheck.set_typecheck_enabled(enabled)
        graph = onnx.load(str(temp), load_external_data=True)
        for key, value in (("chunk_size_output_frames", output_frames), ("pre_encode_cache", pre_encode_cache)):
            graph.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(value)))
        encoder = directory / PARAKEET_RS_GRAPHS[0]
        onnx.save_model(graph, str(encoder), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="encoder.onnx.data", size_threshold=0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    decoder_joint = directory / PARAKEET_RS_GRAPHS[1]
    model.decoder_joint.export(str(decoder_joint), check_trace=False, onnx_opset_version=OPSET)
    (directory / "tokenizer.model").write_bytes(archive.tokenizer_model_bytes())
    layers, d_model = len(model.encoder.layers), int(model.encoder.d_model)
    settings = {
        "model_name": archive.path.stem,
        "sample_rate": config.preprocessor.sample_rate,
        "n_mels": config.encoder.feat_in,
        "subsampling_factor": config.encoder.subsampling_factor,
        "att_context_size": list(context),
        "left_context": int(context[0]),
        "right_context": int(context[1]),
        "chunk_size_output_frames": output_frames,
        "pre_encode_cache": pre_encode_cache,
        "drop_extra_pre_encoded": drop_extra,
        "num_encoder_layers": layers,
        "hidden_dim": d_model,
        "conv_context": int(time_cache.shape[3]),
        "vocab_size": int(model.tokenizer.vocab_size),
        "blank_id": int(model.tokenizer.vocab_size),
        "preprocessor": {
            "window_size": config.preprocessor.window_size, "window_stride": config.preprocessor.window_stride,
            "n_fft": config.preprocessor.n_fft, "normalize": config.preprocessor.normalize,
            "preemph": config.preprocessor.preemph,
        },
        "cache_shapes": {"cache_last_channel": list(channel.shape), "cache_last_time": list(time_cache.shape),
                         "cache_last_channel_len": list(channel_len.shape)},
    }
    (directory / PARAKEET_RS_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    say(f"  parakeet-rs encoder [{layers}, 1, ...] caches, {output_frames} output frames per chunk")
    return [encoder, decoder_joint]


def export_peer(nemo_path: str | Path, out_dir: str | Path, *, fmt: str,
                att_context_sizes: Sequence[Sequence[int]] | None = None, int8: bool = False,
                progress: Callable[[str], None] | None = None, script: str | None = None) -> ExportResult:
    """Write ``nemo_path`` as ``fmt`` (one of ``PEER_FORMATS``) into ``out_dir``; ``script`` chooses the
    version of sherpa-onnx's export script (one of ``SHERPA_SCRIPTS``; None: the newest)."""
    import torch

    if fmt not in PEER_FORMATS:
        raise InvalidInput(f"--format must be one of parity, {', '.join(PEER_FORMATS)}; not {fmt!r}")
    if int8 and fmt != "sherpa-onnx":
        raise InvalidInput(f"--int8: the {fmt} exporter writes no int8 graphs (sherpa-onnx's does)")
    if script is not None and fmt != "sherpa-onnx":
        raise InvalidInput(f"a script version ({script!r}) chooses among sherpa-onnx's export scripts, not {fmt}'s")
    sherpa = sherpa_script(script)
    if int8 and not sherpa.int8:
        raise InvalidInput(f"--int8: sherpa-onnx's {sherpa.name} script ({sherpa.source}) writes no int8 graphs")
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    nemo_path, out_dir = Path(nemo_path), Path(out_dir)
    archive = inspect_nemo(nemo_path)
    config = read_model_config(archive.config)
    if config.speaker_kernels:
        raise Unsupported(f"{nemo_path.name}: a multitalker model; --format {fmt} writes single-speaker exports "
                           "(parity export-onnx writes the multitalker interface)")
    if config.prompt is not None:
        # The peers' exporters export the encoder and decoder_joint modules; prompt_kernel is an attribute of
        # the model (PromptStreamingMixin), so their files would ignore the locale: a silent bypass.
        raise Unsupported(f"{nemo_path.name}: a prompt-conditioned model (Nemotron-3.5); --format {fmt} exports the "
                          "encoder and decoder_joint only, so its files would bypass prompt_kernel and ignore the "
                          "locale (parity export-onnx writes prompt.onnx)")
    available = config.encoder.att_context_size
    contexts = [tuple(int(v) for v in c) for c in (att_context_sizes or available)]
    for context in contexts:
        if context not in available:
            raise InvalidInput(f"att_context_size {list(context)} is not one of the model's "
                               f"{[list(c) for c in available]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = restore_for_inference(archive)
    vocabulary = tokenizer_vocabulary(model)
    result = ExportResult(out_dir)
    factor = config.encoder.subsampling_factor
    with quiet_export(), torch.inference_mode():
        for context in contexts:
            directory = lookahead_dir(out_dir, fmt, context, factor, several=len(contexts) > 1)
            directory.mkdir(parents=True, exist_ok=True)
            model.encoder.set_default_att_context_size(list(context))
            model.set_export_config({"cache_support": True})
            say(f"{fmt} {list(context)} -> {directory}")
            if fmt == "sherpa-onnx":
                result.graphs += _write_sherpa(model, config, context, directory, vocabulary, int8, say, sherpa)
            elif fmt == "nemo":
                result.graphs += _write_nemo(model, directory)
            else:
                result.graphs += _write_parakeet_rs(model, config, archive, context, directory, say)
    result.seconds = time.perf_counter() - started
    result.peak_rss_mb = peak_rss_mb()
    say(f"wrote {len(result.graphs)} graphs in {result.seconds:.1f} s")
    return result


def export_peer_cached(nemo_path: Path, work_dir: Path, *, fmt: str,
                       att_context_sizes: Sequence[Sequence[int]] | None = None, int8: bool = False,
                       script: str | None = None) -> Path:
    """``export_peer`` into ``work_dir/<fmt>[-<script>]-<sha256[:16]>-<options>``, reused when already complete."""
    sha256 = sha256_file(nemo_path)
    tag = f"{fmt}{'-' + script if script else ''}-{sha256[:16]}{'-int8' if int8 else ''}"
    if att_context_sizes:
        tag += "-" + "-".join(context_tag(c) for c in att_context_sizes)

    def write(staging: Path) -> dict:
        export_peer(nemo_path, staging, fmt=fmt, att_context_sizes=att_context_sizes, int8=int8, script=script)
        return {"format": fmt, **({"script": script} if script else {})}

    return cached_directory(Path(work_dir) / tag, "peer-export.json", sha256, write)

"""The ONNX Runtime backend: streams from an export directory alone (no torch, no NeMo).

It runs what a ``described.DescribedExport`` describes, read and checked before any session opens: this
project's export (``layout.describe_export``, from the graphs' metadata) or another exporter's files
(``foreign_read.describe_foreign``, checked against the ``.nemo``); here the sessions are opened
(``sessions``), their declared inputs checked against the description, and the chunks streamed.

- Chunk schedule: the encoder graphs bake NeMo's pad-and-drop first-chunk mode
  (``forward_for_export`` always drops ``drop_extra_pre_encoded`` frames), so that is the only mode
  offered; the schedule's values come from each graph's metadata and are checked at load against
  ``streaming_parity.interface.chunking``'s derivation from the encoder config.
- Caches cross the interface in the canonical layers-first layout; a batch-first graph gets them
  transposed at this edge. The graph's layout is read from its metadata, never guessed.
- Decoding reproduces NeMo's ``GreedyRNNTInfer._greedy_decode``
  (parts/submodules/rnnt_greedy_decoding.py): for every frame, up to ``max_symbols`` times, run the
  prediction net on the last emitted label (blank with zero LSTM state at the start: the blank is
  the embedding's padding row, as NeMo's SOS), then the joint; a blank ends the frame, a label is
  emitted and only then is the new LSTM state kept. One ``decoder_joint`` call = one prediction-net
  call + one joint call, so the ``decoder`` and ``joint`` taps line up with NeMo's call for call.
- Hybrid RNNT-CTC exports add ``ctc.onnx``, the CTC head, run on each step's encoder output (both
  variants: the int8 encoder's output goes through the float32 head): its log-probabilities are the
  ``ctc`` tap, and its greedy labels continue the previous step's
  (``streaming_parity.interface.decoding.ctc_greedy``).
- Prompt-conditioned exports add ``prompt.onnx`` (``prompt.int8.onnx`` for int8), NeMo's
  ``_apply_prompt_to_encoded``: run on each step's encoder output with the stream's locale mapped to its
  one-hot column through the export's own ``prompt_dictionary`` (metadata), before decoding and the CTC
  head; its output is the ``prompt`` tap. A stream without a locale bypasses it, as NeMo does when
  ``set_inference_prompt`` was never called (the ``prompt`` tap is then the encoder output).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from streaming_parity.backends.onnx.described import DescribedExport, GraphFile
from streaming_parity.backends.onnx.layout import (
    ENCODER_OUTPUTS,
    GraphInterfaceError,
    MissingGraphError,
    decoder_joint_file,
    describe_export,
)
from streaming_parity.backends.onnx.sessions import Graph, check_declared, open_decoder_joint, session_options
from streaming_parity.core.system.memory import trim
from streaming_parity.interface.backend import Backend, Capabilities
from streaming_parity.interface.chunking import Chunk, StreamingConfig
from streaming_parity.interface.decoding import ForcedDecisions, ctc_step
from streaming_parity.interface.quantization import Int8Quantization
from streaming_parity.interface.speakers import SpeakerMaskError, SpeakerTargets, reconciled_pair
from streaming_parity.interface.taps import TAP_CTC, TAP_DECODER, TAP_ENCODER, TAP_JOINT, TAP_PROMPT
from streaming_parity.interface.types import (
    DecoderState,
    OfflineOutput,
    ShapeMismatchError,
    StepOutput,
    StreamingState,
    expect_shape,
)


class CacheLayoutError(ShapeMismatchError):
    """Caches in one layout were fed to a graph exported for the other."""


# An export above this size keeps one encoder session open at a time (OnnxBackend, max_open_encoders).
LARGE_EXPORT_BYTES = 1 << 30


def _directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


class OnnxBackend(Backend):
    name = "onnx"
    # What an export of this format streams; an instance states what its own export holds (an older export,
    # or a peer's files, has no plain first-chunk graph: pad-and-drop only).
    capabilities = Capabilities(first_chunk_modes=("plain", "pad-and-drop"), offline=False, teacher_forcing=True)

    def __init__(self, export_dir: str | Path | DescribedExport, *, dtype: str = "float32",
                 nemo_path: str | Path | None = None, taps: bool = True, threads: int | None = None,
                 max_open_encoders: int | None = None):
        """``export_dir``: an export directory of this project's, read and checked by ``layout.describe_export``
        (for ``dtype``, against ``nemo_path`` when given; ``taps``: its tap graphs), or a directory already
        described (``foreign_read.describe_foreign``: another exporter's files), which states its own dtype and
        taps."""
        described = export_dir if isinstance(export_dir, DescribedExport) else describe_export(
            export_dir, dtype=dtype, taps=taps, nemo_path=nemo_path)
        self.described = described
        self.directory = described.directory
        self.dtype = described.dtype
        self.info = described.info
        self.interface = described.interface
        self.cache_layout = described.cache_layout
        self.vocabulary = list(described.info.vocabulary)
        self._max_symbols = described.max_symbols  # None: no per-frame limit (NeMo's max_symbols=None)
        self._int8_quantization: Int8Quantization | None = None
        if self.info.multitalker != self.interface.speaker_masks:
            raise GraphInterfaceError(f"{self.directory}: speaker_kernel_layers {list(self.info.speaker_kernel_layers)} "
                                      f"contradict the {self.interface.name} interface")
        modes = described.first_chunk_modes
        if tuple(modes) != type(self).capabilities.first_chunk_modes:
            self.capabilities = replace(type(self).capabilities, first_chunk_modes=tuple(modes))
        self._options = session_options(threads)
        self.decoder_joint = open_decoder_joint(described, self._options)
        # (lookahead, first-chunk graph) -> open session, least recently used first
        self._encoders: dict[tuple[tuple[int, int], bool], Graph] = {}
        # Every ONNX Runtime session holds its own copy of the weights, even where the lookaheads' graphs
        # share one file (measured at full size: four open encoders, 10.7 GB). A large export keeps one
        # encoder session open at a time (reopened when the lookahead or the first-chunk graph changes); a
        # small one keeps all.
        self._max_open_encoders = max_open_encoders or (
            1 if _directory_bytes(self.directory) > LARGE_EXPORT_BYTES else len(described.encoders))
        for context, first in described.encoders:  # open every encoder now: a broken export fails before anything runs
            self._encoder(context, first=first)
        self.frontend = described.frontend
        self._check_decoder_joint()
        self.ctc_graph = None if described.ctc is None else Graph(described.ctc, "ctc", self.interface, self._options)
        self.prompt_graph = None if described.prompt is None else self._open_prompt(described.prompt)

    # -- opening the described graphs -----------------------------------------------------------------
    def _check_decoder_joint(self) -> None:
        layers, hidden = self.info.pred_layers, self.info.pred_hidden
        for name in ("input_states_1", "input_states_2"):
            check_declared(self.decoder_joint, name, (layers, "B", hidden))
        self._targets_dtype = np.int64 if "int64" in self.decoder_joint.inputs["targets"].type else np.int32

    def _open_prompt(self, file: GraphFile) -> Graph:
        """A prompt-conditioned model's prompt kernel, its declared inputs checked against the model's width."""
        graph = Graph(file, "prompt", self.interface, self._options)
        check_declared(graph, graph.interface.prompt_inputs[0], ("B", self.info.d_model, "T"))
        check_declared(graph, graph.interface.prompt_inputs[1], ("B",))
        return graph

    def run_prompt(self, encoded: np.ndarray, locale: str | None) -> np.ndarray:
        """NeMo's ``_apply_prompt_to_encoded`` on ``encoded`` ``[B, D, T]`` for ``locale`` (this export's
        ``prompt_dictionary`` gives its column): ``prompt.onnx``'s output; ``encoded`` itself for None (never
        set: the bypass). A locale for a model without a prompt kernel, or one the dictionary lacks, is refused."""
        index = self.info.prompt_index(locale)  # InvalidInput for a non-prompt model or an unknown locale
        if index is None:
            return encoded
        names = self.prompt_graph.interface
        expect_shape(f"{self.prompt_graph.path.name} input {names.prompt_inputs[0]}", encoded,
                     (None, self.info.d_model, None))
        batch = encoded.shape[0]
        out = self.prompt_graph.run({names.prompt_inputs[0]: np.ascontiguousarray(encoded, np.float32),
                                     names.prompt_inputs[1]: np.full((batch,), index, np.int64)})
        prompted = out[names.prompt_outputs[0]]
        expect_shape(f"{self.prompt_graph.path.name} output {names.prompt_outputs[0]}", prompted, encoded.shape)
        return prompted

    def _run_ctc(self, encoded: np.ndarray, encoded_len: np.ndarray,
                 last_labels: list[int]) -> tuple[np.ndarray, list[list[int]], list[int]]:
        """The CTC head on ``encoded [B, D, T]``: log-probabilities over the valid frames ``[B, T_valid, V+1]``,
        and per batch item the greedy labels emitted after ``last_labels`` and the last frame's label."""
        names = self.ctc_graph.interface
        log_probs = self.ctc_graph.run({names.ctc_inputs[0]: np.ascontiguousarray(encoded, np.float32)})[names.ctc_outputs[0]]
        return ctc_step(log_probs, encoded_len, self.info.blank_id, last_labels)

    def _encoder(self, context: Sequence[int], *, first: bool = False) -> Graph:
        """The open session of one lookahead's encoder graph (``first``: its plain first chunk's), opened from the
        description when it is not, its declared cache inputs checked against the described shapes."""
        context = (int(context[0]), int(context[1]))
        key = (context, first)
        if key in self._encoders:
            self._encoders[key] = self._encoders.pop(key)  # most recently used last
            return self._encoders[key]
        if context not in self.info.att_context_sizes:
            raise MissingGraphError(
                f"{self.directory}: no encoder graph for att_context_size {list(context)}; exported: "
                f"{[list(c) for c in self.info.att_context_sizes]}")
        if first and "plain" not in self.capabilities.first_chunk_modes:
            raise MissingGraphError(
                f"{self.directory}: no plain first-chunk graph (this export streams "
                f"{', '.join(self.capabilities.first_chunk_modes)} only): compare it in pad-and-drop mode, or export "
                "again with parity export-onnx")
        described = self.described.encoders[key]
        if len(self._encoders) >= self._max_open_encoders:
            # Closed before the next one opens, and its memory handed back: a session's pre-packed weights are
            # about the size of the weights (2.0 GB at full size), and with the old session still open while
            # the new one packed, or its freed heap kept by the allocator, the ONNX phase held two (4.2 GB).
            while len(self._encoders) >= self._max_open_encoders:
                del self._encoders[next(iter(self._encoders))]
            gc.collect()
            trim()
        graph = Graph(described.file, "encoder", described.interface, self._options)
        check_declared(graph, "cache_last_channel", described.cache_shapes.channel)
        check_declared(graph, "cache_last_time", described.cache_shapes.time)
        self._encoders[key] = graph
        return graph

    # -- Backend interface ---------------------------------------------------------------------------
    def streaming_config(self, att_context_size: Sequence[int]) -> StreamingConfig:
        context = (int(att_context_size[0]), int(att_context_size[1]))
        if (context, False) not in self.described.encoders:
            self._encoder(context)  # refused: no graph for this lookahead
        return self.described.encoders[(context, False)].streaming

    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.frontend(np.atleast_2d(np.asarray(audio, np.float32)))

    def run_encoder(self, context: Sequence[int], mel: np.ndarray, length: np.ndarray, cache_last_channel: np.ndarray,
                    cache_last_time: np.ndarray, cache_last_channel_len: np.ndarray,
                    speaker_masks: tuple[np.ndarray, np.ndarray] | None = None, *,
                    first: bool = False) -> dict[str, np.ndarray]:
        """One encoder graph call with caches in the graph's own layout (checked against its metadata);
        ``first``: the plain first chunk's graph.

        Outputs are returned under the ``nemo`` interface's names whatever the graph calls them;
        ``speaker_masks`` (target, background), already reconciled, go to a multitalker graph.
        """
        graph = self._encoder(context, first=first)
        batch = mel.shape[0]
        shapes = self.described.encoders[((int(context[0]), int(context[1])), first)].cache_shapes
        channel_shape, time_shape = shapes.concrete(batch)
        for name, array, expected in (("cache_last_channel", cache_last_channel, channel_shape),
                                      ("cache_last_time", cache_last_time, time_shape)):
            if tuple(array.shape) != expected:
                swapped = (expected[1], expected[0], *expected[2:])
                other = "layers-first" if shapes.layout == "batch-first" else "batch-first"
                hint = f" ({other} caches fed to a {shapes.layout} graph)" if tuple(array.shape) == swapped else ""
                raise CacheLayoutError(f"{graph.path.name}: {name} expected shape {expected} "
                                       f"({shapes.layout}), got {tuple(array.shape)}{hint}")
        if cache_last_channel_len.shape != (batch,):
            raise ShapeMismatchError(f"cache_last_channel_len: expected shape ({batch},), "
                                     f"got {tuple(cache_last_channel_len.shape)}")
        names = graph.interface.encoder_inputs
        feeds = {
            names[0]: np.ascontiguousarray(mel, np.float32), names[1]: np.asarray(length, np.int64),
            names[2]: np.ascontiguousarray(cache_last_channel, np.float32),
            names[3]: np.ascontiguousarray(cache_last_time, np.float32),
            names[4]: np.asarray(cache_last_channel_len, np.int64),
        }
        if graph.interface.speaker_masks:
            if speaker_masks is None:
                raise SpeakerMaskError(f"{graph.path.name}: this graph takes {names[5]} and {names[6]}; none were given")
            frames = self.streaming_config(context).layer_input_frames(mel.shape[-1], 0 if first else None)
            for name, mask in zip(names[5:], speaker_masks):
                if mask.shape != (batch, frames):
                    raise ShapeMismatchError(f"{name}: expected shape ({batch}, {frames}) (the chunk's encoder "
                                             f"frames), got {tuple(mask.shape)}")
                feeds[name] = np.ascontiguousarray(mask, np.float32)
        elif speaker_masks is not None:
            raise SpeakerMaskError(f"{graph.path.name}: this graph has no speaker-mask inputs")
        out = graph.run(feeds)
        canonical = ENCODER_OUTPUTS  # NeMo's names, whatever the graph calls them
        return {**{name: value for name, value in out.items() if name not in graph.interface.encoder_outputs},
                **{role: out[name] for role, name in zip(canonical, graph.interface.encoder_outputs)}}

    def _speaker_masks(self, context: Sequence[int], chunk: Chunk,
                       speaker_masks: SpeakerTargets | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The step's masks reconciled with the chunk's frames, as NeMo's ``solve_length_mismatch`` would."""
        if not self.info.multitalker:
            return None
        later = [i for i in self.info.speaker_kernel_layers if i > 0]
        if (speaker_masks is None or speaker_masks.target is None) and later:
            raise SpeakerMaskError(
                f"onnx: without target-speaker masks NeMo skips the speaker kernels of layers {later} (its "
                f"post-hooks return early) but still applies layer 0's; the exported graph always applies "
                f"them all, so give explicit masks (SpeakerTargets.single_speaker for NeMo's single-speaker mode)")
        frames = self.streaming_config(context).layer_input_frames(chunk.mel.shape[-1], chunk.drop_extra_pre_encoded)
        return reconciled_pair(speaker_masks, frames, chunk.mel.shape[0])

    def _to_graph_layout(self, array: np.ndarray) -> np.ndarray:
        return np.swapaxes(array, 0, 1) if self.cache_layout == "batch-first" else array

    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks: SpeakerTargets | None = None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        self.check_speaker_masks(speaker_masks, chunk.mel.shape[0])
        context = state.att_context_size
        streaming = self.streaming_config(context)
        streaming.check_chunk(chunk, self.name)
        # NeMo's plain first chunk keeps every pre-encoded frame and has no cache prefix: its own graph. Every
        # other chunk (and pad-and-drop's first) drops what the steady graph bakes in.
        first = chunk.is_first and chunk.drop_extra_pre_encoded == 0 and chunk.cache_frames == 0
        if not first and chunk.drop_extra_pre_encoded != streaming.drop_extra_pre_encoded:
            raise ValueError(f"onnx: chunk {chunk.index} drops {chunk.drop_extra_pre_encoded} pre-encoded frames, "
                             f"the graph bakes {streaming.drop_extra_pre_encoded}")
        self.info.check_state(state)  # canonical layers-first shapes
        started = time.perf_counter()
        masks = self._speaker_masks(context, chunk, speaker_masks)
        out = self.run_encoder(context, chunk.mel, chunk.length, self._to_graph_layout(state.cache_last_channel),
                               self._to_graph_layout(state.cache_last_time), state.cache_last_channel_len, masks,
                               first=first)
        encoded, encoded_len = out["outputs"], out["encoded_lengths"].astype(np.int64)
        decoded_from = self.run_prompt(encoded, state.prompt)  # what the decoder, joint and CTC head read
        decoders, emitted, decoder_taps, joint_taps = [], [], [], []
        if forced_decisions is not None and len(state.decoder) != 1:
            raise ValueError(f"onnx: teacher forcing runs batch 1, not {len(state.decoder)}")
        for index, previous in enumerate(state.decoder):
            decoded = self._greedy(decoded_from[index], int(encoded_len[index]), previous,
                                   ForcedDecisions(forced_decisions, self.name))
            decoders.append(decoded[0])
            emitted.append(decoded[1])
            decoder_taps.extend(decoded[2])
            joint_taps.extend(decoded[3])
        ctc = None if self.ctc_graph is None else self._run_ctc(decoded_from, encoded_len,
                                                                self.info.ctc_labels_before(state))
        seconds = time.perf_counter() - started
        taps = {name: out[name] for name in self._encoder(context, first=first).taps}
        taps[TAP_ENCODER] = encoded
        if self.info.prompted:
            taps[TAP_PROMPT] = decoded_from
        taps[TAP_DECODER] = (np.concatenate(decoder_taps, axis=0) if decoder_taps
                             else np.zeros((0, self.info.pred_hidden), np.float32))
        taps[TAP_JOINT] = (np.concatenate(joint_taps, axis=0) if joint_taps
                           else np.zeros((0, len(self.vocabulary) + 1), np.float32))
        if not self.decoder_joint.taps:
            del taps[TAP_DECODER]  # only the debug decoder_joint exposes the prediction-net output
        if ctc is not None:
            taps[TAP_CTC] = ctc[0]
        new_state = replace(
            state,
            cache_last_channel=self._to_graph_layout(out["cache_last_channel_next"]).copy(),
            cache_last_time=self._to_graph_layout(out["cache_last_time_next"]).copy(),
            cache_last_channel_len=out["cache_last_channel_next_len"].astype(np.int64),
            decoder=decoders, step_index=state.step_index + 1, native=None,
            ctc_last_label=None if ctc is None else ctc[2], prompt=state.prompt)
        return StepOutput(encoded=encoded, encoded_len=encoded_len, state=new_state, tokens=emitted, taps=taps,
                          seconds=seconds, ctc_tokens=None if ctc is None else ctc[1])

    def _greedy(self, encoded: np.ndarray, length: int, state: DecoderState, forced: ForcedDecisions):
        """NeMo's GreedyRNNTInfer loop over ``encoded`` ``[D, T]`` continuing ``state``."""
        blank = self.info.blank_id
        h, c, last = state.h, state.c, int(state.last_token)
        tokens, emitted, decoder_taps, joint_taps = list(state.tokens), [], [], []
        targets = np.zeros((1, 1), self._targets_dtype)
        names, outputs = self.interface.decoder_joint_inputs, self.interface.decoder_joint_outputs
        feeds = {names[1]: targets}
        if self.interface.target_length:
            feeds["target_length"] = np.ones((1,), self._targets_dtype)
        frame_first = self.interface.encoder_frame_layout == "BTD"
        for t in range(length):
            frame = encoded[None, :, t:t + 1]
            feeds[names[0]] = np.ascontiguousarray(frame.transpose(0, 2, 1) if frame_first else frame, np.float32)
            symbols = 0
            while self._max_symbols is None or symbols < self._max_symbols:
                targets[0, 0] = last
                feeds[names[-2]], feeds[names[-1]] = h, c
                out = self.decoder_joint.run(feeds)
                logits = out[outputs[0]].reshape(-1)
                joint_taps.append(logits[None].astype(np.float32))
                if TAP_DECODER in out:
                    decoder_taps.append(out[TAP_DECODER].reshape(-1, self.info.pred_hidden))
                label = forced.choose(int(np.argmax(logits)))  # argmax of logits = argmax of NeMo's log-softmax
                if label == blank:
                    break
                tokens.append(label)
                emitted.append(label)
                h, c, last = out[outputs[2]], out[outputs[3]], label
                symbols += 1
        forced.finish()
        return DecoderState(last_token=last, h=h, c=c, tokens=tokens), emitted, decoder_taps, joint_taps

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks: SpeakerTargets | None = None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        raise NotImplementedError("the ONNX export holds streaming (cache-aware) encoder graphs only; "
                                  "compare ONNX against NeMo streaming, not offline")

    def int8_graph_paths(self) -> list[Path]:
        """The int8 graphs this backend runs: this project's export: every lookahead's encoder, ``decoder_joint``
        and a prompt graph; a peer's int8 files (sherpa-onnx's ``*.int8.onnx``: encoder, decoder, joiner)."""
        return list(self.described.int8_graphs)

    def int8_quantization(self) -> Int8Quantization | None:
        """The export's recorded scheme (``int8_quantization`` in the int8 graphs' metadata); an export written
        before the scheme was recorded, or a peer's files, are read from their weights
        (``streaming_parity.backends.onnx.quantization``)."""
        if self.dtype != "int8":
            return None
        if self._int8_quantization is None:
            from streaming_parity.backends.onnx.quantization import read_quantization

            recorded = self.described.int8_quantization
            self._int8_quantization = (
                Int8Quantization.from_dict(recorded, f"{decoder_joint_file('int8')} metadata") if recorded
                else read_quantization(self.int8_graph_paths()))
        return self._int8_quantization

    def notes(self) -> list[str]:
        """What the reader said about the directory, the int8 scheme, and (where taps were looked for by graph
        surgery) the taps that could not be found."""
        scheme = self.int8_quantization()
        lines = list(self.described.notes)
        lines += [f"int8: {scheme.describe()} (read from {scheme.read_from})"] if scheme else []
        unavailable = self.described.unavailable_taps
        if unavailable is not None:
            lines.append("taps unavailable: " + ("none" if not unavailable else "; ".join(
                f"{tap} ({reason})" for tap, reason in unavailable.items())))
        return lines

    def close(self) -> None:
        self._encoders.clear()
        self.decoder_joint = None
        self.ctc_graph = None
        self.prompt_graph = None

"""Reference recordings: the reference streamed once, written to disk, and judged against anywhere.

A recording holds everything a verdict needs from the reference, for every utterance, lookahead and
first-chunk mode it was made with: the audio and the reference's mel, every tap and both caches at
every step, the decoder state, the tokens (and a hybrid's CTC labels), the step timings, and the
offline forward. Candidates are then compared against it exactly as against a live reference
(``streaming_parity.judge.loop.stream_and_compare`` takes a ``Recording`` in place of the backend):
the same tie classification and teacher forcing (which needs the reference's decisions only, read
from its joint tap), the same streaming~offline comparisons, the same results. Neither torch nor
NeMo is imported here: a recording made on one machine judges an artifact on another (Polygraphy's
``--save-outputs`` / ``--load-outputs``).

Format (``SCHEMA``): a directory with ``recording.json`` (the manifest: model, plan, provenance, each
run's tokens and timings, and the sha256 and size of every shard) and safetensors shards: one for the
utterances (audio, mel), one per streamed run, one per offline forward, one for a prompt kernel.

Compact and lossless: NeMo's caches move by a shift plus new frames (``cache_last_channel`` keeps the
last ``C`` encoder-layer inputs along its frame axis, ``cache_last_time`` the last ``K - 1`` conv inputs
along its last axis), so a step stores the frames that entered and the shift, checked on writing to
rebuild the cache bit for bit; a step where no shift does is stored whole. A decoder state no label changed
(the prediction network only steps on a label) is the step before's, and stored once. NeMo's offline forward
and its plain-mode stream at the same lookahead compute the same layer outputs to a few units in the last
place (the streamed caches give each chunk the left context the offline chunked_limited mask gives it; at
[70,0] the first chunk's zero pre-encode cache makes them differ more, ``docs/nemo-findings.md``), so an offline
forward's layer taps are stored as their residual from the streamed run's (``packed_tensors.prediction_residual``):
at full size a fifth of their packed size, and exact whatever the difference.

A recording is untrusted input: a shard whose size or sha256 differs from the manifest, a manifest
from a newer schema, or a plan a caller asks for that it does not hold is refused with one line
(``RecordingError``, exit status 2).
"""

from __future__ import annotations

import bisect
import datetime as _dt
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.core.errors import UnsafeArtifact
from streaming_parity.core.packed_tensors import (
    PackedReader,
    PackedTensorError,
    add_residual,
    prediction_residual,
    save_packed,
)
from streaming_parity.interface.backend import Backend, Capabilities
from streaming_parity.interface.chunking import Chunk, ChunkSchedule, FirstChunkMode, StreamingConfig
from streaming_parity.interface.driver import iter_steps
from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.taps import TAP_ENCODER, TAP_LAYERS, tap_kind
from streaming_parity.interface.types import DecoderState, OfflineOutput, StepOutput, StreamingState
from streaming_parity.interface.utterance import Utterance

# 2: shards are packed (``streaming_parity.core.packed_tensors``) and an encoder output equal to the ``encoder``
# tap is stored once. 3: a decoder state a step did not change is not stored again, and an offline forward's
# layer taps are stored as residuals from the plain-mode run at its lookahead. Schemas 1 (plain safetensors) and 2
# are still read; a harness that reads only 2 refuses 3 rather than read residuals as taps.
SCHEMA = 3
KIND = "streaming-parity reference recording"
MANIFEST = "recording.json"
UTTERANCES_SHARD = "utterances.safetensors"
PROMPT_SHARD = "prompt_kernel.safetensors"
# Caches that move by a shift plus new frames, and the axis they move along (interface.types).
SHIFTED_CACHES = {"cache_last_channel": 2, "cache_last_time": 3}

Context = tuple[int, int]


class RecordingError(UnsafeArtifact):
    """A recording that cannot be trusted, or cannot serve what it was asked for."""


def _context_key(context: Sequence[int]) -> str:
    return f"{int(context[0])},{int(context[1])}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _save(path: Path, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    staged = path.with_name(path.name + ".tmp")
    save_packed(staged, tensors)
    staged.replace(path)
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _same(a: np.ndarray, b: np.ndarray | None) -> bool:
    """Bit for bit the same tensor (NaNs included): one of them is then stored for both."""
    return b is not None and a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def _last_layer(taps: Mapping[str, np.ndarray]) -> str | None:
    layers = [name for name in taps if tap_kind(name) == TAP_LAYERS]
    return max(layers, key=lambda name: int(name.split(".", 1)[1])) if layers else None


def _encoder_from_layer(layer: np.ndarray, frames: int) -> np.ndarray:
    """The encoder output as the last layer's output ``[B, T, D]`` makes it: ``[B, D, T]``, its valid frames."""
    return np.ascontiguousarray(np.swapaxes(layer, 1, 2)[..., :frames])


def _stored_taps(taps: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """The taps to store, and the ones derived from another: NeMo's encoder output is its last layer's output,
    transposed and cut to the valid frames (``ConformerEncoder.forward_internal``); where it is that bit for bit,
    it is stored once."""
    stored, derived = dict(taps), {}
    encoder, last = taps.get(TAP_ENCODER), _last_layer(taps)
    if encoder is not None and last is not None and taps[last].ndim == 3 and encoder.ndim == 3 \
            and encoder.shape[-1] <= taps[last].shape[1] \
            and _same(encoder, _encoder_from_layer(taps[last], encoder.shape[-1])):
        del stored[TAP_ENCODER]
        derived[TAP_ENCODER] = [last, int(encoder.shape[-1])]
    return stored, derived


def _read_taps(tensors: Mapping[str, np.ndarray], entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    derived = entry.get("derived_taps") or {}
    taps = {name: tensors[f"tap/{name}"] for name in entry["taps"] if name not in derived}
    for name, (source, frames) in derived.items():
        taps[name] = _encoder_from_layer(tensors[f"tap/{source}"], int(frames))
    return {name: taps[name] for name in entry["taps"]}


# -- caches as shift + new frames ---------------------------------------------------------------------------

def cache_delta(previous: np.ndarray | None, current: np.ndarray, axis: int,
                hint: int | None = None) -> tuple[int, np.ndarray] | None:
    """``(shift, new)`` such that ``current`` is ``previous`` moved ``shift`` frames along ``axis`` with the
    ``new`` frames appended, bit for bit (NaNs included); None when no shift rebuilds it (store it whole)."""
    if previous is None or previous.shape != current.shape or previous.dtype != current.dtype:
        return None
    size = current.shape[axis]
    candidates = ([hint] if hint is not None and 0 <= hint <= size else []) + list(range(size + 1))
    for shift in dict.fromkeys(candidates):
        kept = np.take(previous, range(shift, size), axis=axis)
        if np.array_equal(kept, np.take(current, range(0, size - shift), axis=axis), equal_nan=True):
            return shift, np.take(current, range(size - shift, size), axis=axis)
    return None


def apply_delta(previous: np.ndarray, shift: int, new: np.ndarray, axis: int) -> np.ndarray:
    size = previous.shape[axis]
    return np.concatenate([np.take(previous, range(shift, size), axis=axis), new], axis=axis)


def pack_caches(caches: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray] | None,
                hint: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, int | None]]:
    """A step's caches as stored: ``cache_new/NAME`` (the frames that entered since ``previous``, the step before's
    caches) where a shift rebuilds the cache bit for bit, else ``cache/NAME`` whole (``previous`` None: all whole);
    and each cache's shift (None: whole). A recording and the spool store caches so (``unpack_caches``)."""
    tensors: dict[str, np.ndarray] = {}
    shifts: dict[str, int | None] = {}
    for name, value in caches.items():
        axis = SHIFTED_CACHES.get(name)
        delta = None if previous is None or axis is None else cache_delta(previous.get(name), value, axis, hint=hint)
        if delta is None:
            tensors[f"cache/{name}"], shifts[name] = value, None
        else:
            shifts[name], tensors[f"cache_new/{name}"] = delta
    return tensors, shifts


def unpack_caches(shifts: Mapping[str, int | None], tensors: Mapping[str, np.ndarray],
                  previous: Mapping[str, np.ndarray] | None, where: str) -> dict[str, np.ndarray]:
    """The caches ``pack_caches`` stored, rebuilt from the step before's (``previous``) where stored as new frames."""
    caches = {}
    for name, shift in shifts.items():
        if shift is None:
            caches[name] = tensors[f"cache/{name}"]
        elif previous is None:
            raise RecordingError(f"{where}: {name} is stored as new frames, and the step before was not read")
        else:
            caches[name] = apply_delta(previous[name], shift, tensors[f"cache_new/{name}"], SHIFTED_CACHES[name])
    return caches


# -- writing ------------------------------------------------------------------------------------------------

def _same_decoder(a: DecoderState, b: DecoderState) -> bool:
    return _same(a.h, b.h) and _same(a.c, b.c)


def _step_tensors(index: int, step: StepOutput, previous: StepOutput | None) -> tuple[dict, dict]:
    """A step's tensors (caches as deltas where a shift rebuilds them, a decoder state only where it changed since
    ``previous``, the step before) and its manifest entry."""
    prefix = f"{index}/"
    stored, derived = _stored_taps(step.taps)
    tensors = {f"{prefix}tap/{name}": value for name, value in stored.items()}
    encoded_is_tap = _same(step.encoded, step.taps.get(TAP_ENCODER))
    if not encoded_is_tap:
        tensors[f"{prefix}encoded"] = step.encoded
    tensors[f"{prefix}encoded_len"] = step.encoded_len
    caches, shifts = pack_caches(step.state.caches(), None if previous is None else previous.state.caches(),
                                 hint=int(step.encoded_len[0]))
    tensors.update({f"{prefix}{key}": value for key, value in caches.items()})
    before = [] if previous is None else previous.state.decoder
    decoders = []
    for batch, decoder in enumerate(step.state.decoder):
        as_before = batch < len(before) and _same_decoder(decoder, before[batch])
        if not as_before:
            tensors[f"{prefix}decoder/{batch}/h"], tensors[f"{prefix}decoder/{batch}/c"] = decoder.h, decoder.c
        decoders.append({"last_token": decoder.last_token, "tokens": decoder.tokens, "as_before": as_before})
    # safetensors sorts its keys: the taps' order (model order, the order a comparison lists them) is kept here.
    entry = {"taps": list(step.taps), "tokens": step.tokens, "ctc_tokens": step.ctc_tokens, "seconds": step.seconds,
             "step_index": step.state.step_index, "ctc_last_label": step.state.ctc_last_label,
             "prompt": step.state.prompt, "cache_shift": shifts, "encoded_is_encoder_tap": encoded_is_tap,
             "derived_taps": derived, "decoder": decoders}
    return tensors, entry


# A run is written in parts of about this many (raw) bytes, so that recording holds one part in memory, not the
# run: at full size a 67 s stream's run is about 1 GB raw (docs/recordings.md).
RUN_PART_BYTES = 128 << 20

# The offline forwards a recording can keep: over the whole streamed mel tensor (what the comparison loop runs,
# ``streaming_parity.judge.loop``) and over the front end's length (the frame past it masked; what a suite may ask
# a reference backend for).
OFFLINE_LENGTHS = ("tensor", "front-end")


def write_recording(reference: Backend, utterances: Sequence[Utterance], contexts: Sequence[Sequence[int]],
                    out: str | Path, *, model: Mapping[str, Any],
                    modes: Sequence[str] | Mapping[Context, Sequence[str]] = ("plain", "pad-and-drop"),
                    offline: bool | Sequence[Sequence[int]] = True, offline_lengths: Sequence[str] = OFFLINE_LENGTHS,
                    provenance: Mapping[str, Any] | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Stream every utterance at every lookahead and first-chunk mode through ``reference`` and write the
    recording to ``out`` (a new or empty directory). ``model``: the checkpoint's record (``name``,
    ``sha256``, ``config``: its NeMo config as a plain mapping, ``vocabulary``, ``max_symbols``).

    ``modes``: the first-chunk modes streamed at every lookahead, or per lookahead (a mapping). ``offline``: whether
    the offline forward is kept, at every lookahead or at the ones listed; ``offline_lengths``: over which mel
    lengths (``OFFLINE_LENGTHS``). A recording holds what a comparison will ask of it, no more: at full size each
    run is about 0.2 GB per minute of audio (``docs/recordings.md``)."""
    say = progress or (lambda _text: None)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecordingError(f"{out}: not empty; a recording is written to a new directory")
    contexts = [(int(c[0]), int(c[1])) for c in contexts]
    modes_at = _modes_by_context(modes, contexts)
    offline_at = (set(contexts) if offline is True else set() if offline is False
                  else {(int(c[0]), int(c[1])) for c in offline})
    if offline_at - set(contexts):
        raise RecordingError(f"offline forwards asked at {sorted(offline_at - set(contexts))}, lookaheads not recorded")
    unknown = set(offline_lengths) - set(OFFLINE_LENGTHS)
    if unknown or not offline_lengths:
        raise RecordingError(f"offline lengths {sorted(unknown) or '(none)'}: choose from {', '.join(OFFLINE_LENGTHS)}")
    out.mkdir(parents=True, exist_ok=True)
    info = reference.info
    for utterance in utterances:
        if utterance.speaker_targets is not None:
            raise RecordingError(f"{utterance.name}: utterances with their own speaker targets are not recorded")
    shards: dict[str, dict[str, Any]] = {}
    runs, offline_entries, utterance_entries = [], [], []
    audio_tensors: dict[str, np.ndarray] = {}
    for utterance in utterances:
        mel, mel_length = reference.features(utterance.audio[None])
        audio = np.asarray(utterance.audio, np.float32)
        audio_tensors[f"{utterance.name}/audio"], audio_tensors[f"{utterance.name}/mel"] = audio, mel
        utterance_entries.append({"name": utterance.name, "text": utterance.text, "prompt": utterance.prompt,
                                  "samples": int(audio.shape[-1]), "mel_length": int(mel_length[0]),
                                  "audio_sha256": hashlib.sha256(audio.tobytes()).hexdigest()})
        masks = utterance.speaker_masks_for(reference)
        prompt = utterance.prompt_for(info)
        for context in contexts:
            for mode in modes_at[context]:
                say(f"recording {utterance.name} [{context[0]},{context[1]}] {mode}")
                steps = iter_steps(reference, mel, context, mode, speaker_masks=masks, prompt=prompt)
                runs.append({"utterance": utterance.name, "context": list(context), "mode": mode,
                             **_write_run(steps, out, f"run-{len(runs):04d}", shards)})
            lengths = {"tensor": mel.shape[-1], "front-end": int(mel_length[0])}
            for length in dict.fromkeys(lengths[n] for n in offline_lengths) if context in offline_at else ():
                say(f"recording {utterance.name} [{context[0]},{context[1]}] offline, {length} frames")
                output = reference.offline(mel, np.array([length] * mel.shape[0]), context,
                                           speaker_masks=masks, prompt=prompt)
                shard = f"offline-{len(offline_entries):04d}.safetensors"
                stored, derived = _stored_taps(output.taps)
                plain = next((index for index, run in enumerate(runs) if run["utterance"] == utterance.name
                              and tuple(run["context"]) == context and run["mode"] == FirstChunkMode.PLAIN.value),
                             None)
                residuals = {} if plain is None else _residuals_from_run(stored, runs[plain], out)
                tensors = {f"tap/{name}": value for name, value in stored.items() if name not in residuals}
                tensors.update({f"residual/tap/{name}": value for name, value in residuals.items()})
                encoded_is_tap = _same(output.encoded, output.taps.get(TAP_ENCODER))
                if not encoded_is_tap:
                    tensors["encoded"] = output.encoded
                tensors["encoded_len"] = output.encoded_len
                shards[shard] = _save(out / shard, tensors)
                offline_entries.append({"utterance": utterance.name, "context": list(context), "length": length,
                                        "shard": shard, "taps": list(output.taps), "tokens": output.tokens,
                                        "ctc_tokens": output.ctc_tokens, "encoded_is_encoder_tap": encoded_is_tap,
                                        "derived_taps": derived,
                                        "residual_taps": {"run": plain, "taps": list(residuals)} if residuals
                                        else None})
    shards[UTTERANCES_SHARD] = _save(out / UTTERANCES_SHARD, audio_tensors)
    if info.prompted:
        kernel = reference.prompt_kernel()
        shards[PROMPT_SHARD] = _save(out / PROMPT_SHARD, asdict(kernel))
    manifest = {
        "kind": KIND, "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "reference": {"backend": reference.name, "dtype": reference.dtype},
        "model": dict(model),
        "provenance": dict(provenance or {}),
        "plan": {"contexts": [list(c) for c in contexts],
                 "modes": list(dict.fromkeys(m for c in contexts for m in modes_at[c])),
                 "modes_by_lookahead": {_context_key(c): modes_at[c] for c in contexts},
                 "offline": bool(offline_at), "offline_lookaheads": [list(c) for c in contexts if c in offline_at],
                 "offline_lengths": list(offline_lengths),
                 "streaming_configs": {_context_key(c): _plain(asdict(reference.streaming_config(c)))
                                       for c in contexts}},
        "utterances": utterance_entries, "runs": runs, "offline": offline_entries, "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _write_run(steps: Iterator[StepOutput], out: Path, stem: str, shards: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write a streamed run in parts of about ``RUN_PART_BYTES`` (``stem-NNN.safetensors``; memory holds one part,
    not the run) into ``out``, each part's record into ``shards``; the run's manifest entry (its parts, the first
    step of each, and every step's entry)."""
    parts: list[str] = []
    starts: list[int] = []
    entries: list[dict[str, Any]] = []
    tensors: dict[str, np.ndarray] = {}
    previous: StepOutput | None = None

    def write_part(first_step: int) -> None:
        part = f"{stem}-{len(parts):03d}.safetensors"
        shards[part] = _save(out / part, tensors)
        parts.append(part)
        starts.append(first_step)
        tensors.clear()

    first_step = 0
    for index, step in enumerate(steps):
        if not tensors:
            first_step = index
        step_tensors, entry = _step_tensors(index, step, previous)
        tensors.update(step_tensors)
        entries.append(entry)
        previous = step
        if sum(value.nbytes for value in tensors.values()) >= RUN_PART_BYTES:
            write_part(first_step)
    if tensors or not parts:
        write_part(first_step)
    return {"shards": parts, "shard_starts": starts, "steps": entries}


def _part_of(entry: Mapping[str, Any], shards: Sequence[_Shard], step: int) -> _Shard:
    """The part of a run (``shards``, its manifest ``entry``) that holds ``step``; the others closed."""
    starts = entry.get("shard_starts") or [0]
    part = shards[bisect.bisect_right(starts, step) - 1]
    for other in shards:
        if other is not part:
            other.close()
    return part


def _streamed_tap(run: Mapping[str, Any], directory: Path, name: str) -> np.ndarray:
    """A recorded run's (its manifest entry's) tap ``name``, step after step, joined along the frame axis, as stored:
    what an offline forward's layer taps are stored against, by the writer and the reader alike. One tap at a time,
    so that no more than one layer's frames are held beside the offline forward's."""
    shards = [_Shard(directory / shard) for shard in _run_shards(run)]
    frames = []
    for index, step in enumerate(run["steps"]):
        if name not in step["taps"] or name in (step.get("derived_taps") or {}):
            raise RecordingError(f"{name}: not stored at step {index} of the run it is predicted from")
        frames += _part_of(run, shards, index).read(f"{index}/tap/{name}")
    for shard in shards:
        shard.close()
    return np.concatenate(frames, axis=1)


def _prediction(streamed: np.ndarray, shape: Sequence[int], dtype: np.dtype) -> np.ndarray | None:
    """The streamed frames of a layer tap ``[B, T, D]`` cut or zero-padded to the offline forward's ``shape``; None
    when the two cannot be laid over each other (another batch, width or dtype)."""
    if streamed.ndim != 3 or len(shape) != 3 or streamed.dtype != dtype \
            or streamed.shape[0] != shape[0] or streamed.shape[2] != shape[2]:
        return None
    prediction = np.zeros(shape, dtype)
    frames = min(streamed.shape[1], shape[1])
    prediction[:, :frames] = streamed[:, :frames]
    return prediction


def _residuals_from_run(taps: Mapping[str, np.ndarray], run: Mapping[str, Any], directory: Path) -> dict[str, np.ndarray]:
    """The offline forward's layer taps that the plain-mode ``run`` at its lookahead predicts, as residuals from it.
    (The ``pre_encode`` tap is not: a streamed step's holds the pre-encode cache's frames too.)"""
    residuals = {}
    for name, value in taps.items():
        if tap_kind(name) != TAP_LAYERS or value.dtype.kind != "f":
            continue
        prediction = _prediction(_streamed_tap(run, directory, name), value.shape, value.dtype)
        if prediction is not None:
            residuals[name] = prediction_residual(value, prediction)
    return residuals


def _taps_from_residuals(tensors: dict[str, np.ndarray], entry: Mapping[str, Any], runs: Sequence[Mapping[str, Any]],
                         directory: Path) -> None:
    """Put back, in ``tensors`` (an offline shard's), the layer taps stored as residuals from a run."""
    stored = entry.get("residual_taps")
    if not stored:
        return
    index = stored.get("run")
    if not isinstance(index, int) or not 0 <= index < len(runs):
        raise RecordingError(f"{entry['shard']}: residual taps of run {index!r}; the recording has {len(runs)} runs")
    for name in stored["taps"]:
        residual = tensors.pop(f"residual/tap/{name}", None)
        if residual is None:
            raise RecordingError(f"{entry['shard']}: residual/tap/{name} listed, not stored")
        streamed = _streamed_tap(runs[index], directory, name)
        prediction = _prediction(streamed, residual.shape, streamed.dtype)
        if prediction is None:
            raise RecordingError(f"{entry['shard']}: residual/tap/{name} {list(residual.shape)} does not lie over "
                                 f"run {index}'s {name} {list(streamed.shape)}")
        try:
            tensors[f"tap/{name}"] = add_residual(residual, prediction)
        except PackedTensorError as error:
            raise RecordingError(f"{entry['shard']}: tap/{name}: {error}") from None


def _modes_by_context(modes: Sequence[str] | Mapping[Context, Sequence[str]],
                      contexts: Sequence[Context]) -> dict[Context, list[str]]:
    if isinstance(modes, Mapping):
        given = {(int(c[0]), int(c[1])): wanted for c, wanted in modes.items()}
        if set(given) != set(contexts):
            raise RecordingError(f"first-chunk modes given for lookaheads {sorted(given)}, recorded: {sorted(contexts)}")
    else:
        given = dict.fromkeys(contexts, modes)
    chosen = {c: list(dict.fromkeys(FirstChunkMode(m).value for m in given[c])) for c in contexts}
    if not all(chosen.values()):
        raise RecordingError("every recorded lookahead streams at least one first-chunk mode")
    return chosen


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# -- reading ------------------------------------------------------------------------------------------------

class _Shard:
    """One shard, read tensor by tensor (``streaming_parity.core.packed_tensors``; a schema-1 shard is plain
    safetensors)."""

    def __init__(self, path: Path):
        self.path = path
        self._reader: PackedReader | None = None
        self._by_step: dict[str, list[str]] | None = None

    def _open(self) -> PackedReader:
        # Opened once and kept: a comparison reads a run step by step, and a shard's header lists every tensor.
        if self._reader is None:
            try:
                self._reader = PackedReader(self.path)
            except PackedTensorError as error:
                raise RecordingError(str(error)) from None
        return self._reader

    def close(self) -> None:
        """Let the file go: safetensors maps it into memory, and every page a comparison read stays resident (and in
        the process's RSS) while it is open. Reading again opens it again."""
        self._reader = None
        self._by_step = None

    def read(self, *names: str) -> list[np.ndarray]:
        reader = self._open()
        return [_inflated(reader, name) for name in names]

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """The tensors under ``prefix`` (a step's ``N/``, or ``""`` for all), without it."""
        reader = self._open()
        if not prefix:
            return {key: _inflated(reader, key) for key in reader.keys()}
        if self._by_step is None:
            self._by_step = {}
            for key in reader.keys():
                head, _, _ = key.partition("/")
                self._by_step.setdefault(head + "/", []).append(key)
        return {key[len(prefix):]: _inflated(reader, key) for key in self._by_step.get(prefix, [])}


def _inflated(reader: PackedReader, name: str) -> np.ndarray:
    try:
        return reader.get(name)
    except PackedTensorError as error:
        raise RecordingError(str(error)) from None


def _encoded(taps: Mapping[str, np.ndarray], tensors: Mapping[str, np.ndarray], entry: Mapping[str, Any]) -> np.ndarray:
    """The encoder output of a step or offline forward: stored once with the ``encoder`` tap when they are equal."""
    return taps[TAP_ENCODER] if entry.get("encoded_is_encoder_tap") else tensors["encoded"]


def _run_shards(entry: Mapping[str, Any]) -> list[str]:
    """The shards of a run (its parts, in step order) or of an offline forward."""
    if "shards" in entry:
        if not isinstance(entry["shards"], list) or not entry["shards"]:
            raise RecordingError(f"a run lists no shards ({entry.get('shards')!r})")
        return list(entry["shards"])
    return [entry.get("shard")]


class RecordedSteps(Sequence):
    """The steps of a recorded run, rebuilt from the shard on access (caches from their deltas). Sequential
    access, as a comparison reads them, rebuilds each step from the one before."""

    def __init__(self, run: RecordedRun):
        self.run = run
        self._last: tuple[int, dict[str, np.ndarray], StepOutput] | None = None

    def __len__(self) -> int:
        return len(self.run.entry["steps"])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"step {index} of a run with {len(self)} steps")
        index %= len(self)
        if self._last is not None and self._last[0] == index:
            return self._last[2]
        start, carried = (0, {}) if self._last is None or self._last[0] > index else (self._last[0] + 1, self._last[1])
        for position in range(start, index + 1):
            tensors = self.run.shard_of(position).tensors(f"{position}/")
            carried = self._carried(position, tensors, carried)
        step = self._step(index, tensors, carried)
        self._last = (index, carried, step)
        return step

    def _carried(self, index: int, tensors: Mapping[str, np.ndarray],
                 previous: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What a step takes from the step before: its caches (stored as the frames that entered) and its decoder
        states (stored only where they changed), by their tensor names."""
        entry, where = self.run.entry["steps"][index], f"{self.run.shard_of(index).path} step {index}"
        carried = unpack_caches(entry["cache_shift"], tensors, previous or None, where)
        for batch, decoder in enumerate(entry["decoder"]):
            for part in ("h", "c"):
                name = f"decoder/{batch}/{part}"
                if not decoder.get("as_before"):
                    carried[name] = tensors[name]
                elif name not in previous:
                    raise RecordingError(f"{where}: {name} is stored as the step before's, and the step before was "
                                         f"not read")
                else:
                    carried[name] = previous[name]
        return carried

    def _step(self, index: int, tensors: Mapping[str, np.ndarray], carried: Mapping[str, np.ndarray]) -> StepOutput:
        entry = self.run.entry["steps"][index]
        decoders = [DecoderState(last_token=int(d["last_token"]), h=carried[f"decoder/{b}/h"],
                                 c=carried[f"decoder/{b}/c"], tokens=[int(t) for t in d["tokens"]])
                    for b, d in enumerate(entry["decoder"])]
        caches = {name: carried[name] for name in entry["cache_shift"]}
        state = StreamingState(att_context_size=self.run.att_context_size, decoder=decoders,
                               step_index=int(entry["step_index"]), ctc_last_label=entry["ctc_last_label"],
                               prompt=entry["prompt"], **caches)
        taps = _read_taps(tensors, entry)
        ctc = entry["ctc_tokens"]
        return StepOutput(encoded=_encoded(taps, tensors, entry), encoded_len=tensors["encoded_len"], state=state,
                          tokens=[[int(t) for t in row] for row in entry["tokens"]], taps=taps,
                          seconds=float(entry["seconds"]),
                          ctc_tokens=None if ctc is None else [[int(t) for t in row] for row in ctc])


@dataclass
class RecordedRun:
    """A reference run read from a recording: what ``compare_runs`` reads from a ``StreamRun``."""

    backend: str
    dtype: str
    att_context_size: tuple[int, int]
    mode: str
    entry: dict[str, Any] = field(repr=False)
    shards: list[_Shard] = field(repr=False)
    features: np.ndarray | None = field(default=None, repr=False)

    def shard_of(self, step: int) -> _Shard:
        """The part of the run that holds ``step`` (a schema-2 run is written in parts; earlier ones in one). The
        other parts are let go: a run is read step after step, so one part's pages are resident at a time, not the
        run's (a [70,0] run is 241 MB at full size)."""
        return _part_of(self.entry, self.shards, step)

    @functools.cached_property
    def steps(self) -> RecordedSteps:
        # One reader per run: a comparison reads steps in order, each rebuilt from the one before.
        return RecordedSteps(self)

    def release(self) -> None:
        """Close the run's shards and drop the step last read, once a comparison is done with the run: a recording
        is memory-mapped, and a run left open keeps every page read of it resident (at full size a night's runs
        are 1 GB). The run reads again as before, its shards reopened."""
        for shard in self.shards:
            shard.close()
        self.__dict__.pop("steps", None)

    @property
    def step_tokens(self) -> list[list[int]]:
        return [[int(t) for t in step["tokens"][0]] for step in self.entry["steps"]]

    @property
    def tokens(self) -> list[int]:
        return [t for step in self.step_tokens for t in step]

    @property
    def ctc_tokens(self) -> list[int] | None:
        rows = [step["ctc_tokens"] for step in self.entry["steps"]]
        if not rows or any(row is None for row in rows):
            return None
        return [int(t) for row in rows for t in row[0]]

    @property
    def step_seconds(self) -> list[float]:
        return [float(step["seconds"]) for step in self.entry["steps"]]

    @property
    def encoded(self) -> np.ndarray:
        """The streamed encoder output, its valid frames, step after step: only the tensors it is stored in are read
        (the step's own, or the ``encoder`` tap, or the last layer it is derived from), not the steps' caches."""
        parts = []
        for index, step in enumerate(self.entry["steps"]):
            derived = (step.get("derived_taps") or {}).get(TAP_ENCODER)
            stored = f"{index}/encoded" if not step.get("encoded_is_encoder_tap") else \
                f"{index}/tap/{derived[0] if derived else TAP_ENCODER}"
            encoded, length = self.shard_of(index).read(stored, f"{index}/encoded_len")
            if step.get("encoded_is_encoder_tap") and derived:
                encoded = _encoder_from_layer(encoded, int(derived[1]))
            parts.append(encoded[..., : int(length[0])])
        return np.concatenate(parts, axis=-1)

    def step_taps(self, index: int) -> dict[str, np.ndarray]:
        return self.steps[index].taps_and_caches()


class Recording:
    """An opened recording: every shard's size and sha256 checked against the manifest before anything is read.

    It stands in for the reference backend where the loop takes one (``name``, ``dtype``, ``info``,
    ``capabilities``, ``streaming_config``, ``prompt_kernel``); it cannot stream anything new."""

    def __init__(self, directory: str | Path, *, verify: bool = True):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise RecordingError(f"{self.directory}: no {MANIFEST}; not a reference recording")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecordingError(f"{manifest_path}: not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise RecordingError(f"{manifest_path}: not a reference recording (kind {manifest.get('kind')!r})"
                                 if isinstance(manifest, dict) else f"{manifest_path}: not a JSON object")
        schema = manifest.get("schema")
        if not isinstance(schema, int) or schema > SCHEMA:
            raise RecordingError(f"{manifest_path}: schema {schema!r} is newer than this harness reads ({SCHEMA}); "
                                 "upgrade streaming-parity")
        self.manifest = manifest
        if verify:
            self.verify()
        model = manifest["model"]
        info = ModelInfo.from_nemo_config(model["config"], model["vocabulary"])
        if model.get("max_symbols") is not None:
            info = replace(info, max_symbols=int(model["max_symbols"]))
        self.info = info
        self.name = manifest["reference"]["backend"]
        self.dtype = manifest["reference"]["dtype"]
        self._mels: dict[str, np.ndarray] = {}

    def verify(self) -> None:
        """Every shard the manifest names exists with its declared size and sha256; no run points elsewhere."""
        shards = self.manifest.get("shards") or {}
        for name, record in shards.items():
            path = self.directory / name
            if Path(name).name != name or not path.is_file():
                raise RecordingError(f"{self.directory}: shard {name} is missing")
            size = path.stat().st_size
            if size != record.get("bytes"):
                raise RecordingError(f"{path}: {size} bytes, the manifest declares {record.get('bytes')}")
            if _sha256(path) != record.get("sha256"):
                raise RecordingError(f"{path}: sha256 differs from the manifest's; the recording was altered")
        for entry in [*self.manifest.get("runs", []), *self.manifest.get("offline", [])]:
            for name in _run_shards(entry):
                if name not in shards:
                    raise RecordingError(f"{self.directory}: a run points to {name!r}, not a listed shard")

    # -- what the loop reads from a reference -------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        from streaming_parity.interface.registry import get

        return get(self.manifest["reference"]["backend"]).capabilities

    @property
    def contexts(self) -> list[Context]:
        return [(int(c[0]), int(c[1])) for c in self.manifest["plan"]["contexts"]]

    @property
    def modes(self) -> list[str]:
        return list(self.manifest["plan"]["modes"])

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    def streaming_config(self, context: Sequence[int]) -> StreamingConfig:
        recorded = self.manifest["plan"]["streaming_configs"].get(_context_key(context))
        if recorded is None:
            raise RecordingError(f"{self.directory}: no lookahead [{context[0]},{context[1]}] recorded "
                                 f"(recorded: {', '.join(self.manifest['plan']['streaming_configs'])})")
        return StreamingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})

    def check_made_from(self, source_sha256: str | None, what: str) -> None:
        """``what`` (an artifact) must have been made from the recorded checkpoint, when it names its source."""
        if source_sha256 and source_sha256 != self.model["sha256"]:
            raise RecordingError(f"{what} was made from a checkpoint with sha256 {source_sha256[:12]}; the recording "
                                 f"{self.directory} is of {self.model.get('name')} ({self.model['sha256'][:12]})")

    def check_plan(self, backend: Backend, contexts: Sequence[Sequence[int]]) -> None:
        """A tensor-level candidate must cut the stream as the recorded reference did at every lookahead."""
        if not backend.capabilities.tensor_level:
            return
        for context in contexts:
            theirs, ours = backend.streaming_config(context), self.streaming_config(context)
            if theirs != ours:
                raise RecordingError(f"{backend.name}:{backend.dtype} runs another chunk plan at "
                                     f"[{context[0]},{context[1]}] than the recording ({theirs} vs {ours})")

    def prompt_kernel(self) -> PromptKernel | None:
        if PROMPT_SHARD not in self.manifest["shards"]:
            return None
        return PromptKernel(**_Shard(self.directory / PROMPT_SHARD).tensors(""))

    def close(self) -> None:
        pass

    def utterances(self) -> list[Utterance]:
        """The recorded utterances, audio included (a candidate runs its own front end on it)."""
        tensors = _Shard(self.directory / UTTERANCES_SHARD).tensors("")
        return [Utterance(name=u["name"], audio=tensors[f"{u['name']}/audio"], text=u.get("text"),
                          prompt=u.get("prompt")) for u in self.manifest["utterances"]]

    def mel(self, utterance: str) -> np.ndarray:
        """NeMo's mel of a recorded utterance, read once (every run and offline forward of it uses it)."""
        if utterance not in self._mels:
            self._mels[utterance] = _Shard(self.directory / UTTERANCES_SHARD).read(f"{utterance}/mel")[0]
        return self._mels[utterance]

    def check_utterance(self, utterance: Utterance) -> None:
        """The audio a caller compares on is the audio that was recorded."""
        entry = next((u for u in self.manifest["utterances"] if u["name"] == utterance.name), None)
        if entry is None:
            raise RecordingError(f"{self.directory}: {utterance.name} was not recorded "
                                 f"(recorded: {', '.join(u['name'] for u in self.manifest['utterances'])})")
        digest = hashlib.sha256(np.asarray(utterance.audio, np.float32).tobytes()).hexdigest()
        if digest != entry["audio_sha256"]:
            raise RecordingError(f"{utterance.name}: its audio differs from the recorded audio (sha256)")

    def run(self, utterance: str, context: Sequence[int], mode: FirstChunkMode | str) -> RecordedRun:
        key = (utterance, [int(context[0]), int(context[1])], FirstChunkMode(mode).value)
        entry = next((r for r in self.manifest["runs"] if (r["utterance"], r["context"], r["mode"]) == key), None)
        if entry is None:
            raise RecordingError(f"{self.directory}: {utterance} at [{key[1][0]},{key[1][1]}] in {key[2]} mode was "
                                 f"not recorded (lookaheads {self.manifest['plan']['contexts']}, modes {self.modes})")
        return RecordedRun(backend=self.name, dtype=self.dtype, att_context_size=(key[1][0], key[1][1]), mode=key[2],
                           entry=entry, shards=[_Shard(self.directory / name) for name in _run_shards(entry)],
                           features=self.mel(utterance))

    def offline(self, utterance: str, context: Sequence[int], length: int | None = None) -> OfflineOutput:
        """The recorded offline forward over ``length`` mel frames (default: the whole mel tensor, as the loop
        runs it)."""
        key = (utterance, [int(context[0]), int(context[1])])
        if length is None:
            length = int(self.mel(utterance).shape[-1])
        entry = next((r for r in self.manifest["offline"]
                      if (r["utterance"], r["context"], r["length"]) == (*key, length)), None)
        if entry is None:
            raise RecordingError(f"{self.directory}: no offline forward of {utterance} at [{key[1][0]},{key[1][1]}] "
                                 f"over {length} frames was recorded")
        tensors = _Shard(self.directory / entry["shard"]).tensors("")
        _taps_from_residuals(tensors, entry, self.manifest["runs"], self.directory)
        taps = _read_taps(tensors, entry)
        return OfflineOutput(encoded=_encoded(taps, tensors, entry), encoded_len=tensors["encoded_len"],
                             tokens=entry["tokens"], taps=taps,
                             ctc_tokens=entry["ctc_tokens"])

    def size_bytes(self) -> int:
        return sum(record["bytes"] for record in self.manifest["shards"].values()) + (self.directory / MANIFEST).stat().st_size

    def describe(self) -> Iterator[str]:
        plan = self.manifest["plan"]
        by_lookahead = plan.get("modes_by_lookahead") or {_context_key(c): plan["modes"] for c in plan["contexts"]}
        runs = "; ".join(f"[{key}] {', '.join(modes)}" for key, modes in by_lookahead.items())
        offline = plan.get("offline_lookaheads", plan["contexts"] if plan["offline"] else [])
        yield (f"{self.directory}: {len(self.manifest['utterances'])} utterances; {runs}"
               f"{'; offline at ' + ', '.join(f'[{_context_key(c)}]' for c in offline) if offline else ''}; "
               f"{self.size_bytes() / 1e6:.1f} MB")


class ReplayBackend(Backend):
    """A recording behind the ``Backend`` interface: it answers exactly what was recorded (the front end of a
    recorded utterance, each step of a recorded stream, a recorded offline forward) and refuses anything else
    with ``RecordingError``. Where a suite asks the reference backend for those (``pytest --parity-reference``),
    it runs without NeMo; a question the recording cannot answer fails the test that asked it, it is never
    answered by something else."""

    def __init__(self, recording: Recording):
        self.recording = recording
        self.name = recording.name
        self.dtype = recording.dtype
        self.info = recording.info
        self.capabilities = recording.capabilities
        self._by_audio = {entry["audio_sha256"]: entry for entry in recording.manifest["utterances"]}

    def streaming_config(self, att_context_size: Sequence[int]) -> StreamingConfig:
        return self.recording.streaming_config(att_context_size)

    def prompt_kernel(self) -> PromptKernel | None:
        return self.recording.prompt_kernel()

    def features(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        if audio.shape[0] != 1:
            raise RecordingError(f"a recording answers one utterance at a time, not a batch of {audio.shape[0]}")
        entry = self._by_audio.get(hashlib.sha256(audio[0].tobytes()).hexdigest())
        if entry is None:
            raise RecordingError(f"{self.recording.directory}: this audio ({audio.shape[-1]} samples) was not recorded")
        return self.recording.mel(entry["name"]), np.array([entry["mel_length"]], np.int64)

    def _utterance_of(self, mel: np.ndarray) -> str:
        for entry in self.recording.manifest["utterances"]:
            recorded = self.recording.mel(entry["name"])
            if recorded.shape == mel.shape and np.array_equal(recorded, mel):
                return entry["name"]
        raise RecordingError(f"{self.recording.directory}: no recorded utterance has this mel {tuple(mel.shape)}")

    def step(self, chunk: Chunk, state: StreamingState, *, speaker_masks=None,
             forced_decisions: Sequence[int] | None = None) -> StepOutput:
        if forced_decisions is not None:
            raise RecordingError("a recording cannot decode with other decisions than it took")
        context = tuple(int(v) for v in state.att_context_size)
        if state.native is None:  # a new stream: the recorded run whose first chunk this is
            if not chunk.is_first:
                raise RecordingError("a recorded stream is replayed from its first chunk only")
            # One RecordedSteps for the whole stream: it rebuilds each step's caches from the step before.
            state.native = (self._run_starting_with(chunk, context).steps, 0)
        steps, index = state.native
        if index >= len(steps):
            raise RecordingError(f"the recorded stream has {len(steps)} steps; step {index} was asked for")
        output = steps[index]
        output.state.native = (steps, index + 1)
        return output

    def _run_starting_with(self, chunk: Chunk, context: Context) -> RecordedRun:
        for entry in self.recording.manifest["runs"]:
            if tuple(entry["context"]) != context:
                continue
            mel = self.recording.mel(entry["utterance"])
            first = ChunkSchedule(self.streaming_config(context), FirstChunkMode(entry["mode"])).chunks(mel)[0]
            if first.mel.shape == chunk.mel.shape and first.cache_frames == chunk.cache_frames \
                    and np.array_equal(first.mel, chunk.mel):
                return self.recording.run(entry["utterance"], context, entry["mode"])
        raise RecordingError(f"{self.recording.directory}: no recorded stream at [{context[0]},{context[1]}] starts "
                             "with this chunk")

    def offline(self, mel: np.ndarray, length: np.ndarray, att_context_size: Sequence[int], *,
                speaker_masks=None, prompt: str | None = None,
                forced_decisions: Sequence[int] | None = None) -> OfflineOutput:
        if forced_decisions is not None:
            raise RecordingError("a recording cannot decode with other decisions than it took")
        return self.recording.offline(self._utterance_of(mel), att_context_size, int(np.asarray(length)[0]))

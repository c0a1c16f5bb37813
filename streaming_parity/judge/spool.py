"""Stream runs spooled to disk, so that a comparison's memory does not grow with the audio.

At full size (24 layers x 1024 wide) one [70,13] streaming step carries about 9 MB of taps and
caches, most of it the caches: they are written as the frames that entered (with a keyframe every
``KEYFRAME_STEPS``), as a recording stores them, so a [70,0] step is about 0.3 MB, not 7. ``record`` streams one
backend and writes each step to its own ``.npz`` as it is produced; ``SpooledRun`` reads steps
back one at a time. It offers what ``streaming_parity.judge.compare.compare_runs`` reads from a ``StreamRun``
(``steps``, ``step_taps``, ``tokens``, ``ctc_tokens``, ``encoded``, ``features``), so two spooled runs are compared
by the same code as two in-memory ones, holding one step of each at a time.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streaming_parity.core.system.memory import resident_mb
from streaming_parity.interface.backend import Backend
from streaming_parity.interface.chunking import FirstChunkMode
from streaming_parity.interface.driver import iter_steps
from streaming_parity.interface.speakers import SpeakerTargets
from streaming_parity.interface.types import DecoderState, StepOutput, StreamingState
from streaming_parity.judge.recording import pack_caches, unpack_caches

STEP_FILE = "step-{index:05d}.npz"
RUN_FILE = "run.json"
_TAP = "tap/"
# Every this many steps both caches are written whole, so that reading a step out of order rebuilds its caches
# from at most this many steps' new frames.
KEYFRAME_STEPS = 64
# A spooled run is a long one (a 10-minute stream is 7,540 steps at [70,0], over an hour at full size): it says
# how far it is, how fast and how much memory the process holds, about this often.
PROGRESS_SECONDS = 60.0


def _save_step(path: Path, step: StepOutput, previous: Mapping[str, np.ndarray] | None) -> None:
    """One step; its caches as the frames that entered since ``previous`` (the step before's caches), as a recording
    stores them (``streaming_parity.judge.recording.cache_delta``, checked bit for bit), or whole at a keyframe or
    where no shift rebuilds them. At full size a whole channel cache is 7 MB a step; the frames that entered at
    [70,0], 0.1 MB."""
    arrays = {f"{_TAP}{name}": value for name, value in step.taps.items()}
    caches, shifts = pack_caches(step.state.caches(), previous, hint=int(step.encoded_len[0]))
    arrays.update(caches)
    arrays["encoded"], arrays["encoded_len"] = step.encoded, step.encoded_len
    for index, decoder in enumerate(step.state.decoder):
        arrays[f"decoder/{index}/h"], arrays[f"decoder/{index}/c"] = decoder.h, decoder.c
    meta = {"tokens": step.tokens, "seconds": step.seconds, "step_index": step.state.step_index,
            "att_context_size": list(step.state.att_context_size),
            "decoder": [{"last_token": d.last_token, "tokens": d.tokens} for d in step.state.decoder],
            "ctc_tokens": step.ctc_tokens, "ctc_last_label": step.state.ctc_last_label, "prompt": step.state.prompt,
            "cache_shift": shifts}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    staged = path.with_suffix(".tmp.npz")
    np.savez(staged, **arrays)
    staged.replace(path)


def _load_caches(path: Path, previous: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """A step's caches alone (the other arrays of its file are not read)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        return unpack_caches(meta["cache_shift"], data, previous, str(path))


def _load_step(path: Path, previous: Mapping[str, np.ndarray] | None = None) -> StepOutput:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    taps = {name[len(_TAP):]: value for name, value in arrays.items() if name.startswith(_TAP)}
    caches = unpack_caches(meta["cache_shift"], arrays, previous, str(path))
    decoders = [DecoderState(last_token=int(d["last_token"]), h=arrays[f"decoder/{i}/h"], c=arrays[f"decoder/{i}/c"],
                             tokens=[int(t) for t in d["tokens"]]) for i, d in enumerate(meta["decoder"])]
    state = StreamingState(att_context_size=tuple(meta["att_context_size"]), decoder=decoders,
                           step_index=int(meta["step_index"]), ctc_last_label=meta.get("ctc_last_label"),
                           prompt=meta.get("prompt"), **caches)
    ctc = meta.get("ctc_tokens")
    return StepOutput(encoded=arrays["encoded"], encoded_len=arrays["encoded_len"], state=state,
                      tokens=[[int(t) for t in row] for row in meta["tokens"]], taps=taps, seconds=float(meta["seconds"]),
                      ctc_tokens=None if ctc is None else [[int(t) for t in row] for row in ctc])


class SpooledSteps(Sequence):
    """The steps of a spooled run, read from disk on access: in order, each step's caches are rebuilt from the step
    before's (kept, the only thing kept); out of order, from the keyframe before it."""

    def __init__(self, directory: Path, count: int):
        self.directory = directory
        self.count = count
        self._last: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.count

    def _file(self, index: int) -> Path:
        return self.directory / STEP_FILE.format(index=index)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(f"step {index} of a run with {self.count} steps")
        index %= self.count
        if self._last is not None and self._last[0] == index - 1:
            previous = self._last[1]
        else:
            start, previous = index - index % KEYFRAME_STEPS, None
            for position in range(start, index):
                previous = _load_caches(self._file(position), previous)
        step = _load_step(self._file(index), previous)
        self._last = (index, step.state.caches())
        return step


@dataclass
class SpooledRun:
    """A ``StreamRun`` whose steps live in ``directory``; only tokens and timings stay in memory."""

    backend: str
    dtype: str
    att_context_size: tuple[int, int]
    mode: str
    directory: Path
    step_count: int
    step_tokens: list[list[int]] = field(default_factory=list)  # batch item 0, per step
    step_seconds: list[float] = field(default_factory=list)
    features: np.ndarray | None = None
    step_ctc_tokens: list[list[int] | None] = field(default_factory=list)  # hybrid models' CTC labels, per step
    # The process's resident memory once each step was written (MiB): memory flat in the stream's length, or not.
    # Empty where the system does not say (no /proc).
    step_rss_mb: list[float] = field(default_factory=list)

    @functools.cached_property
    def steps(self) -> SpooledSteps:
        # One reader per run: a comparison reads steps in order, each step's caches rebuilt from the one before.
        return SpooledSteps(self.directory, self.step_count)

    @property
    def tokens(self) -> list[int]:
        return [t for step in self.step_tokens for t in step]

    @property
    def ctc_tokens(self) -> list[int] | None:
        if not self.step_ctc_tokens or any(step is None for step in self.step_ctc_tokens):
            return None
        return [t for step in self.step_ctc_tokens for t in step]

    @property
    def encoded(self) -> np.ndarray:
        parts = []
        for index in range(self.step_count):
            with np.load(self.directory / STEP_FILE.format(index=index), allow_pickle=False) as data:
                parts.append(data["encoded"][..., : int(data["encoded_len"][0])])
        return np.concatenate(parts, axis=-1)

    def step_taps(self, index: int) -> dict[str, np.ndarray]:
        return self.steps[index].taps_and_caches()

    def delete(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def record(backend: Backend, mel: np.ndarray, att_context_size: Sequence[int], mode: FirstChunkMode | str,
           directory: str | Path, *, dtype: str = "float32", speaker_masks: SpeakerTargets | None = None,
           features: np.ndarray | None = None, forced_decisions=None, audio: np.ndarray | None = None,
           prompt: str | None = None, progress: Callable[[str], None] | None = None) -> SpooledRun:
    """Stream ``mel`` through ``backend`` and write every step to ``directory`` as it is produced, with the
    process's resident memory after each step; ``progress`` gets a line about every ``PROGRESS_SECONDS``."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    run = SpooledRun(backend=backend.name, dtype=dtype, att_context_size=tuple(int(v) for v in att_context_size),
                     mode=FirstChunkMode(mode).value, directory=directory, step_count=0, features=features)
    steps = iter_steps(backend, mel, att_context_size, mode, speaker_masks=speaker_masks,
                       forced_decisions=forced_decisions, audio=audio, prompt=prompt)
    previous = None
    said_at, said_steps = time.monotonic(), 0
    for index, step in enumerate(steps):
        _save_step(directory / STEP_FILE.format(index=index), step, None if index % KEYFRAME_STEPS == 0 else previous)
        previous = step.state.caches()
        run.step_count += 1
        run.step_tokens.append(list(step.tokens[0]))
        run.step_ctc_tokens.append(None if step.ctc_tokens is None else list(step.ctc_tokens[0]))
        run.step_seconds.append(step.seconds)
        resident = resident_mb()
        if resident is not None:
            run.step_rss_mb.append(round(resident, 1))
        del step
        if progress is not None and time.monotonic() - said_at >= PROGRESS_SECONDS:
            progress(_progress_line(run, since=said_steps))
            said_at, said_steps = time.monotonic(), run.step_count
    (directory / RUN_FILE).write_text(json.dumps({
        "backend": run.backend, "dtype": run.dtype, "att_context_size": list(run.att_context_size),
        "mode": run.mode, "steps": run.step_count, "tokens": run.step_tokens, "ctc_tokens": run.step_ctc_tokens,
        "seconds": run.step_seconds, "rss_mb": run.step_rss_mb}) + "\n")
    return run


def _progress_line(run: SpooledRun, *, since: int) -> str:
    """Where a spooled run is: its steps so far, the backend's time a step since the last line, and the memory."""
    recent = run.step_seconds[since:]
    return (f"{run.backend}:{run.dtype} [{run.att_context_size[0]},{run.att_context_size[1]}] {run.mode}: "
            f"{run.step_count} steps, {sum(recent) / max(len(recent), 1):.3f} s a step over the last {len(recent)}, "
            f"{len(run.tokens)} labels" + (f", resident {run.step_rss_mb[-1]:.0f} MiB" if run.step_rss_mb else ""))

"""The suites' shared backends and runs: each backend prepared and loaded once, each run streamed once.

``BackendPool`` and ``RunCache`` are library state the pytest plugin (``streaming_parity.app.pytest_plugin``)
hands to the suites as session fixtures; the runs are recorded through the judge's run store and judged by
its one policy (``streaming_parity.judge.forcing.judge_stream``), as ``parity compare`` records and judges them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from streaming_parity.core.errors import Unsupported


def _refuse(reason: str) -> NoReturn:
    raise Unsupported(reason)


class BackendPool:
    """Prepares (exports, converts) and loads each backend once per session.

    ``reference``: a ``ReplayBackend`` over a recording, served as the reference backend (``--parity-reference``);
    ``artifacts``: directories given for ``(name, dtype or None)``, loaded instead of prepared from the .nemo.
    ``unavailable(reason)``: what a backend that cannot run here does (the suites skip; by default it raises)."""

    def __init__(self, nemo_path: Path | None, work_dir: Path, *, reference=None,
                 artifacts: dict[tuple[str, str | None], Path] | None = None,
                 unavailable: Callable[[str], NoReturn] = _refuse):
        self.nemo_path = nemo_path
        self.unavailable = unavailable
        self.work_dir = work_dir
        self.reference = reference
        self.artifacts = dict(artifacts or {})
        self._sources = {}
        self._loaded = {}

    def source(self, name: str, dtype: str | None = None) -> Path:
        """What ``name`` loads (the .nemo, an export or artifact directory), prepared once."""
        from streaming_parity.interface.registry import get

        entry = get(name)
        key = (name, dtype or entry.dtypes[0])
        given = self.artifacts.get(key) or (self.artifacts.get((name, None)) if key[1] == entry.dtypes[0] else None)
        if given is not None:
            return given
        if key not in self._sources and self.nemo_path is None:
            self.unavailable(f"no {name}:{key[1]} artifact given (--parity-artifact {name}:{key[1]}=DIR) and no .nemo "
                        "to prepare one from")
        if key not in self._sources:
            (self.work_dir / name).mkdir(parents=True, exist_ok=True)
            try:
                self._sources[key] = entry.prepare(self.nemo_path, self.work_dir / name, dtype=key[1])
            except Unsupported as error:  # a peer that runs one model family (mlx-audio: prompt models only)
                self.unavailable(f"{name} does not run this model: {error}")
        return self._sources[key]

    def get(self, name: str, dtype: str | None = None):
        from streaming_parity.interface.registry import REFERENCE, get

        if name == REFERENCE and self.reference is not None:
            return self.reference
        entry = get(name)
        key = (name, dtype or entry.dtypes[0])
        if key not in self._loaded:
            self._loaded[key] = entry.load(self.source(*key), dtype=key[1], nemo_path=self.nemo_path)
        return self._loaded[key]


class RunCache:
    """Stream runs shared by the suites: one run per (backend, dtype, utterance, lookahead, mode)."""

    def __init__(self, pool: BackendPool):
        from streaming_parity.judge.loop import MemoryStore

        self.pool = pool
        self.store = MemoryStore()  # the judge's run store, as ``parity compare`` records its runs
        self._runs = {}
        self._mels = {}

    def mel(self, utterance):
        if utterance.name not in self._mels:
            self._mels[utterance.name] = self.pool.get("nemo").features(utterance.audio[None])[0]
        return self._mels[utterance.name]

    def run(self, backend_name: str, utterance, context, mode, dtype: str | None = None):
        from streaming_parity.interface.chunking import FirstChunkMode

        backend = self.pool.get(backend_name, dtype)
        key = (backend_name, backend.dtype, utterance.name, tuple(context), str(mode))
        if key not in self._runs:
            # A transcript-level peer runtime takes the audio through its own front end (Capabilities.input).
            audio_input = backend.capabilities.input == "audio"
            features = None if audio_input else backend.features(utterance.audio[None])[0]
            self._runs[key] = self.store.record(
                backend, self.mel(utterance), context, FirstChunkMode(mode), key="-".join(map(str, key)),
                speaker_masks=None, features=features, audio=utterance.audio[None],
                prompt=utterance.prompt_for(self.pool.get("nemo").info))
        return self._runs[key]

    def judge(self, reference_name: str, candidate_name: str, utterance, context, mode, tolerances, *,
              dtype: str | None = None, pair: str | None = None):
        """The candidate's run against the reference's, judged as ``parity compare`` judges it
        (``streaming_parity.judge.forcing.judge_stream``: teacher-forced where a decision left the reference's).
        Returns ``(reference run, candidate run, comparison)``."""
        from functools import partial

        from streaming_parity.interface.chunking import FirstChunkMode
        from streaming_parity.judge.forcing import judge_stream

        reference = self.run(reference_name, utterance, context, mode)
        candidate = self.run(candidate_name, utterance, context, mode, dtype=dtype)
        backend = self.pool.get(candidate_name, dtype)
        tokens_only = not backend.capabilities.tensor_level
        rerun = partial(self.store.record, backend, self.mel(utterance), context, FirstChunkMode(mode),
                        key=f"{candidate_name}-{backend.dtype}-{utterance.name}-forced", speaker_masks=None,
                        features=candidate.features, prompt=utterance.prompt_for(self.pool.get("nemo").info))
        comparison, _ = judge_stream(reference, candidate, tolerances,
                                     num_layers=self.pool.get(reference_name).info.num_layers,
                                     utterance=utterance.name, pair=pair, tokens_only=tokens_only,
                                     rerun=rerun if backend.capabilities.teacher_forcing else None)
        return reference, candidate, comparison

"""Builders the test modules share: synthetic steps, runs, tap results and comparisons, the CLI run in
process (and in a subprocess without torch and NeMo), a directory copied, and one candidate streamed and judged
against a reference.

``tests`` is not a package: a test module imports these as ``from builders import ...``, as it does
``graph_metadata`` and ``hub_cache``. pytest's default ``prepend`` import mode puts the directory of a test
module without ``__init__.py`` (here ``tests/``) first on ``sys.path`` before importing it.

Every default below is stated in its builder's docstring; a test that depends on a value passes it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from streaming_parity.interface.driver import StreamRun
from streaming_parity.interface.types import DecoderState, StepOutput, StreamingState
from streaming_parity.judge.compare import PairComparison, TapResult, comparison_order

ROOT = Path(__file__).resolve().parents[1]

# -- streaming state, steps and runs ----------------------------------------------------------------


def streaming_state(context: tuple[int, int] = (70, 13), *, caches: bool = False, blank: int | None = None,
                    step_index: int = 0, ctc_last_label: list[int] | None = None) -> StreamingState:
    """A state at lookahead ``context``.

    ``caches``: zero caches of one layer, one batch item (``cache_last_channel`` ``[1, 1, 2, 4]``,
    ``cache_last_time`` ``[1, 1, 4, 2]``, float32; ``cache_last_channel_len`` ``[0]``), compared as cache taps;
    none by default. ``blank``: one decoder state at the start of a sequence (``blank`` fed next, zero LSTM
    states ``[1, 1, 3]``); no decoder by default. ``ctc_last_label``: a hybrid model's last CTC label.
    """
    state = StreamingState(att_context_size=context, step_index=step_index, ctc_last_label=ctc_last_label)
    if caches:
        state.cache_last_channel = np.zeros((1, 1, 2, 4), np.float32)
        state.cache_last_time = np.zeros((1, 1, 4, 2), np.float32)
        state.cache_last_channel_len = np.zeros((1,), np.int64)
    if blank is not None:
        state.decoder = [DecoderState(blank, np.zeros((1, 1, 3), np.float32), np.zeros((1, 1, 3), np.float32))]
    return state


def step_output(taps: Mapping[str, np.ndarray] | None = None, tokens: Iterable[int] = (), *,
                ctc_tokens: Iterable[int] | None = None, encoded: np.ndarray | None = None,
                state: StreamingState | None = None) -> StepOutput:
    """One step of batch item 0: ``taps`` (each copied as float32), the ``tokens`` it emitted and, for a
    hybrid model, its ``ctc_tokens`` (None: no CTC head).

    ``encoded`` defaults to zeros ``[1, 2, 1]``; ``encoded_len`` is its last dimension. ``state`` defaults to
    ``streaming_state()``: lookahead (70, 13), no caches, no decoder.
    """
    encoded = np.zeros((1, 2, 1), np.float32) if encoded is None else encoded
    return StepOutput(encoded=encoded, encoded_len=np.array([encoded.shape[-1]], np.int64),
                      state=streaming_state() if state is None else state, tokens=[list(tokens)],
                      taps={name: np.array(value, np.float32) for name, value in (taps or {}).items()},
                      ctc_tokens=None if ctc_tokens is None else [list(ctc_tokens)])


def stream_run(backend: str, steps: Sequence[StepOutput], *, context: tuple[int, int] = (70, 13),
               mode: str = "plain", dtype: str = "float32", features: np.ndarray | None = None) -> StreamRun:
    """``steps`` as one utterance streamed by ``backend``; ``features``: its front end's output, if any."""
    return StreamRun(backend=backend, dtype=dtype, att_context_size=context, mode=mode, steps=list(steps),
                     features=features)


# -- judged taps and comparisons --------------------------------------------------------------------


def tap_result(tap: str = "encoder", *, step: int = 0, metrics: Mapping[str, float] | None = None,
               limits: Mapping[str, float] | None = None, violations: Iterable[str] = ()) -> TapResult:
    """One judged tap: its ``metrics`` against ``limits`` (both empty by default) and the ``violations``
    found (none: it passed); shapes not recorded."""
    return TapResult(step, tap, dict(metrics or {}), dict(limits or {}), list(violations))


def pair_comparison(taps: Iterable[TapResult] = (), reference_tokens: Iterable[int] = (1, 2, 3),
                    candidate_tokens: Iterable[int] = (1, 2, 3), *, pair: str = "nemo~mlx",
                    reference: str = "nemo", candidate: str | None = None, dtype: str = "float32",
                    context: tuple[int, int] = (70, 13), utterance: str = "utt", order: Iterable[str] | None = None,
                    **fields) -> PairComparison:
    """A comparison of ``pair`` on ``utterance`` at ``context``, as ``compare_runs`` would leave it.

    ``candidate`` defaults to the part of ``pair`` after ``~``; ``order`` to ``comparison_order(2)`` (the
    model order of a two-layer encoder). ``fields``: any other ``PairComparison`` field
    (``require_token_match``, ``flips``, ``reference_ctc_tokens``, ...).
    """
    return PairComparison(reference, pair.split("~", 1)[1] if candidate is None else candidate, pair, dtype, context,
                          utterance, list(taps), list(reference_tokens), list(candidate_tokens),
                          comparison_order(2) if order is None else list(order), **fields)


def stream_and_compare_one(reference, candidate, utterances, contexts=None, tolerances=None):
    """``candidate`` (a ``judge.loop.Candidate``) streamed against ``reference`` on ``utterances`` at
    ``contexts`` (default: every lookahead of the reference's model), judged by ``tolerances`` (default: the
    shipped file), without the streaming~offline comparisons."""
    from streaming_parity.judge.loop import stream_and_compare
    from streaming_parity.judge.tolerances import Tolerances

    return stream_and_compare(reference, [candidate], utterances, reference.info.att_context_sizes if contexts is None else contexts,
                              Tolerances.load() if tolerances is None else tolerances, include_offline=False)


# -- the command line and files ---------------------------------------------------------------------


class CliRun(NamedTuple):
    """``parity``'s exit code and what it wrote to stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        """stdout then stderr."""
        return self.out + self.err


def run_cli(capsys, *argv) -> CliRun:
    """``parity *argv`` run in process (each argument passed as ``str``), its output read from ``capsys``."""
    from streaming_parity.app.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return CliRun(code, captured.out, captured.err)


def copy_dir(source: Path, target: Path, *, without: Iterable[str] = ()) -> Path:
    """A copy of the directory ``source`` at ``target`` (its parents created), leaving out every entry,
    at any depth, named in ``without``; returns ``target``."""
    left_out = set(without)
    shutil.copytree(source, target, ignore=lambda _directory, names: [n for n in names if n in left_out])
    return target


# -- without torch and NeMo -----------------------------------------------------------------------------------

BLOCK = textwrap.dedent("""
    import importlib.machinery, sys
    class Filtered(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "nemo", "lightning", "pytorch_lightning"):
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)
    sys.meta_path = [Filtered if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    from streaming_parity.app.cli import main
    code = main(sys.argv[1:])
    assert "torch" not in sys.modules and "nemo" not in sys.modules, "torch or NeMo was imported"
    raise SystemExit(code)
""")


def torch_free_cli(*argv: str) -> subprocess.CompletedProcess:
    """``parity ARGV...`` in a subprocess where torch and NeMo cannot be imported (as on a Mac with only MLX); it
    fails if either was imported all the same."""
    return subprocess.run([sys.executable, "-c", BLOCK, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


# -- a checkpoint with another config ----------------------------------------------------------------------

def rewrite_nemo_config(source: Path, destination: Path, edit, state_edit=None) -> Path:
    """A copy of the ``.nemo`` ``source`` whose model_config.yaml went through ``edit(config)`` (and its weights
    through ``state_edit``, as ``streaming_parity.fixtures.models.rewrite_checkpoint`` does)."""
    import yaml

    from streaming_parity.fixtures.models import rewrite_checkpoint

    if state_edit is not None:
        source = rewrite_checkpoint(source, destination.with_suffix(".weights.nemo"), state_edit)
    with tarfile.open(source, "r:*") as tar_in, tarfile.open(destination, "w") as tar_out:
        for member in tar_in.getmembers():
            data = tar_in.extractfile(member).read() if member.isfile() else None
            if member.name.lstrip("./") == "model_config.yaml":
                config = yaml.safe_load(data)
                edit(config)
                data = yaml.safe_dump(config).encode()
                member.size = len(data)
            tar_out.addfile(member, io.BytesIO(data) if data is not None else None)
    return destination

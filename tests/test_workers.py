"""Work in a spawned process: a worker that dies is an error within seconds, never a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest

from streaming_parity.core.system.workers import WorkerDied, WorkerFailed, run_in_subprocess


def _add(a: int, b: int) -> int:
    return a + b


def _kill_myself(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(60)  # never reached


def _raise(message: str) -> None:
    raise KeyError(message)


def test_the_result_comes_back():
    assert run_in_subprocess(_add, 2, 3, phase="adding") == 5


def test_a_worker_killed_for_memory_is_named_within_seconds():
    started = time.monotonic()
    with pytest.raises(WorkerDied, match=r"killed by signal 9 \(SIGKILL\) while exporting ONNX: probably out of memory"):
        run_in_subprocess(_kill_myself, signal.SIGKILL, phase="exporting ONNX")
    assert time.monotonic() - started < 30


def test_another_signal_is_named_without_the_memory_hint():
    with pytest.raises(WorkerDied, match=r"killed by signal 15 \(SIGTERM\) while converting$"):
        run_in_subprocess(_kill_myself, signal.SIGTERM, phase="converting")


def test_an_exception_in_the_worker_names_its_type_and_the_phase():
    with pytest.raises(WorkerFailed, match=r"^preparing mlx:float32: KeyError: 'no such tensor'"):
        run_in_subprocess(_raise, "no such tensor", phase="preparing mlx:float32")

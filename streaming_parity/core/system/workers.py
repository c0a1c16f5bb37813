"""Work in a spawned process that cannot hang its parent when it dies.

``multiprocessing.Pool.apply`` waits forever when its worker is killed (the kernel's OOM killer
during a full-size export, say). ``run_in_subprocess`` waits on a pipe instead: a worker that dies
closes it, and the parent raises ``WorkerDied`` naming the phase and the signal at once.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections.abc import Callable
from typing import Any


class WorkerDied(RuntimeError):
    """The subprocess ended without a result (killed by a signal, or exited)."""


class WorkerFailed(RuntimeError):
    """The subprocess raised; the message carries its exception and the last traceback line."""


def _child(connection, function: Callable[..., Any], args: tuple) -> None:
    try:
        connection.send((True, function(*args)))
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent as text
        connection.send((False, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"))
    finally:
        connection.close()


def run_in_subprocess(function: Callable[..., Any], *args: Any, phase: str) -> Any:
    """``function(*args)`` in a fresh spawned process; its result, or an error naming ``phase``.

    ``function`` and its arguments and result must be picklable (a module-level function).
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, function, args), daemon=True)
    process.start()
    sender.close()  # only the child holds the sending end: its death ends recv() with EOFError
    try:
        ok, value = receiver.recv()
    except EOFError:
        process.join()
        raise WorkerDied(describe_exit(process.exitcode, phase)) from None
    finally:
        receiver.close()
    process.join()
    if not ok:
        raise WorkerFailed(f"{phase}: {value}")
    return value


def describe_exit(exitcode: int | None, phase: str) -> str:
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        hint = ": probably out of memory" if number == signal.SIGKILL else ""
        return f"killed by signal {number} ({name}) while {phase}{hint}"
    return f"the worker exited with status {exitcode} while {phase}, without a result"

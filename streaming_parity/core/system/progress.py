"""Progress of long commands: a rich bar on stderr when it is a terminal, one log line per phase otherwise.

``ProgressBar`` has the callbacks of ``streaming_parity.judge.loop.LoopProgress`` (``total``, ``phase``,
``advance``), so it can be handed to the stream-and-compare loop as it is; called with a line of
text (``bar("exporting ...")``) it starts the next step: the form the export and the fixture builds
report in. ``parity -q`` turns bars off (``set_bars(False)``); a CI log, where stderr is not a
terminal, gets no live bar but one log line per phase, as the nightly does.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

_BARS = True
LOG_WIDTH = 160  # where stderr is no terminal (a CI log): long enough that a log line is one line
_CONSOLE: Any = None


def set_bars(enabled: bool) -> None:
    global _BARS
    _BARS = enabled


def quiet() -> bool:
    """``parity -q``: warnings only, no bars and no progress lines."""
    return not _BARS


def use_console(console: Any) -> None:
    """The console the CLI's log handler writes to, for the bars too (None: a fresh one each time)."""
    global _CONSOLE
    _CONSOLE = console


def make_console(stream: Any = None):
    """A console on ``stream`` (default: the current stderr), kept even while a library redirects
    ``sys.stderr`` (``streaming_parity.core.system.nemo_quiet``); wide enough for one line per message in a log."""
    from rich.console import Console

    stream = stream or sys.stderr
    terminal = bool(getattr(stream, "isatty", lambda: False)())
    return Console(file=stream, highlight=False, width=None if terminal else LOG_WIDTH)


def stderr_console():
    return _CONSOLE or make_console()


def bars_enabled() -> bool:
    return _BARS and stderr_console().is_terminal


class ProgressBar:
    """A progress bar for one command (``with ProgressBar("convert") as bar:``)."""

    def __init__(self, title: str, *, total: int | None = None, logger: logging.Logger | None = None):
        self.title = title
        self.logger = logger or logging.getLogger("streaming_parity.progress")
        self._total = total
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if bars_enabled():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=stderr_console(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.title, total=self._total)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    @property
    def live(self) -> bool:
        return self._bar is not None

    def total(self, units: int | None) -> None:
        """The units of work of the phase that starts now (counting starts again at 0)."""
        self._total = units
        if self._bar is not None:
            self._bar.reset(self._task, total=units)

    def phase(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.title}: {text}")
            self.logger.debug("%s: %s", self.title, text)
        else:
            self.logger.info("%s: %s", self.title, text)

    def advance(self, text: str = "") -> None:
        if self._bar is not None:
            self._bar.advance(self._task)
        if text:
            self.logger.debug("%s: %s", self.title, text)

    def __call__(self, text: str) -> None:
        """One step, announced as it starts: the phase text and one unit."""
        self.phase(text)
        self.advance()


class LineProgress:
    """The same callbacks over a plain ``callable(text)`` (the library functions' older form)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def total(self, units: int | None) -> None:
        pass

    def phase(self, text: str) -> None:
        self.say(text)

    def advance(self, text: str = "") -> None:
        if text:
            self.say(text)

    def __call__(self, text: str) -> None:
        self.say(text)


class NoProgress(LineProgress):
    def __init__(self):
        super().__init__(lambda _text: None)


def as_progress(progress: Any) -> Any:
    """``None``, a ``callable(text)`` or an object with ``total``/``phase``/``advance`` -> such an object."""
    if progress is None:
        return NoProgress()
    if all(callable(getattr(progress, name, None)) for name in ("total", "phase", "advance")):
        return progress
    return LineProgress(progress)

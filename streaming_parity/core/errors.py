"""Bad input: the errors that mean "the input is wrong", not "the project is wrong".

``parity`` exits 2 with a one-line message for a ``BadInput`` and 3 for any other exception
(``streaming_parity.interface.commands`` holds the exit codes). The class an error derives from is its
classification, so a new error type says which kind it is where it is defined, and a plain
``ValueError`` or ``KeyError`` escaping a command is reported as the bug it is instead of being
taken for a user's mistake.

This module sits below every other module of the project and imports nothing from it, so the
lowest layers (``streaming_parity.core.nemo_file``) and every backend can derive their own error types from it
without the harness importing a backend.

Each subclass also derives from the built-in type that code catching it may already expect
(``ValueError``, ``FileNotFoundError``, ``KeyError``, ``NotImplementedError``).
"""

from __future__ import annotations


class BadInput(Exception):
    """Input the project refuses: a file, an option, a model or a setting; the message says why."""


class InvalidInput(BadInput, ValueError):
    """A value given to the project that it cannot take: a lookahead the model does not have, a dtype a
    backend does not run, backends that share no first-chunk mode, a malformed results file."""


class InputNotFound(BadInput, FileNotFoundError):
    """A path given to the project does not exist."""


class UnknownName(BadInput, KeyError):
    """A name that is not registered: a backend, a fixture model, a mutation."""

    def __str__(self) -> str:
        # KeyError quotes its argument (it is usually a key, not a sentence).
        return str(self.args[0]) if self.args else ""


class Unsupported(BadInput, NotImplementedError):
    """A model, or a model feature, that this project does not run (e.g. a TDT decoder in the MLX port)."""


class UnsafeArtifact(BadInput, ValueError):
    """A model file whose structure or declared sizes cannot be trusted; refused before anything is
    read into memory or handed to a library (``streaming_parity.core.safe_files``, ``streaming_parity.core.nemo_file``)."""

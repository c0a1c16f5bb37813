"""The contract between the ``parity`` command line and the commands a backend contributes.

A backend's registry entry names a module with ``register(subparsers)``; its commands receive the
parsed arguments, whose ``context`` attribute is a ``CommandContext``. The context gives what only
the application layer can: the reference backend, the default utterances, diagnosis through every
registered artifact reader, model sources named on the hub. That way a backend command never
imports the application layer or another backend, and the command line names no backend.

Exit codes, one meaning each:

====  =========================================================================================
0     pass
1     parity violation (a comparison, verification or contradiction failed)
2     bad input: a ``streaming_parity.core.errors.BadInput`` (every input-error type of the project and of the
      backends derives from it: ``CommandError``, ``AudioError``, ``SpeakerMaskError``,
      ``UnsafeNemoFile``, ``UnsafeArtifact``, ``ToleranceFileError``, ``ConversionError``,
      ``ExportDirError``...), or a command line argparse refuses; one line on stderr
3     internal error: any other exception, a bug, reported as ``error: internal error: Type: message``
      on one line (``parity --debug`` prints the traceback)
====  =========================================================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import BadInput
from streaming_parity.core.system.provenance import ResolvedSource

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_BAD_INPUT = EXIT_USAGE


class CommandError(BadInput):
    """A command's refusal of its arguments: printed as one line, no traceback, exit 2."""


def err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (the type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def parse_contexts(values: Sequence[str] | None) -> list[tuple[int, int]] | None:
    from streaming_parity.interface.chunking import parse_att_context

    try:
        return [parse_att_context(v) for v in values] if values else None
    except ValueError as error:  # parse_att_context only parses the text the user typed
        raise CommandError(str(error)) from None


def add_audio_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mix-to-mono", action="store_true", help="average the channels of multi-channel audio")
    parser.add_argument("--resample", action="store_true", help="resample audio that is not 16 kHz (soxr)")
    parser.add_argument("--speaker-masks", type=Path, metavar="MASKS.npz",
                        help="multitalker models: spk_targets (and optionally bg_spk_targets), one value per "
                             "80 ms encoder frame, applied to every audio file given")
    parser.add_argument("--prompt", metavar="LOCALE",
                        help="prompt-conditioned models (Nemotron-3.5): the locale every stream is given, a key of "
                             "the model's prompt_dictionary (default: en-US)")


def load_utterances(args: argparse.Namespace, paths: Sequence[Path]) -> list:
    """Audio files as utterances, with ``--speaker-masks`` and ``--prompt`` attached when given."""
    from streaming_parity.interface.speakers import SpeakerMaskError, load_speaker_masks
    from streaming_parity.interface.utterance import Utterance

    masks = None
    if getattr(args, "speaker_masks", None):
        try:
            masks = load_speaker_masks(args.speaker_masks)
        except (OSError, SpeakerMaskError) as error:
            raise CommandError(str(error)) from None
    return [Utterance.from_file(p, mix_to_mono=args.mix_to_mono, resample=args.resample, speaker_targets=masks,
                                prompt=getattr(args, "prompt", None)) for p in paths]


@dataclass(frozen=True)
class CommandContext:
    """Services of the application layer, handed to every command.

    - ``load_reference(nemo_path)``: the reference backend (NeMo) over a checkpoint;
    - ``default_utterances()``: the fixture speech, used when a command is given no audio;
    - ``diagnose(path, nemo_path=None, **options)``: ``streaming_parity.detect`` over every registered
      artifact reader, numeric check included when ``nemo_path`` is given;
    - ``resolve_source(text, backend)``: a source argument (a local path, ``ORG/NAME[@REVISION]`` or
      ``hf://ORG/NAME[@REVISION]/FILE``) as a ``ResolvedSource``: the local path (downloaded through
      the hub cache when need be) and, for a hub source, the repository and resolved commit.
      ``backend``: whose artifact format; None: a checkpoint (a ``.nemo``, the reference's source).
    """

    load_reference: Callable[[Path], Any]
    default_utterances: Callable[[], list]
    diagnose: Callable[..., Any]
    resolve_source: Callable[..., ResolvedSource] = lambda text, backend=None: ResolvedSource(Path(text), str(text))

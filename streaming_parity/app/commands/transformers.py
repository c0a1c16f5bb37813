"""``parity export-transformers``: the transformers backend's command, added to ``parity`` through its registry entry."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def cmd_export_transformers(args) -> int:
    from streaming_parity.backends.transformers.export import export_transformers
    from streaming_parity.core.system.progress import ProgressBar
    from streaming_parity.interface.commands import EXIT_OK

    source = args.context.resolve_source(args.model)
    with ProgressBar("export-transformers", logger=log) as bar:
        result = export_transformers(source.path, args.out, progress=bar.phase, source_hub=source.hub)
    print(f"{result.directory} ({result.family})")
    for note in result.notes:
        print(f"  {note}")
    return EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("export-transformers",
                              help="write a cache-aware streaming .nemo as a transformers checkpoint "
                                   "(NemotronAsrStreaming or Nemotron3_5Asr) that from_pretrained loads")
    p.add_argument("model", metavar="MODEL", help="a .nemo, ORG/NAME[@REVISION] or hf://ORG/NAME[@REVISION]/FILE")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the checkpoint (replaced)")
    p.set_defaults(func=cmd_export_transformers)

"""``parity export-onnx``: the ONNX backend's command, added to ``parity`` through its registry entry."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def cmd_export_onnx(args) -> int:
    from streaming_parity.backends.onnx.export import export_onnx
    from streaming_parity.core.system.progress import ProgressBar
    from streaming_parity.interface.commands import EXIT_OK, parse_contexts

    source = args.context.resolve_source(args.model)
    if args.format != "parity":
        from streaming_parity.backends.onnx.peer_export import export_peer

        with ProgressBar("export-onnx", logger=log) as bar:
            result = export_peer(source.path, args.out, fmt=args.format, att_context_sizes=parse_contexts(
                args.att_context), int8=args.int8, progress=bar.phase)
        for graph in result.graphs:
            print(graph)
        return EXIT_OK
    with ProgressBar("export-onnx", logger=log) as bar:
        result = export_onnx(source.path, args.out, att_context_sizes=parse_contexts(args.att_context),
                             cache_layout=args.cache_layout, int8=args.int8, debug_taps=args.debug_taps,
                             progress=bar, source_hub=source.hub)
    for graph in result.graphs:
        print(graph)
    return EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser("export-onnx", help="export a cache-aware streaming .nemo to ONNX graphs")
    p.add_argument("model", metavar="MODEL", help="a .nemo, ORG/NAME[@REVISION] or hf://ORG/NAME[@REVISION]/FILE")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the graphs")
    p.add_argument("--att-context", action="append", metavar="L,R",
                   help="lookahead(s) to export, one graph each (default: all of the model's)")
    p.add_argument("--cache-layout", choices=("batch-first", "layers-first"), default="batch-first",
                   help="cache tensor layout of the encoder graphs (default: NeMo's export, batch-first)")
    p.add_argument("--int8", action="store_true", help="also write dynamic int8 graphs (*.int8.onnx)")
    p.add_argument("--debug-taps", action="store_true",
                   help="also write *.debug.onnx graphs exposing pre_encode and every layer output")
    p.add_argument("--format", choices=("parity", "sherpa-onnx", "nemo", "parakeet-rs"), default="parity",
                   help="whose files to write: this project's (default), or as sherpa-onnx's, NeMo's plain or "
                        "parakeet-rs' exporter writes them (streaming_parity/backends/onnx/peer_export.py)")
    p.set_defaults(func=cmd_export_onnx)

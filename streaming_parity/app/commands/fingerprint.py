"""``parity fingerprint``: what the weights alone say, next to what the config claims."""

from __future__ import annotations

import json


def cmd_fingerprint(args) -> int:
    from streaming_parity.app.diagnose_path import artifact_readers
    from streaming_parity.app.hub import resolve_any
    from streaming_parity.core.system.cpu import int8_kernel_path
    from streaming_parity.detect.fingerprint import fingerprint

    report = fingerprint(resolve_any(args.path).path, artifact_readers())
    # What an int8 file's figures measured here depend on (streaming_parity.core.system.cpu), beside what the file says.
    report["int8_kernel_path"] = int8_kernel_path().to_dict()
    if not args.tensors:
        report["tensors"] = f"{len(report['tensors'])} tensors (use --tensors for the hash manifest)"
    print(json.dumps(report, indent=2))
    return 1 if report["contradictions"] and args.strict else 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("fingerprint", help="print JSON of what the weights alone say about a model")
    parser.add_argument("path", help="a .nemo, an ONNX export directory or an MLX artifact directory, "
                                     "or ORG/NAME[@REVISION] on the hub")
    parser.add_argument("--tensors", action="store_true", help="include the per-tensor shape/dtype/sha256 manifest")
    parser.add_argument("--strict", action="store_true", help="exit 1 when config and weights contradict")
    parser.set_defaults(func=cmd_fingerprint)

"""``parity convert`` and ``parity verify``: thin wrappers over ``backends.mlx.convert`` / ``verify``.

Heavy imports (MLX, torch, NeMo) happen inside the commands, so ``parity --help`` stays fast and
works without MLX installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _utterances(args):
    """The ``--audio`` files, else the application's default utterances (the fixture speech)."""
    if not args.audio:
        return args.context.default_utterances()
    from harness.interface.commands import load_utterances

    return load_utterances(args, args.audio)


def _contexts(args):
    from harness.interface.commands import parse_contexts

    return parse_contexts(args.att_context)


def _print_verification(verification) -> None:
    """One narrow table per lookahead (rows: first-chunk modes and offline; columns: the taps in
    model order), so that every figure reads whole in an 80-column terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    columns = ("mel", "pre_encode", "layers", "encoder", "caches", "decoder", "joint")
    headers = ("mel", "pre_enc", "layers", "encoder", "caches", "decoder", "joint")
    tokens = verification.token_summary()
    for context, by_mode in verification.worst("max_abs").items():
        table = Table(title=f"[{context}] nemo~mlx {verification.dtype}: worst max_abs", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
        table.add_column("mode", no_wrap=True)
        for header in headers:
            table.add_column(header, justify="right", no_wrap=True)
        table.add_column("tokens", justify="right", no_wrap=True)
        for mode, worst in by_mode.items():
            grouped: dict[str, float] = {}
            for tap, value in worst.items():
                group = ("layers" if tap.startswith("layers.") else
                         "caches" if tap.startswith("cache_last_") and tap != "cache_last_channel_len" else tap)
                grouped[group] = max(grouped.get(group, 0.0), value)
            summary = tokens[context][mode]
            table.add_row("pad+drop" if mode == "pad-and-drop" else mode,
                          *(f"{grouped[c]:.1e}" if c in grouped else "–" for c in columns),
                          f"{summary['identical']}/{summary['total']}")
        console.print(table)
    for failure in verification.failures()[:20]:
        console.print(f"FAIL {failure}")
    console.print(("[green]PASS[/] " if verification.passed else "[red]FAIL[/] ") + verification.summary())


def cmd_convert(args) -> int:
    from backends.mlx import mapping
    from backends.mlx.convert import ConversionError, VerificationFailed, convert
    from harness.interface.commands import EXIT_OK, EXIT_USAGE, EXIT_VIOLATION, err

    if args.show_mapping:
        print(mapping.describe())
        return EXIT_OK
    if not args.model or not args.out:
        err("convert needs MODEL.nemo and --out DIR")
        return EXIT_USAGE
    try:
        result = convert(args.model, args.out, dtype=args.dtype, skip_verify=args.skip_verify,
                         overwrite=args.overwrite, reference=lambda: args.context.load_reference(args.model),
                         utterances=None if args.skip_verify else _utterances(args),
                         att_context_sizes=_contexts(args),
                         tolerances_path=args.tolerances, progress=lambda m: print(f"  {m}", file=sys.stderr))
    except VerificationFailed as failure:
        err(str(failure))
        return EXIT_VIOLATION
    except ConversionError as error:
        err(str(error))
        return EXIT_USAGE
    artifact = result.artifact
    if result.verification is not None:
        _print_verification(result.verification)
    print(f"wrote {result.published} ({artifact.dtype}, {len(artifact.tensors['model.safetensors'])} tensors, "
          f"{artifact.seconds:.1f} s, peak RSS {artifact.peak_rss_mb:.0f} MB"
          f"{', verified' if result.verification is not None else ', NOT verified (--skip-verify)'})")
    return EXIT_OK


def cmd_verify(args) -> int:
    """Without --nemo: config claims vs weight facts. With --nemo: also every tensor against the
    source through the mapping, and the numeric check; any failure is localized to tap and tensors."""
    from harness.interface.commands import EXIT_OK, EXIT_VIOLATION

    diagnose = args.context.diagnose
    static = diagnose(args.artifact, args.nemo, numeric=False)
    for line in static.sentences():
        print(line)
    if static.contradictions:
        return EXIT_VIOLATION  # the weights are not the model the config describes: numbers mean nothing
    if args.nemo is None:
        print("config and weights agree; add --nemo MODEL.nemo to compare every tensor and run the numeric check")
        return EXIT_OK
    from backends.mlx.verify import verify_artifact

    reference = args.context.load_reference(args.nemo)
    utterances = _utterances(args)
    verification = verify_artifact(args.artifact, args.nemo, reference=reference, utterances=utterances,
                                   att_context_sizes=_contexts(args), tolerances_path=args.tolerances,
                                   device=args.device, progress=lambda m: print(f"  {m}", file=sys.stderr))
    _print_verification(verification)
    if args.json:
        args.json.write_text(json.dumps(verification.to_dict(), indent=2) + "\n")
        print(f"report written to {args.json}")
    if verification.passed and not static.differing_tensors:
        return EXIT_OK
    located = diagnose(args.artifact, args.nemo, utterances=utterances if args.audio else None,
                       att_context_sizes=_contexts(args),
                       reference=reference)
    for line in located.sentences():
        if line.startswith(("first divergence", "most likely")):
            print(line)
    return EXIT_VIOLATION


def _add_check_options(parser: argparse.ArgumentParser) -> None:
    from harness.interface.commands import add_audio_options

    parser.add_argument("--audio", nargs="+", type=Path, help="audio files for the check (default: the fixture speech)")
    parser.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all of the model's")
    parser.add_argument("--tolerances", type=Path, help="tolerance file (default: harness/judge/tolerances.toml)")
    add_audio_options(parser)


def register(subparsers) -> None:
    from backends.mlx.artifact import DTYPES

    p = subparsers.add_parser("convert", help="convert a .nemo to a verified MLX artifact directory")
    p.add_argument("model", nargs="?", metavar="MODEL.nemo", type=Path)
    p.add_argument("--out", type=Path, metavar="DIR", help="artifact directory (published atomically)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--skip-verify", action="store_true", help="publish without the NeMo-vs-MLX parity check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR (after verification)")
    p.add_argument("--show-mapping", action="store_true", help="print the weight mapping table and exit")
    _add_check_options(p)
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("verify", help="check an MLX artifact: config vs weights, and against its source with --nemo")
    p.add_argument("artifact", metavar="DIR", type=Path)
    p.add_argument("--nemo", type=Path, metavar="MODEL.nemo", help="the checkpoint the artifact was converted from")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="MLX device")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the report here")
    _add_check_options(p)
    p.set_defaults(func=cmd_verify)

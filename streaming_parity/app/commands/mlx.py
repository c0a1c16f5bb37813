"""``parity convert`` and ``parity verify``: thin wrappers over ``streaming_parity.backends.mlx.convert`` and
``streaming_parity.app.verify``.

Heavy imports (MLX, torch, NeMo) happen inside the commands, so ``parity --help`` stays fast and
works without MLX installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def _utterances(args):
    """The ``--audio`` files, else the application's default utterances (the fixture speech), with the
    ``--prompt`` locale (prompt-conditioned models) when given."""
    if not args.audio:
        utterances = args.context.default_utterances()
        prompt = getattr(args, "prompt", None)
        return [dataclasses.replace(u, prompt=prompt) for u in utterances] if prompt else utterances
    from streaming_parity.interface.commands import load_utterances

    return load_utterances(args, args.audio)


def _contexts(args):
    from streaming_parity.interface.commands import parse_contexts

    return parse_contexts(args.att_context)


def _print_verification(verification) -> None:
    """One narrow table per lookahead (rows: first-chunk modes and offline; columns: the taps in
    model order), so that every figure reads whole in an 80-column terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from streaming_parity.app.verify import TAP_GROUPS, grouped_worst

    console = Console(highlight=False)
    worst_max_abs = verification.worst("max_abs")
    columns = TAP_GROUPS
    headers = ("mel", "pre_enc", "layers", "encoder", "caches", "decoder", "joint")
    tokens = verification.token_summary()
    for context, by_mode in worst_max_abs.items():
        table = Table(title=f"[{context}] nemo~mlx {verification.dtype}: worst max_abs", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
        table.add_column("mode", no_wrap=True)
        for header in headers:
            table.add_column(header, justify="right", no_wrap=True)
        table.add_column("tokens", justify="right", no_wrap=True)
        for mode, worst in by_mode.items():
            grouped = grouped_worst(worst)
            summary = tokens[context][mode]
            table.add_row("pad+drop" if mode == "pad-and-drop" else mode,
                          *(f"{grouped[c]:.1e}" if c in grouped else "–" for c in columns),
                          f"{summary['identical']}/{summary['total']}")
        console.print(table)
        # A hybrid RNNT-CTC model's CTC head: one line under the table, which stays 80 columns wide.
        ctc = [f"{'pad+drop' if mode == 'pad-and-drop' else mode} {worst['ctc']:.1e}"
               for mode, worst in by_mode.items() if "ctc" in worst]
        if ctc:
            console.print("ctc head worst max_abs: " + ", ".join(ctc))
        # A prompt-conditioned model's encoder output after prompt_kernel: likewise one line.
        prompt = [f"{'pad+drop' if mode == 'pad-and-drop' else mode} {worst['prompt']:.1e}"
                  for mode, worst in by_mode.items() if "prompt" in worst]
        if prompt:
            console.print("prompt kernel worst max_abs: " + ", ".join(prompt))
    for failure in verification.failures()[:20]:
        console.print(f"FAIL {failure}")
    console.print(("[green]PASS[/] " if verification.passed else "[red]FAIL[/] ") + verification.summary())


def cmd_convert(args) -> int:
    from streaming_parity.app import model_card
    from streaming_parity.app.verify import verifier
    from streaming_parity.backends.mlx import mapping
    from streaming_parity.backends.mlx.convert import ConversionError, VerificationFailed, convert
    from streaming_parity.core.system.progress import ProgressBar
    from streaming_parity.interface.commands import EXIT_OK, EXIT_USAGE, EXIT_VIOLATION, err

    if args.show_mapping:
        print(mapping.describe())
        return EXIT_OK
    if not args.model or not args.out:
        err("convert needs MODEL (a .nemo or ORG/NAME on the hub) and --out DIR")
        return EXIT_USAGE
    source = args.context.resolve_source(args.model)
    reference = functools.cache(lambda: args.context.load_reference(source.path))  # loaded once, if at all
    try:
        with ProgressBar("convert", logger=log) as bar:
            verify = None if args.skip_verify else verifier(
                source.path, reference=reference,
                utterances=_utterances(args), att_context_sizes=_contexts(args), tolerances_path=args.tolerances,
                progress=bar, source_hub=source.hub)
            result = convert(source.path, args.out, dtype=args.dtype, verify=verify, skip_verify=args.skip_verify,
                             overwrite=args.overwrite, progress=bar, source_hub=source.hub)
    except VerificationFailed as failure:
        err(str(failure))
        return EXIT_VIOLATION
    except ConversionError as error:
        err(str(error))
        return EXIT_USAGE
    artifact = result.artifact
    if result.verification is not None:
        _print_verification(result.verification)
        with ProgressBar("convert", logger=log) as bar:
            evidence = record_evidence(result.published, source, reference(), _utterances(args),
                                       _contexts(args), progress=bar.phase)
        print(f"reference recorded into the artifact: {evidence} ({size_mb(evidence):.1f} MB); "
              f"parity verify {result.published} re-judges against it without NeMo")
    if args.model_card:
        log.info("model card: %s", model_card.write(result.published, artifact_ref=str(args.out)))
    print(f"wrote {result.published} ({artifact.dtype}, {len(artifact.tensors['model.safetensors'])} tensors, "
          f"{artifact.seconds:.1f} s, peak RSS {artifact.peak_rss_mb:.0f} MB"
          f"{', verified' if result.verification is not None else ', NOT verified (--skip-verify)'})")
    return EXIT_OK


# What an artifact carries of its reference: a small recording (streaming_parity.judge.recording) that ``parity verify
# DIR`` judges against where there is no NeMo (an Apple silicon Mac), and ``parity publish`` uploads with it.
EVIDENCE_DIR = "reference"
EVIDENCE_UTTERANCES = 2


def record_evidence(artifact: Path, source, reference, utterances, contexts, *, progress=None) -> Path:
    """Record ``reference`` on the shortest ``EVIDENCE_UTTERANCES`` utterances, at every lookahead (or
    ``contexts``), plain and pad-and-drop and offline, into ``artifact/reference``."""
    from streaming_parity.app.source_provenance import record_reference

    chosen = sorted(utterances, key=lambda u: len(u.audio))[:EVIDENCE_UTTERANCES]
    target = artifact / EVIDENCE_DIR
    if target.exists():
        shutil.rmtree(target)
    return record_reference(reference, source.path, chosen, contexts or reference.info.att_context_sizes, target,
                            hub=source.hub, progress=progress)


def size_mb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6


def source_mismatch(artifact: Path, source, static=None) -> str | None:
    """Why ``artifact`` was not converted from ``source`` (a ``ResolvedSource``), or None.

    The recorded source (``artifact.json``, else the weights' safetensors metadata) names the
    checkpoint's sha256: another sha256 is another checkpoint. Without a record, ``static`` (the
    tensor-by-tensor diagnosis against ``source``) decides: every weight differing means another
    checkpoint, not a faulty conversion of this one."""
    from streaming_parity.backends.mlx.artifact import ARTIFACT_FILE, MODEL_FILE, recorded_provenance
    from streaming_parity.core.nemo_file import sha256_file
    from streaming_parity.core.safe_files import read_safetensors_header
    from streaming_parity.core.system.provenance import Provenance

    if not (artifact / MODEL_FILE).is_file():
        return None  # not an artifact: the diagnosis says so
    recorded = recorded_provenance(artifact)
    header = read_safetensors_header(artifact / MODEL_FILE)
    if recorded is None and header.metadata.get("source_sha256"):
        recorded = Provenance(source_sha256=header.metadata["source_sha256"])
    actual = sha256_file(source.path)
    given = Provenance(source_name=source.path.name, source_sha256=actual,
                       hub_repo=source.hub.repo if source.hub else None,
                       hub_revision=source.hub.revision if source.hub else None)
    if recorded is not None and recorded.source_sha256:
        if recorded.source_sha256 == actual:
            return None
        return (f"{artifact} was converted from another checkpoint: it records {recorded.source_label()}, "
                f"--nemo {source.given} is {given.source_label()}")
    if static is None:
        return None
    weights = set(header.tensors)
    differing = {d.name for d in static.differing_tensors}
    if weights and weights <= differing:
        return (f"{artifact} was not converted from --nemo {source.given} ({given.source_label()}): every one "
                f"of its {len(weights)} weight tensors differs from it, and no {ARTIFACT_FILE} names its source")
    return None


def cmd_verify(args) -> int:
    """Without --nemo: config claims vs weight facts. With --nemo: first that the artifact was made
    from that checkpoint, then every tensor against it through the mapping, and the numeric check;
    any failure is localized to tap and tensors."""
    from streaming_parity.core.system.progress import ProgressBar
    from streaming_parity.interface.commands import EXIT_OK, EXIT_USAGE, EXIT_VIOLATION, err

    artifact = args.context.resolve_source(args.artifact, "mlx").path
    if args.nemo and args.reference:
        err("verify takes --nemo MODEL or --reference REF, not both")
        return EXIT_USAGE
    source = args.context.resolve_source(args.nemo) if args.nemo else None
    nemo_path = source.path if source else None
    diagnose = args.context.diagnose
    recording = args.reference
    if recording is None and source is None and (artifact / EVIDENCE_DIR / "recording.json").is_file():
        recording = artifact / EVIDENCE_DIR  # the reference recorded when the artifact was converted
    if source is not None:
        mismatch = source_mismatch(artifact, source)
        if mismatch:
            print(f"FAIL {mismatch}")
            return EXIT_VIOLATION
    with ProgressBar("verify", logger=log) as bar:
        bar.phase("config and weights" + (" against the checkpoint" if source else ""))
        static = diagnose(artifact, nemo_path, numeric=False)
    if source is not None and (mismatch := source_mismatch(artifact, source, static)):
        print(f"FAIL {mismatch}")
        return EXIT_VIOLATION
    for line in static.sentences():
        print(line)
    if static.contradictions:
        return EXIT_VIOLATION  # the weights are not the model the config describes: numbers mean nothing
    if recording is not None:
        return _verify_against_recording(args, artifact, recording)
    if source is None:
        print("config and weights agree; add --nemo MODEL.nemo to compare every tensor and run the numeric check")
        return EXIT_OK
    from streaming_parity.app.verify import verify_artifact

    utterances = _utterances(args)
    with ProgressBar("verify", logger=log) as bar:
        bar.phase(f"loading NeMo ({nemo_path.name})")
        reference = args.context.load_reference(nemo_path)
        verification = verify_artifact(artifact, nemo_path, reference=reference, utterances=utterances,
                                       att_context_sizes=_contexts(args), tolerances_path=args.tolerances,
                                       device=args.device, progress=bar, source_hub=source.hub)
    _print_verification(verification)
    if args.json:
        args.json.write_text(json.dumps(verification.to_dict(), indent=2) + "\n")
        print(f"report written to {args.json}")
    if verification.passed and not static.differing_tensors:
        return EXIT_OK
    with ProgressBar("verify", logger=log) as bar:
        bar.phase("locating the divergence")
        located = diagnose(artifact, nemo_path, utterances=utterances if args.audio else None,
                           att_context_sizes=_contexts(args), reference=reference)
    for line in located.sentences():
        if line.startswith(("first divergence", "most likely")):
            print(line)
    return EXIT_VIOLATION


def _verify_against_recording(args, artifact: Path, path: Path) -> int:
    """The numeric check against a recording of the reference (``parity record``, or the one ``parity convert``
    put in the artifact): no NeMo and no torch needed, so the artifact is judged where its users run it."""
    from streaming_parity.app.verify import verify_artifact
    from streaming_parity.backends.mlx.artifact import recorded_provenance
    from streaming_parity.core.system.progress import ProgressBar
    from streaming_parity.interface.commands import EXIT_OK, EXIT_VIOLATION
    from streaming_parity.judge.recording import Recording

    recording = Recording(path)
    made_from = recorded_provenance(artifact)
    recording.check_made_from(made_from.source_sha256 if made_from else None, str(artifact))
    for line in recording.describe():
        print(f"reference: {line}")
    utterances = _utterances(args) if args.audio else recording.utterances()
    with ProgressBar("verify", logger=log) as bar:
        verification = verify_artifact(artifact, None, reference=recording, utterances=utterances,
                                       att_context_sizes=_contexts(args), tolerances_path=args.tolerances,
                                       include_offline=recording.manifest["plan"]["offline"], device=args.device,
                                       progress=bar)
    _print_verification(verification)
    if args.json:
        args.json.write_text(json.dumps(verification.to_dict(), indent=2) + "\n")
        print(f"report written to {args.json}")
    return EXIT_OK if verification.passed else EXIT_VIOLATION


def cmd_publish(args) -> int:
    """Upload a verified artifact (``streaming_parity.app.publish``); ``--dry-run`` lists what would go."""
    from streaming_parity.app.publish import PublishRefused, check_publishable, plan, upload
    from streaming_parity.interface.commands import EXIT_OK, EXIT_VIOLATION, err

    try:
        check_publishable(args.artifact)
    except PublishRefused as refusal:
        err(str(refusal))
        return EXIT_VIOLATION
    files = plan(args.artifact, args.repo, args.revision)
    target = args.repo + (f"@{args.revision}" if args.revision else "")
    if not any(file.name == "README.md" for file in files):
        log.warning("%s has no model card (README.md): parity convert --model-card writes one", args.artifact)
    for file in files:
        print(f"{file.size:>12}  {file.sha256}  {file.name}")
    total = sum(file.size for file in files)
    if args.dry_run:
        print(f"dry run: {len(files)} files, {total} bytes would be uploaded to {target}"
              f"{' (private)' if args.private else ''}")
        return EXIT_OK
    commit = upload(args.artifact, args.repo, files, revision=args.revision, private=args.private)
    print(f"uploaded {len(files)} files, {total} bytes to {target}: {getattr(commit, 'commit_url', commit)}")
    return EXIT_OK


def _add_check_options(parser: argparse.ArgumentParser) -> None:
    from streaming_parity.interface.commands import add_audio_options

    parser.add_argument("--audio", nargs="+", type=Path, help="audio files for the check (default: the fixture speech)")
    parser.add_argument("--att-context", action="append", metavar="L,R", help="lookahead(s); default: all of the model's")
    parser.add_argument("--tolerances", type=Path, help="tolerance file (default: streaming_parity/judge/tolerances.toml)")
    add_audio_options(parser)


def register(subparsers) -> None:
    from streaming_parity.backends.mlx.artifact import DTYPES

    p = subparsers.add_parser("convert", help="convert a .nemo to a verified MLX artifact directory")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a .nemo, ORG/NAME[@REVISION] or hf://ORG/NAME[@REVISION]/FILE")
    p.add_argument("--out", type=Path, metavar="DIR", help="artifact directory (published atomically)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--skip-verify", action="store_true", help="publish without the NeMo-vs-MLX parity check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR (after verification)")
    p.add_argument("--show-mapping", action="store_true", help="print the weight mapping table and exit")
    p.add_argument("--model-card", action="store_true",
                   help="also write README.md, the hub model card (parity table, WER, how to verify)")
    _add_check_options(p)
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("verify", help="check an MLX artifact: config vs weights, and against its source with --nemo")
    p.add_argument("artifact", metavar="DIR", help="an MLX artifact directory, or ORG/NAME[@REVISION] on the hub")
    p.add_argument("--nemo", metavar="MODEL",
                   help="the checkpoint the artifact was converted from: a .nemo or ORG/NAME[@REVISION]")
    p.add_argument("--reference", type=Path, metavar="REF",
                   help="a recording of the reference (parity record) to judge against, no NeMo needed; without "
                        "--nemo or --reference, the recording parity convert put in DIR/reference is used")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="MLX device")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the report here")
    _add_check_options(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("publish", help="upload a verified MLX artifact to the hub")
    p.add_argument("artifact", metavar="DIR", type=Path, help="an artifact whose parity.json records a passed check")
    p.add_argument("repo", metavar="REPO", help="the hub repository, ORG/NAME")
    p.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if need be)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="list the files (size, sha256) and upload nothing")
    p.set_defaults(func=cmd_publish)

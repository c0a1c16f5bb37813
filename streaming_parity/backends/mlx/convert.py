"""``parity convert``: a NeMo FastConformer transducer ``.nemo`` -> a verified MLX artifact directory.

Artifact layout (``DIR``)::

    model.safetensors     weights in MLX layout (the mapping in streaming_parity/backends/mlx/mapping.py), chosen dtype
    frontend.safetensors  the checkpoint's window and mel filterbank, float32
    config.json           the NeMo model config, copied faithfully, vocabulary as joint.vocabulary
    tokenizer.model       the SentencePiece model from the .nemo
    artifact.json         what was written: dtype, source sha256, file and per-tensor sha256, provenance
    parity.json           the NeMo-vs-MLX verification that allowed publication (absent with --skip-verify)
    README.md             with ``--model-card``: the hub model card (``streaming_parity/app/model_card.py``)

The conversion is strict (every source tensor mapped or dropped by a named rule, every expected
tensor produced with the expected shape), streams tensor by tensor into the safetensors files, and
publishes atomically: everything is built in a hidden sibling directory and renamed to ``DIR``
only after verification passed. On failure nothing appears at ``DIR`` and the failing report is
kept beside it as ``DIR.parity-failed.json``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.backends.mlx import mapping
from streaming_parity.backends.mlx.artifact import (
    ARTIFACT_FILE,
    ARTIFACT_FORMAT,
    CONFIG_FILE,
    DTYPES,
    FRONTEND_FILE,
    MODEL_FILE,
    PARITY_FILE,
    SAFETENSORS_DTYPE,
    TOKENIZER_FILE,
)
from streaming_parity.core.errors import BadInput
from streaming_parity.core.nemo_config import NemoConfigError
from streaming_parity.core.nemo_file import inspect_nemo, load_state_dict, sha256_file
from streaming_parity.core.system.memory import peak_rss_mb
from streaming_parity.core.system.progress import as_progress, bars_enabled, stderr_console
from streaming_parity.core.system.provenance import HubOrigin, Provenance

PROGRESS_BAR_BYTES = 64 << 20  # show a progress bar for checkpoints larger than this


class ConversionError(BadInput, ValueError):
    """The checkpoint does not map cleanly onto the MLX model; the message names the tensor."""


class VerificationFailed(RuntimeError):
    """The converted artifact does not match NeMo within tolerance; nothing was published."""

    def __init__(self, message: str, report_path: Path | None):
        super().__init__(message)
        self.report_path = report_path


# ------------------------------------------------------------------------------------------------
# Expected targets: names and shapes the MLX model declares
# ------------------------------------------------------------------------------------------------

def artifact_config(config: Mapping[str, Any], vocabulary: Sequence[str]) -> dict[str, Any]:
    """The source config, unchanged except that the vocabulary is embedded as ``joint.vocabulary``."""
    result = json.loads(json.dumps(config))  # deep copy, and proof it is JSON-serialisable
    result.setdefault("joint", {})["vocabulary"] = list(vocabulary)
    return result


def expected_targets(config: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{file: {name: shape}}`` the MLX model and front end expect for this config.

    The model is built lazily (MLX does not materialise its initial parameters until evaluated),
    so this costs no memory even for large models.
    """
    from mlx.utils import tree_flatten

    from streaming_parity.backends.mlx.model import ModelArgs, StreamingRNNT

    args = ModelArgs.from_nemo_config(config)
    model = StreamingRNNT(args)
    pre = args.preprocessor
    return {
        MODEL_FILE: {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())},
        FRONTEND_FILE: {"window": (pre.win_length,), "filterbank": (pre.n_mels, pre.n_fft // 2 + 1)},
    }


def vocabulary_of(archive, config: Mapping[str, Any]) -> list[str]:
    """The vocabulary: the SentencePiece model's pieces, else the config's ``joint.vocabulary``."""
    try:
        model_bytes = archive.tokenizer_model_bytes()
    except Exception:  # noqa: BLE001 - any unreadable tokenizer member: fall back to the config's vocabulary
        model_bytes = None
    if model_bytes is not None:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocabulary = (config.get("joint") or {}).get("vocabulary")
    if not vocabulary:
        raise ConversionError(f"{archive.path}: no tokenizer.model and no joint.vocabulary in the config")
    return list(vocabulary)


# ------------------------------------------------------------------------------------------------
# Streaming safetensors writer (header first, then each tensor at its offset)
# ------------------------------------------------------------------------------------------------

class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor; the header is known up front from the expected shapes."""

    def __init__(self, path: Path, shapes: Mapping[str, tuple[int, ...]], dtype: str, metadata: Mapping[str, str]):
        self.path, self.dtype = path, dtype
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        self.offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for name in sorted(shapes):
            size = int(np.prod(shapes[name], dtype=np.int64)) * itemsize
            self.offsets[name] = (position, position + size)
            header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]),
                            "data_offsets": [position, position + size]}
            position += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.data_start = 8 + len(encoded)
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.handle.truncate(self.data_start + position)
        self.written: dict[str, str] = {}  # name -> sha256 of its bytes

    def write(self, name: str, data: bytes) -> None:
        begin, end = self.offsets[name]
        if len(data) != end - begin:
            raise ConversionError(f"{name}: {len(data)} bytes for a slot of {end - begin}")
        self.handle.seek(self.data_start + begin)
        self.handle.write(data)
        self.written[name] = hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        self.handle.close()


def _tensor_bytes(tensor, dtype: str) -> bytes:
    """Bytes of a torch tensor cast to ``dtype`` (bfloat16 has no numpy type; torch does the cast)."""
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return tensor.detach().to(torch_dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------------------------------
# The conversion
# ------------------------------------------------------------------------------------------------

@dataclass
class WrittenArtifact:
    directory: Path
    dtype: str
    source_sha256: str
    files: dict[str, str]  # file name -> sha256
    tensors: dict[str, dict[str, str]]  # weights file -> {tensor: sha256}
    dropped: dict[str, str]  # source tensor -> rule name
    seconds: float
    peak_rss_mb: float


def _apply(rule: mapping.Rule, source_name: str, tensor, target: str, expected: tuple[int, ...]):
    import torch

    array = tensor.detach().cpu()
    if rule.layout is mapping.CONV2D_OHWI:
        if array.dim() != 4:
            raise ConversionError(f"{source_name}: rule '{rule.name}' expects a 4-D weight, got shape "
                                  f"{tuple(array.shape)} (target {target} expects {expected})")
        array = array.permute(0, 2, 3, 1)
    elif rule.layout is mapping.CONV1D_OKI:
        if array.dim() != 3:
            raise ConversionError(f"{source_name}: rule '{rule.name}' expects a 3-D weight, got shape "
                                  f"{tuple(array.shape)} (target {target} expects {expected})")
        array = array.permute(0, 2, 1)
    elif rule.layout is mapping.SQUEEZE_BATCH:
        if array.dim() < 1 or array.shape[0] != 1:
            raise ConversionError(f"{source_name}: rule '{rule.name}' expects a leading batch axis of 1, got shape "
                                  f"{tuple(array.shape)} (target {target} expects {expected})")
        array = array.reshape(array.shape[1:])
    if not torch.is_floating_point(array):
        raise ConversionError(f"{source_name}: expected a floating-point tensor, got {array.dtype}")
    if tuple(array.shape) != tuple(expected):
        raise ConversionError(f"{source_name} -> {target}: shape {tuple(array.shape)} after '{rule.layout.name}' "
                              f"(source shape {tuple(tensor.shape)}), the MLX model expects {tuple(expected)}")
    return array


def write_artifact(nemo_path: str | Path, out_dir: str | Path, *, dtype: str = "float32",
                   progress: Any = None, source_hub: HubOrigin | None = None) -> WrittenArtifact:
    """Convert ``nemo_path`` into ``out_dir`` (which must be empty or absent). No verification here.

    ``progress``: a bar of its own (True, or None: for large checkpoints), or the caller's
    (``streaming_parity.core.system.progress.ProgressBar``), advanced once per source tensor. ``source_hub``:
    where the checkpoint came from, for the provenance in ``artifact.json``."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    started = time.perf_counter()
    nemo_path, out_dir = Path(nemo_path), Path(out_dir)
    archive = inspect_nemo(nemo_path)
    config = archive.config
    vocabulary = vocabulary_of(archive, config)
    config_vocabulary = (config.get("joint") or {}).get("vocabulary")
    if config_vocabulary and list(config_vocabulary) != vocabulary:
        raise ConversionError(f"{nemo_path}: joint.vocabulary in the config differs from the tokenizer's pieces")
    out_config = artifact_config(config, vocabulary)
    try:
        expected = expected_targets(out_config)
    except (NotImplementedError, KeyError, NemoConfigError) as error:
        raise ConversionError(f"{nemo_path}: unsupported model config: {error}") from None

    out_dir.mkdir(parents=True, exist_ok=True)
    source_sha = sha256_file(nemo_path)
    state = load_state_dict(archive)
    total_bytes = sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel"))
    metadata = {"format": ARTIFACT_FORMAT, "source_sha256": source_sha}
    writers = {
        MODEL_FILE: SafetensorsWriter(out_dir / MODEL_FILE, expected[MODEL_FILE], dtype, {**metadata, "dtype": dtype}),
        FRONTEND_FILE: SafetensorsWriter(out_dir / FRONTEND_FILE, expected[FRONTEND_FILE], "float32",
                                         {**metadata, "dtype": "float32"}),
    }
    dropped: dict[str, str] = {}
    pending_sums: dict[str, dict[str, Any]] = {}
    try:
        with _progress(progress if progress is not None else total_bytes > PROGRESS_BAR_BYTES,
                       len(state), f"converting {nemo_path.name}") as advance:
            for name in list(state):
                tensor = state.pop(name)  # free each source tensor once written: peak ~ one checkpoint
                advance()
                match = mapping.match_source(name)
                if match is None:
                    raise ConversionError(f"{name} (shape {tuple(getattr(tensor, 'shape', ()))}): no mapping rule "
                                          f"maps or drops this tensor; the checkpoint has a module this converter "
                                          f"does not know")
                if match.rule.is_drop:
                    dropped[name] = match.rule.name
                    continue
                file = match.rule.file
                shapes = expected[file]
                if match.target not in shapes:
                    raise ConversionError(f"{name} (shape {tuple(tensor.shape)}) maps to {match.target} by rule "
                                          f"'{match.rule.name}', which the MLX model for this config does not have")
                if match.target in writers[file].written:
                    raise ConversionError(f"{name}: {match.target} was already written")
                target_shape = shapes[match.target]
                if match.rule.is_sum:
                    parts = pending_sums.setdefault(match.target, {})
                    parts[name] = _apply(match.rule, name, tensor, match.target, target_shape)
                    if len(parts) < len(match.partner_sources):
                        continue
                    array = sum(parts[source] for source in match.partner_sources)
                    del pending_sums[match.target]
                else:
                    array = _apply(match.rule, name, tensor, match.target, target_shape)
                writers[file].write(match.target, _tensor_bytes(array, writers[file].dtype))
        for target, parts in pending_sums.items():
            rule_sources = mapping.match_source(next(iter(parts))).partner_sources
            missing = [s for s in rule_sources if s not in parts]
            raise ConversionError(f"{target}: needs {' + '.join(rule_sources)}, the checkpoint lacks {missing}")
        for file, writer in writers.items():
            missing = sorted(set(expected[file]) - set(writer.written))
            if missing:
                shown = ", ".join(f"{m} {expected[file][m]}" for m in missing[:8])
                raise ConversionError(f"{nemo_path}: the MLX model expects {len(missing)} tensor(s) the checkpoint "
                                      f"does not provide: {shown}{' ...' if len(missing) > 8 else ''}")
    finally:
        for writer in writers.values():
            writer.close()
        del state

    (out_dir / CONFIG_FILE).write_text(json.dumps(out_config, indent=2, ensure_ascii=False) + "\n")
    try:
        (out_dir / TOKENIZER_FILE).write_bytes(archive.tokenizer_model_bytes())
    except Exception:  # noqa: BLE001
        pass  # a checkpoint without a SentencePiece model: the vocabulary in config.json suffices to decode
    files = {path.name: sha256_file(path) for path in sorted(out_dir.iterdir()) if path.is_file()}
    artifact = WrittenArtifact(
        directory=out_dir, dtype=dtype, source_sha256=source_sha, files=files,
        tensors={file: dict(sorted(writer.written.items())) for file, writer in writers.items()},
        dropped=dropped, seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(),
    )
    (out_dir / ARTIFACT_FILE).write_text(json.dumps({
        "format": ARTIFACT_FORMAT,
        "dtype": dtype,
        "source": {"name": nemo_path.name, "sha256": source_sha},
        "files": files,
        "tensors": artifact.tensors,
        "dropped": dropped,
        "mapping": mapping.describe().splitlines(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "provenance": Provenance.collect(nemo_path, sha256=source_sha, hub=source_hub).to_dict(),
    }, indent=2) + "\n")
    return artifact


class _progress:
    """A rich progress bar over the source tensors, the caller's, or nothing for small checkpoints."""

    def __init__(self, enabled: Any, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self) -> Callable[[], None]:
        if callable(getattr(self.enabled, "advance", None)):  # the caller's bar
            steps, self.enabled = self.enabled, False
            steps.total(self.total)
            steps.phase(self.description)
            return lambda: steps.advance()
        self.enabled = self.enabled and bars_enabled()  # a terminal, and not parity -q
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=stderr_console(), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


# ------------------------------------------------------------------------------------------------
# Convert + verify + publish atomically
# ------------------------------------------------------------------------------------------------

def failed_report_path(out_dir: Path) -> Path:
    return out_dir.parent / f"{out_dir.name}.parity-failed.json"


@dataclass
class ConversionResult:
    artifact: WrittenArtifact
    verification: Any = None  # what convert's verify returned (None with skip_verify)
    published: Path | None = None


def convert(nemo_path: str | Path, out_dir: str | Path, *, dtype: str = "float32",
            verify: Callable[[Path], Any] | None = None, skip_verify: bool = False, overwrite: bool = False,
            progress: Any = None, progress_bar: bool | None = None,
            source_hub: HubOrigin | None = None) -> ConversionResult:
    """Convert, verify (unless ``skip_verify``) and publish ``out_dir`` atomically.

    ``verify`` is called on the written (staging) directory before it is published, and returns the
    verification: an object with ``passed``, ``summary()`` and ``to_dict()``. What verifying means (the
    reference, the utterances, the tolerances) is the caller's: ``parity convert`` passes
    ``streaming_parity.app.verify.verifier(...)``. ``progress``: a ``callable(text)``, or a
    ``streaming_parity.core.system.progress.ProgressBar`` that then also counts the tensors.
    ``source_hub``: where the checkpoint came from.

    Raises ``ConversionError`` (nothing written at ``out_dir``) or ``VerificationFailed`` (nothing
    written at ``out_dir``; the report is kept at ``failed_report_path(out_dir)``).
    """
    out_dir = Path(out_dir)
    if skip_verify == (verify is not None):
        raise ValueError("pass either verify (a callable run on the written artifact) or skip_verify=True")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} already exists; pass --overwrite to replace it after verification")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    steps = as_progress(progress)
    bar = progress if progress is steps and progress_bar is None else progress_bar
    try:
        artifact = write_artifact(nemo_path, staging, dtype=dtype, progress=bar, source_hub=source_hub)
        steps.phase(f"converted in {artifact.seconds:.1f} s (peak RSS {artifact.peak_rss_mb:.0f} MB)")
        verification = None
        if verify is not None:
            steps.phase("verifying")
            verification = verify(staging)
            report = verification.to_dict()
            if not verification.passed:
                failed = failed_report_path(out_dir)
                failed.write_text(json.dumps(report, indent=2) + "\n")
                raise VerificationFailed(f"verification failed, nothing published at {out_dir}: "
                                         f"{verification.summary()}; report kept at {failed}", failed)
            (staging / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _publish(staging, out_dir)
        stale = failed_report_path(out_dir)
        if stale.exists():
            stale.unlink()
        artifact.directory = out_dir
        return ConversionResult(artifact=artifact, verification=verification, published=out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is swapped out whole, never merged."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    retired = out_dir.parent / f".{out_dir.name}.retired-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, retired)
    try:
        os.replace(staging, out_dir)
    except OSError:
        os.replace(retired, out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)

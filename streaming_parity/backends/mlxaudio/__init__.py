"""mlx-audio (Blaizzy/mlx-audio), a peer runtime, running NVIDIA's prompt-conditioned Nemotron-3.5 streaming ASR
(``mlx_audio.stt.models.nemotron_asr``) the way its users run it.

- ``prepare``: mlx-audio's own converter (``python -m mlx_audio.stt.models.nemotron_asr.convert``) on the
  ``.nemo``, in a subprocess, cached per checkpoint and dtype, published atomically;
- ``load``: ``mlx_audio.stt.load(directory)`` with its defaults (``strict=False``);
- ``backend.py``: ``MlxAudioBackend``, its streaming generation fed audio and a prompt locale, with the
  encoder output of every chunk before and after the prompt kernel as taps.

The package is ``streaming_parity.backends.mlxaudio``: ``backends.mlx_audio`` would read as the library's own name.
Importing it imports neither mlx nor mlx-audio.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import InvalidInput, Unsupported

CONVERTER = "mlx_audio.stt.models.nemotron_asr.convert"
FILES = ("config.json", "model.safetensors", "tokenizer.model")
MODEL_TYPES = ("nemotron_asr",)
PROMPT_TARGET_SUFFIX = "EncDecRNNTBPEModelWithPrompt"


def check_supported(nemo_path: Path) -> None:
    """mlx-audio's ``nemotron_asr`` is the prompt-conditioned model; refuse another (its converter would build a
    randomly initialised prompt kernel for it) before converting."""
    from streaming_parity.core.nemo_file import inspect_nemo

    config = inspect_nemo(nemo_path).config
    if not str(config.get("target", "")).endswith(PROMPT_TARGET_SUFFIX):
        raise Unsupported(f"{nemo_path}: mlx-audio's nemotron_asr runs {PROMPT_TARGET_SUFFIX} models, not "
                          f"{config.get('target')!r}")


def prepare(nemo_path: Path, work_dir: Path, *, dtype: str = "float32",
            att_context_sizes: Sequence[Sequence[int]] | None = None) -> Path:
    """Run mlx-audio's converter on ``nemo_path`` once (keyed by the checkpoint's sha256 and dtype)."""
    from streaming_parity.core.nemo_file import sha256_file

    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidInput(f"mlx-audio's converter writes float32, bfloat16 or float16, not {dtype}")
    check_supported(Path(nemo_path))
    work_dir = Path(work_dir)
    target = work_dir / f"mlx-audio-{sha256_file(nemo_path)[:16]}-{dtype}"
    if all((target / name).is_file() for name in FILES):
        return target
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=work_dir))
    try:
        command = [sys.executable, "-m", CONVERTER, "--nemo-path", str(Path(nemo_path).resolve()),
                   "--mlx-path", str(staging / "out"), "--dtype", dtype]
        run = subprocess.run(command, capture_output=True, text=True, cwd=staging, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"mlx-audio's converter failed ({' '.join(command)}):\n{run.stderr[-2000:]}")
        (staging / "out" / "conversion.json").write_text(json.dumps(
            {"command": command[1:], "stdout": run.stdout.splitlines()[-10:]}, indent=1))
        try:
            os.replace(staging / "out", target)
        except OSError:
            if not all((target / name).is_file() for name in FILES):  # another process published it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load(source: Path, *, dtype: str | None = None, nemo_path: Path | None = None, **options: Any):
    from streaming_parity.backends.mlxaudio.backend import MlxAudioBackend

    return MlxAudioBackend(source, dtype=dtype, nemo_path=nemo_path, **options)


def detect(path: Path) -> str | None:
    """``mlx-audio nemotron_asr`` for a directory mlx-audio's converter wrote."""
    path = Path(path)
    if not (path.is_dir() and all((path / name).is_file() for name in FILES[:2])):
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and config.get("model_type") in MODEL_TYPES and "prompt" in config:
        return f"mlx-audio {config['model_type']}"
    return None

"""Loading and validating audio: one-line errors, nothing written, before any model runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streaming_parity.core.errors import BadInput

SAMPLE_RATE = 16000
MIN_SECONDS = 0.08  # one 80 ms encoder frame


class AudioError(BadInput, ValueError):
    """The audio cannot be used as is; the message says why in one line."""


def load_audio(path: str | Path, *, mix_to_mono: bool = False, resample: bool = False) -> np.ndarray:
    """Read a file as float32 mono samples at 16 kHz, refusing anything the models cannot take."""
    import soundfile as sf

    path = Path(path)
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # noqa: BLE001 - soundfile raises LibsndfileError / RuntimeError / OSError
        reason = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        raise AudioError(f"{path}: cannot read audio ({reason})") from None
    channels = samples.shape[1]
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    if channels > 1:
        if not mix_to_mono:
            raise AudioError(f"{path}: {channels} channels; the models take mono (use --mix-to-mono)")
        samples = samples.mean(axis=1, keepdims=True)
    audio = samples[:, 0]
    if not np.all(np.isfinite(audio)):
        bad = int(np.count_nonzero(~np.isfinite(audio)))
        raise AudioError(f"{path}: {bad} samples are NaN or Inf")
    if rate != SAMPLE_RATE:
        if not resample:
            raise AudioError(f"{path}: sample rate {rate} Hz; the models take {SAMPLE_RATE} Hz (use --resample)")
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="VHQ").astype(np.float32)
    return validate_samples(audio, name=str(path))


def validate_samples(audio: np.ndarray, *, name: str = "audio") -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise AudioError(f"{name}: expected mono samples [T], got shape {audio.shape}")
    if audio.size == 0:
        raise AudioError(f"{name}: the file holds no samples")
    if audio.size < int(MIN_SECONDS * SAMPLE_RATE):
        raise AudioError(f"{name}: {audio.size} samples ({audio.size / SAMPLE_RATE * 1000:.0f} ms); "
                         f"at least {MIN_SECONDS * 1000:.0f} ms are needed")
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{name}: samples are NaN or Inf")
    return audio

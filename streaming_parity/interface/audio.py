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
    if samples.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    audio = conform_samples(samples, rate, name=str(path), mix_to_mono=mix_to_mono, resample=resample)
    return validate_samples(audio, name=str(path))


def conform_samples(samples: np.ndarray, rate: int, *, name: str = "audio", sample_rate: int = SAMPLE_RATE,
                    channels: int = 1, mix_to_mono: bool = False, resample: bool = False) -> np.ndarray:
    """The harness's input stage: ``samples`` (``[T]`` mono or ``[T, C]``) at ``rate`` Hz as float32 mono
    ``[T]`` at ``sample_rate``, what a backend declares it takes (``Capabilities.sample_rate`` and
    ``channels``). Other channel counts are averaged only with ``mix_to_mono``, other rates resampled
    (soxr, very high quality) only with ``resample``; otherwise refused with ``AudioError`` naming the
    option (``--mix-to-mono``, ``--resample``). Length is not judged here (``validate_samples``)."""
    samples = np.asarray(samples, np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise AudioError(f"{name}: expected samples [T] or [T, channels], got shape {samples.shape}")
    found = samples.shape[1]
    if found != channels:
        if channels != 1 or not mix_to_mono:
            wanted = "mono (use --mix-to-mono)" if channels == 1 else f"{channels} channels"
            raise AudioError(f"{name}: {found} channels; the models take {wanted}")
        samples = samples.mean(axis=1, keepdims=True)
    audio = samples[:, 0]
    if not np.all(np.isfinite(audio)):
        bad = int(np.count_nonzero(~np.isfinite(audio)))
        raise AudioError(f"{name}: {bad} samples are NaN or Inf")
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"{name}: sample rate {rate} Hz; the models take {sample_rate} Hz (use --resample)")
        if audio.size:
            import soxr

            audio = soxr.resample(audio, rate, sample_rate, quality="VHQ").astype(np.float32)
    return np.ascontiguousarray(audio, np.float32)


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

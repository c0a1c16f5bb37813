"""NeMo's log-mel front end in numpy, for backends that run without torch.

Reproduces ``FilterbankFeatures.forward`` (collections/asr/parts/preprocessing/features.py, NeMo
3.0.0) in eval mode, step by step:

1. pre-emphasis ``y[0] = x[0]``, ``y[n] = x[n] - 0.97 x[n-1]``, samples past the length zeroed;
2. STFT with ``center=True`` and **constant (zero)** padding of ``n_fft // 2`` on both sides
   (NeMo 3.0.0; older releases used reflect padding), the ``win_length`` window centred in
   ``n_fft`` as ``torch.stft`` does, ``|X|`` then ``|X| ** mag_power`` (2: power spectrum);
3. the mel filterbank (``fb``, stored in the checkpoint; librosa slaney filters);
4. ``log(x + 2**-24)`` (``log_zero_guard_type`` "add") or ``log(max(x, guard))`` ("clamp");
5. optional per-feature / all-features normalisation (only when the config asks: "NA" means none);
6. ``seq_len = (len + 2 * (n_fft // 2) - n_fft) // hop`` (= ``len // hop``), later frames set to
   ``pad_value``; ``pad_to`` padding.

Dither is a training-time augmentation (NeMo applies it only in train mode) and is not reproduced.
The window and filterbank are taken from the checkpoint (``preprocessor.featurizer.window`` and
``.fb``), never recomputed, so the mel scale cannot drift from the model's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.core.nemo_config import PreprocessorConfig, UnsupportedValueError

NEMO_NORMALIZE_CONSTANT = 1e-5  # features.CONSTANT, added to the std in normalize_batch


@dataclass(frozen=True)
class FrontendConfig:
    """The resolved ``FilterbankFeatures`` settings (sample counts, not seconds)."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 128
    preemph: float | None = 0.97
    mag_power: float = 2.0
    log: bool = True
    log_zero_guard_type: str = "add"
    log_zero_guard_value: float = 2.0 ** -24
    normalize: Any = "NA"
    pad_value: float = 0.0
    pad_to: int = 0
    frame_splicing: int = 1
    exact_pad: bool = False

    @classmethod
    def from_nemo_config(cls, cfg: PreprocessorConfig | Mapping[str, Any]) -> FrontendConfig:
        """From the ``preprocessor`` section of a NeMo model config (read by ``streaming_parity.core.nemo_config``,
        which resolves it as ``AudioToMelSpectrogramPreprocessor`` does: seconds to samples, n_fft to
        the next power of two). ``pad_to`` is 0: every streaming backend runs with it off, as NeMo's
        ``CacheAwareStreamingAudioBuffer`` sets it. Settings no front end here reproduces are refused.
        """
        pre = cfg if isinstance(cfg, PreprocessorConfig) else PreprocessorConfig.from_mapping(cfg)
        if pre.frame_splicing != 1:
            raise UnsupportedValueError("preprocessor.frame_splicing > 1 is not supported")
        if pre.exact_pad:
            raise UnsupportedValueError(
                "preprocessor.exact_pad is not supported (NeMo streaming models use center=True)")
        if pre.window != "hann":
            # The window itself comes from the checkpoint; other shapes would work but are untested.
            raise UnsupportedValueError(f"preprocessor.window {pre.window!r} is not supported")
        if isinstance(pre.log_zero_guard_value, str):
            raise UnsupportedValueError(
                f"preprocessor.log_zero_guard_value {pre.log_zero_guard_value!r} (dtype-dependent) is not supported")
        if pre.normalize not in ("NA", "none", "None", "", None, "per_feature", "all_features"):
            raise UnsupportedValueError(f"preprocessor.normalize {pre.normalize!r} is not supported")
        return cls(
            sample_rate=pre.sample_rate, n_fft=pre.n_fft, win_length=pre.win_length, hop_length=pre.hop_length,
            n_mels=pre.n_mels, preemph=pre.preemph, mag_power=pre.mag_power, log=pre.log,
            log_zero_guard_type=pre.log_zero_guard_type, log_zero_guard_value=pre.log_zero_guard_value,
            normalize=pre.normalize, pad_value=pre.pad_value, pad_to=0, frame_splicing=1, exact_pad=False,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FrontendConfig:
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Frontend:
    """Log-mel features from float32 audio ``[B, samples]``: ``(mel [B, n_mels, T], lengths [B])``."""

    config: FrontendConfig
    filterbank: np.ndarray  # [n_mels, n_fft // 2 + 1]
    window: np.ndarray | None  # [win_length], None for a rectangular window
    _padded_window: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cfg = self.config
        fb = np.asarray(self.filterbank, np.float32)
        if fb.ndim == 3:  # NeMo stores it as [1, n_mels, bins]
            fb = fb[0]
        if fb.shape != (cfg.n_mels, cfg.n_fft // 2 + 1):
            raise ValueError(f"filterbank: expected shape ({cfg.n_mels}, {cfg.n_fft // 2 + 1}), got {fb.shape}")
        self.filterbank = fb
        if cfg.frame_splicing != 1:
            raise ValueError(f"frame_splicing {cfg.frame_splicing} is not supported (streaming models use 1)")
        window = np.ones(cfg.win_length, np.float64) if self.window is None else np.asarray(self.window, np.float64)
        if window.shape != (cfg.win_length,):
            raise ValueError(f"window: expected shape ({cfg.win_length},), got {window.shape}")
        # torch.stft centres a shorter window inside n_fft with zeros on both sides.
        left = (cfg.n_fft - cfg.win_length) // 2
        padded = np.zeros(cfg.n_fft, np.float64)
        padded[left:left + cfg.win_length] = window
        self._padded_window = padded

    # -- persistence (written by the ONNX export beside the graphs) ----------------------------------
    def save(self, directory: str | Path) -> tuple[Path, Path]:
        directory = Path(directory)
        arrays = directory / "frontend.npz"
        np.savez(arrays, filterbank=self.filterbank,
                 window=self.window if self.window is not None else np.zeros((0,), np.float32))
        settings = directory / "frontend.json"
        settings.write_text(json.dumps(self.config.as_dict(), indent=2) + "\n")
        return arrays, settings

    @classmethod
    def load(cls, directory: str | Path) -> Frontend:
        directory = Path(directory)
        settings = json.loads((directory / "frontend.json").read_text())
        with np.load(directory / "frontend.npz") as arrays:
            window = arrays["window"]
            return cls(FrontendConfig.from_dict(settings), arrays["filterbank"], window if window.size else None)

    # -- computation -----------------------------------------------------------------------------
    def seq_len(self, samples: np.ndarray) -> np.ndarray:
        """``FilterbankFeatures.get_seq_len``: frames counted as if the signal were not centre-padded."""
        cfg = self.config
        pad = ((cfg.n_fft - cfg.hop_length) // 2) * 2 if cfg.exact_pad else (cfg.n_fft // 2) * 2
        return ((np.asarray(samples, np.int64) + pad - cfg.n_fft) // cfg.hop_length).astype(np.int64)

    def __call__(self, audio: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        audio = np.atleast_2d(np.asarray(audio, np.float64))
        batch, total = audio.shape
        lengths = np.full((batch,), total, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        seq_len = np.where(lengths == 0, 0, self.seq_len(lengths))

        if cfg.exact_pad:
            amount = (cfg.n_fft - cfg.hop_length) // 2
            audio = np.pad(audio, ((0, 0), (amount, amount)))
        x = audio
        if cfg.preemph is not None:
            x = np.concatenate([x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]], axis=1)
            x = np.where(np.arange(x.shape[1])[None, :] < lengths[:, None], x, 0.0)

        power = self._power_spectrum(x)  # [B, bins, frames]
        mel = np.matmul(self.filterbank.astype(np.float64), power)
        if cfg.log:
            if cfg.log_zero_guard_type == "add":
                mel = np.log(mel + cfg.log_zero_guard_value)
            elif cfg.log_zero_guard_type == "clamp":
                mel = np.log(np.maximum(mel, cfg.log_zero_guard_value))
            else:
                raise ValueError(f"log_zero_guard_type {cfg.log_zero_guard_type!r} is neither 'add' nor 'clamp'")
        mel = _normalize(mel, seq_len, cfg.normalize)

        frames = mel.shape[-1]
        beyond = np.arange(frames)[None, None, :] >= seq_len[:, None, None]
        mel = np.where(beyond, cfg.pad_value, mel)
        if cfg.pad_to and cfg.pad_to > 0 and frames % cfg.pad_to:
            extra = cfg.pad_to - frames % cfg.pad_to
            mel = np.pad(mel, ((0, 0), (0, 0), (0, extra)), constant_values=cfg.pad_value)
        return mel.astype(np.float32), seq_len

    def _power_spectrum(self, x: np.ndarray) -> np.ndarray:
        cfg = self.config
        if not cfg.exact_pad:  # center=True, pad_mode="constant" (NeMo 3.0.0)
            half = cfg.n_fft // 2
            x = np.pad(x, ((0, 0), (half, half)))
        frames = 1 + (x.shape[1] - cfg.n_fft) // cfg.hop_length
        index = np.arange(cfg.n_fft)[None, :] + cfg.hop_length * np.arange(frames)[:, None]
        spectrum = np.fft.rfft(x[:, index] * self._padded_window, n=cfg.n_fft, axis=-1)  # [B, frames, bins]
        magnitude = np.abs(spectrum)
        if cfg.mag_power != 1.0:
            magnitude = magnitude ** cfg.mag_power
        return np.transpose(magnitude, (0, 2, 1))


def _normalize(mel: np.ndarray, seq_len: np.ndarray, normalize: Any) -> np.ndarray:
    """``normalize_batch``: per_feature / all_features; any other value (e.g. "NA") leaves mel as is."""
    if normalize == "per_feature":
        valid = np.arange(mel.shape[-1])[None, None, :] < seq_len[:, None, None]
        count = valid.sum(axis=-1)
        mean = np.where(valid, mel, 0.0).sum(axis=-1) / count
        centred = np.where(valid, mel - mean[..., None], 0.0)
        std = np.sqrt((centred ** 2).sum(axis=-1) / (count - 1.0))
        std = np.nan_to_num(std, nan=0.0) + NEMO_NORMALIZE_CONSTANT
        return np.where(valid, (mel - mean[..., None]) / std[..., None], 0.0)
    if normalize == "all_features":
        out = np.empty_like(mel)
        for i, n in enumerate(seq_len):
            valid = mel[i, :, :n]
            out[i] = (mel[i] - valid.mean()) / (valid.std(ddof=1) + NEMO_NORMALIZE_CONSTANT)
        return out
    if isinstance(normalize, Mapping) and "fixed_mean" in normalize:
        mean = np.asarray(normalize["fixed_mean"], np.float64).reshape(mel.shape[0], mel.shape[1], 1)
        std = np.asarray(normalize["fixed_std"], np.float64).reshape(mel.shape[0], mel.shape[1], 1)
        return (mel - mean) / std
    return mel


def frontend_from_featurizer(featurizer: Any) -> Frontend:
    """Build from a live NeMo ``FilterbankFeatures`` (export time only; reads its resolved attributes)."""
    guard = featurizer.log_zero_guard_value
    if isinstance(guard, str):
        raise ValueError(f"log_zero_guard_value {guard!r} (a dtype-dependent guard) is not supported")
    config = FrontendConfig(
        sample_rate=int(featurizer.sample_rate), n_fft=int(featurizer.n_fft),
        win_length=int(featurizer.win_length), hop_length=int(featurizer.hop_length),
        n_mels=int(featurizer.nfilt), preemph=None if featurizer.preemph is None else float(featurizer.preemph),
        mag_power=float(featurizer.mag_power), log=bool(featurizer.log),
        log_zero_guard_type=str(featurizer.log_zero_guard_type), log_zero_guard_value=float(guard),
        normalize=featurizer.normalize if isinstance(featurizer.normalize, (str, type(None))) else dict(featurizer.normalize),
        pad_value=float(featurizer.pad_value), pad_to=0 if featurizer.pad_to == "max" else int(featurizer.pad_to),
        frame_splicing=int(featurizer.frame_splicing), exact_pad=bool(featurizer.exact_pad),
    )
    window = featurizer.window
    return Frontend(config, featurizer.fb.detach().float().cpu().numpy(),
                    None if window is None else window.detach().float().cpu().numpy())

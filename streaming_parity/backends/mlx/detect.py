"""What ``parity compare --candidate PATH`` learns about an MLX directory from its file names alone."""

from __future__ import annotations

from pathlib import Path

from streaming_parity.backends.mlx.artifact import CONFIG_FILE, FRONTEND_FILE, MODEL_FILE


def detect(path: Path) -> str | None:
    """``mlx`` for this project's artifact (``parity convert``); None otherwise. A directory in parakeet-mlx's
    layout (``config.json`` + ``model.safetensors`` without the stored front end) is not one this backend
    loads: parakeet-mlx has no causal subsampling, so no cache-aware streaming model is written that way."""
    path = Path(path)
    if path.is_dir() and all((path / name).is_file() for name in (MODEL_FILE, CONFIG_FILE, FRONTEND_FILE)):
        return "mlx"
    return None

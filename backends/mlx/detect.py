"""What ``parity compare --candidate PATH`` learns about an MLX directory from its file names alone."""

from __future__ import annotations

from pathlib import Path

from backends.mlx.artifact import CONFIG_FILE, FRONTEND_FILE, MODEL_FILE


def detect(path: Path) -> str | None:
    """``mlx`` for this project's artifact (``parity convert``), ``parakeet-mlx`` for a directory in
    parakeet-mlx's layout (``config.json`` + ``model.safetensors``, no stored front end); None otherwise."""
    path = Path(path)
    if not (path.is_dir() and (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()):
        return None
    return "mlx" if (path / FRONTEND_FILE).is_file() else "parakeet-mlx"

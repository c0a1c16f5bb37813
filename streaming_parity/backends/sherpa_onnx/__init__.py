"""sherpa-onnx (k2-fsa/sherpa-onnx), a peer runtime, as a transcript-level backend.

- ``backend.py``   ``SherpaOnnxBackend``: sherpa-onnx's ``OnlineRecognizer`` on a sherpa-onnx directory,
                   fed audio chunk by chunk; the tokens each decoded chunk adds are its steps
- ``frontend.py``  kaldi-native-fbank configured as sherpa-onnx configures it for NeMo transducers

Its artifact (``encoder.onnx``, ``decoder.onnx``, ``joiner.onnx``, ``tokens.txt``) is written by
``parity export-onnx --format sherpa-onnx``; the registry prepares it through the ONNX backend's
exporter (``backends.BackendEntry.prepare_with``), so this package never imports another backend.
Importing it imports neither sherpa-onnx nor kaldi-native-fbank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(source: Path, *, dtype: str = "float32", nemo_path: Path | None = None, **options: Any):
    from streaming_parity.backends.sherpa_onnx.backend import SherpaOnnxBackend

    return SherpaOnnxBackend(source, dtype=dtype, nemo_path=nemo_path, **options)


def detect(path: Path) -> str | None:
    from streaming_parity.backends.sherpa_onnx.backend import detect as detect_directory

    return detect_directory(path)

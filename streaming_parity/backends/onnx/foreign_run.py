"""Another exporter's ONNX files run by the harness's ONNX Runtime driver: the running half.

``foreign_read`` recognises the directory, checks it against the ``.nemo`` and describes it; ``OnnxBackend`` runs
the description as it runs this project's exports (sherpa-onnx's split decoder and joiner through
``sessions.SplitDecoderJoint``). What is left here is the lifetime of the tap copies graph surgery writes.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

from streaming_parity.backends.onnx.foreign_read import describe_foreign, read_foreign
from streaming_parity.backends.onnx.layout import ForeignArtifactError
from streaming_parity.backends.onnx.runtime import OnnxBackend
from streaming_parity.backends.onnx.sessions import session_options


class ForeignOnnxBackend(OnnxBackend):
    """The ONNX Runtime backend over a foreign directory, checked against the ``.nemo`` it came from.

    ``artifact``: what ``read_foreign`` read (``format``, its lookaheads); ``unavailable_taps``: the taps graph
    surgery could not find, with why.
    """

    def __init__(self, path: str | Path, *, dtype: str = "float32", nemo_path: str | Path | None = None,
                 taps: bool = True, threads: int | None = None):
        if nemo_path is None:
            raise ForeignArtifactError(f"{path}: ONNX files without this project's metadata are read against the "
                                       ".nemo they were exported from: parity compare MODEL.nemo --candidate PATH")
        self.artifact = read_foreign(path, nemo_path, session_options(threads))
        self.format = self.artifact.format
        self._scratch = Path(tempfile.mkdtemp(prefix="parity-foreign-"))  # the tap copies of the graphs
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        try:
            described = describe_foreign(self.artifact, dtype=dtype, taps=taps, scratch=self._scratch)
            unavailable = described.unavailable_taps
            self.unavailable_taps: dict[str, str] = {} if unavailable is None else unavailable
            super().__init__(described, threads=threads)
        except BaseException:
            self._cleanup()
            raise

    def close(self) -> None:
        super().close()
        self._cleanup()

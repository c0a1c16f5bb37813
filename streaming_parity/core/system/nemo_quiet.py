"""Keep NeMo's logging quiet unless asked (it prints hundreds of lines per model restore)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

_VERBOSE = os.environ.get("PARITY_VERBOSE", "") not in ("", "0")


def set_verbose(verbose: bool) -> None:
    global _VERBOSE
    _VERBOSE = verbose
    if verbose:
        os.environ["PARITY_VERBOSE"] = "1"


@contextlib.contextmanager
def quiet_nemo():
    """Silence NeMo, Lightning and their warnings for the duration, unless verbose."""
    if _VERBOSE:
        yield
        return
    os.environ.setdefault("NEMO_LOGGING_LEVEL", "ERROR")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = {}
        for name in ("nemo_logger", "nemo", "lightning", "pytorch_lightning", "lightning.pytorch", "torch"):
            logger = logging.getLogger(name)
            previous[name] = logger.level
            logger.setLevel(logging.ERROR)
        try:
            from nemo.utils import logging as nemo_logging

            nemo_previous = nemo_logging.getEffectiveLevel()
            nemo_logging.setLevel(logging.ERROR)
        except Exception:  # noqa: BLE001 - nemo not importable: nothing to quiet
            nemo_logging = None
        # NeMo's telemetry layer prints banners straight to stderr at import; swallow them.
        sink = io.StringIO()
        try:
            with contextlib.redirect_stderr(sink):
                yield
        finally:
            for name, level in previous.items():
                logging.getLogger(name).setLevel(level)
            if nemo_logging is not None:
                nemo_logging.setLevel(nemo_previous)

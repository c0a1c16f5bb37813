"""Pytest configuration shared by every suite: markers, options, and session-scoped fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MARKERS = {
    "nemo": "needs NeMo + torch (the reference backend)",
    "onnx": "ONNX export and the ONNX Runtime backend",
    "mlx": "the MLX converter and backend (skips when mlx cannot be imported)",
    "slow": "takes more than a few seconds per case; in the default run only where essential",
    "nightly": "the large matrix run by `parity nightly` / the nightly workflow, not by default",
    "browser": "renders a report in headless Chromium (skips when Chromium is absent)",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    # NeMo prints hundreds of lines at import and restore; the suites keep it quiet.
    os.environ.setdefault("NEMO_LOGGING_LEVEL", "ERROR")


def pytest_addoption(parser):
    group = parser.getgroup("parity")
    group.addoption("--model", action="store", default=None, metavar="PATH.nemo",
                    help="run the suites on this checkpoint instead of the fixture models")
    group.addoption("--backends", action="store", default=None, metavar="A,B",
                    help="comma-separated backends to include (default: every registered, available one)")
    group.addoption("--att-context", action="append", default=None, metavar="L,R",
                    help="lookahead(s) to test (default: all of the model's)")
    group.addoption("--results", action="store", default=None, metavar="DIR",
                    help="write each suite's results JSON into DIR")


def pytest_collection_modifyitems(config, items):
    run_nightly = config.getoption("-m") and "nightly" in config.getoption("-m")
    skip_nightly = pytest.mark.skip(reason="nightly: run with -m nightly")
    for item in items:
        if "nightly" in item.keywords and not run_nightly:
            item.add_marker(skip_nightly)


@pytest.fixture(scope="session")
def tiny_nemo(request) -> Path:
    """The ``.nemo`` under test: ``--model`` if given, else the ``tiny-streaming`` fixture (built once)."""
    pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")
    user_model = request.config.getoption("--model")
    if user_model:
        return Path(user_model)
    from fixtures.models import build

    return build("tiny-streaming", progress=lambda _m: None)


@pytest.fixture(scope="session")
def nemo_backend(tiny_nemo):
    from backends import get

    return get("nemo").load(tiny_nemo)


@pytest.fixture(scope="session")
def utterances():
    from harness.parity import fixture_utterances

    return fixture_utterances()


@pytest.fixture(scope="session")
def tolerances():
    from harness.tolerances import Tolerances

    return Tolerances.load()


@pytest.fixture(scope="session")
def att_contexts(request, nemo_backend):
    from harness.chunking import parse_att_context

    chosen = request.config.getoption("--att-context")
    if chosen:
        return [parse_att_context(c) for c in chosen]
    return list(nemo_backend.info.att_context_sizes)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    """A session scratch directory for exports and artifacts."""
    return tmp_path_factory.mktemp("work")

"""The parity suites as a pytest plugin: markers, options, hypothesis profiles and session fixtures.

Installed as the ``pytest11`` entry point ``parity``, so another repository runs the suites on its own
checkpoint without copying anything::

    pytest --pyargs tests --parity-model my.nemo            # or: pytest -p streaming_parity.app.pytest_plugin ...

Options: ``--parity-model``, ``--parity-backends``, ``--parity-att-context``, ``--parity-results``,
``--run-nightly``, ``--parity-reference REF`` (a recording: no NeMo needed) with ``--parity-artifact mlx=DIR``.
It holds hooks and fixtures only; the pool of backends and the run cache they hand out are library state
(``streaming_parity.app.suite_runs``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streaming_parity.app.suite_runs import BackendPool, RunCache
from streaming_parity.core.system.threads import limit_threads

# One thread per library: the fixture models are tiny, so two threads on this project's 2-core CI
# machines only add synchronisation (a tiny-streaming NeMo step measured 13.5 ms with one torch
# thread and up to 440 ms with two under load; numpy's norm went from 5 us to 1-2 ms).
limit_threads(1, only_default=True)

MARKERS = {
    "nemo": "needs NeMo + torch (the reference backend)",
    "onnx": "ONNX export and the ONNX Runtime backend",
    "mlx": "the MLX converter and backend (skips when mlx cannot be imported)",
    "nightly": "the large matrix run by `parity nightly` / the nightly workflow, not by default",
    "browser": "renders a report in headless Chromium (skips when Chromium is absent)",
    "sherpa_onnx": "sherpa-onnx's own runtime, a transcript-level peer (skips when sherpa-onnx is absent)",
    "mlx_audio": "mlx-audio's own nemotron_asr, a peer runtime (skips when mlx-audio is absent)",
    "transformers": "transformers' Nemotron ASR classes, driven and as a peer runtime (skips when transformers is "
                    "absent)",
    "streams_mel": "drives Backend.step with the harness's mel chunks: a transcript-level backend that takes "
                   "audio (a peer runtime) is skipped, with the reason",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    _register_hypothesis_profiles()
    # NeMo prints hundreds of lines at import and restore; the suites keep it quiet.
    os.environ.setdefault("NEMO_LOGGING_LEVEL", "ERROR")
    # MLX's Linux CPU wheel links a reference BLAS; streaming_parity.backends.mlx loads an optimized one, which only
    # works before anything imports mlx.core, so do it before any test module does.
    import importlib.util

    if importlib.util.find_spec("mlx") is not None:
        from streaming_parity.backends.mlx.blas import use_optimized_blas

        use_optimized_blas()
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (imported here so that limit_threads sizes its pool)
    limit_threads(1, only_default=True)


def _register_hypothesis_profiles() -> None:
    """``ci`` (the default run: no deadline, since a first call may build a fixture) and ``nightly``
    (many more examples); choose with hypothesis' own ``--hypothesis-profile``."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("nightly", parent=settings.get_profile("ci"), max_examples=500)
    settings.load_profile("ci")


def pytest_addoption(parser):
    group = parser.getgroup("parity")
    group.addoption("--parity-model", action="store", default=None, metavar="PATH.nemo",
                    help="run the suites on this checkpoint instead of the fixture models")
    group.addoption("--parity-backends", action="store", default=None, metavar="A,B",
                    help="comma-separated backends to include (default: every registered, available one)")
    group.addoption("--parity-att-context", action="append", default=None, metavar="L,R",
                    help="lookahead(s) to test (default: all of the model's)")
    group.addoption("--parity-results", action="store", default=None, metavar="DIR",
                    help="write each suite's results JSON into DIR")
    group.addoption("--run-nightly", action="store_true", default=False,
                    help="also run the tests marked nightly (the large matrix)")
    group.addoption("--parity-reference", action="store", default=None, metavar="REF",
                    help="a recording of the reference (parity record): the suites compare against it, without "
                         "NeMo or torch; a test that asks the reference for anything it did not record fails")
    group.addoption("--parity-artifact", action="append", default=None, metavar="NAME[:DTYPE]=DIR",
                    help="an artifact to test instead of preparing one from the .nemo (repeatable), e.g. mlx=DIR")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-nightly"):
        return
    skip_nightly = pytest.mark.skip(reason="nightly: run with --run-nightly")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip_nightly)


def _recording(config):
    """The ``--parity-reference`` recording, opened (and its shards checked) once per session; None without one."""
    path = config.getoption("--parity-reference")
    if path is None:
        return None
    if not hasattr(config, "_parity_recording"):
        from streaming_parity.judge.recording import Recording

        config._parity_recording = Recording(path)
    return config._parity_recording


def _given_artifacts(config) -> dict[tuple[str, str | None], Path]:
    """``--parity-artifact NAME[:DTYPE]=DIR`` as ``{(name, dtype or None): DIR}``."""
    from streaming_parity.interface.registry import REGISTRY

    given = {}
    for text in config.getoption("--parity-artifact") or []:
        target, separator, directory = text.partition("=")
        name, _, dtype = target.partition(":")
        if not separator or name not in REGISTRY or (dtype and dtype not in REGISTRY[name].dtypes):
            raise pytest.UsageError(f"--parity-artifact {text}: expected NAME[:DTYPE]=DIR with NAME one of "
                                    f"{list(REGISTRY)} and DTYPE one it runs")
        given[(name, dtype or None)] = Path(directory)
    return given


@pytest.fixture(scope="session")
def tiny_nemo(request) -> Path:
    """The ``.nemo`` under test: ``--parity-model`` if given, else the ``tiny-streaming`` fixture (built once).
    With ``--parity-reference`` there is none: a test that needs the checkpoint itself (a conversion) skips."""
    if _recording(request.config) is not None and not request.config.getoption("--parity-model"):
        pytest.skip("needs the .nemo itself; --parity-reference judges against a recording")
    pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")
    user_model = request.config.getoption("--parity-model")
    if user_model:
        return Path(user_model)
    from streaming_parity.fixtures.models import build

    return build("tiny-streaming", progress=lambda _m: None)


@pytest.fixture(scope="session")
def model_under_test(request) -> dict:
    """How results name the checkpoint under test: the .nemo's path and sha256, or the recording's record of it."""
    recording = _recording(request.config)
    if recording is not None and not request.config.getoption("--parity-model"):
        return {"path": None, "sha256": recording.model["sha256"], "name": Path(recording.model["name"]).stem,
                "recording": str(recording.directory)}
    from streaming_parity.core.nemo_file import sha256_file

    nemo_path = request.getfixturevalue("tiny_nemo")
    return {"path": str(nemo_path), "sha256": sha256_file(nemo_path), "name": nemo_path.stem}


@pytest.fixture(scope="session")
def nemo_backend(backend_pool):
    return backend_pool.get("nemo")


@pytest.fixture(scope="session")
def utterances(request):
    recording = _recording(request.config)
    if recording is not None:
        return recording.utterances()
    from streaming_parity.app.session import fixture_utterances

    return fixture_utterances()


@pytest.fixture(scope="session")
def tolerances():
    from streaming_parity.judge.tolerances import Tolerances

    return Tolerances.load()


@pytest.fixture(scope="session")
def att_contexts(request, nemo_backend):
    from streaming_parity.interface.chunking import parse_att_context

    chosen = request.config.getoption("--parity-att-context")
    if chosen:
        return [parse_att_context(c) for c in chosen]
    recording = _recording(request.config)
    return recording.contexts if recording is not None else list(nemo_backend.info.att_context_sizes)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    """A session scratch directory for exports and artifacts."""
    return tmp_path_factory.mktemp("work")


# -- backends as parameters: a registered backend appears in every suite --------------------------

def _selected_backends(config) -> list[str]:
    from streaming_parity.interface.registry import REGISTRY

    chosen = config.getoption("--parity-backends")
    names = [n.strip() for n in chosen.split(",")] if chosen else list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise pytest.UsageError(f"--parity-backends: unknown {unknown}; registered: {list(REGISTRY)}")
    return names


def _backend_param(names: tuple[str, ...], *, streams_mel: bool = False, recorded_reference: bool = False):
    from streaming_parity.interface.registry import REFERENCE, REGISTRY

    marks = [getattr(pytest.mark, REGISTRY[n].marker) for n in dict.fromkeys(names)]
    takes_audio = [n for n in names if REGISTRY[n].capabilities.input == "audio"]
    if streams_mel and takes_audio:
        marks.append(pytest.mark.skip(reason=f"{', '.join(takes_audio)}: a transcript-level backend (its own front "
                                             "end and chunking, it takes audio); this test streams mel chunks"))
    # A recorded reference replays NeMo's runs: NeMo and torch are not needed for it.
    missing = {n: REGISTRY[n].missing_requirements() for n in names if not (recorded_reference and n == REFERENCE)}
    missing = {n: m for n, m in missing.items() if m}
    if missing:
        reason = "; ".join(f"{n} needs {', '.join(m)}" for n, m in missing.items())
        marks.append(pytest.mark.skip(reason=f"backend not installed: {reason}"))
    return pytest.param(names if len(names) > 1 else names[0], marks=marks, id="~".join(names))


def pytest_generate_tests(metafunc):
    """``backend_name`` runs a test on every backend; ``backend_pair`` on reference~candidate pairs."""
    from streaming_parity.interface.registry import REFERENCE, REGISTRY

    names = _selected_backends(metafunc.config)
    streams_mel = metafunc.definition.get_closest_marker("streams_mel") is not None
    recorded = metafunc.config.getoption("--parity-reference") is not None
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", [_backend_param((n,), streams_mel=streams_mel, recorded_reference=recorded)
                                              for n in names])
    if "backend_pair" in metafunc.fixturenames:
        candidates = [n for n in names if n != REFERENCE]
        # Candidates are also compared with each other where both produce tensors; a transcript-level
        # backend (a peer runtime) is compared with the reference only.
        tensor_level = [n for n in candidates if REGISTRY[n].capabilities.tensor_level
                        and REGISTRY[n].capabilities.input == "mel"]
        pairs = [(REFERENCE, c) for c in candidates] + [
            (a, b) for i, a in enumerate(tensor_level) for b in tensor_level[i + 1:]]
        metafunc.parametrize("backend_pair", [_backend_param(p, streams_mel=streams_mel, recorded_reference=recorded)
                                              for p in pairs])


@pytest.fixture(scope="session")
def backend_pool(request, tmp_path_factory) -> BackendPool:
    recording = _recording(request.config)
    artifacts = _given_artifacts(request.config)
    if recording is None:
        return BackendPool(request.getfixturevalue("tiny_nemo"), tmp_path_factory.mktemp("backends"),
                           artifacts=artifacts, unavailable=pytest.skip)
    from streaming_parity.judge.recording import ReplayBackend

    return BackendPool(None, tmp_path_factory.mktemp("backends"), reference=ReplayBackend(recording),
                       artifacts=artifacts, unavailable=pytest.skip)


@pytest.fixture(scope="session")
def run_cache(backend_pool) -> RunCache:
    return RunCache(backend_pool)


def _fixture_model(name: str) -> Path:
    """A fixture ``.nemo``, built once (skipped where NeMo cannot be imported)."""
    pytest.importorskip("nemo", reason="NeMo is not installed (pip install '.[nemo]')")
    from streaming_parity.fixtures.models import build

    return build(name, progress=lambda _m: None)


@pytest.fixture(scope="session")
def prompt_nemo() -> Path:
    """The ``tiny-prompt`` fixture: Nemotron-3.5's language-ID prompt (128 prompts, 8 locales), left context 56."""
    return _fixture_model("tiny-prompt")


@pytest.fixture(scope="session")
def prompt_pool(prompt_nemo, tmp_path_factory) -> BackendPool:
    return BackendPool(prompt_nemo, tmp_path_factory.mktemp("prompt"), unavailable=pytest.skip)


@pytest.fixture(scope="session")
def prompt_reference(prompt_pool):
    """NeMo on ``tiny-prompt``, loaded once for every prompt suite."""
    return prompt_pool.get("nemo")


@pytest.fixture(scope="session")
def multitalker_nemo() -> Path:
    """The ``tiny-multitalker`` fixture: speaker kernels at layer 0 (pre-hook) and layer 2 (post-hook)."""
    return _fixture_model("tiny-multitalker")


@pytest.fixture(scope="session")
def multitalker_pool(multitalker_nemo, tmp_path_factory) -> BackendPool:
    return BackendPool(multitalker_nemo, tmp_path_factory.mktemp("multitalker"), unavailable=pytest.skip)


@pytest.fixture(scope="session")
def results_dir(request) -> Path | None:
    chosen = request.config.getoption("--parity-results")
    if not chosen:
        return None
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path

"""The mutation catalog: every seeded conversion bug is caught and localized; no false alarms."""

from __future__ import annotations

import shutil

import pytest

from streaming_parity.app.diagnose_path import diagnose_path
from streaming_parity.backends.mlx.mutations import CATALOG
from streaming_parity.fixtures.models import SPEECH_DIR

pytestmark = [pytest.mark.mlx]
mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install '.[mlx]')")


@pytest.fixture(scope="module")
def hybrid_pool(tmp_path_factory):
    """The tiny-hybrid fixture (a CTC head beside the transducer), its NeMo backend and MLX artifact."""
    from streaming_parity.app.suite_runs import BackendPool
    from streaming_parity.fixtures.models import build

    return BackendPool(build("tiny-hybrid", progress=lambda _m: None), tmp_path_factory.mktemp("hybrid"),
                       unavailable=pytest.skip)


@pytest.fixture(scope="module")
def artifacts(tiny_nemo, multitalker_pool, hybrid_pool, prompt_pool, tmp_path_factory):
    """Correct fp32 artifacts of tiny-streaming, tiny-multitalker, tiny-hybrid and tiny-tdt (for the
    mislabel case)."""
    from streaming_parity.fixtures.models import build
    from streaming_parity.interface.registry import get

    work = tmp_path_factory.mktemp("mutations")
    streaming = get("mlx").prepare(tiny_nemo, work / "streaming")
    tdt = get("mlx").prepare(build("tiny-tdt", progress=lambda _m: None), work / "tdt")
    return {"streaming": streaming, "tdt": tdt, "multitalker": multitalker_pool.source("mlx"),
            "hybrid": hybrid_pool.source("mlx"), "prompt": prompt_pool.source("mlx")}


@pytest.fixture(scope="module")
def models(tiny_nemo, nemo_backend, multitalker_nemo, multitalker_pool, hybrid_pool, prompt_pool):
    """Per mutation target: the source .nemo and its NeMo reference backend."""
    return {"streaming": (tiny_nemo, nemo_backend),
            "multitalker": (multitalker_nemo, multitalker_pool.get("nemo")),
            "hybrid": (hybrid_pool.nemo_path, hybrid_pool.get("nemo")),
            "prompt": (prompt_pool.nemo_path, prompt_pool.get("nemo"))}


@pytest.fixture(scope="module")
def source_state(tiny_nemo):
    from streaming_parity.detect.diagnose import source_state

    return source_state(tiny_nemo)


@pytest.fixture(scope="module")
def shortest(utterances):
    return [min(utterances, key=lambda u: len(u.audio))]


def test_correct_artifacts_pass(artifacts, tiny_nemo, nemo_backend, utterances):
    """Zero false alarms: a correct artifact passes every check, at every lookahead."""
    diagnosis = diagnose_path(artifacts["streaming"], tiny_nemo, utterances=utterances[:2], reference=nemo_backend)
    assert diagnosis.passed, "\n".join(diagnosis.sentences())
    assert diagnosis.numeric_checked
    tdt = diagnose_path(artifacts["tdt"])  # no source: contradictions only (our runtime does not decode TDT)
    assert tdt.passed, "\n".join(tdt.sentences())


@pytest.mark.parametrize("model", ["multitalker", "hybrid", "prompt"])
def test_correct_multitalker_hybrid_and_prompt_artifacts_pass(model, artifacts, models, utterances):
    nemo_path, reference = models[model]
    diagnosis = diagnose_path(artifacts[model], nemo_path, utterances=utterances[:1], reference=reference)
    assert diagnosis.passed, "\n".join(diagnosis.sentences())
    assert diagnosis.numeric_checked


@pytest.mark.parametrize("mutation", CATALOG, ids=[m.name for m in CATALOG])
def test_mutation_is_caught_and_localized(mutation, artifacts, models, source_state, shortest, tmp_path):
    nemo_path, reference = models[mutation.model]
    mutated = tmp_path / "artifact"
    shutil.copytree(artifacts[mutation.model], mutated)
    mutation.apply(mutated, {"source_state": source_state, "tdt_artifact": artifacts["tdt"]})

    if mutation.expect_contradiction:
        diagnosis = diagnose_path(mutated)  # caught from the artifact alone, no source needed
        assert not diagnosis.passed, f"{mutation.name} was not caught"
        assert any(mutation.expect_contradiction in c for c in diagnosis.contradictions), diagnosis.contradictions
        return

    diagnosis = diagnose_path(mutated, nemo_path, utterances=shortest, att_context_sizes=[reference.info.att_context_sizes[0]],
                         reference=reference)
    report = "\n".join(diagnosis.sentences())
    assert not diagnosis.passed, f"{mutation.name} was not caught"
    assert {d.name for d in diagnosis.differing_tensors} == set(mutation.expect_tensors), report
    assert diagnosis.first_divergence is not None, f"{mutation.name}: no numeric divergence\n{report}"
    assert diagnosis.first_divergence["tap"] == mutation.expect_tap, report
    assert set(mutation.expect_tensors) <= set(diagnosis.suspects), report
    if mutation.expect_cause:
        assert any(mutation.expect_cause in cause for cause in diagnosis.first_divergence["causes"]), report
        assert mutation.expect_cause in report


def test_verify_cli_names_contradictions_and_localizes(artifacts, tiny_nemo, source_state, tmp_path, capsys):
    from streaming_parity.app.cli import EXIT_OK, EXIT_VIOLATION, main
    from streaming_parity.backends.mlx.mutations import by_name

    assert main(["verify", str(artifacts["streaming"])]) == EXIT_OK
    capsys.readouterr()

    flipped = tmp_path / "flipped"
    shutil.copytree(artifacts["streaming"], flipped)
    by_name("causal-flag-flipped").apply(flipped, {})
    assert main(["verify", str(flipped)]) == EXIT_VIOLATION
    assert "non-causal subsampling" in capsys.readouterr().out

    swapped = tmp_path / "swapped"
    shutil.copytree(artifacts["streaming"], swapped)
    by_name("pos-bias-swapped").apply(swapped, {})
    assert main(["verify", str(swapped), "--nemo", str(tiny_nemo), "--att-context", "70,13",
                 "--audio", str(SPEECH_DIR / "utt04.wav")]) == EXIT_VIOLATION
    out = capsys.readouterr().out
    assert "tensor encoder.layers.2.self_attn.pos_bias_u differs" in out
    assert "tap layers.2" in out and "most likely responsible: encoder.layers.2.self_attn.pos_bias_u" in out

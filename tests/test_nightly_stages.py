"""The night split across machines: the record stage (NeMo) and the candidates stage (no torch, no NeMo) give the
verdicts a single-machine night gives, and refuse a plan, a selection or an artifact they cannot trust."""

from __future__ import annotations

import json
import shutil

import pytest
from builders import torch_free_cli

from streaming_parity.app.nightly import MatrixPlan, PlannedCandidate, run_model_matrix
from streaming_parity.app.nightly_stages import NIGHT_PLAN, judge_night_candidates, record_night
from streaming_parity.app.session import fixture_utterances
from streaming_parity.core.errors import InvalidInput, UnknownName
from streaming_parity.interface.registry import REGISTRY
from streaming_parity.judge.results import Results

pytestmark = [pytest.mark.nemo, pytest.mark.mlx]
CONTEXTS = [(70, 13)]


def _judged(results_list):
    return sorted((c.pair, c.utterance, tuple(c.att_context_size), c.mode, c.passed,
                   [(t.tap, t.metrics) for t in c.taps]) for results in results_list for c in results.comparisons)


@pytest.fixture(scope="module")
def recorded_night(tiny_nemo, tmp_path_factory):
    if not REGISTRY["mlx"].available():
        pytest.skip("mlx is not installed")
    root = tmp_path_factory.mktemp("night")
    outcome = record_night([str(tiny_nemo)], recordings=root / "recordings", out_root=root / "reports",
                           date="2026-01-02", backends=["mlx:float32"], att_contexts=CONTEXTS, utterance_limit=2,
                           work_dir=root / "work", bounded_memory=False)
    return root, outcome


def test_the_stages_give_the_single_machine_nights_verdicts_and_the_candidates_stage_needs_no_nemo(
        recorded_night, tiny_nemo, tolerances):
    root, recorded = recorded_night
    plan = json.loads((root / "recordings" / NIGHT_PLAN).read_text())
    [model] = plan["models"]
    [candidate] = model["candidates"]
    assert candidate["backend"] == "mlx" and not candidate["artifact"].startswith("/"), candidate
    assert (root / "work" / candidate["artifact"]).is_dir()
    # The work directory travels (a workflow artifact): the candidates stage finds it wherever it is put.
    shutil.move(root / "work", root / "downloaded")
    done = torch_free_cli("nightly", "--stage", "candidates", "--recordings", str(root / "recordings"),
                          "--work-dir", str(root / "downloaded"), "--backends", "mlx", "--out", str(root / "reports"),
                          "--job", "macos-mlx")
    assert done.returncode == 0, done.stderr[-3000:]
    judged = Results.load(root / "reports" / "2026-01-02" / f"results-{tiny_nemo.stem}-macos-mlx.json")
    assert judged.extra["stage"] == "candidates" and judged.model["sha256"] == recorded.results[0].model["sha256"]
    assert {c.pair for c in judged.comparisons} == {"nemo~mlx"}
    assert {c.pair for c in recorded.results[0].comparisons} == {"streaming~offline@70,13"}

    single = run_model_matrix(tiny_nemo, MatrixPlan([PlannedCandidate("mlx", "float32")], []),
                              fixture_utterances()[:2], CONTEXTS, tolerances, work_dir=root / "single")
    assert _judged([recorded.results[0], judged]) == _judged([single])

    # Bounded (as for a full-size checkpoint): runs spooled to disk, each phase's memory measured, the same verdicts.
    bounded = judge_night_candidates(recordings=root / "recordings", backends=["mlx"], out_root=root / "bounded",
                                     work_dir=root / "downloaded", bounded_memory=True).results[0]
    assert set(bounded.extra["peak_rss_mb"]) == {"recording", "mlx:float32"}
    assert _judged([bounded]) == _judged([judged])


def test_a_moved_or_altered_artifact_is_an_error_of_its_candidate_named_with_its_hashes(recorded_night, tmp_path):
    root, _ = recorded_night
    work = root / "work" if (root / "work").exists() else root / "downloaded"
    plan = json.loads((root / "recordings" / NIGHT_PLAN).read_text())
    artifact = plan["models"][0]["candidates"][0]["artifact"]
    altered = shutil.copytree(work, tmp_path / "work")
    (altered / artifact / "config.json").write_text((altered / artifact / "config.json").read_text() + " ")
    outcome = judge_night_candidates(recordings=root / "recordings", backends=["mlx"], out_root=tmp_path / "out",
                                     work_dir=altered)
    [record] = outcome.results[0].extra["candidates"]
    assert record["status"] == "error" and "the record stage made" in record["error"]
    assert not outcome.results[0].comparisons

    missing = judge_night_candidates(recordings=root / "recordings", backends=["mlx"], out_root=tmp_path / "out2",
                                     work_dir=tmp_path / "empty")
    assert "is not here" in missing.results[0].extra["candidates"][0]["error"]


def test_a_selection_outside_the_plan_and_a_missing_plan_are_refused(recorded_night, tmp_path):
    root, _ = recorded_night
    with pytest.raises(UnknownName, match="mlx:bfloat16 is not in the night plan \\(planned: mlx:float32\\)"):
        judge_night_candidates(recordings=root / "recordings", backends=["mlx:bfloat16"], out_root=tmp_path)
    with pytest.raises(UnknownName, match="unknown backend 'mxl'"):
        judge_night_candidates(recordings=root / "recordings", backends=["mxl"], out_root=tmp_path)
    with pytest.raises(InvalidInput, match="no night plan; run `parity nightly --stage record"):
        judge_night_candidates(recordings=tmp_path, out_root=tmp_path)

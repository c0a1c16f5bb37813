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
    return sorted((c.pair, c.dtype, c.utterance, tuple(c.att_context_size), c.mode, c.passed,
                   [(t.tap, t.metrics) for t in c.taps]) for results in results_list for c in results.comparisons)


@pytest.fixture(scope="module")
def recorded_night(tiny_nemo, tmp_path_factory):
    if not REGISTRY["mlx"].available():
        pytest.skip("mlx is not installed")
    root = tmp_path_factory.mktemp("night")
    outcome = record_night([str(tiny_nemo)], recordings=root / "recordings", out_root=root / "reports",
                           date="2026-01-02", backends=["mlx:float32", "mlx:bfloat16"], att_contexts=CONTEXTS,
                           utterance_limit=2,
                           work_dir=root / "work", bounded_memory=False)
    return root, outcome


def test_the_stages_give_the_single_machine_nights_verdicts_and_the_candidates_stage_needs_no_nemo(
        recorded_night, tiny_nemo, tolerances):
    root, recorded = recorded_night
    plan = json.loads((root / "recordings" / NIGHT_PLAN).read_text())
    [model] = plan["models"]
    candidate, _ = model["candidates"]
    assert (candidate["backend"], candidate["dtype"]) == ("mlx", "float32") and not candidate["artifact"].startswith(
        "/"), candidate
    assert (root / "work" / candidate["artifact"]).is_dir()
    # The work directory travels (a workflow artifact): the candidates stage finds it wherever it is put.
    shutil.move(root / "work", root / "downloaded")
    done = torch_free_cli("nightly", "--stage", "candidates", "--recordings", str(root / "recordings"),
                          "--work-dir", str(root / "downloaded"), "--backends", "mlx:float32", "--out",
                          str(root / "reports"),
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
    bounded = judge_night_candidates(recordings=root / "recordings", backends=["mlx:float32"], out_root=root / "bounded",
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
    outcome = judge_night_candidates(recordings=root / "recordings", backends=["mlx:float32"], out_root=tmp_path / "out",
                                     work_dir=altered)
    [record] = outcome.results[0].extra["candidates"]
    assert record["status"] == "error" and "the record stage made" in record["error"]
    assert not outcome.results[0].comparisons

    missing = judge_night_candidates(recordings=root / "recordings", backends=["mlx:float32"], out_root=tmp_path / "out2",
                                     work_dir=tmp_path / "empty")
    assert "is not here" in missing.results[0].extra["candidates"][0]["error"]


def test_a_selection_outside_the_plan_and_a_missing_plan_are_refused(recorded_night, tmp_path):
    root, _ = recorded_night
    with pytest.raises(UnknownName, match="mlx:float16 is not in the night plan \\(planned: mlx:bfloat16, mlx:float32\\)"):
        judge_night_candidates(recordings=root / "recordings", backends=["mlx:float16"], out_root=tmp_path)
    with pytest.raises(UnknownName, match="unknown backend 'mxl'"):
        judge_night_candidates(recordings=root / "recordings", backends=["mxl"], out_root=tmp_path)
    with pytest.raises(InvalidInput, match="no night plan; run `parity nightly --stage record"):
        judge_night_candidates(recordings=tmp_path, out_root=tmp_path)


def test_candidates_judged_in_parallel_processes_give_the_same_results_each_dtype_decided_where_it_runs(
        recorded_night, tmp_path):
    root, _ = recorded_night
    work = root / "work" if (root / "work").exists() else root / "downloaded"
    one_by_one = judge_night_candidates(recordings=root / "recordings", out_root=tmp_path / "serial", work_dir=work)
    together = judge_night_candidates(recordings=root / "recordings", out_root=tmp_path / "parallel", work_dir=work,
                                      parallel=2)
    assert len(together.results_files) == 2 and len(one_by_one.results_files) == 1
    assert _judged(together.results) == _judged(one_by_one.results)
    # bfloat16 has no fast path on a CPU: judged at one lookahead on two utterances, and recorded as such.
    records = {r["dtype"]: r for results in together.results for r in results.extra["candidates"]}
    if REGISTRY["mlx"].slow_dtype_reason("bfloat16"):
        assert records["bfloat16"]["reduced_plan"]["utterances"] == 2 and "reduced_plan" not in records["float32"]


@pytest.mark.parametrize("requested, candidates, checkpoint, free_mb, expected", [
    (4, 3, 2_500_000_000, 24_000, 3),   # 3 candidates of a 2.5 GB checkpoint: 15 GB of 24 GB free
    (4, 3, 2_500_000_000, 11_000, 2),   # 11 GB free holds two at 5 GB each
    (4, 3, 2_500_000_000, 3_000, 1),    # not even one fits: one at a time, as without --parallel
    (2, 5, 50_000_000, None, 2),        # free memory unknown: as requested
    (1, 5, 50_000_000, 24_000, 1),
])
def test_parallel_candidates_stay_within_free_memory(requested, candidates, checkpoint, free_mb, expected):
    from streaming_parity.app.nightly_stages import parallel_candidates

    assert parallel_candidates(requested, candidates, checkpoint, free_mb) == expected

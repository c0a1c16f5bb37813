"""What a comparison counts as each backend's own compute: the harness's share of a run is the rest
(``bench/benchmark.py --overhead``), so a backend's work counted as the harness's would misstate it."""

from __future__ import annotations

import pytest


@pytest.mark.nemo
@pytest.mark.onnx
def test_a_backends_front_end_and_its_steps_are_its_compute(nemo_backend, backend_pool, utterances, tolerances):
    from streaming_parity.app.session import compare_backends

    outcome = compare_backends(nemo_backend, [backend_pool.get("onnx")], utterances[:2], [(70, 13)], tolerances,
                               include_offline=False)
    labels = {"nemo:float32", "onnx:float32"}
    # Each backend computed the mel of every utterance (the candidate its own, compared as the mel tap).
    assert set(outcome.frontend_seconds) == labels and all(s > 0 for s in outcome.frontend_seconds.values())
    steps = dict.fromkeys(labels, 0.0)
    for row in outcome.results.timings:
        steps[f"{row['backend']}:{row['dtype']}"] += sum(row["step_seconds"])
    for label in labels:  # fp32 on the tiny fixture takes the reference's decisions: no teacher-forced rerun
        assert outcome.backend_seconds[label] == pytest.approx(outcome.frontend_seconds[label] + steps[label])
        assert outcome.backend_seconds[label] < outcome.phase_seconds[label]

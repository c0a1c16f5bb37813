"""Re-judging saved results with another tolerance file keeps what no tolerance can change."""

from __future__ import annotations

import json

import numpy as np
from builders import step_output, stream_run, streaming_state

from streaming_parity.interface.driver import StreamRun
from streaming_parity.judge.compare import compare_runs, rejudge
from streaming_parity.judge.results import comparison_from_dict, comparison_to_dict
from streaming_parity.judge.tolerances import Tolerances


def _encoder_run(backend: str, steps: int, width: int = 3) -> StreamRun:
    """``steps`` steps of ``width`` zero frames each, the encoder tap alone, with caches and a decoder."""
    zeros = np.zeros((1, 4, width), np.float32)
    return stream_run(backend, [step_output({"encoder": zeros}, encoded=zeros.copy(),
                                            state=streaming_state((70, 13), caches=True, blank=8, step_index=i))
                                for i in range(steps)], context=(70, 13))


def test_a_step_count_and_a_shape_violation_survive_rejudging():
    tolerances = Tolerances.load()
    short = compare_runs(_encoder_run("nemo", 3), _encoder_run("mlx", 2), tolerances, num_layers=1, utterance="u")
    misshapen = compare_runs(_encoder_run("nemo", 1), _encoder_run("mlx", 1, width=2), tolerances, num_layers=1,
                             utterance="u")
    for comparison, phrase in ((short, "step count 3 vs 2"), (misshapen, "shape [1, 4, 3] vs [1, 4, 2]")):
        assert not comparison.passed and phrase in comparison.describe_failure()
        saved = comparison_from_dict(json.loads(json.dumps(comparison_to_dict(comparison))))
        rejudged = rejudge(saved, tolerances)
        assert not rejudged.passed and phrase in rejudged.describe_failure()

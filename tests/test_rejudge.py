"""Re-judging saved results with another tolerance file keeps what no tolerance can change."""

from __future__ import annotations

import json

import numpy as np

from streaming_parity.interface.driver import StreamRun
from streaming_parity.interface.types import DecoderState, StepOutput, StreamingState
from streaming_parity.judge.compare import compare_runs, rejudge
from streaming_parity.judge.results import comparison_from_dict, comparison_to_dict
from streaming_parity.judge.tolerances import Tolerances


def _run(backend: str, steps: int, width: int = 3) -> StreamRun:
    def step(index: int) -> StepOutput:
        state = StreamingState(att_context_size=(70, 13), cache_last_channel=np.zeros((1, 1, 2, 4), np.float32),
                               cache_last_time=np.zeros((1, 1, 4, 2), np.float32),
                               cache_last_channel_len=np.zeros((1,), np.int64),
                               decoder=[DecoderState(8, np.zeros((1, 1, 3), np.float32),
                                                     np.zeros((1, 1, 3), np.float32))], step_index=index)
        return StepOutput(encoded=np.zeros((1, 4, width), np.float32), encoded_len=np.full((1,), width, np.int64),
                          state=state, tokens=[[]], taps={"encoder": np.zeros((1, 4, width), np.float32)})

    return StreamRun(backend=backend, dtype="float32", att_context_size=(70, 13), mode="plain",
                     steps=[step(i) for i in range(steps)])


def test_a_step_count_and_a_shape_violation_survive_rejudging():
    tolerances = Tolerances.load()
    short = compare_runs(_run("nemo", 3), _run("mlx", 2), tolerances, num_layers=1, utterance="u")
    misshapen = compare_runs(_run("nemo", 1), _run("mlx", 1, width=2), tolerances, num_layers=1, utterance="u")
    for comparison, phrase in ((short, "step count 3 vs 2"), (misshapen, "shape [1, 4, 3] vs [1, 4, 2]")):
        assert not comparison.passed and phrase in comparison.describe_failure()
        saved = comparison_from_dict(json.loads(json.dumps(comparison_to_dict(comparison))))
        rejudged = rejudge(saved, tolerances)
        assert not rejudged.passed and phrase in rejudged.describe_failure()

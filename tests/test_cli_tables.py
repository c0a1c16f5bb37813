"""What a person reads in an 80-column terminal: every number whole, ``–`` where nothing was compared."""

from __future__ import annotations

import io

from builders import pair_comparison
from rich.console import Console

from streaming_parity.app.cli import print_comparisons
from streaming_parity.judge.compare import TapResult
from streaming_parity.judge.loop import LoopOutcome
from streaming_parity.judge.results import Results


def _render(results: Results, width: int = 80) -> str:
    buffer = io.StringIO()
    print_comparisons(LoopOutcome(results), out=Console(file=buffer, width=width, force_terminal=False))
    return buffer.getvalue()


def test_the_compare_table_fits_80_columns_without_cutting_a_number():
    layer = TapResult(0, "layers.3", {"max_abs": 1.6712e-06}, {"max_abs": 1e-4}, [])
    encoder = TapResult(0, "encoder", {"max_abs": 2.3814e-06}, {"max_abs": 1e-4}, [])
    results = Results(model={}, tolerances="t", comparisons=[
        pair_comparison([layer, encoder], [1, 2], [1, 2], pair="nemo~onnx",
                        utterance="a-rather-long-utterance-name-01.wav", order=[]),
        pair_comparison([layer, encoder], [1, 2], [1, 2], pair="nemo~mlx", utterance="utt01.wav", order=[]),
    ])
    text = _render(results)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text, text
    assert "1.7e-06" in text and "2.4e-06" in text
    assert "nemo~onnx float32" in text and "nemo~mlx float32" in text


def test_a_tap_that_was_not_compared_shows_a_dash_not_nan():
    encoder_only = TapResult(-1, "encoder", {"max_abs": 4.8e-06}, {"max_abs": 1e-4}, [])
    results = Results(model={}, tolerances="t", comparisons=[
        pair_comparison([encoder_only], [1, 2], [1, 2], pair="streaming~offline@70,13", utterance="utt01.wav", order=[],
                        require_token_match=False)])
    text = _render(results)
    assert "nan" not in text
    assert "–" in text and "4.8e-06" in text

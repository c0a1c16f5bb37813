"""What a person reads in an 80-column terminal: every number whole, ``–`` where nothing was compared."""

from __future__ import annotations

import io

from rich.console import Console

from streaming_parity.app.cli import print_comparisons
from streaming_parity.judge.compare import PairComparison, TapResult
from streaming_parity.judge.loop import LoopOutcome
from streaming_parity.judge.results import Results


def _comparison(pair: str, utterance: str, taps: list[TapResult], *, require_token_match: bool = True):
    return PairComparison(reference="nemo", candidate=pair.split("~")[1], pair=pair, dtype="float32",
                          att_context_size=(70, 13), utterance=utterance, taps=taps, reference_tokens=[1, 2],
                          candidate_tokens=[1, 2], order=[], require_token_match=require_token_match)


def _render(results: Results, width: int = 80) -> str:
    buffer = io.StringIO()
    print_comparisons(LoopOutcome(results), out=Console(file=buffer, width=width, force_terminal=False))
    return buffer.getvalue()


def test_the_compare_table_fits_80_columns_without_cutting_a_number():
    layer = TapResult(0, "layers.3", {"max_abs": 1.6712e-06}, {"max_abs": 1e-4}, [])
    encoder = TapResult(0, "encoder", {"max_abs": 2.3814e-06}, {"max_abs": 1e-4}, [])
    results = Results(model={}, tolerances="t", comparisons=[
        _comparison("nemo~onnx", "a-rather-long-utterance-name-01.wav", [layer, encoder]),
        _comparison("nemo~mlx", "utt01.wav", [layer, encoder]),
    ])
    text = _render(results)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text, text
    assert "1.7e-06" in text and "2.4e-06" in text
    assert "nemo~onnx float32" in text and "nemo~mlx float32" in text


def test_a_tap_that_was_not_compared_shows_a_dash_not_nan():
    encoder_only = TapResult(-1, "encoder", {"max_abs": 4.8e-06}, {"max_abs": 1e-4}, [])
    results = Results(model={}, tolerances="t", comparisons=[
        _comparison("streaming~offline@70,13", "utt01.wav", [encoder_only], require_token_match=False)])
    text = _render(results)
    assert "nan" not in text
    assert "–" in text and "4.8e-06" in text

"""Which prompt a candidate actually used, when its ``prompt`` tap diverges.

A prompt-conditioned model (Nemotron-3.5) fuses the stream's locale into the encoder output through
``prompt_kernel`` (``PromptStreamingMixin._apply_prompt_to_encoded``). The failures that hide there
are silent: a runtime that never calls ``set_inference_prompt`` passes the encoder output through
unchanged, and a converted artifact whose ``prompt_dictionary`` is shifted conditions every stream on
the neighbouring language. Both still produce plausible transcripts.

Given the reference's kernel weights (``Backend.prompt_kernel``), the candidate's ``prompt`` tap at the
first step where it diverges is recomputed from the candidate's own encoder output for every prompt
index, and for the bypass; the one that matches within the prompt tap's tolerance names the cause.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streaming_parity.interface.model_info import ModelInfo, PromptKernel
from streaming_parity.interface.taps import TAP_ENCODER, TAP_PROMPT
from streaming_parity.judge.compare import PairComparison
from streaming_parity.judge.metrics import all_metrics
from streaming_parity.judge.tolerances import Tolerances

BYPASSED = "bypassed"


def identify_prompt(kernel: PromptKernel, encoded: np.ndarray, prompt_tap: np.ndarray, tolerances: Tolerances,
                    pair: str, dtype: str) -> int | str | None:
    """The prompt index whose fusion of ``encoded`` ``[B, D, T]`` reproduces ``prompt_tap`` within the
    ``prompt`` tap's limits, ``BYPASSED`` when ``prompt_tap`` is ``encoded`` itself, None when nothing does
    (the kernel weights or the fusion differ)."""
    if encoded.shape != prompt_tap.shape:
        return None
    limits = tolerances.limits(pair, dtype, TAP_PROMPT)
    candidates: list[int | str] = [BYPASSED, *range(kernel.num_prompts)]
    best, best_error = None, np.inf
    for candidate in candidates:
        fused = kernel.apply(encoded, None if candidate == BYPASSED else int(candidate))
        metrics = all_metrics(fused, prompt_tap)
        if tolerances.check(metrics, limits):
            continue
        error = metrics.get("max_abs", np.inf)
        if error < best_error:
            best, best_error = candidate, error
    return best


def explain_prompt_divergence(comparison: PairComparison, reference_run: Any, candidate_run: Any,
                              kernel: PromptKernel, info: ModelInfo, prompt: str | None,
                              tolerances: Tolerances) -> str | None:
    """A sentence naming why the candidate's ``prompt`` tap diverged (bypassed, another index, or neither),
    when the comparison's first divergence is the ``prompt`` tap; None otherwise."""
    divergence = comparison.first_divergence()
    if divergence is None or divergence.tap != TAP_PROMPT or divergence.step < 0:
        return None
    step = divergence.step
    candidate_taps = candidate_run.step_taps(step)
    reference_taps = reference_run.step_taps(step)
    encoded = candidate_taps.get(TAP_ENCODER, reference_taps.get(TAP_ENCODER))
    if encoded is None or TAP_PROMPT not in candidate_taps:
        return None
    found = identify_prompt(kernel, encoded, candidate_taps[TAP_PROMPT], tolerances, comparison.pair,
                            comparison.dtype)
    expected = info.prompt_index(prompt)
    given = f"{prompt!r} (index {expected})" if prompt is not None else "no locale"
    if found == BYPASSED:
        return (f"the candidate's prompt tap at step {step} is its encoder output unchanged: the prompt was "
                f"bypassed (never set, as when set_inference_prompt is skipped); the reference used {given}")
    if found is None:
        return (f"the candidate's prompt tap at step {step} matches no prompt index through the reference's "
                f"prompt_kernel, nor the bypass: its prompt_kernel weights or the fusion differ")
    locale = info.prompt_locale(int(found))
    named = f"index {found}" + (f" ({locale!r})" if locale else "")
    if expected is None:
        return f"the candidate conditioned on {named} at step {step} where the reference set no prompt"
    return (f"the candidate's prompt tap at step {step} is the reference's prompt_kernel at {named}, not "
            f"{given}: its prompt index is off by {int(found) - expected:+d} (another prompt_dictionary)")

"""Token-level comparison of two runs: what a transcript-level backend (a peer runtime) can be judged on.

A peer runtime runs its own front end, chunking and decoding and exposes no tensors, so its run is a
sequence of steps (one per chunk it decoded) with the tokens each step added. Against the reference's
run this gives: whether the transcripts are identical (or, where the tolerance file bounds it for the
pair, how much they agree), and the first step at which the runtime's tokens leave the reference's,
with the tokens it lost and added there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from streaming_parity.judge.metrics import token_agreement


def step_tokens(run: Any) -> list[list[int]]:
    """The tokens each step of a run added (batch item 0)."""
    spooled = getattr(run, "step_tokens", None)
    if spooled is not None:
        return [list(tokens) for tokens in spooled]
    return [list(step.tokens[0]) for step in run.steps]


def token_divergence(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict[str, Any] | None:
    """The first step whose tokens differ, with the tokens the candidate lost and added there (multisets),
    and the totals over the whole run; None when every step agrees.

    Steps are paired by index: the reference's chunk schedule against the candidate's own, which cover
    the same audio when the candidate cuts chunks as the reference does.
    """
    steps = max(len(reference), len(candidate))
    for index in range(steps):
        ref = list(reference[index]) if index < len(reference) else []
        cand = list(candidate[index]) if index < len(candidate) else []
        if ref != cand:
            all_ref = [t for row in reference for t in row]
            all_cand = [t for row in candidate for t in row]
            return {
                "step": index,
                "reference_step_tokens": ref,
                "candidate_step_tokens": cand,
                "lost": _missing_from(ref, cand),
                "added": _missing_from(cand, ref),
                "reference_steps": len(reference),
                "candidate_steps": len(candidate),
                "total_lost": sum((Counter(all_ref) - Counter(all_cand)).values()),
                "total_added": sum((Counter(all_cand) - Counter(all_ref)).values()),
            }
    return None


def _missing_from(tokens: Sequence[int], other: Sequence[int]) -> list[int]:
    """``tokens`` in order, less one occurrence of each token ``other`` holds (a multiset difference)."""
    remaining = Counter(other)
    missing = []
    for token in tokens:
        if remaining[token] > 0:
            remaining[token] -= 1
        else:
            missing.append(token)
    return missing


def describe_divergence(divergence: dict[str, Any], vocabulary: Sequence[str] | None = None) -> str:
    """``tokens leave the reference's at step 3: lost ['▁the', '▁cat'], added []`` (ids without a vocabulary)."""
    def shown(tokens):
        if vocabulary is None:
            return list(tokens)
        return [vocabulary[t] if 0 <= t < len(vocabulary) else t for t in tokens]

    return (f"tokens leave the reference's at step {divergence['step']}: lost {shown(divergence['lost'])}, "
            f"added {shown(divergence['added'])} (whole run: {divergence['total_lost']} lost, "
            f"{divergence['total_added']} added; {divergence['reference_steps']} vs {divergence['candidate_steps']} "
            "steps)")


def agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """1 - edit distance / reference tokens (``streaming_parity.judge.metrics.token_agreement``)."""
    return token_agreement(reference, candidate)

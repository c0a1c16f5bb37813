"""Cross-backend parity: every backend pair, every lookahead, every fixture utterance, every step.

Parametrized over the backend registry (``backend_pair`` / ``backend_name``, see conftest.py), so a
new backend needs no change here. Pairs run in the first-chunk mode both backends support (plain,
else pad-and-drop); the reference runs are shared across pairs through ``run_cache``.
"""

from __future__ import annotations

import numpy as np
import pytest

from streaming_parity.core.errors import Unsupported
from streaming_parity.interface.decoding import decode_tokens
from streaming_parity.interface.driver import shared_mode
from streaming_parity.judge.compare import compare_streaming_to_offline
from streaming_parity.judge.metrics import word_error_rate
from streaming_parity.judge.results import Results


def _pair_comparisons(backend_pair, backend_pool, run_cache, utterances, att_contexts, tolerances):
    reference_name, candidate_name = backend_pair
    reference, candidate = backend_pool.get(reference_name), backend_pool.get(candidate_name)
    mode = shared_mode(reference, candidate)
    comparisons = []
    for utterance in utterances:
        for context in att_contexts:
            # Judged as parity compare judges (teacher-forced where a near-tie moved a decision).
            try:
                judged = run_cache.judge(reference_name, candidate_name, utterance, context, mode, tolerances)
            except Unsupported as refused:
                # A peer that cannot run a lookahead at all (transformers' documented streaming at [70,0]) says so;
                # this project's backends never refuse one of the model's lookaheads.
                if candidate.capabilities.gating:
                    raise
                print(f"{candidate_name} [{context[0]},{context[1]}]: {refused}")
                continue
            comparisons.append((utterance, *judged))
    return comparisons


def _save(results_dir, name, comparisons, model, tolerances, transcripts=()):
    if results_dir is None:
        return
    results = Results(model=model, tolerances=tolerances.source, comparisons=list(comparisons),
                      transcripts=list(transcripts))
    results.save(results_dir / f"{name}.json")


def test_per_layer_taps_and_caches_within_tolerance(backend_pair, backend_pool, run_cache, utterances,
                                                    att_contexts, tolerances, results_dir, model_under_test):
    """All shared taps and the caches after every step, judged by the tolerance file.

    A peer runtime that exposes some taps (mlx-audio's encoder output) is judged by the same file, but it is
    not this project's conversion: its divergences must be located (a first divergent tap and step), and
    ``parity compare`` diagnoses why (docs/peers.md, docs/prompt.md); they do not fail the suite."""
    candidate = backend_pool.get(backend_pair[1])
    if not candidate.capabilities.tensor_level:
        pytest.skip("transcript-level backend: it exposes no taps and no caches")
    comparisons = _pair_comparisons(backend_pair, backend_pool, run_cache, utterances, att_contexts, tolerances)
    if not candidate.capabilities.gating:  # a peer runtime, or a peer's model (transformers): located, not failed
        for _utterance, _, _, comparison in comparisons:
            if not comparison.passed:
                assert comparison.first_divergence() is not None, comparison.describe_failure()
                print(comparison.describe_failure())
        return
    _save(results_dir, "parity-" + "~".join(backend_pair), [c for *_, c in comparisons], model_under_test,
          tolerances)
    num_layers = backend_pool.get(backend_pair[0]).info.num_layers
    every_tap = {"mel", "pre_encode", *(f"layers.{i}" for i in range(num_layers)), "encoder", "decoder", "joint",
                 "cache_last_channel", "cache_last_time", "cache_last_channel_len"}
    worst: dict[tuple[int, int], dict[str, float]] = {}
    failures = []
    for _utterance, _, _, comparison in comparisons:
        missing = every_tap - {t.tap for t in comparison.taps}
        assert not missing, f"{'~'.join(backend_pair)} does not expose taps {sorted(missing)}"
        per_tap = worst.setdefault(comparison.att_context_size, {})
        for tap, value in comparison.worst("max_abs").items():
            kind = tap.split(".")[0]
            per_tap[kind] = max(per_tap.get(kind, 0.0), value)
        if any(not t.passed for t in comparison.taps):
            failures.append(comparison.describe_failure())
    for context, per_tap in worst.items():
        print(f"{'~'.join(backend_pair)} {list(context)} worst max_abs: "
              + ", ".join(f"{k} {v:.1e}" for k, v in per_tap.items()))
    assert not failures, "\n".join(failures)


def test_transcripts_agree_token_for_token(backend_pair, backend_pool, run_cache, utterances, att_contexts,
                                           tolerances):
    comparisons = _pair_comparisons(backend_pair, backend_pool, run_cache, utterances, att_contexts, tolerances)
    vocabulary = backend_pool.get(backend_pair[0]).info.vocabulary
    # A transcript-level candidate (a peer runtime) runs its own front end and chunking: its tokens are
    # compared step by step and a difference must be located (the first step, the tokens lost and added);
    # the runtime's stack is bisected by parity compare (docs/peers.md). Its verdict is the tolerance file's.
    # A peer runtime that exposes taps (mlx-audio) is placed by its first divergent tap instead.
    capabilities = backend_pool.get(backend_pair[1]).capabilities
    transcript_level = not capabilities.tensor_level
    differing = []
    for _utterance, ref_run, cand_run, comparison in comparisons:
        if not capabilities.gating and not transcript_level:
            if not comparison.tokens_equal:
                assert comparison.first_divergence() is not None, comparison.describe_failure()
                print(comparison.describe_failure())
        elif transcript_level:
            if not comparison.tokens_equal:
                assert comparison.token_divergence is not None, comparison.describe_failure()
                print(comparison.describe_failure())
            if comparison.taps and not comparison.passed:  # a tokens agreement bound the pair has, violated
                differing.append(comparison.describe_failure())
        elif not comparison.tokens_equal:
            differing.append(comparison.describe_failure())
        ref_text, cand_text = decode_tokens(vocabulary, ref_run.tokens), decode_tokens(vocabulary, cand_run.tokens)
        assert word_error_rate([ref_text], [cand_text]) == (0.0 if comparison.tokens_equal else pytest.approx(
            word_error_rate([ref_text], [cand_text])))
    assert not differing, "\n".join(differing)


def test_cache_invariants(backend_name, backend_pool, run_cache, utterances, att_contexts):
    """On each backend alone: caches start at zero, the channel-cache length grows by the frames each
    step keeps and saturates at the left context, and the time cache holds the last K-1 conv inputs
    (so after a step of T < K-1 frames it is the previous cache shifted left by T)."""
    backend = backend_pool.get(backend_name)
    if not backend.capabilities.caches:
        pytest.skip("transcript-level backend: it exposes no caches")
    mode = shared_mode(backend)
    utterance = max(utterances, key=lambda u: len(u.audio))
    for context in att_contexts:
        cfg = backend.streaming_config(context)
        initial = backend.initial_state(context)
        assert not initial.cache_last_channel.any() and not initial.cache_last_time.any()
        assert initial.cache_last_channel_len.tolist() == [0]
        run = run_cache.run(backend_name, utterance, context, mode)
        expected_len, previous_time = 0, initial.cache_last_time
        for index, step in enumerate(run.steps):
            kept = int(step.taps["layers.0"].shape[1])
            expected_len = min(expected_len + kept, cfg.last_channel_cache_size)
            assert step.state.cache_last_channel_len.tolist() == [expected_len], f"{context} step {index}"
            width = previous_time.shape[-1]
            if kept < width:
                np.testing.assert_array_equal(step.state.cache_last_time[..., : width - kept],
                                              previous_time[..., kept:], err_msg=f"{context} step {index}")
            previous_time = step.state.cache_last_time
        assert expected_len == cfg.last_channel_cache_size


def test_streaming_matches_offline(backend_name, backend_pool, run_cache, utterances, att_contexts, tolerances):
    """Each backend's own streaming output against its own offline forward ([70,0] has its own bound)."""
    from streaming_parity.interface.chunking import FirstChunkMode

    backend = backend_pool.get(backend_name)
    if not backend.capabilities.offline:
        pytest.skip(f"{backend_name} has no offline forward")
    if FirstChunkMode.PLAIN.value not in backend.first_chunk_modes:
        pytest.skip(f"{backend_name} streams in pad-and-drop mode only, which is not frame-comparable to offline")
    failures = []
    for utterance in utterances:
        mel = run_cache.mel(utterance)
        for context in att_contexts:
            run = run_cache.run(backend_name, utterance, context, FirstChunkMode.PLAIN)
            offline = backend.offline(mel, np.array([mel.shape[-1]]), context, prompt=utterance.prompt_for(backend.info))
            comparison = compare_streaming_to_offline(run, offline, tolerances,
                                                      num_layers=backend.info.num_layers, utterance=utterance.name)
            if not comparison.passed:
                failures.append(comparison.describe_failure())
    if not backend.capabilities.gating:  # a peer's model (transformers): its divergences are located, not failed
        for failure in failures:
            print(failure)
        return
    assert not failures, "\n".join(failures)


def test_registry_knows_each_backends_first_chunk_modes(backend_name, backend_pool):
    """The bounded-memory matrix plans reference runs from the registry before loading any candidate."""
    from streaming_parity.interface.registry import get

    assert get(backend_name).capabilities == backend_pool.get(backend_name).capabilities

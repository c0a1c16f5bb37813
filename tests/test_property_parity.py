"""Property tests: whatever the audio, every backend pair agrees within tolerance.

Random lengths from 80 ms to 20 s (off the 10 ms hop grid), silence, noise, tones, clipped and
very quiet speech, random lookahead. Few examples in the default run; many under ``-m nightly``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming_parity.app.session import fixture_utterances
from streaming_parity.fixtures.models import STREAMING_CONTEXTS
from streaming_parity.interface.driver import shared_mode, stream
from streaming_parity.judge.compare import compare_runs

# Drives Backend.step with mel chunks: a transcript-level peer runtime (it takes audio) is skipped.
pytestmark = pytest.mark.streams_mel

SAMPLE_RATE = 16000
SPEECH = np.concatenate([u.audio for u in fixture_utterances()])


@st.composite
def signals(draw):
    samples = draw(st.integers(min_value=int(0.08 * SAMPLE_RATE), max_value=20 * SAMPLE_RATE))
    kind = draw(st.sampled_from(["silence", "noise", "tone", "clipped", "quiet", "speech"]))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SAMPLE_RATE
    if kind == "silence":
        audio = np.zeros(samples)
    elif kind == "noise":
        audio = rng.standard_normal(samples) * draw(st.sampled_from([1e-3, 0.05, 0.3]))
    elif kind == "tone":
        audio = 0.5 * np.sin(2 * np.pi * draw(st.floats(min_value=50, max_value=7900)) * t)
    else:
        start = int(rng.integers(0, max(len(SPEECH) - samples, 1)))
        excerpt = np.resize(SPEECH[start:start + samples], samples)
        audio = {"clipped": np.clip(excerpt * 20.0, -1.0, 1.0), "quiet": excerpt * 1e-4, "speech": excerpt}[kind]
    context = tuple(draw(st.sampled_from(STREAMING_CONTEXTS)))
    return kind, audio.astype(np.float32), context


def _agree(backend_pair, backend_pool, tolerances, signal):
    kind, audio, context = signal
    reference, candidate = (backend_pool.get(name) for name in backend_pair)
    mel = backend_pool.get("nemo").features(audio[None])[0]
    mode = shared_mode(reference, candidate)
    ref_run = stream(reference, mel, context, mode, features=reference.features(audio[None])[0])
    cand_run = stream(candidate, mel, context, mode, dtype=candidate.dtype,
                      features=candidate.features(audio[None])[0])
    comparison = compare_runs(ref_run, cand_run, tolerances, num_layers=reference.info.num_layers,
                              utterance=f"{kind} {len(audio) / SAMPLE_RATE:.3f}s")
    if not (reference.capabilities.gating and candidate.capabilities.gating):
        # A peer's model (transformers): its divergences are located, as the parity suites locate them, not failed.
        assert comparison.passed or comparison.first_divergence() is not None, comparison.describe_failure()
        return
    assert comparison.passed, comparison.describe_failure()


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(signal=signals())
def test_backends_agree_on_arbitrary_audio(backend_pair, backend_pool, tolerances, signal):
    _agree(backend_pair, backend_pool, tolerances, signal)


@pytest.mark.nightly
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(signal=signals())
def test_backends_agree_on_arbitrary_audio_nightly(backend_pair, backend_pool, tolerances, signal):
    _agree(backend_pair, backend_pool, tolerances, signal)

"""The numpy front end (streaming_parity.interface.frontend) against NeMo's AudioToMelSpectrogramPreprocessor."""

from __future__ import annotations

import numpy as np
import pytest

from streaming_parity.interface.frontend import Frontend, FrontendConfig


@pytest.fixture(scope="module")
def frontend(nemo_backend):
    from streaming_parity.interface.frontend import frontend_from_featurizer

    return frontend_from_featurizer(nemo_backend.model.preprocessor.featurizer)


@pytest.mark.nemo
def test_matches_nemo_preprocessor_on_fixture_speech(frontend, nemo_backend, utterances, tolerances):
    limits = tolerances.limits("nemo~onnx", "float32", "mel")
    worst = 0.0
    for utterance in utterances:
        expected, expected_len = nemo_backend.features(utterance.audio[None])
        actual, actual_len = frontend(utterance.audio[None])
        assert actual.shape == expected.shape, utterance.name
        np.testing.assert_array_equal(actual_len, expected_len)
        worst = max(worst, float(np.abs(actual - expected).max()))
    # Measured 2.4e-4: NeMo's float32 STFT against this float64 one, largest on near-silent bins.
    print(f"numpy front end vs NeMo: max abs error {worst:.2e} (limit {limits['max_abs']:.0e})")
    assert worst <= limits["max_abs"]


@pytest.mark.nemo
def test_save_and_load_round_trip(frontend, tmp_path, utterances):
    frontend.save(tmp_path)
    loaded = Frontend.load(tmp_path)
    audio = utterances[0].audio[None]
    np.testing.assert_array_equal(loaded(audio)[0], frontend(audio)[0])


def test_masking_and_lengths_follow_nemo_rules():
    config = FrontendConfig(n_mels=4, n_fft=16, win_length=12, hop_length=4)
    frontend = Frontend(config, np.full((4, 9), 0.1, np.float32), np.hanning(12).astype(np.float32))
    audio = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    mel, lengths = frontend(audio, np.array([40, 21]))
    assert mel.shape == (2, 4, 11)  # centred STFT: 1 + 40 // 4 frames
    np.testing.assert_array_equal(lengths, [10, 5])  # len // hop
    assert (mel[0, :, 10:] == 0).all() and (mel[1, :, 5:] == 0).all()  # frames past seq_len -> pad_value
    with pytest.raises(ValueError, match="filterbank: expected shape"):
        Frontend(config, np.zeros((4, 8), np.float32), None)


def test_config_from_the_nemo_config_equals_the_live_featurizers(nemo_backend, tiny_nemo):
    """One description of NeMo's front end: resolved from the config (MLX) or read off NeMo (ONNX export)."""
    from streaming_parity.core.nemo_file import inspect_nemo
    from streaming_parity.interface.frontend import FrontendConfig, frontend_from_featurizer

    from_config = FrontendConfig.from_nemo_config(inspect_nemo(tiny_nemo).config["preprocessor"])
    assert from_config == frontend_from_featurizer(nemo_backend.model.preprocessor.featurizer).config

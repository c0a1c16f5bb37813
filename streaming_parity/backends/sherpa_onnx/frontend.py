"""sherpa-onnx's front end for NeMo transducers: kaldi-native-fbank, configured as sherpa-onnx does.

``OnlineRecognizerTransducerNeMoImpl::PostInit`` (sherpa-onnx/csrc/online-recognizer-transducer-nemo-impl.h)
overrides the recognizer's feature settings for every NeMo transducer::

    feature_dim = <encoder input dim 1>; low_freq = 0; high_freq = 8000; is_librosa = true;
    remove_dc_offset = false; window_type = "hann"; dither = 0; nemo_normalize_type = <metadata>

and ``FeatureExtractor::InitFbank`` (csrc/features.cc) keeps the defaults of ``FeatureExtractorConfig``
for the rest: 16 kHz, 25 ms frames every 10 ms, ``snip_edges = false``, ``preemph_coeff = 0.97``,
``round_to_power_of_two = true`` (a 512-point FFT); samples in [-1, 1] (``normalize_samples``).
kaldi-native-fbank computes each frame on its own: the frame is pre-emphasised within itself
(``d[0] -= 0.97 d[0]``), windowed by a periodic Hann window (``2 pi / N``), its first sample at
``160 f + 80 - 200`` (centred half a hop later than NeMo's ``center=True`` STFT, reflected at the edges
rather than zero-padded), and the log is ``log(max(x, FLT_EPSILON))`` (NeMo: ``log(x + 2**-24)``).
"""

from __future__ import annotations

import numpy as np

from streaming_parity.core.errors import Unsupported

SAMPLE_RATE = 16000


def fbank_options(feature_dim: int, sample_rate: int = SAMPLE_RATE):
    """``knf.FbankOptions`` as sherpa-onnx sets them for a NeMo transducer."""
    try:
        import kaldi_native_fbank as knf
    except ImportError:
        raise Unsupported("sherpa-onnx's front end needs kaldi-native-fbank (pip install kaldi-native-fbank)") from None
    options = knf.FbankOptions()
    frame = options.frame_opts
    frame.samp_freq = sample_rate
    frame.frame_shift_ms = 10.0
    frame.frame_length_ms = 25.0
    frame.dither = 0.0
    frame.preemph_coeff = 0.97
    frame.remove_dc_offset = False
    frame.window_type = "hann"
    frame.round_to_power_of_two = True
    frame.snip_edges = False
    mel = options.mel_opts
    mel.num_bins = feature_dim
    mel.low_freq = 0.0
    mel.high_freq = 8000.0
    mel.is_librosa = True
    return options


def fbank(audio: np.ndarray, feature_dim: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Log-mel frames of one utterance (float32 samples in [-1, 1]) as ``[n_mels, T]``."""
    import kaldi_native_fbank as knf

    extractor = knf.OnlineFbank(fbank_options(feature_dim, sample_rate))
    extractor.accept_waveform(sample_rate, np.asarray(audio, np.float32).tolist())
    extractor.input_finished()
    frames = [extractor.get_frame(i) for i in range(extractor.num_frames_ready)]
    if not frames:
        return np.zeros((feature_dim, 0), np.float32)
    return np.asarray(frames, np.float32).T.copy()

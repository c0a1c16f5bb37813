"""The chunk schedule: NeMo's streaming config reproduced, every mel frame consumed exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming_parity.fixtures.models import FIXTURES, STREAMING_CONTEXTS
from streaming_parity.interface.chunking import ChunkSchedule, FirstChunkMode, StreamingConfig, parse_att_context

ENCODER = FIXTURES["tiny-streaming"].encoder
HOP = 160  # 10 ms at 16 kHz


def mel_frames(samples: int) -> int:
    """Width of NeMo's mel for ``samples`` (centred STFT): len // hop + 1."""
    return samples // HOP + 1


# The table in the shared notes (NeMo 3.0.0, measured): chunk sizes, valid_out_len per lookahead.
@pytest.mark.parametrize("context, chunk_size, valid_out_len", [
    ((70, 0), (1, 8), 1), ((70, 1), (9, 16), 2), ((70, 6), (49, 56), 7), ((70, 13), (105, 112), 14)])
def test_streaming_config_matches_nemo_table(context, chunk_size, valid_out_len):
    cfg = StreamingConfig.from_encoder_config(ENCODER, context)
    assert cfg.chunk_size == chunk_size
    assert cfg.shift_size == chunk_size
    assert cfg.valid_out_len == valid_out_len
    assert cfg.pre_encode_cache_size == (0, 9)
    assert cfg.drop_extra_pre_encoded == 2
    assert cfg.last_channel_cache_size == 70


def test_unknown_lookahead_is_refused():
    with pytest.raises(ValueError, match=r"not one of the model's"):
        StreamingConfig.from_encoder_config(ENCODER, (70, 3))


def test_parse_att_context():
    assert parse_att_context("70,13") == (70, 13)
    assert parse_att_context("[70, 6]") == (70, 6)
    with pytest.raises(ValueError, match="70,13"):
        parse_att_context("seventy")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=st.integers(min_value=1280, max_value=20 * 16000),
       context=st.sampled_from(STREAMING_CONTEXTS),
       mode=st.sampled_from(list(FirstChunkMode)))
def test_every_frame_consumed_once_and_outputs_match_offline(samples, context, mode):
    cfg = StreamingConfig.from_encoder_config(ENCODER, context)
    total = mel_frames(samples)
    # Frame values are their own indices, so the chunks show exactly which frames they carry.
    mel = np.broadcast_to(np.arange(total, dtype=np.float32), (1, 4, total)).copy() + 1.0
    chunks = ChunkSchedule(cfg, mode).chunks(mel)
    assert chunks, "a stream of at least 80 ms yields at least one chunk"

    new_frames = np.concatenate([c.mel[0, 0, c.cache_frames:] for c in chunks]) - 1.0
    consumed = len(new_frames)
    np.testing.assert_array_equal(new_frames, np.arange(consumed))  # in order, none twice, none skipped
    tail = total - consumed
    assert 0 <= tail < cfg.sampling_frames[1], "only a tail too short for one output may be left (NeMo drops it)"

    for chunk in chunks:
        cache = chunk.mel[0, 0, :chunk.cache_frames] - 1.0
        if chunk.is_first:
            assert np.all(chunk.mel[0, 0, :chunk.cache_frames] == 0.0)  # zeros: nothing precedes the stream
        else:
            real = cache[cache >= 0]
            expected = np.arange(chunk.start_frame - len(real), chunk.start_frame)
            np.testing.assert_array_equal(real, expected)  # the cache is the frames just before the chunk
    assert [c.keep_all_outputs for c in chunks[:-1]] == [False] * (len(chunks) - 1)
    assert chunks[-1].keep_all_outputs == (tail == 0)

    # NeMo's streaming buffer treats the whole mel tensor as the stream, including the last frame,
    # which lies past seq_len = samples // hop and is masked to zero; offline over the same width.
    streamed = sum(cfg.valid_output_frames(c) for c in chunks)
    offline = cfg.subsampled_length(total)
    assert offline - 2 <= streamed <= offline, f"streamed {streamed} frames, offline {offline}"


@pytest.mark.nemo
def test_streaming_config_equals_nemo_for_every_lookahead(nemo_backend):
    for context in nemo_backend.info.att_context_sizes:
        ours = nemo_backend.streaming_config(context)
        theirs = nemo_backend.streaming_config_from_nemo(context)
        assert list(ours.chunk_size) == list(theirs.chunk_size)
        assert list(ours.shift_size) == list(theirs.shift_size)
        assert list(ours.pre_encode_cache_size) == list(theirs.pre_encode_cache_size)
        assert ours.drop_extra_pre_encoded == theirs.drop_extra_pre_encoded
        assert ours.valid_out_len == theirs.valid_out_len
        assert ours.last_channel_cache_size == theirs.last_channel_cache_size


@pytest.mark.nemo
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=st.integers(min_value=1280, max_value=3 * 16000),
       context=st.sampled_from(STREAMING_CONTEXTS),
       mode=st.sampled_from(list(FirstChunkMode)))
def test_schedule_arithmetic_matches_nemo_encoded_lengths(nemo_backend, samples, context, mode):
    """The valid-frame arithmetic used above is what NeMo's streaming step really returns."""
    from streaming_parity.interface.driver import stream

    audio = np.random.default_rng(samples).standard_normal(samples).astype(np.float32) * 0.1
    mel, _ = nemo_backend.features(audio[None])
    cfg = nemo_backend.streaming_config(context)
    run = stream(nemo_backend, mel, context, mode)
    chunks = ChunkSchedule(cfg, mode).chunks(mel)
    assert [int(s.encoded_len[0]) for s in run.steps] == [cfg.valid_output_frames(c) for c in chunks]

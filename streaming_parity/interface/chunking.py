"""The chunk schedule: the only place that knows how a mel tensor is cut for cache-aware streaming.

Matches NeMo 3.0.0:

- ``StreamingConfig.from_encoder_config`` reproduces ``ConformerEncoder.setup_streaming_params``
  (collections/asr/modules/conformer_encoder.py) for the encoder config alone, so backends without
  NeMo (ONNX Runtime, MLX) derive the same schedule; a test checks it against NeMo's own values.
- ``ChunkSchedule.chunks`` reproduces ``CacheAwareStreamingAudioBuffer.__iter__``
  (parts/utils/streaming_utils.py): mel is computed once for the whole utterance, each chunk is
  prefixed with up to ``pre_encode_cache_size`` earlier frames (zeros when not available), a final
  chunk shorter than the subsampling's ``sampling_frames`` is dropped, and ``keep_all_outputs`` is
  set on the last chunk. ``drop_extra_pre_encoded`` is 0 for the first chunk in plain mode and the
  config's value otherwise (NeMo's ``calc_drop_extra_pre_encoded`` in the streaming example).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.nemo_config import EncoderConfig
from streaming_parity.core.nemo_config import normalize_att_context_sizes as normalize_att_context_sizes  # re-exported


class ChunkSizeError(InvalidInput):
    """A chunk cut for another lookahead (or another schedule) than the one a backend streams."""


class FirstChunkMode(str, enum.Enum):
    """How the first chunk is formed (``pad_and_drop_preencoded`` in NeMo's streaming buffer)."""

    PLAIN = "plain"  # first chunk is chunk_size[0] frames, nothing dropped
    PAD_AND_DROP = "pad-and-drop"  # every chunk is cache + chunk_size[1]; ONNX export bakes this in


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


@dataclass(frozen=True)
class StreamingConfig:
    """NeMo's ``CacheAwareStreamingConfig`` for one lookahead, as (first step, later steps) pairs."""

    att_context_size: tuple[int, int]
    chunk_size: tuple[int, int]
    shift_size: tuple[int, int]
    pre_encode_cache_size: tuple[int, int]
    drop_extra_pre_encoded: int
    valid_out_len: int
    last_channel_cache_size: int
    cache_drop_size: int
    subsampling_factor: int
    sampling_frames: tuple[int, int]

    @classmethod
    def from_encoder_config(cls, encoder: EncoderConfig | Mapping[str, Any],
                            att_context_size: Sequence[int]) -> StreamingConfig:
        """``encoder``: the typed encoder config, or the ``encoder`` section of a NeMo config."""
        if not isinstance(encoder, EncoderConfig):
            encoder = EncoderConfig.from_mapping(encoder)
        style = encoder.att_context_style
        if style != "chunked_limited":
            raise ValueError(
                f"cache-aware streaming needs att_context_style 'chunked_limited', the model has {style!r}")
        factor = encoder.subsampling_factor
        subsampling = encoder.subsampling
        causal = encoder.causal_downsampling
        left, lookahead = int(att_context_size[0]), int(att_context_size[1])
        allowed = encoder.att_context_size
        if (left, lookahead) not in allowed:
            raise InvalidInput(f"att_context_size [{left},{lookahead}] is not one of the model's {list(map(list, allowed))}")

        # ConvSubsampling.get_sampling_frames / get_streaming_cache_size (parts/submodules/subsampling.py):
        # causal striding subsampling needs 1 frame for the first output and `factor` for each later one,
        # and `factor + 1` frames of left context from the previous chunk.
        if causal and subsampling in ("striding", "dw_striding", "striding_conv1d", "dw_striding_conv1d"):
            sampling_frames = (1, factor)
            pre_encode_cache = (0, factor + 1)
        else:
            sampling_frames = (factor, factor)
            pre_encode_cache = (0, 0)

        cache_drop_size = 0
        chunk_size = (sampling_frames[0] + factor * lookahead, sampling_frames[1] + factor * lookahead)
        shift_size = (
            sampling_frames[0] + sampling_frames[1] * (lookahead - cache_drop_size),
            sampling_frames[1] + sampling_frames[1] * (lookahead - cache_drop_size),
        )
        valid_out_len = (shift_size[1] - sampling_frames[1]) // factor + 1
        drop_extra = 1 + (pre_encode_cache[1] - 1) // factor if pre_encode_cache[1] >= 1 else 0
        return cls(
            att_context_size=(left, lookahead),
            chunk_size=chunk_size,
            shift_size=shift_size,
            pre_encode_cache_size=pre_encode_cache,
            drop_extra_pre_encoded=drop_extra,
            valid_out_len=valid_out_len,
            last_channel_cache_size=left if left >= 0 else 10000,
            cache_drop_size=cache_drop_size,
            subsampling_factor=factor,
            sampling_frames=sampling_frames,
            causal_subsampling=causal,
        )

    @property
    def latency_ms(self) -> int:
        """Audio covered by one later-step chunk (10 ms mel hop)."""
        return self.shift_size[1] * 10

    causal_subsampling: bool = True

    def subsampled_length(self, frames: int) -> int:
        """Output frames of the striding subsampling for ``frames`` input frames.

        NeMo's ``calc_length`` (parts/submodules/subsampling.py) with kernel 3, stride 2, repeated
        log2(factor) times; causal padding is (k-1) left + (s-1) right, symmetric is (k-1)//2 each.
        """
        kernel, stride = 3, 2
        paddings = (kernel - 1) + (stride - 1) if self.causal_subsampling else 2 * ((kernel - 1) // 2)
        length = frames
        for _ in range(int(math.log2(self.subsampling_factor))):
            length = math.floor((length + paddings - kernel) / stride + 1)
        return max(length, 0)

    def layer_input_frames(self, mel_frames: int, drop_extra_pre_encoded: int | None = None) -> int:
        """Frames the conformer layers see for a chunk ``mel_frames`` wide: the subsampled width minus
        the frames dropped (``drop_extra_pre_encoded``, as ``forward_for_export`` does; 0 for the plain first
        chunk, which keeps them all). This is the length a multitalker graph's speaker masks must have."""
        drop = self.drop_extra_pre_encoded if drop_extra_pre_encoded is None else drop_extra_pre_encoded
        return self.subsampled_length(mel_frames) - drop

    def valid_output_frames(self, chunk: Chunk) -> int:
        """Encoder frames a streaming step returns for ``chunk`` (batch item 0).

        Subsampling of the chunk's valid length, minus ``drop_extra_pre_encoded``, clamped to
        ``valid_out_len`` unless ``keep_all_outputs`` (``streaming_post_process``).
        """
        frames = max(self.subsampled_length(int(chunk.length[0])) - chunk.drop_extra_pre_encoded, 0)
        return frames if chunk.keep_all_outputs else min(frames, self.valid_out_len)

    def check_chunk(self, chunk: Chunk, backend: str) -> None:
        """Refuse a chunk this lookahead's schedule never cuts (``ChunkSizeError``), before a backend runs it.

        A backend streams one lookahead's chunks: ``chunk_size[0]`` new mel frames for NeMo's plain first
        chunk (no cache, nothing dropped), else ``pre_encode_cache_size[1]`` cache frames, ``chunk_size[1]``
        new ones and ``drop_extra_pre_encoded`` dropped; only the stream's last chunk may be shorter. A
        wider chunk would be silently shortened: the step keeps ``valid_out_len`` output frames and the rest
        of the chunk's audio is never decoded (measured before this check: a [70,13] chunk fed at [70,6]
        returned 7 of its 14 frames in NeMo, ONNX Runtime and MLX alike; the ``chunk-size`` probe)."""
        left, right = self.att_context_size
        cache = int(chunk.cache_frames)
        new = int(chunk.mel.shape[-1]) - cache
        plain_first = chunk.is_first and cache == 0 and chunk.drop_extra_pre_encoded == 0
        expected_cache = 0 if plain_first else self.pre_encode_cache_size[1]
        expected_new = self.chunk_size[0] if plain_first else self.chunk_size[1]
        expected_drop = 0 if plain_first else self.drop_extra_pre_encoded
        where = f"{backend} at [{left},{right}]: chunk {chunk.index}"
        if cache != expected_cache or chunk.drop_extra_pre_encoded != expected_drop:
            raise ChunkSizeError(f"{where} carries {cache} cache frames and drops {chunk.drop_extra_pre_encoded} "
                                 f"pre-encoded frames; this lookahead's schedule prefixes {expected_cache} and drops "
                                 f"{expected_drop}")
        if new > expected_new:
            raise ChunkSizeError(f"{where} has {new} new mel frames; [{left},{right}] streams chunks of "
                                 f"{expected_new} (it keeps {self.valid_out_len} output frames per step: the rest "
                                 f"would be silently dropped)")
        if new < expected_new and not (chunk.is_last or chunk.keep_all_outputs):
            raise ChunkSizeError(f"{where} has {new} new mel frames, fewer than [{left},{right}]'s {expected_new}, "
                                 "and is not the stream's last chunk")

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def parse_att_context(text: str) -> tuple[int, int]:
    """Parse ``"70,13"`` (the CLI form) into ``(70, 13)``."""
    try:
        left, right = (int(part) for part in text.replace("[", "").replace("]", "").split(","))
    except ValueError:
        raise InvalidInput(f"att context must look like 70,13; got {text!r}") from None
    return left, right


@dataclass(frozen=True)
class Chunk:
    index: int
    mel: np.ndarray  # [B, n_mels, cache + new frames] float32
    length: np.ndarray  # [B] int64, valid frames in `mel` (cache included)
    drop_extra_pre_encoded: int
    keep_all_outputs: bool
    start_frame: int  # utterance frame index of the first new (non-cache) frame
    num_new_frames: int
    cache_frames: int  # frames prefixed from the previous chunk or as zeros
    is_first: bool
    is_last: bool


class ChunkSchedule:
    """Cuts one mel tensor into the identical chunk sequence every backend is fed."""

    def __init__(self, config: StreamingConfig, mode: FirstChunkMode | str = FirstChunkMode.PLAIN):
        self.config = config
        self.mode = FirstChunkMode(mode)

    def _first(self, pair: tuple[int, int]) -> int:
        return pair[1] if self.mode is FirstChunkMode.PAD_AND_DROP else pair[0]

    def chunks(self, mel: np.ndarray, lengths: np.ndarray | None = None) -> list[Chunk]:
        if mel.ndim != 3:
            raise ValueError(f"mel: expected [B, n_mels, T], got shape {tuple(mel.shape)}")
        batch, n_mels, total = mel.shape
        # NeMo's buffer uses the tensor's full width as the stream length (append_processed_signal).
        streams_length = np.full((batch,), total, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        cfg = self.config
        result: list[Chunk] = []
        position = 0
        while position < total:
            first = position == 0
            chunk_size = self._first(cfg.chunk_size) if first else cfg.chunk_size[1]
            shift_size = self._first(cfg.shift_size) if first else cfg.shift_size[1]
            new = mel[:, :, position:position + chunk_size]
            min_frames = cfg.sampling_frames[0] if first else cfg.sampling_frames[1]
            if new.shape[-1] < min_frames:
                break  # too few frames for one output after subsampling: NeMo stops here
            if first:
                cache = np.zeros((batch, n_mels, self._first(cfg.pre_encode_cache_size)), mel.dtype)
            else:
                wanted = cfg.pre_encode_cache_size[1]
                cache = mel[:, :, max(position - wanted, 0):position]
                if cache.shape[-1] < wanted:
                    pad = np.zeros((batch, n_mels, wanted - cache.shape[-1]), mel.dtype)
                    cache = np.concatenate([pad, cache], axis=-1)
            added = cache.shape[-1]
            chunk_mel = np.ascontiguousarray(np.concatenate([cache, new], axis=-1), dtype=np.float32)
            chunk_len = np.clip(streams_length - position + added, 0, chunk_mel.shape[-1]).astype(np.int64)
            drop = 0 if (first and self.mode is FirstChunkMode.PLAIN) else cfg.drop_extra_pre_encoded
            position += shift_size
            result.append(Chunk(
                index=len(result), mel=chunk_mel, length=chunk_len, drop_extra_pre_encoded=drop,
                keep_all_outputs=position >= total, start_frame=position - shift_size,
                num_new_frames=new.shape[-1], cache_frames=added, is_first=first, is_last=False,
            ))
        # When the loop stopped on a too-short tail, NeMo's buffer is not empty, so the last chunk it
        # yielded keeps keep_all_outputs=False (is_buffer_empty() is read after the pointer advanced).
        if result:
            result[-1] = dataclasses.replace(result[-1], is_last=True)
        return result


def shared_first_chunk_mode(*capabilities) -> FirstChunkMode:
    """Plain mode where every backend streams it (comparable to offline), else pad-and-drop.

    ``capabilities``: each backend's ``Capabilities`` (anything with ``first_chunk_modes``).
    """
    for mode in (FirstChunkMode.PLAIN, FirstChunkMode.PAD_AND_DROP):
        if all(mode.value in c.first_chunk_modes for c in capabilities):
            return mode
    raise InvalidInput("the backends share no first-chunk mode: "
                     + "; ".join("/".join(c.first_chunk_modes) for c in capabilities))

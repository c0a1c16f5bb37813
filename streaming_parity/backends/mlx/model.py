"""NeMo FastConformer transducers in MLX, layer by layer, with NeMo's cache-aware streaming.

One readable file, in the spirit of mlx-examples' ``whisper/whisper.py``. Every block names the
NeMo 3.0.0 code it reproduces (paths relative to ``nemo/collections/asr/``); where NeMo does
something surprising, the comment says so, because matching it is the point.

Layout: MLX is channels-last, so the encoder works on ``[B, T, D]`` and 2-D convolutions on
``[B, T, F, C]``; caches cross the interface in NeMo's layers-first layout
(``cache_last_channel [L, B, C, D]``, ``cache_last_time [L, B, D, K-1]``) and are transposed here.

Parameter names equal NeMo's module paths (``encoder.layers.0.self_attn.linear_q.weight``), so the
converter's mapping is a table of layout changes, and an artifact of a non-causal checkpoint
loads in parakeet-mlx as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streaming_parity.backends.mlx.blas import use_optimized_blas
from streaming_parity.core.errors import UnsafeArtifact, Unsupported

use_optimized_blas()  # before mlx.core: see streaming_parity/backends/mlx/blas.py

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from streaming_parity.core.nemo_config import (
    CtcConfig,
    DecoderConfig,
    EncoderConfig,
    JointConfig,
    ModelConfig,
    PromptConfig,
    SpeakerKernelConfig,
    read_model_config,
    require_one_of,
)
from streaming_parity.interface.frontend import FrontendConfig
from streaming_parity.interface.speakers import SpeakerTargets, reconciled_pair

# multi_head_attention.py: INF_VAL fills masked attention scores.
ATTENTION_MASK_VALUE = -10000.0
# features.py: CONSTANT added to the per-feature standard deviation.
NORMALIZE_EPSILON = 1e-5


# ------------------------------------------------------------------------------------------------
# Configuration: the typed NeMo config (streaming_parity.core.nemo_config reads the .nemo's model_config.yaml or
# config.json, with NeMo's defaults), and what of it this port implements
# ------------------------------------------------------------------------------------------------

def check_supported(config: ModelConfig) -> None:
    """Refuse, by key and value, a model this port does not build: NeMo accepts more than it implements."""
    encoder = config.encoder
    for key, value, supported in (
        ("encoder.self_attention_model", encoder.self_attention_model, ("rel_pos",)),
        ("encoder.subsampling", encoder.subsampling, ("dw_striding",)),
        ("encoder.untie_biases", encoder.untie_biases, (True,)),
        ("encoder.feat_out", encoder.feat_out, (-1,)),
        ("encoder.reduction", encoder.reduction, (None,)),
        ("encoder.conv_norm_type", encoder.conv_norm_type, ("batch_norm", "layer_norm")),
        ("decoder.blank_as_pad", config.decoder.blank_as_pad, (True,)),
    ):
        require_one_of(key, value, supported)
    if config.prompt is not None:
        # The prompt kernel reads the encoder output concatenated with the one-hot: NeMo sizes it from
        # model_defaults.enc_hidden, which must therefore be the encoder's width.
        require_one_of("model_defaults.enc_hidden", config.prompt.hidden, (encoder.d_model,))


@dataclass(frozen=True)
class ModelArgs:
    """What ``StreamingRNNT`` is built from: the sections of the typed config, completed with the
    vocabulary (``decoder.vocab_size`` and ``joint.num_classes`` are its size, as NeMo sets them).

    ``EncoderConfig`` is ``ConformerEncoder`` (modules/conformer_encoder.py), ``DecoderConfig``
    ``RNNTDecoder`` (embedding + stacked LSTM) and ``JointConfig`` ``RNNTJoint`` (modules/rnnt.py),
    whose ``output_index`` says whether the output layer is ``joint_net.2`` or ``joint_net.1``.
    """

    preprocessor: FrontendConfig  # streaming_parity.interface.frontend: the one description of NeMo's front end
    encoder: EncoderConfig
    decoder: DecoderConfig
    joint: JointConfig
    vocabulary: tuple[str, ...]
    max_symbols: int
    tdt_durations: tuple[int, ...] = ()
    speaker_kernels: SpeakerKernelConfig | None = None  # SpeakerKernelMixin (multitalker models)
    ctc: CtcConfig | None = None  # hybrid RNNT-CTC models: the aux_ctc ConvASRDecoder head
    prompt: PromptConfig | None = None  # prompt-conditioned models (PromptStreamingMixin): the prompt kernel

    @classmethod
    def from_nemo_config(cls, config: ModelConfig | Mapping[str, Any],
                         vocabulary: Sequence[str] | None = None) -> ModelArgs:
        """From a NeMo model config (a mapping, read here, or the ``ModelConfig`` already read) and the
        vocabulary without the blank (default: the config's ``joint.vocabulary``)."""
        model = read_model_config(config)
        check_supported(model)
        vocabulary = tuple(vocabulary) if vocabulary is not None else model.joint.require_vocabulary()
        model = model.with_vocabulary(vocabulary)
        return cls(
            preprocessor=FrontendConfig.from_nemo_config(model.preprocessor),
            encoder=model.encoder,
            decoder=model.decoder,
            joint=model.joint,
            vocabulary=model.joint.require_vocabulary(),
            max_symbols=model.decoding.max_symbols,
            tdt_durations=model.tdt_durations,
            speaker_kernels=model.speaker_kernels,
            ctc=model.ctc,
            prompt=model.prompt,
        )

    @property
    def blank_id(self) -> int:
        return len(self.vocabulary)


# ------------------------------------------------------------------------------------------------
# Front end: FilterbankFeatures.forward (parts/preprocessing/features.py)
# ------------------------------------------------------------------------------------------------

class FrontEnd:
    """Log-mel features exactly as NeMo computes them, with the checkpoint's own window and filterbank.

    Always float32 (NeMo disables autocast around the STFT and the filterbank product).
    """

    def __init__(self, args: FrontendConfig, window: np.ndarray, filterbank: np.ndarray):
        if window.shape != (args.win_length,):
            raise UnsafeArtifact(f"front-end window: expected shape ({args.win_length},), got {window.shape}")
        if args.normalize not in ("NA", "none", "None", "", None, "per_feature"):
            raise Unsupported(f"preprocessor.normalize {args.normalize!r} is not supported by the MLX front end")
        expected_fb = (args.n_mels, args.n_fft // 2 + 1)
        if filterbank.shape != expected_fb:
            raise UnsafeArtifact(f"front-end filterbank: expected shape {expected_fb}, got {filterbank.shape}")
        self.args = args
        # torch.stft pads a shorter window with zeros on both sides to n_fft (centred).
        left = (args.n_fft - args.win_length) // 2
        padded = np.zeros(args.n_fft, np.float32)
        padded[left:left + args.win_length] = window
        self.window = mx.array(padded)
        self.filterbank = mx.array(np.asarray(filterbank, np.float32))

    def seq_len(self, lengths: np.ndarray) -> np.ndarray:
        # FilterbankFeatures.get_seq_len with center=True: (len + 2 * (n_fft // 2) - n_fft) // hop.
        pad = self.args.n_fft // 2 * 2
        return (np.asarray(lengths, np.int64) + pad - self.args.n_fft) // self.args.hop_length

    def __call__(self, audio: np.ndarray, lengths: np.ndarray | None = None) -> tuple[mx.array, np.ndarray]:
        """float32 audio ``[B, samples]`` -> (log-mel ``[B, features, frames]``, valid frames ``[B]``)."""
        args = self.args
        audio = np.atleast_2d(np.asarray(audio, np.float32))
        batch, samples = audio.shape
        lengths = np.full((batch,), samples, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        valid_frames = self.seq_len(lengths)
        valid_frames = np.where(lengths == 0, 0, valid_frames)
        x = mx.array(audio)
        if args.preemph is not None:
            # Pre-emphasis, then zero every sample at or beyond the input length.
            x = mx.concatenate([x[:, :1], x[:, 1:] - args.preemph * x[:, :-1]], axis=1)
            time_mask = mx.arange(samples)[None, :] < mx.array(lengths)[:, None]
            x = mx.where(time_mask, x, 0.0)
        # torch.stft(center=True, pad_mode="constant"): n_fft // 2 zeros on each side, frames every hop.
        half = args.n_fft // 2
        x = mx.pad(x, [(0, 0), (half, half)])
        num_frames = 1 + (samples + 2 * half - args.n_fft) // args.hop_length
        starts = np.arange(num_frames)[:, None] * args.hop_length
        frames = x[:, mx.array(starts + np.arange(args.n_fft)[None, :])]  # [B, frames, n_fft]
        spectrum = mx.fft.rfft(frames * self.window, axis=-1)
        # |X| = sqrt(re^2 + im^2), then ** mag_power (NeMo takes the root first, then the power).
        magnitude = mx.sqrt(mx.real(spectrum) ** 2 + mx.imag(spectrum) ** 2)
        power = magnitude if args.mag_power == 1.0 else magnitude ** args.mag_power
        mel = mx.matmul(self.filterbank, power.transpose(0, 2, 1))  # [B, features, frames]
        if args.log:
            if args.log_zero_guard_type == "add":
                mel = mx.log(mel + args.log_zero_guard_value)
            elif args.log_zero_guard_type == "clamp":
                mel = mx.log(mx.maximum(mel, args.log_zero_guard_value))
            else:
                raise ValueError(f"log_zero_guard_type {args.log_zero_guard_type!r} is not understood")
        frame_valid = mx.arange(num_frames)[None, :] < mx.array(valid_frames)[:, None]  # [B, frames]
        if args.normalize == "per_feature":
            mel = _normalize_per_feature(mel, frame_valid, valid_frames)
        mel = mx.where(frame_valid[:, None, :], mel, args.pad_value)
        return mel, valid_frames


def _normalize_per_feature(mel: mx.array, frame_valid: mx.array, valid_frames: np.ndarray) -> mx.array:
    """features.py normalize_batch("per_feature"): unbiased std over valid frames, + 1e-5."""
    mask = frame_valid[:, None, :]
    count = mx.array(valid_frames.astype(np.float32))[:, None]
    mean = mx.where(mask, mel, 0.0).sum(axis=2) / count
    centred = mx.where(mask, mel - mean[:, :, None], 0.0)
    std = mx.sqrt((centred ** 2).sum(axis=2) / (count - 1.0))
    std = mx.where(mx.isnan(std), 0.0, std) + NORMALIZE_EPSILON
    return mx.where(mask, (mel - mean[:, :, None]) / std[:, :, None], 0.0)


# ------------------------------------------------------------------------------------------------
# Building blocks with NeMo's parameter names
# ------------------------------------------------------------------------------------------------

class Conv2d(nn.Module):
    """A 2-D convolution on ``[B, T, F, C]``; weight ``[O, kH, kW, I/groups]`` (NeMo's OIHW -> OHWI).

    ``causal`` is ``CausalConv2D`` (parts/submodules/causal_convs.py): pad ``kernel-1`` before and
    ``stride-1`` after on time *and* frequency; otherwise symmetric ``(kernel-1)//2`` like ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, *, groups: int = 1,
                 causal: bool = False):
        super().__init__()
        self.weight = mx.zeros((out_channels, kernel, kernel, in_channels // groups))
        self.bias = mx.zeros((out_channels,))
        self.stride, self.groups, self.kernel = stride, groups, kernel
        if kernel == 1:
            self.padding = (0, 0)
        elif causal:
            self.padding = (kernel - 1, stride - 1)
        else:
            self.padding = ((kernel - 1) // 2, (kernel - 1) // 2)

    def output_length(self, lengths: np.ndarray) -> np.ndarray:
        # subsampling.py calculate_conv_output_size, on float lengths as MaskedConvSequential keeps them.
        return np.floor((lengths + sum(self.padding) - self.kernel) / self.stride) + 1

    def __call__(self, x: mx.array) -> mx.array:
        before, after = self.padding
        if before or after:
            x = mx.pad(x, [(0, 0), (before, after), (before, after), (0, 0)])
        out_channels, _, _, in_per_group = self.weight.shape
        if self.kernel == 1 and self.stride == 1 and self.groups == 1:
            return x @ self.weight[:, 0, 0, :].T + self.bias  # pointwise: a matmul
        if in_per_group == 1 and (self.groups == out_channels or x.shape[-1] == 1):
            return _strided_taps_sum(x, self.weight[..., 0], self.stride) + self.bias
        return mx.conv2d(x, self.weight, stride=self.stride, groups=self.groups) + self.bias


def _strided_taps_sum(x: mx.array, weight: mx.array, stride: int) -> mx.array:
    """A convolution with one input channel per output channel, as a sum over kernel taps.

    ``x [B, T, F, C or 1]`` (already padded), ``weight [C, kH, kW]``. Equal to ``mx.conv2d`` up to
    summation order and about five times faster on CPU, where MLX's grouped convolution is slow;
    the sum is accumulated in float32 whatever the compute dtype.
    """
    kernel_t, kernel_f = weight.shape[1], weight.shape[2]
    out_t = (x.shape[1] - kernel_t) // stride + 1
    out_f = (x.shape[2] - kernel_f) // stride + 1
    x32, w32 = x.astype(mx.float32), weight.astype(mx.float32)
    total = None
    for i in range(kernel_t):
        for j in range(kernel_f):
            window = x32[:, i:i + stride * (out_t - 1) + 1:stride, j:j + stride * (out_f - 1) + 1:stride, :]
            term = window * w32[:, i, j]
            total = term if total is None else total + term
    return total.astype(x.dtype)


class ConvSubsampling(nn.Module):
    """``ConvSubsampling`` with ``dw_striding`` (parts/submodules/subsampling.py).

    ``conv`` mirrors NeMo's ``MaskedConvSequential`` indices: ``[conv, relu, (dw_conv, pw_conv, relu) * n]``.
    Before every layer the time steps beyond the running length are zeroed, and the length is
    updated after every strided convolution, exactly as ``MaskedConvSequential.forward`` does.
    """

    def __init__(self, args: EncoderConfig):
        super().__init__()
        channels = args.subsampling_conv_channels
        causal = args.causal_downsampling
        steps = int(math.log2(args.subsampling_factor))
        layers: list[nn.Module] = [Conv2d(1, channels, 3, 2, causal=causal), nn.ReLU()]
        for _ in range(steps - 1):
            layers += [Conv2d(channels, channels, 3, 2, groups=channels, causal=causal),
                       Conv2d(channels, channels, 1, 1), nn.ReLU()]
        self.conv = layers
        freq = float(args.feat_in)
        for layer in layers:
            if isinstance(layer, Conv2d) and layer.stride > 1:
                freq = math.floor((freq + sum(layer.padding) - layer.kernel) / layer.stride) + 1
        self.out = nn.Linear(channels * int(freq), args.d_model)

    def __call__(self, x: mx.array, lengths: np.ndarray) -> tuple[mx.array, np.ndarray]:
        """``[B, T, F]`` -> ``[B, T', D]`` and the subsampled lengths."""
        x = x[..., None]  # [B, T, F, 1]
        current = np.asarray(lengths, np.float64)

        def time_mask(time: int) -> mx.array:
            valid = np.arange(time)[None, :] < current.astype(np.int64)[:, None]
            return mx.array(valid)[:, :, None, None].astype(x.dtype)

        mask = time_mask(x.shape[1])
        for layer in self.conv:
            x = layer(x * mask)
            if isinstance(layer, Conv2d) and layer.stride > 1:
                current = layer.output_length(current)
                mask = time_mask(x.shape[1])
        x = x * mask
        batch, time, freq, channels = x.shape
        # NeMo flattens [B, C, T, F] as x.transpose(1, 2).reshape(b, t, c * f): channel-major.
        x = x.transpose(0, 1, 3, 2).reshape(batch, time, channels * freq)
        return self.out(x), current.astype(np.int64)


def relative_positions(length: int, d_model: int) -> mx.array:
    """``RelPositionalEncoding`` (multi_head_attention.py) for positions ``length-1 .. -(length-1)``.

    Computed in float32 with NeMo's formula, ``[1, 2*length-1, d_model]``.
    """
    positions = np.arange(length - 1, -length, -1, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d_model)))
    angles = (positions * div_term).astype(np.float32)
    pe = np.zeros((positions.shape[0], d_model), np.float32)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)
    return mx.array(pe[None])


def rel_shift(x: mx.array) -> mx.array:
    """``RelPositionMultiHeadAttention.rel_shift``: pad one zero column on the left, fold, drop a row."""
    b, h, qlen, pos_len = x.shape
    x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (1, 0)])
    x = x.reshape(b, h, pos_len + 1, qlen)[:, :, 1:]
    return x.reshape(b, h, qlen, pos_len)


class RelPositionMultiHeadAttention(nn.Module):
    """``RelPositionMultiHeadAttention`` (Transformer-XL biases ``pos_bias_u``/``pos_bias_v``).

    The scores are computed as NeMo's non-SDPA path does: ``(ac + bd) / sqrt(d_k)``, masked with
    -10000 before the softmax and with 0 after it, so fully masked (padding) rows give zeros.
    """

    def __init__(self, n_heads: int, d_model: int, use_bias: bool):
        super().__init__()
        self.h, self.d_k = n_heads, d_model // n_heads
        self.scale = math.sqrt(self.d_k)
        self.linear_q = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = mx.zeros((n_heads, self.d_k))
        self.pos_bias_v = mx.zeros((n_heads, self.d_k))

    def __call__(self, x: mx.array, mask: mx.array | None, pos_emb: mx.array,
                 cache: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """``x [B, T, D]`` (already normed); with ``cache [B, C, D]`` keys/values are ``cat(cache, x)``.

        Returns the output and the next channel cache: the last ``C`` frames of ``cat(cache, x)``
        (``MultiHeadAttention.update_cache`` followed by ``streaming_post_process``'s slice).
        """
        batch, time, _ = x.shape
        keys = x if cache is None else mx.concatenate([cache, x], axis=1)
        next_cache = None if cache is None else keys[:, -cache.shape[1]:]
        q = self.linear_q(x).reshape(batch, time, self.h, self.d_k)
        k = self.linear_k(keys).reshape(batch, -1, self.h, self.d_k).transpose(0, 2, 1, 3)
        v = self.linear_v(keys).reshape(batch, -1, self.h, self.d_k).transpose(0, 2, 1, 3)
        p = self.linear_pos(pos_emb).reshape(pos_emb.shape[0], -1, self.h, self.d_k).transpose(0, 2, 1, 3)
        q_with_bias_u = (q + self.pos_bias_u).transpose(0, 2, 1, 3)
        q_with_bias_v = (q + self.pos_bias_v).transpose(0, 2, 1, 3)
        matrix_ac = q_with_bias_u @ k.transpose(0, 1, 3, 2)
        matrix_bd = rel_shift(q_with_bias_v @ p.transpose(0, 1, 3, 2))[..., :matrix_ac.shape[-1]]
        scores = (matrix_ac + matrix_bd) / self.scale
        if mask is not None:
            scores = mx.where(mask[:, None], ATTENTION_MASK_VALUE, scores)
            weights = mx.where(mask[:, None], 0.0, mx.softmax(scores, axis=-1, precise=True))
        else:
            weights = mx.softmax(scores, axis=-1, precise=True)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, time, self.h * self.d_k)
        return self.linear_out(out), next_cache


class FeedForward(nn.Module):
    """``ConformerFeedForward``: linear1 -> swish -> linear2."""

    def __init__(self, d_model: int, d_ff: int, use_bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear2(nn.silu(self.linear1(x)))


class PointwiseConv1d(nn.Module):
    """A kernel-1 ``nn.Conv1d``; weight ``[O, 1, I]`` (NeMo's OIK -> OKI)."""

    def __init__(self, in_channels: int, out_channels: int, use_bias: bool):
        super().__init__()
        self.weight = mx.zeros((out_channels, 1, in_channels))
        if use_bias:
            self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight[:, 0, :].T
        return y + self.bias if "bias" in self else y


class DepthwiseConv1d(nn.Module):
    """``CausalConv1D`` with ``groups = channels`` (parts/submodules/causal_convs.py); weight ``[C, K, 1]``.

    Without a cache the input is padded ``(left, right)`` with zeros; with one, the cache
    (the last ``K-1`` inputs of the previous chunk) replaces the left padding, and the next cache is
    the last ``K-1`` frames of ``cat(cache, x)`` (``CausalConv1D.update_cache``).
    """

    def __init__(self, channels: int, kernel: int, padding: tuple[int, int], use_bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1))
        if use_bias:
            self.bias = mx.zeros((channels,))
        self.padding = padding

    def __call__(self, x: mx.array, cache: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        left, right = self.padding
        if cache is None:
            x = mx.pad(x, [(0, 0), (left, right), (0, 0)])
            next_cache = None
        else:
            x = mx.concatenate([cache, mx.pad(x, [(0, 0), (0, right), (0, 0)])], axis=1)
            next_cache = x[:, -cache.shape[1]:]
        # Depthwise: a sum over the K kernel taps (float32 accumulation), several times faster on
        # CPU than MLX's grouped conv1d and equal to it up to summation order.
        kernel = self.weight.shape[1]
        out_len = x.shape[1] - kernel + 1
        x32, w32 = x.astype(mx.float32), self.weight[:, :, 0].astype(mx.float32)
        y = x32[:, 0:out_len] * w32[:, 0]
        for k in range(1, kernel):
            y = y + x32[:, k:k + out_len] * w32[:, k]
        y = y.astype(x.dtype)
        return (y + self.bias if "bias" in self else y), next_cache


class BatchNorm(nn.Module):
    """``nn.BatchNorm1d`` in eval mode (running statistics), on the last axis."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return (x - self.running_mean) * mx.rsqrt(self.running_var + self.eps) * self.weight + self.bias


class ConformerConvolution(nn.Module):
    """``ConformerConvolution``: pointwise -> GLU -> zero padding frames -> depthwise -> norm -> swish -> pointwise."""

    def __init__(self, args: EncoderConfig):
        super().__init__()
        d = args.d_model
        self.pointwise_conv1 = PointwiseConv1d(d, 2 * d, args.use_bias)
        self.depthwise_conv = DepthwiseConv1d(d, args.conv_kernel_size, args.conv_context_size, args.use_bias)
        self.batch_norm = nn.LayerNorm(d, eps=1e-5) if args.conv_norm_type == "layer_norm" else BatchNorm(d)
        self.pointwise_conv2 = PointwiseConv1d(d, d, args.use_bias)

    def __call__(self, x: mx.array, pad_mask: mx.array | None, cache: mx.array | None = None):
        x = self.pointwise_conv1(x)
        value, gate = mx.split(x, 2, axis=-1)
        x = value * mx.sigmoid(gate)  # nn.functional.glu(x, dim=1)
        if pad_mask is not None:
            x = mx.where(pad_mask[:, :, None], 0.0, x)
        x, next_cache = self.depthwise_conv(x, cache)
        x = nn.silu(self.batch_norm(x))
        return self.pointwise_conv2(x), next_cache


class ConformerLayer(nn.Module):
    """``ConformerLayer`` (parts/submodules/conformer_modules.py): half-step FFN, MHSA, conv, half-step FFN, norm."""

    def __init__(self, args: EncoderConfig):
        super().__init__()
        d = args.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d, eps=1e-5)
        self.feed_forward1 = FeedForward(d, d * args.ff_expansion_factor, args.use_bias)
        self.norm_self_att = nn.LayerNorm(d, eps=1e-5)
        self.self_attn = RelPositionMultiHeadAttention(args.n_heads, d, args.use_bias)
        self.norm_conv = nn.LayerNorm(d, eps=1e-5)
        self.conv = ConformerConvolution(args)
        self.norm_feed_forward2 = nn.LayerNorm(d, eps=1e-5)
        self.feed_forward2 = FeedForward(d, d * args.ff_expansion_factor, args.use_bias)
        self.norm_out = nn.LayerNorm(d, eps=1e-5)

    def __call__(self, x, att_mask, pos_emb, pad_mask, channel_cache=None, time_cache=None):
        residual = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        attended, channel_cache = self.self_attn(self.norm_self_att(residual), att_mask, pos_emb, channel_cache)
        residual = residual + attended
        convolved, time_cache = self.conv(self.norm_conv(residual), pad_mask, time_cache)
        residual = residual + convolved
        residual = residual + 0.5 * self.feed_forward2(self.norm_feed_forward2(residual))
        return self.norm_out(residual), channel_cache, time_cache


def attention_masks(style: str, att_context_size: tuple[int, int], padding_length: np.ndarray, max_len: int,
                    offset: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``ConformerEncoder._create_masks``: (pad_mask ``[B, T]``, att_mask ``[B, T, T]``), True = masked."""
    left, right = att_context_size
    rows = np.arange(max_len)[:, None]
    cols = np.arange(max_len)[None, :]
    visible = np.ones((max_len, max_len), bool)
    if style == "regular":
        if left >= 0:
            visible &= cols >= rows - left  # triu(diagonal=-left)
        if right >= 0:
            visible &= cols <= rows + right  # tril(diagonal=right)
    elif style == "chunked_limited":
        if right == -1:
            if left >= 0:
                visible &= cols >= rows - left
        else:
            chunk_size = right + 1
            left_chunks = left // chunk_size if left >= 0 else 10000
            chunk = np.arange(max_len) // chunk_size
            diff = chunk[:, None] - chunk[None, :]
            visible &= (diff <= left_chunks) & (diff >= 0)
    else:
        raise Unsupported(f"att_context_style {style!r} is not supported by the MLX port")
    positions = np.arange(max_len)[None, :]
    valid = positions < np.asarray(padding_length)[:, None]
    if offset is not None:
        valid &= positions >= np.asarray(offset)[:, None]
    pair_valid = valid[:, None, :] & valid[:, :, None]
    att_mask = ~(visible[None] & pair_valid)
    return ~valid, att_mask


@dataclass
class EncoderCache:
    """One stream's caches in NeMo's layers-first layout (``get_initial_cache_state``)."""

    channel: mx.array  # cache_last_channel [L, B, C, D]
    time: mx.array  # cache_last_time [L, B, D, K-1]
    channel_len: np.ndarray  # cache_last_channel_len [B] int64


@dataclass
class EncoderOutput:
    encoded: mx.array  # [B, D, T]
    lengths: np.ndarray  # [B] int64
    cache: EncoderCache | None
    taps: dict[str, mx.array]


class ConformerEncoder(nn.Module):
    """``ConformerEncoder``: subsampling, xscaling, rel-pos encoding, conformer layers; offline or cache-aware."""

    def __init__(self, args: EncoderConfig):
        super().__init__()
        self.args = args
        self.pre_encode = ConvSubsampling(args)
        self.layers = [ConformerLayer(args) for _ in range(args.n_layers)]
        self._positions: dict[int, mx.array] = {}

    def _pos_emb(self, length: int, dtype: mx.Dtype) -> mx.array:
        if length not in self._positions:
            self._positions[length] = relative_positions(length, self.args.d_model)
        return self._positions[length].astype(dtype)

    def __call__(self, mel: mx.array, lengths: np.ndarray, att_context_size: tuple[int, int], *,
                 cache: EncoderCache | None = None, drop_extra_pre_encoded: int = 0,
                 record_taps: bool = False, inject: SpeakerInjection | None = None) -> EncoderOutput:
        """``ConformerEncoder.forward_internal``: mel ``[B, n_mels, T]`` -> ``[B, D, T']`` (+ next caches).

        With ``cache`` this is the encoder half of ``cache_aware_stream_step``; the streaming
        post-processing (``valid_out_len``) is ``StreamingRNNT.stream_step``'s job. ``inject``
        (multitalker models) adds the speaker kernels to the input of their layers where NeMo's
        hooks do: before layer 0, and for a later layer ``i`` right after layer ``i - 1``. The
        ``layers.{i}`` tap is the layer's own output, before any kernel added for the next layer.
        """
        args = self.args
        taps: dict[str, mx.array] = {}
        x, lengths = self.pre_encode(mel.transpose(0, 2, 1), lengths)
        if record_taps:
            taps["pre_encode"] = x
        if cache is not None and drop_extra_pre_encoded > 0:
            x = x[:, drop_extra_pre_encoded:]
            lengths = np.maximum(lengths - drop_extra_pre_encoded, 0)
        time = x.shape[1]
        if cache is not None:
            cache_len = cache.channel.shape[2]
            max_len = time + cache_len
            padding_length = lengths + cache_len
            offset = cache_len - np.asarray(cache.channel_len, np.int64)
        else:
            cache_len, max_len, padding_length, offset = 0, time, lengths, None
        if args.xscaling:
            x = x * math.sqrt(args.d_model)
        pos_emb = self._pos_emb(time + cache_len, x.dtype)
        pad_mask, att_mask = attention_masks(args.att_context_style, att_context_size, padding_length, max_len, offset)
        pad_mask, att_mask = mx.array(pad_mask[:, cache_len:]), mx.array(att_mask[:, cache_len:])

        next_channel, next_time = [], []
        for index, layer in enumerate(self.layers):
            if inject is not None and index == 0:
                x = inject(0, x)
            channel_cache = time_cache = None
            if cache is not None:
                channel_cache = cache.channel[index]
                time_cache = cache.time[index].transpose(0, 2, 1)  # [B, D, K-1] -> [B, K-1, D]
            x, channel_cache, time_cache = layer(x, att_mask, pos_emb, pad_mask, channel_cache, time_cache)
            if cache is not None:
                next_channel.append(channel_cache)
                next_time.append(time_cache.transpose(0, 2, 1))
            if record_taps:
                taps[f"layers.{index}"] = x
            if inject is not None and index + 1 < len(self.layers):
                x = inject(index + 1, x)
        next_cache = None
        if cache is not None:
            # cache_last_channel_len grows by the chunk's frames (cache_keep_size) and saturates at C.
            next_cache = EncoderCache(channel=mx.stack(next_channel), time=mx.stack(next_time),
                                      channel_len=np.minimum(np.asarray(cache.channel_len, np.int64) + time,
                                                             cache_len))
        return EncoderOutput(encoded=x.transpose(0, 2, 1), lengths=np.asarray(lengths, np.int64),
                             cache=next_cache, taps=taps)


# ------------------------------------------------------------------------------------------------
# Multitalker speaker kernels: SpeakerKernelMixin (parts/mixins/multitalker_asr_mixins.py)
# ------------------------------------------------------------------------------------------------

def speaker_kernel(hidden: int, d_model: int) -> list:
    """``get_spk_kernel_class('ff')``: ``Sequential(Linear, ReLU, Dropout, Linear)``; a list keeps NeMo's
    indices (``.0`` and ``.3``) in the parameter names."""
    return [nn.Linear(hidden, d_model), nn.ReLU(), nn.Dropout(0.0), nn.Linear(d_model, hidden)]


def _apply_kernel(kernel: list, x: mx.array) -> mx.array:
    for module in kernel:
        x = module(x)
    return x


class SpeakerInjection:
    """The speaker-kernel hooks of one forward, with that forward's masks.

    NeMo's ``_get_spk_kernel_hook_pre_layer`` (layer 0) and ``_get_spk_kernel_hook_post_layer``
    (layer ``i`` > 0, hooked after layer ``i - 1``) both compute
    ``x = x + spk_kernel(x * spk_mask)`` and then ``x = x + bg_spk_kernel(x * bg_mask)`` (the
    background kernel sees the updated ``x``), each mask reconciled with ``x``'s frames by
    ``solve_length_mismatch``. Without target masks (``spk_targets`` None) the post-hook returns
    its input unchanged while the pre-hook uses all ones: that asymmetry is NeMo's and kept.
    """

    def __init__(self, model: StreamingRNNT, masks: SpeakerTargets | None):
        self.model = model
        self.masks = masks

    def __call__(self, layer_index: int, x: mx.array) -> mx.array:
        args = self.model.args.speaker_kernels
        if layer_index not in args.layers:
            return x
        target_set = self.masks is not None and self.masks.target is not None
        if layer_index > 0 and not target_set:
            return x
        batch, frames = x.shape[0], x.shape[1]
        target, background = reconciled_pair(self.masks, frames, batch)
        x = x + _apply_kernel(self.model.spk_kernels[layer_index], x * mx.array(target).astype(x.dtype)[:, :, None])
        if args.background:
            x = x + _apply_kernel(self.model.bg_spk_kernels[layer_index],
                                  x * mx.array(background).astype(x.dtype)[:, :, None])
        return x


# ------------------------------------------------------------------------------------------------
# Transducer: prediction network, joint, greedy decoding
# ------------------------------------------------------------------------------------------------

class LSTMLayer(nn.Module):
    """One ``torch.nn.LSTM`` layer with parakeet-mlx's names: ``Wx = weight_ih``, ``Wh = weight_hh``,
    ``bias = bias_ih + bias_hh``; gates in torch's order (input, forget, cell, output)."""

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.Wx = mx.zeros((4 * hidden, input_size))
        self.Wh = mx.zeros((4 * hidden, hidden))
        self.bias = mx.zeros((4 * hidden,))

    def __call__(self, x: mx.array, h: mx.array, c: mx.array) -> tuple[mx.array, mx.array]:
        gates = x @ self.Wx.T + h @ self.Wh.T + self.bias
        i, f, g, o = mx.split(gates, 4, axis=-1)
        c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
        h = mx.sigmoid(o) * mx.tanh(c)
        return h, c


class LSTMStack(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.lstm = [LSTMLayer(hidden, hidden) for _ in range(layers)]

    def __call__(self, x: mx.array, h: mx.array, c: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """``x [B, H]``, states ``[layers, B, H]`` -> (output, next h, next c)."""
        next_h, next_c = [], []
        for index, layer in enumerate(self.lstm):
            x, c_new = layer(x, h[index], c[index])
            next_h.append(x)
            next_c.append(c_new)
        return x, mx.stack(next_h), mx.stack(next_c)


class Prediction(nn.Module):
    def __init__(self, args: DecoderConfig):
        super().__init__()
        # blank_as_pad: the blank id is the embedding's padding row (index vocab_size).
        self.embed = nn.Embedding(args.vocab_size + 1, args.pred_hidden)
        self.dec_rnn = LSTMStack(args.pred_hidden, args.pred_rnn_layers)


class RNNTDecoder(nn.Module):
    """``RNNTDecoder.predict`` for one label per call."""

    def __init__(self, args: DecoderConfig):
        super().__init__()
        self.args = args
        self.prediction = Prediction(args)

    def __call__(self, label: int | None, h: mx.array, c: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """``label`` None is the start of sequence: NeMo feeds a zero vector (``predict(None)``)."""
        batch = h.shape[1]
        if label is None:
            x = mx.zeros((batch, self.args.pred_hidden), dtype=h.dtype)
        else:
            x = self.prediction.embed(mx.array([label] * batch))
        return self.prediction.dec_rnn(x, h, c)


class RNNTJoint(nn.Module):
    """``RNNTJoint.joint``: ``joint_net(enc(f) + pred(g))``, raw logits (the greedy argmax needs no softmax)."""

    def __init__(self, args: JointConfig):
        super().__init__()
        self.args = args
        self.enc = nn.Linear(args.encoder_hidden, args.joint_hidden)
        self.pred = nn.Linear(args.pred_hidden, args.joint_hidden)
        activation = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[args.activation]()
        output = nn.Linear(args.joint_hidden, args.output_size)
        # Sequential(activation, [Dropout], Linear): the output layer's index depends on the dropout.
        self.joint_net = [activation, nn.Dropout(0.0), output] if args.has_dropout else [activation, output]

    def __call__(self, f_projected: mx.array, g_projected: mx.array) -> mx.array:
        x = f_projected + g_projected
        for layer in self.joint_net:
            x = layer(x)
        return x


@dataclass
class GreedyState:
    """One utterance's decoding state: NeMo's partial ``Hypothesis`` (last label, LSTM state, labels)."""

    last_token: int | None  # None = start of sequence
    h: mx.array  # [layers, 1, H]
    c: mx.array
    tokens: list[int]


@dataclass
class GreedyResult:
    state: GreedyState
    emitted: list[int]
    decoder_outputs: list[mx.array]  # one [1, H] row per prediction-net call, in NeMo's call order
    joint_outputs: list[mx.array]  # one [1, V+1] row per joint call


def greedy_decode(decoder: RNNTDecoder, joint: RNNTJoint, encoded: mx.array, length: int, state: GreedyState,
                  *, blank_id: int, max_symbols: int, record: bool = False,
                  choose: Callable[[int], int] | None = None) -> GreedyResult:
    """``GreedyRNNTInfer._greedy_decode`` (parts/submodules/rnnt_greedy_decoding.py) for one utterance.

    NeMo calls the prediction net before every joint evaluation with the last emitted label and
    commits its new state only when a non-blank is emitted; at most ``max_symbols`` joint calls
    per frame. The prediction output depends only on (label, state), which change only on an
    emission, so it is computed once per emission and reused, and the joint is evaluated for all
    remaining frames at once; the recorded decoder/joint rows are still one per NeMo call.

    ``encoded`` is ``[D, T]`` for this utterance. ``choose`` (teacher forcing) maps the argmax of each
    joint call to the decision taken instead.
    """
    frames = encoded[:, :length].T  # [T, D]
    f_projected = joint.enc(frames) if length else None
    tokens = list(state.tokens)
    emitted: list[int] = []
    decoder_rows: list[mx.array] = []
    joint_rows: list[mx.array] = []
    last, h, c = state.last_token, state.h, state.c
    g, h_next, c_next = decoder(last, h, c)
    g_projected = joint.pred(g)
    frame, symbols = 0, 0
    logits = labels = None
    logits_from = -1
    while frame < length:
        if symbols >= max_symbols:
            frame, symbols = frame + 1, 0
            continue
        if logits is None or logits_from < 0:
            logits = joint(f_projected[frame:], g_projected)  # [T - frame, V+1]
            labels = np.array(mx.argmax(logits.astype(mx.float32)[:, :blank_id + 1], axis=-1))
            logits_from = frame
        row = frame - logits_from
        label = int(labels[row]) if choose is None else choose(int(labels[row]))
        if record:
            decoder_rows.append(g)
            joint_rows.append(logits[row:row + 1])
        if label == blank_id:
            frame, symbols = frame + 1, 0
            continue
        tokens.append(label)
        emitted.append(label)
        last, h, c = label, h_next, c_next
        g, h_next, c_next = decoder(last, h, c)
        g_projected = joint.pred(g)
        logits_from = -1
        symbols += 1
    return GreedyResult(GreedyState(last, h, c, tokens), emitted, decoder_rows, joint_rows)


# ------------------------------------------------------------------------------------------------
# Hybrid RNNT-CTC: the auxiliary CTC head, ConvASRDecoder (modules/conv_asr.py)
# ------------------------------------------------------------------------------------------------

class ConvASRDecoder(nn.Module):
    """``ConvASRDecoder``: ``decoder_layers = Sequential(Conv1d(feat_in, num_classes + 1, kernel_size=1))``
    on the encoder output, then ``log_softmax`` over the classes (the blank last). The kernel-1 conv is a
    matmul on ``[B, T, D]``; the log-softmax is taken in float32, as NeMo computes it."""

    def __init__(self, args: CtcConfig):
        super().__init__()
        self.decoder_layers = [PointwiseConv1d(args.feat_in, args.output_size, use_bias=True)]

    def __call__(self, encoded: mx.array) -> mx.array:
        """``encoded [B, D, T]`` -> log-probabilities ``[B, T, V+1]`` (float32)."""
        logits = self.decoder_layers[0](encoded.transpose(0, 2, 1)).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Prompt-conditioned models (Nemotron-3.5): PromptStreamingMixin (parts/mixins/mixins.py)
# ------------------------------------------------------------------------------------------------

def prompt_kernel(args: PromptConfig) -> list:
    """``PromptStreamingMixin.initialize_prompt_feature``: ``Sequential(Linear(D + P, 2D), ReLU, Linear(2D, D))``;
    a list keeps NeMo's indices (``prompt_kernel.0`` and ``.2``) in the parameter names."""
    return [nn.Linear(args.hidden + args.num_prompts, 2 * args.hidden), nn.ReLU(),
            nn.Linear(2 * args.hidden, args.hidden)]


def apply_prompt_kernel(kernel: list, encoded: mx.array, index: int, num_prompts: int) -> mx.array:
    """NeMo's ``_apply_prompt_to_encoded``: the one-hot column ``index`` (of ``num_prompts``) appended to every
    frame of ``encoded [B, D, T]``, through ``kernel``, back to ``[B, D, T]`` in ``encoded``'s dtype (the
    one-hot is built in it and the result cast back, as NeMo's ``.to(out_dtype)``)."""
    if not 0 <= index < num_prompts:
        raise ValueError(f"prompt index {index} is outside the model's {num_prompts} prompts")
    x = encoded.transpose(0, 2, 1)  # [B, T, D]
    batch, frames, _ = x.shape
    one_hot = mx.broadcast_to((mx.arange(num_prompts) == index).astype(x.dtype), (batch, frames, num_prompts))
    x = _apply_kernel(kernel, mx.concatenate([x, one_hot], axis=-1))
    return x.astype(encoded.dtype).transpose(0, 2, 1)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

@dataclass
class StreamStepOutput:
    encoded: mx.array  # [B, D, T_valid]
    lengths: np.ndarray  # [B]
    cache: EncoderCache
    taps: dict[str, mx.array]


class StreamingRNNT(nn.Module):
    """Encoder + RNNT decoder + joint, with NeMo's parameter tree (``encoder.``, ``decoder.``, ``joint.``,
    ``ctc_decoder.`` for a hybrid RNNT-CTC model, ``prompt_kernel.`` for a prompt-conditioned one)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.encoder = ConformerEncoder(args.encoder)
        self.decoder = RNNTDecoder(args.decoder)
        self.joint = RNNTJoint(args.joint)
        if args.ctc is not None:
            self.ctc_decoder = ConvASRDecoder(args.ctc)
        if args.prompt is not None:
            self.prompt_kernel = prompt_kernel(args.prompt)
        speakers = args.speaker_kernels
        if speakers is not None:
            # NeMo's ModuleDicts keyed by layer index: lists with placeholders keep those indices.
            def kernels() -> list:
                return [speaker_kernel(speakers.hidden, speakers.d_model) if i in speakers.layers else nn.Identity()
                        for i in range(max(speakers.layers) + 1)]

            self.spk_kernels = kernels()
            if speakers.background:
                self.bg_spk_kernels = kernels()

    def speaker_injection(self, masks: SpeakerTargets | None) -> SpeakerInjection | None:
        """The hooks for one forward; ``None`` for single-speaker models."""
        return None if self.args.speaker_kernels is None else SpeakerInjection(self, masks)

    def stream_step(self, mel: mx.array, lengths: np.ndarray, cache: EncoderCache, *,
                    att_context_size: tuple[int, int], valid_out_len: int, keep_all_outputs: bool,
                    drop_extra_pre_encoded: int, record_taps: bool = False,
                    speaker_masks: SpeakerTargets | None = None) -> StreamStepOutput:
        """``CacheAwareStreamingMixin.cache_aware_stream_step`` (parts/mixins/streaming.py).

        The encoder forward with caches, then ``streaming_post_process``: unless ``keep_all_outputs``
        (or for the "regular" style), keep the first ``valid_out_len`` frames.
        """
        out = self.encoder(mel, lengths, att_context_size, cache=cache,
                           drop_extra_pre_encoded=drop_extra_pre_encoded, record_taps=record_taps,
                           inject=self.speaker_injection(speaker_masks))
        encoded, out_lengths = out.encoded, out.lengths
        if valid_out_len > 0 and (not keep_all_outputs or self.args.encoder.att_context_style == "regular"):
            encoded = encoded[:, :, :valid_out_len]
            out_lengths = np.minimum(out_lengths, valid_out_len)
        return StreamStepOutput(encoded=encoded, lengths=out_lengths, cache=out.cache, taps=out.taps)

    def apply_prompt(self, encoded: mx.array, index: int | None) -> mx.array:
        """``_apply_prompt_to_encoded`` (PromptStreamingMixin) on the encoder output ``[B, D, T]``, what the
        decoder, joint and CTC head then read. ``index`` None (no ``set_inference_prompt``): the encoder
        output unchanged, as NeMo bypasses it."""
        if index is None:
            return encoded
        if self.args.prompt is None:
            raise Unsupported("this model has no prompt kernel (model_defaults.initialize_prompt_feature)")
        return apply_prompt_kernel(self.prompt_kernel, encoded, index, self.args.prompt.num_prompts)

    def ctc_log_probs(self, encoded: mx.array) -> mx.array:
        """A hybrid model's CTC head on ``encoded [B, D, T]``: log-probabilities ``[B, T, V+1]``."""
        if self.args.ctc is None:
            raise Unsupported("this model has no CTC head (no aux_ctc in its config)")
        return self.ctc_decoder(encoded)

    def initial_greedy_state(self, dtype: mx.Dtype) -> GreedyState:
        shape = (self.args.decoder.pred_rnn_layers, 1, self.args.decoder.pred_hidden)
        return GreedyState(None, mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype), [])

    def decode(self, encoded: mx.array, length: int, state: GreedyState, *, record: bool = False,
               choose: Callable[[int], int] | None = None) -> GreedyResult:
        if self.args.tdt_durations:
            raise Unsupported("TDT decoding is not implemented in the MLX runtime (RNNT only)")
        return greedy_decode(self.decoder, self.joint, encoded, length, state, blank_id=self.args.blank_id,
                             max_symbols=self.args.max_symbols, record=record, choose=choose)

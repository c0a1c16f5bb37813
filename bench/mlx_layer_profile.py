"""Where an MLX conformer layer spends a streaming step: feed-forward, attention, convolution, depthwise.

    python bench/mlx_layer_profile.py                    # full-size dimensions (d_model 1024), [70,13] chunk
    python bench/mlx_layer_profile.py --d-model 64       # the tiny fixtures' width

Builds one ``streaming_parity.backends.mlx.model.ConformerLayer`` with random weights at the given width, feeds it
one streaming chunk (``--frames`` new frames against a ``--cache`` frame channel cache and the
8-frame conv cache) and times the whole layer and each part, warm, median of ``--repeat`` runs.
It answers whether MLX's CPU depthwise convolution (much slower than torch's in isolation) matters
at the real model's size. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--frames", type=int, default=14, help="new frames per chunk ([70,13]: 14)")
    parser.add_argument("--cache", type=int, default=70, help="channel-cache frames (left context)")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)

    from streaming_parity.backends.mlx.blas import status, use_optimized_blas

    use_optimized_blas()  # before mlx.core
    import mlx.core as mx

    from streaming_parity.backends.mlx.model import ConformerLayer, relative_positions
    from streaming_parity.core.nemo_config import EncoderConfig

    encoder = EncoderConfig(feat_in=128, n_layers=1, d_model=args.d_model, n_heads=args.heads, conv_kernel_size=9,
                            conv_norm_type="layer_norm", conv_context_size="causal", att_context_size=((70, 13),),
                            att_context_style="chunked_limited", causal_downsampling=True,
                            subsampling="dw_striding", subsampling_factor=8)
    layer = ConformerLayer(encoder)
    mx.eval(layer.parameters())
    frames, cache, width = args.frames, args.cache, args.d_model
    x = mx.random.normal((1, frames, width))
    positions = relative_positions(frames + cache, width)
    attention_mask = mx.zeros((1, frames, frames + cache), dtype=mx.bool_)
    pad_mask = mx.zeros((1, frames), dtype=mx.bool_)
    channel_cache = mx.random.normal((1, cache, width))
    time_cache = mx.random.normal((1, 8, width))

    def timed(function) -> float:
        for _ in range(3):
            mx.eval(function())
        samples = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            mx.eval(function())
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1e3

    parts = {
        "whole layer": lambda: layer(x, attention_mask, positions, pad_mask, channel_cache, time_cache)[0],
        "feed-forward (one of two)": lambda: layer.feed_forward1(layer.norm_feed_forward1(x)),
        "self-attention": lambda: layer.self_attn(layer.norm_self_att(x), attention_mask, positions, channel_cache)[0],
        "convolution module": lambda: layer.conv(layer.norm_conv(x), pad_mask, time_cache)[0],
        "depthwise convolution": lambda: layer.conv.depthwise_conv(x, time_cache)[0],
    }
    figures = {name: timed(function) for name, function in parts.items()}
    whole = figures["whole layer"]
    print(f"MLX {mx.default_device()}, BLAS: {status().reason}; d_model {width}, chunk {frames} + cache {cache}")
    for name, value in figures.items():
        print(f"  {name:28s} {value:8.3f} ms  {100 * value / whole:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tap names: the tensors every backend returns by name after each step, and their kinds.

Tap names shared by all backends (all float32 numpy arrays, batch first):

- ``mel``            front-end output ``[B, n_mels, T]`` (``Backend.features``)
- ``pre_encode``     subsampling output before ``drop_extra_pre_encoded`` ``[B, T_sub, D]``
- ``layers.{i}``     output of conformer layer ``i`` ``[B, T, D]`` (all frames of the chunk)
                     (the layer's own output: a multitalker speaker kernel feeding layer
                     ``i + 1`` is added after it and shows in ``layers.{i+1}``)
- ``encoder``        final encoder output after streaming post-processing ``[B, D, T_valid]``
- ``prompt``         prompt-conditioned models only: the encoder output after ``prompt_kernel`` fused the
                     stream's locale into it, what the decoder and joint read ``[B, D, T_valid]``
- ``decoder``        prediction-net output of every decoder call in the step, in call order ``[N, H]``
- ``joint``          joint logits (before log-softmax) of every joint call, in call order ``[N, V+1]``
- ``ctc``            hybrid RNNT-CTC models only: the CTC head's log-probabilities (NeMo's
                     ``ConvASRDecoder`` applies log_softmax) over the step's valid encoder frames
                     ``[B, T_valid, V+1]``, the blank last

The caches are compared like taps after every step, under their own names (``CACHE_TAPS``). A backend
declares the tap kinds it returns in its ``Capabilities`` (``streaming_parity.interface.backend``).
"""

from __future__ import annotations

TAP_MEL = "mel"
TAP_PRE_ENCODE = "pre_encode"
TAP_ENCODER = "encoder"
TAP_DECODER = "decoder"
TAP_JOINT = "joint"
TAP_CTC = "ctc"
TAP_PROMPT = "prompt"
TAP_LAYERS = "layers"  # the tap kind of every ``layers.{i}`` tap
TENSOR_TAP_KINDS = (TAP_MEL, TAP_PRE_ENCODE, TAP_LAYERS, TAP_ENCODER, TAP_PROMPT, TAP_DECODER, TAP_JOINT, TAP_CTC)
# The caches, compared like taps after every step under these names (``StreamingState.caches``).
CACHE_TAPS = ("cache_last_channel", "cache_last_time", "cache_last_channel_len")


def layer_tap(index: int) -> str:
    return f"layers.{index}"


def tap_kind(tap: str) -> str:
    """``layers.3`` -> ``layers``; every other tap is its own kind."""
    return tap.split(".", 1)[0]

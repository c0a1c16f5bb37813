"""Reading NeMo model configs: the one place that knows their keys and NeMo's defaults.

A config comes from a ``.nemo``'s ``model_config.yaml`` or an MLX artifact's ``config.json`` (the
same format). Everything above this module reads typed values from here instead of indexing the
raw mapping, so a default NeMo applies (``conv_kernel_size`` 31, ``subsampling_factor`` 4, ...) is
written once.
"""

from __future__ import annotations

from typing import Any


def speaker_kernel_info(config: dict[str, Any]) -> dict[str, Any]:
    """``SpeakerKernelMixin._init_speaker_kernel_config``: kernels exist when ``spk_kernel_type`` is set;
    ``spk_kernel_layers`` defaults to [0] and ``add_bg_spk_kernel`` to true."""
    if config.get("spk_kernel_type") is None:
        return {}
    layers = tuple(int(i) for i in (config.get("spk_kernel_layers") or [0]))
    num_layers = int(config["encoder"]["n_layers"])
    if any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"spk_kernel_layers {list(layers)} outside the encoder's {num_layers} layers")
    return {"speaker_kernel_layers": layers,
            "background_speaker_kernel": bool(config.get("add_bg_spk_kernel", True))}

"""How an int8 candidate's weights were quantized (``Int8Quantization``), read from its files by its backend
(``Backend.int8_quantization``), so that a failure can be explained by the CPU's int8 kernel path
(``streaming_parity.judge.int8``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.system.cpu import Int8KernelPath


@dataclass(frozen=True)
class Int8Quantization:
    """How an int8 candidate's weights were quantized, read from its files (``Backend.int8_quantization``).

    Dynamic int8 (``onnxruntime.quantization.quantize_dynamic``) quantizes activations to u8 at run time;
    ``weight_type`` is the weights' type (``QInt8``: s8, ``QUInt8``: u8) and ``weight_bits`` their range
    (7 with ``reduce_range``). u8 x s8 products at full range can overflow an int16 pair sum, which MLAS
    saturates on x86 CPUs without VNNI (``streaming_parity.core.system.cpu``): ``saturation_prone``.
    """

    weight_type: str  # "QInt8" or "QUInt8"
    activation_type: str = "QUInt8"
    weight_bits: int = 8
    per_channel: bool = False
    read_from: str = ""  # "export" (the export's record) or the graph file the weights were read from
    widest_weight: int | None = None  # the largest |stored integer weight| found, when read from the weights

    @property
    def saturation_prone(self) -> bool:
        """u8 activations x s8 weights at full range: 2 x 255 x 128 > 32,767."""
        return self.activation_type == "QUInt8" and self.weight_type == "QInt8" and self.weight_bits >= 8

    def saturates_on(self, path: Int8KernelPath) -> bool:
        return self.saturation_prone and path.saturates_u8s8

    def describe(self) -> str:
        weights = {"QInt8": "s8", "QUInt8": "u8"}.get(self.weight_type, self.weight_type)
        text = (f"{self.weight_type} weights ({weights}, {self.weight_bits}-bit"
                f"{', per channel' if self.per_channel else ''}) x u8 activations")
        if self.saturation_prone:
            text += ": saturates on x86 CPUs without VNNI"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"weight_type": self.weight_type, "activation_type": self.activation_type,
                "weight_bits": self.weight_bits, "per_channel": self.per_channel, "read_from": self.read_from,
                "widest_weight": self.widest_weight, "saturation_prone": self.saturation_prone}

    def same_scheme(self, other: Int8Quantization) -> bool:
        """The same arithmetic (where the description was read from aside)."""
        return (self.weight_type, self.activation_type, self.weight_bits, self.per_channel) == (
            other.weight_type, other.activation_type, other.weight_bits, other.per_channel)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], read_from: str) -> Int8Quantization:
        """A recorded scheme (``export.json``, graph metadata); an unknown type or width is refused."""
        weight_type = data.get("weight_type")
        if weight_type not in ("QInt8", "QUInt8"):
            raise InvalidInput(f"{read_from}: int8 weight_type {weight_type!r} is neither QInt8 nor QUInt8")
        bits = data.get("weight_bits")
        if bits not in (7, 8):
            raise InvalidInput(f"{read_from}: int8 weight_bits {bits!r} is neither 7 nor 8")
        activation = data.get("activation_type", "QUInt8")
        if activation != "QUInt8":
            raise InvalidInput(f"{read_from}: int8 activation_type {activation!r}: dynamic quantization runs u8")
        return cls(weight_type=weight_type, activation_type=activation, weight_bits=int(bits),
                   per_channel=bool(data.get("per_channel", False)), read_from=read_from)

"""What an int8 ONNX graph's quantization is, read from the graph itself, and the scheme exports use.

``onnxruntime.quantization.quantize_dynamic`` always quantizes activations to u8 at run time
(``DynamicQuantizeLinear``); the weights' type and range are the export's choice, stored as
initializers that feed ``MatMulInteger``, ``DynamicQuantizeMatMul`` or ``DynamicQuantizeLSTM``. Reading
them back tells any int8 file's kind, ours of any version or a peer's, without trusting its metadata:

- s8 weights at full range (stored values up to 127 in magnitude) with u8 activations are the saturating kind:
  on x86 CPUs without VNNI MLAS sums pairs of u8 x s8 products into int16 with saturation
  (``streaming_parity.core.system.cpu``);
- s8 weights within 7 bits (``reduce_range``) cannot reach int16's limit (2 x 255 x 64 = 32,640);
- u8 weights run MLAS's U8U8 kernels, exact on every CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from streaming_parity.interface.quantization import Int8Quantization


@dataclass(frozen=True)
class QuantScheme:
    """The ``quantize_dynamic`` choices that decide an int8 graph's arithmetic."""

    weight_type: str  # "QInt8" or "QUInt8"
    per_channel: bool = False
    reduce_range: bool = False

    @property
    def label(self) -> str:
        return self.weight_type + "".join(f" {flag}" for flag, on in (("per_channel", self.per_channel),
                                                                       ("reduce_range", self.reduce_range)) if on)

    def options(self) -> dict:
        """``quantize_dynamic`` keyword arguments."""
        from onnxruntime.quantization import QuantType

        return {"weight_type": getattr(QuantType, self.weight_type), "per_channel": self.per_channel,
                "reduce_range": self.reduce_range}

    def recorded(self) -> Int8Quantization:
        """What ``export.json`` and the graphs' metadata record for this scheme."""
        return Int8Quantization(weight_type=self.weight_type, activation_type="QUInt8",
                                weight_bits=7 if self.reduce_range else 8, per_channel=self.per_channel,
                                read_from="export")


# The scheme of this project's int8 exports, chosen from bench/int8_quantization.py's measurements
# (docs/int8.md): every op it quantizes is exact on every CPU ONNX Runtime runs on.
EXPORT_SCHEME = QuantScheme("QInt8", reduce_range=True)


# op type -> the input positions that hold quantized weights
_WEIGHT_INPUTS = {"MatMulInteger": (1,), "DynamicQuantizeMatMul": (1,), "DynamicQuantizeLSTM": (1, 2),
                  "ConvInteger": (1,)}
# op type -> the input position of the weights' zero point
_ZERO_POINT_INPUT = {"MatMulInteger": 3, "DynamicQuantizeMatMul": 3, "ConvInteger": 3}
_LSTM_ZERO_POINTS = {1: 10, 2: 12}  # DynamicQuantizeLSTM: W_zero_point, R_zero_point
_TYPES = {TensorProto.INT8: "QInt8", TensorProto.UINT8: "QUInt8"}


def read_quantization(paths: Iterable[str | Path]) -> Int8Quantization | None:
    """The quantization of the int8 graphs at ``paths`` (weights read, not metadata); None when no graph
    holds quantized weights. Graphs that disagree (one u8, one s8) are described by the riskier one."""
    found: list[Int8Quantization] = []
    for path in paths:
        scheme = _graph_quantization(Path(path))
        if scheme is not None:
            found.append(scheme)
    if not found:
        return None
    # The saturating kind wins: it is what can make the verdict depend on the CPU.
    return max(found, key=lambda s: (s.saturation_prone, s.weight_type == "QInt8", s.weight_bits))


def _graph_quantization(path: Path) -> Int8Quantization | None:
    """The weights' integer type and width, from the raw integers the kernels multiply: MLAS multiplies the
    stored values as they are and corrects for the zero point afterwards (column sums), so whether a pair
    of u8 x s8 products can pass int16 depends on the largest stored |s8 weight|, not on the zero point."""
    model = onnx.load(str(path), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    widest: dict[str, int] = {}  # weight type -> the largest |stored value|
    per_channel = False
    for node in model.graph.node:
        for position in _WEIGHT_INPUTS.get(node.op_type, ()):
            if position >= len(node.input) or node.input[position] not in initializers:
                continue
            tensor = initializers[node.input[position]]
            if tensor.data_type not in _TYPES:
                continue
            values = numpy_helper.to_array(tensor).astype(np.int32)
            kind = _TYPES[tensor.data_type]
            widest[kind] = max(widest.get(kind, 0), int(np.abs(values).max()) if values.size else 0)
            zero_index = (_LSTM_ZERO_POINTS.get(position) if node.op_type == "DynamicQuantizeLSTM"
                          else _ZERO_POINT_INPUT.get(node.op_type))
            if zero_index is not None and zero_index < len(node.input) and node.input[zero_index] in initializers:
                per_channel |= int(np.prod(initializers[node.input[zero_index]].dims)) > 1
    if not widest:
        return None
    # s8 weights decide saturation wherever there are any (the riskier kind); 7-bit s8 stays within +-64,
    # 7-bit u8 within 0..127 (reduce_range).
    weight_type = "QInt8" if "QInt8" in widest else "QUInt8"
    limit = 64 if weight_type == "QInt8" else 127
    return Int8Quantization(weight_type=weight_type, activation_type="QUInt8",
                            weight_bits=7 if widest[weight_type] <= limit else 8, per_channel=per_channel,
                            read_from=path.name, widest_weight=widest[weight_type])

"""Why an int8 candidate exceeded its table: the export's quantization against the CPU's int8 kernel path.

The int8 tables (``[int8."nemo~onnx".*]`` in tolerances.toml) hold for an export whose integer
arithmetic is exact on every CPU. A QInt8 export at full range is not: on x86 CPUs without VNNI,
ONNX Runtime sums pairs of u8 x s8 products into int16 with saturation, and the same file measures
an order of magnitude worse there than on a VNNI machine. A failing int8 comparison therefore names
which of the two it met, so that nobody loosens a table for what is a property of the file and the CPU.
"""

from __future__ import annotations

from streaming_parity.core.system.cpu import Int8KernelPath
from streaming_parity.interface.quantization import Int8Quantization
from streaming_parity.judge.compare import PairComparison

INT8 = "int8"


def explain_int8_excess(comparison: PairComparison, scheme: Int8Quantization | None,
                        path: Int8KernelPath) -> str | None:
    """A cause for an int8 comparison with a tap beyond its table (None when every tap is within it, the
    comparison is not int8, or nothing is known of the candidate's quantization): whether its weights are the
    saturating kind, and whether this CPU saturates."""
    if comparison.dtype != INT8 or scheme is None or all(tap.passed for tap in comparison.taps):
        return None  # a flipped label alone is no excess: int8 transcripts are reported as an agreement rate
    where = f"{scheme.describe()} (read from {scheme.read_from})" if scheme.read_from else scheme.describe()
    if scheme.saturates_on(path):
        return (f"int8 saturation: the candidate's {where}; this CPU's int8 kernel path is {path.name}, without "
                "VNNI, where ONNX Runtime sums pairs of u8 x s8 products into int16 with saturation (vpmaddubsw). "
                "The same file measures within its table on a VNNI CPU; quantize with reduce_range (7-bit s8 "
                "weights, as parity export-onnx does) for a verdict that holds on every CPU")
    if scheme.saturation_prone:
        return (f"not int8 saturation: the candidate's {where}, but this CPU's int8 kernel path ({path.name}) "
                "accumulates u8 x s8 in 32 bits, so the excess is the quantization itself or the conversion")
    return (f"not int8 saturation: the candidate's {where} is exact on every int8 kernel path (this CPU: "
            f"{path.name}), so the excess is the quantization itself or the conversion")

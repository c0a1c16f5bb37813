"""The int8 kernel path read from CPU flags, the quantization read from an int8 graph's weights, and the
cause named when an int8 candidate exceeds its table. No NeMo: synthetic graphs and comparisons."""

from __future__ import annotations

import numpy as np
import pytest
from builders import pair_comparison, tap_result

from streaming_parity.core.errors import InvalidInput
from streaming_parity.core.system.cpu import KNOWN_PATHS, int8_kernel_path, kernel_path_from_flags
from streaming_parity.interface.quantization import Int8Quantization
from streaming_parity.judge.compare import PairComparison
from streaming_parity.judge.int8 import explain_int8_excess

# -- the kernel path MLAS's dispatch takes --------------------------------------------------------------

AVX2_ONLY = "fpu sse4_1 sse4_2 avx f16c fma avx2"  # the AMD EPYC of the report: no AVX-512, no VNNI


@pytest.mark.parametrize(("machine", "flags", "expected", "saturates"), [
    ("x86_64", AVX2_ONLY, "avx2", True),
    ("x86_64", AVX2_ONLY + " avx_vnni", "avx-vnni", False),
    ("x86_64", AVX2_ONLY + " avx512f avx512bw avx512dq avx512vl", "avx512-core", True),
    # MLAS puts AVX512 core over AVX-VNNI: without AVX512-VNNI such a CPU saturates again.
    ("x86_64", AVX2_ONLY + " avx_vnni avx512f avx512bw avx512dq avx512vl", "avx512-core", True),
    ("x86_64", AVX2_ONLY + " avx512f avx512bw avx512dq avx512vl avx512_vnni", "avx512-vnni", False),
    ("x86_64", AVX2_ONLY + " avx512bw avx512dq avx512vl avx512_vnni amx_tile amx_int8", "amx", False),
    ("x86_64", AVX2_ONLY + " avx512bw avx512dq avx512_vnni", "avx2", True),  # no avx512vl: not AVX512 core
    ("x86_64", "fpu sse4_1 sse4_2 avx", "x86", False),
    ("AMD64", "AVX2", "avx2", True),  # Windows' machine name, upper-case flags
    ("aarch64", "fp asimd asimddp", "arm64-dotprod", False),
    ("arm64", "", "arm64", False),
    ("riscv64", "", "unknown", False),
])
def test_kernel_path_follows_mlas_dispatch(machine, flags, expected, saturates):
    path = kernel_path_from_flags(machine, flags.split())
    assert (path.name, path.saturates_u8s8) == (expected, saturates)
    assert path.to_dict()["saturates_u8s8"] is saturates and path.name in KNOWN_PATHS
    assert path.name in path.describe()


def test_this_machine_has_a_known_path():
    path = int8_kernel_path()
    assert path.name in KNOWN_PATHS
    assert int8_kernel_path() is path  # read once per process


# -- the quantization of a graph, read from its weights ---------------------------------------------------

def _graph(tmp_path, rows: int = 16, inner: int = 64, cols: int = 48, hidden: int = 8):
    """A MatMul and an LSTM with float32 weights, as the export's graphs hold them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weight = rng.standard_normal((inner, cols)).astype(np.float32)
    w = rng.standard_normal((1, 4 * hidden, cols)).astype(np.float32)
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "weight"], ["y"]),
             helper.make_node("Unsqueeze", ["y", "axis"], ["y3"]),
             helper.make_node("LSTM", ["y3", "w", "r"], ["out"], hidden_size=hidden)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(w, "w"), numpy_helper.from_array(r, "r"),
         numpy_helper.from_array(np.array([1], np.int64), "axis")])
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(("weight_type", "per_channel", "reduce_range", "expected"), [
    ("QInt8", False, False, ("QInt8", 8, True)),
    ("QInt8", False, True, ("QInt8", 7, False)),
    ("QInt8", True, True, ("QInt8", 7, False)),
    # ONNX Runtime's LSTM quantizer writes s8 weights whatever weight_type says: u8 MatMul weights beside a
    # full-range s8 LSTM are still the saturating kind.
    ("QUInt8", False, False, ("QInt8", 8, True)),
])
def test_quantization_is_read_from_the_weights(tmp_path, weight_type, per_channel, reduce_range, expected):
    from onnxruntime.quantization import quantize_dynamic

    from streaming_parity.backends.onnx.quantization import QuantScheme, read_quantization

    scheme = QuantScheme(weight_type, per_channel=per_channel, reduce_range=reduce_range)
    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(str(_graph(tmp_path)), str(quantized), op_types_to_quantize=["MatMul", "LSTM"],
                     **scheme.options())
    found = read_quantization([quantized])
    assert (found.weight_type, found.weight_bits, found.saturation_prone) == expected, found
    assert found.read_from == quantized.name and found.widest_weight is not None
    assert found.per_channel is per_channel


def test_u8_weights_alone_are_not_saturation_prone(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    from streaming_parity.backends.onnx.quantization import QuantScheme, read_quantization

    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(str(_graph(tmp_path)), str(quantized), op_types_to_quantize=["MatMul"],
                     **QuantScheme("QUInt8").options())
    found = read_quantization([quantized])
    assert (found.weight_type, found.weight_bits, found.saturation_prone, found.per_channel) == ("QUInt8", 8, False,
                                                                                               False)


def test_a_graph_without_quantized_weights_reads_as_none(tmp_path):
    from streaming_parity.backends.onnx.quantization import read_quantization

    assert read_quantization([_graph(tmp_path)]) is None


def test_the_export_scheme_is_exact_on_every_path():
    from streaming_parity.backends.onnx.quantization import EXPORT_SCHEME

    recorded = EXPORT_SCHEME.recorded()
    for flags in (AVX2_ONLY, AVX2_ONLY + " avx512bw avx512dq avx512vl"):
        assert not recorded.saturates_on(kernel_path_from_flags("x86_64", flags.split()))
    assert Int8Quantization.from_dict(recorded.to_dict(), "export.json").same_scheme(recorded)


@pytest.mark.parametrize("record", [{"weight_type": "QInt4", "weight_bits": 8}, {"weight_type": "QInt8", "weight_bits": 6},
                                    {"weight_type": "QInt8", "weight_bits": 8, "activation_type": "QInt8"}])
def test_a_recorded_scheme_is_checked(record):
    with pytest.raises(InvalidInput, match="export.json: int8"):
        Int8Quantization.from_dict(record, "export.json")


# -- the named cause ------------------------------------------------------------------------------------

def _int8_comparison(dtype: str = "int8", passed: bool = False) -> PairComparison:
    """nemo~onnx at ``dtype`` whose encoder is over its rel_l2 limit unless ``passed``."""
    encoder = tap_result("encoder", metrics={"rel_l2": 0.17}, limits={"rel_l2": 0.025},
                         violations=[] if passed else ["rel_l2 0.17 > 0.025"])
    return pair_comparison([encoder], [1], [1], pair="nemo~onnx", dtype=dtype, utterance="utt01", order=["encoder"])


FULL_RANGE = Int8Quantization("QInt8", weight_bits=8, read_from="encoder-70_13.int8.onnx")
SEVEN_BIT = Int8Quantization("QInt8", weight_bits=7, read_from="export")
U8 = Int8Quantization("QUInt8", weight_bits=8, read_from="export")
AVX2 = kernel_path_from_flags("x86_64", AVX2_ONLY.split())
VNNI = kernel_path_from_flags("x86_64", (AVX2_ONLY + " avx512bw avx512dq avx512vl avx512_vnni").split())


def test_saturation_is_named_where_the_cpu_saturates():
    cause = explain_int8_excess(_int8_comparison(), FULL_RANGE, AVX2)
    assert cause.startswith("int8 saturation:") and "avx2" in cause and "vpmaddubsw" in cause
    assert "encoder-70_13.int8.onnx" in cause


def test_saturation_is_ruled_out_where_it_cannot_happen():
    on_vnni = explain_int8_excess(_int8_comparison(), FULL_RANGE, VNNI)
    assert on_vnni.startswith("not int8 saturation:") and "avx512-vnni" in on_vnni
    for scheme in (SEVEN_BIT, U8):
        assert explain_int8_excess(_int8_comparison(), scheme, AVX2).startswith("not int8 saturation:")


def test_no_cause_without_a_failing_int8_comparison():
    assert explain_int8_excess(_int8_comparison(passed=True), FULL_RANGE, AVX2) is None
    assert explain_int8_excess(_int8_comparison(dtype="float32"), FULL_RANGE, AVX2) is None
    assert explain_int8_excess(_int8_comparison(), None, AVX2) is None

"""ONNX Runtime sessions over described graphs (``described.GraphFile``): this project's and other exporters'.

- ``Graph``: one session, its inputs checked against the interface the description names (``layout.INTERFACES``, or
  the one a foreign reader built from the graph's own names).
- ``SplitDecoderJoint``: sherpa-onnx's ``decoder.onnx`` + ``joiner.onnx`` run as one ``decoder_joint``.
- ``session_options``: the thread settings every session of a backend shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streaming_parity.backends.onnx.described import DescribedExport, GraphFile
from streaming_parity.backends.onnx.layout import (
    DECODER_JOINT_OUTPUTS,
    ForeignArtifactError,
    GraphInterface,
    GraphInterfaceError,
)
from streaming_parity.interface.taps import TAP_DECODER

PROVIDERS = ["CPUExecutionProvider"]


def session_options(threads: int | None):
    """ONNX Runtime's options: quiet, and ``threads`` intra-op threads (else the harness's request, else ONNX
    Runtime's default)."""
    import onnxruntime as ort

    from streaming_parity.core.system.threads import requested_threads

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = threads or requested_threads()  # ONNX Runtime ignores OMP_NUM_THREADS
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


class Graph:
    """One ONNX Runtime session with its interface checks.

    ``role`` is ``"encoder"``, ``"decoder_joint"``, ``"ctc"`` or ``"prompt"``; the names it must have come from
    ``interface``. ``taps``: the described taps the session has as outputs.
    """

    def __init__(self, file: GraphFile, role: str, interface: GraphInterface, options):
        import onnxruntime as ort

        self.path = file.path
        self.interface = interface
        inputs = getattr(interface, f"{role}_inputs")
        outputs = getattr(interface, f"{role}_outputs")
        self.session = ort.InferenceSession(str(file.loads), options, providers=PROVIDERS)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing_in = [name for name in inputs if name not in self.inputs]
        missing_out = [name for name in outputs if name not in self.output_names]
        if missing_in or missing_out:
            raise GraphInterfaceError(
                f"{self.path.name}: graph lacks expected inputs {missing_in} / outputs {missing_out}; "
                f"it has inputs {list(self.inputs)} and outputs {self.output_names}")
        self.taps = [name for name in file.taps if name in self.output_names]

    def declared_shape(self, name: str) -> list[Any]:
        return list(self.inputs[name].shape)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def check_declared(graph: Graph | SplitDecoderJoint, name: str, expected: Sequence[Any]) -> None:
    """The graph's declared input shape must agree with the description on every static axis."""
    declared = graph.declared_shape(name)
    agree = len(declared) == len(expected) and all(
        not isinstance(d, int) or not isinstance(e, int) or d == e for d, e in zip(declared, expected))
    if not agree:
        raise GraphInterfaceError(f"{graph.path.name}: input {name} is declared {declared}, "
                                  f"but the metadata says {list(expected)}")


@dataclass
class _Arg:
    name: str
    type: str
    shape: list[Any]


class SplitDecoderJoint:
    """sherpa-onnx's ``decoder.onnx`` + ``joiner.onnx``, presented as one ``decoder_joint`` under NeMo's
    names: one call runs the prediction net on the target, then the joint on (frame, prediction). The
    prediction-net output is the ``decoder`` tap, straight from ``decoder.onnx``."""

    def __init__(self, decoder: GraphFile, joiner: GraphFile, interface: GraphInterface, options):
        import onnxruntime as ort

        self.path = decoder.path
        self.interface = interface
        self.decoder = ort.InferenceSession(str(decoder.loads), options, providers=PROVIDERS)
        self.joiner = ort.InferenceSession(str(joiner.loads), options, providers=PROVIDERS)
        decoder_inputs = self.decoder.get_inputs()
        if len(decoder_inputs) != 4 or len(self.joiner.get_inputs()) != 2:
            raise ForeignArtifactError(f"{decoder.path.parent}: decoder inputs {[i.name for i in decoder_inputs]} / "
                                       f"joiner inputs {[i.name for i in self.joiner.get_inputs()]}: expected NeMo's "
                                       "(targets, target_length, two LSTM states) and (encoder, decoder outputs)")
        self._decoder_names = [i.name for i in decoder_inputs]
        self._joiner_names = [i.name for i in self.joiner.get_inputs()]
        self.inputs = {"targets": _Arg("targets", decoder_inputs[0].type, decoder_inputs[0].shape),
                       "target_length": _Arg("target_length", decoder_inputs[1].type, decoder_inputs[1].shape),
                       "input_states_1": _Arg("input_states_1", decoder_inputs[2].type, decoder_inputs[2].shape),
                       "input_states_2": _Arg("input_states_2", decoder_inputs[3].type, decoder_inputs[3].shape)}
        self.output_names = [*DECODER_JOINT_OUTPUTS, TAP_DECODER]
        self.taps = [TAP_DECODER] if TAP_DECODER in decoder.taps else []

    def declared_shape(self, name: str) -> list[Any]:
        return list(self.inputs[name].shape)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        targets = feeds["targets"]
        length = feeds.get("target_length", np.ones((targets.shape[0],), targets.dtype)).astype(targets.dtype)
        prediction, lengths, state_1, state_2 = self.decoder.run(None, dict(zip(self._decoder_names, (
            targets, length, feeds["input_states_1"], feeds["input_states_2"]))))[:4]
        logits = self.joiner.run(None, dict(zip(self._joiner_names, (feeds["encoder_outputs"], prediction))))[0]
        out = {"outputs": logits, "prednet_lengths": lengths, "output_states_1": state_1, "output_states_2": state_2}
        if self.taps:
            out[TAP_DECODER] = np.transpose(prediction, (0, 2, 1))  # [B, H, U] -> [B, U, H]
        return out


def open_decoder_joint(described: DescribedExport, options) -> Graph | SplitDecoderJoint:
    """The described ``decoder_joint``: one graph, or sherpa-onnx's decoder and joiner."""
    if described.joiner is not None:
        return SplitDecoderJoint(described.decoder_joint, described.joiner, described.interface, options)
    return Graph(described.decoder_joint, "decoder_joint", described.interface, options)

"""ONNX graph surgery for the export: tap outputs found by structure, metadata, external data.

Taps are located from the module scopes the TorchScript exporter writes into node names
(``/pre_encode/out/MatMul``, ``/layers.3/norm_out/LayerNormalization``,
``/decoder/dec_rnn/lstm/LSTM_1``): a tap is the one tensor that leaves a module's scope, i.e. is
produced by a node inside it and consumed outside it. No node index or generated tensor name is
hard-coded, and a scope that is missing or has more than one way out is an error naming the scope.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from streaming_parity.interface.taps import TAP_DECODER, TAP_PRE_ENCODE, layer_tap

PROTOBUF_LIMIT = 2 * 1024 ** 3  # a ModelProto over 2 GB cannot be serialised inline
EXTERNAL_ALIGNMENT = 64


class TapNotFoundError(RuntimeError):
    """A tap tensor could not be located in the graph by its module scope."""


def _scope_pattern(scope: str) -> re.Pattern[str]:
    # The scope may sit under a wrapper's prefix (``/encoder/layers.0/...``); segment boundaries keep
    # ``layers.1`` from matching ``layers.10``.
    return re.compile(r"(^|/)" + re.escape(scope.strip("/")) + "/")


def scope_exits(graph: onnx.GraphProto, scope: str) -> list[str]:
    """Tensors produced by nodes inside ``scope`` and consumed outside it (or graph outputs)."""
    pattern = _scope_pattern(scope)
    inside = [node for node in graph.node if pattern.search(node.name)]
    produced = {name for node in inside for name in node.output if name}
    inside_ids = {id(node) for node in inside}
    consumed_outside = {name for node in graph.node if id(node) not in inside_ids for name in node.input}
    graph_outputs = {output.name for output in graph.output}
    ordered = [name for node in inside for name in node.output if name in produced]
    return [name for name in dict.fromkeys(ordered) if name in consumed_outside or name in graph_outputs]


def find_tap(graph: onnx.GraphProto, scope: str, tap: str, *, exclude_graph_outputs: bool = False) -> str:
    """The single tensor leaving ``scope``; raise ``TapNotFoundError`` naming the tap otherwise."""
    if not any(_scope_pattern(scope).search(node.name) for node in graph.node):
        raise TapNotFoundError(f"tap {tap!r}: no node in module scope '{scope}/' "
                               f"(node names carry no such scope; was the graph exported by the TorchScript exporter?)")
    exits = scope_exits(graph, scope)
    if exclude_graph_outputs:
        outputs = {output.name for output in graph.output}
        exits = [name for name in exits if name not in outputs]
    if len(exits) != 1:
        raise TapNotFoundError(f"tap {tap!r}: module scope '{scope}/' has {len(exits)} outgoing tensors "
                               f"{exits[:6]}, expected exactly one")
    return exits[0]


def encoder_tap_tensors(graph: onnx.GraphProto, num_layers: int) -> dict[str, str]:
    """Shared tap name -> tensor name in a cache-aware encoder graph.

    ``pre_encode``: ConvSubsampling's output is its final Linear (``pre_encode.out``), before the
    encoder drops ``drop_extra_pre_encoded`` frames. ``layers.i``: ConformerLayer returns
    ``norm_out(residual)`` (its caches leave the layer through other scopes).
    """
    taps = {TAP_PRE_ENCODE: find_tap(graph, "pre_encode/out", TAP_PRE_ENCODE)}
    for index in range(num_layers):
        taps[layer_tap(index)] = find_tap(graph, f"layers.{index}/norm_out", layer_tap(index))
    if any(_scope_pattern(f"layers.{num_layers}").search(node.name) for node in graph.node):
        raise TapNotFoundError(f"graph has a layer scope 'layers.{num_layers}/' but the model has {num_layers} layers")
    return taps


def decoder_joint_tap_tensors(graph: onnx.GraphProto) -> dict[str, str]:
    """``decoder``: the prediction net's LSTM output (``dec_rnn``), not its states (graph outputs)."""
    return {TAP_DECODER: find_tap(graph, "decoder/dec_rnn", TAP_DECODER, exclude_graph_outputs=True)}


def add_tap_outputs(model: onnx.ModelProto, taps: Mapping[str, str]) -> onnx.ModelProto:
    """Expose each tensor as a graph output under its shared tap name (through an Identity node)."""
    existing = {output.name for output in model.graph.output}
    for tap, tensor in taps.items():
        if tap in existing:
            raise ValueError(f"graph already has an output named {tap!r}")
        model.graph.node.append(helper.make_node("Identity", [tensor], [tap], name=f"/parity_taps/{tap}"))
        model.graph.output.append(helper.make_tensor_value_info(tap, TensorProto.FLOAT, None))
    return model


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace the given ``metadata_props`` keys, keep the others."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def graph_io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return inputs, [o.name for o in model.graph.output]


# -- weights: inline or one external data file per graph -------------------------------------------

def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _tensors_with_data(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t


def consolidate_external_data(path: str | Path) -> Path | None:
    """Rewrite a graph whose weights are scattered over many external files into one ``<graph>.data``.

    The legacy exporter writes every tensor of a > 2 GB model to its own file (hundreds of them).
    Tensors are copied one at a time (peak memory: the largest tensor), the scattered files removed.
    Returns the data file, or ``None`` when the graph had no external data.
    """
    path = Path(path)
    directory = path.parent
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in _tensors_with_data(model) if t.data_location == TensorProto.EXTERNAL]
    if not external:
        return None
    data_name = path.name + ".data"
    target = directory / data_name
    staging = directory / (data_name + ".partial")
    sources: set[Path] = set()
    with open(staging, "wb") as out:
        for tensor in external:
            entries = _external_entries(tensor)
            source = directory / entries["location"]
            offset = int(entries.get("offset", 0))
            with open(source, "rb") as handle:
                handle.seek(offset)
                payload = handle.read(int(entries["length"])) if "length" in entries else handle.read()
            padding = (-out.tell()) % EXTERNAL_ALIGNMENT
            out.write(b"\0" * padding)
            position = out.tell()
            out.write(payload)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(position)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            sources.add(source)
    onnx.save(model, str(path))
    for source in sources:
        if source.resolve() != target.resolve() and source.exists():
            source.unlink()
    os.replace(staging, target)
    return target


class SharedWeights:
    """One external-data file shared by several graphs of the same weights (one per lookahead).

    Every lookahead's encoder graph holds the same weights; written once per graph they cost one
    checkpoint of disk each (2.5 GB at full size). ``absorb(graph)`` moves a graph's external
    tensors, and its inline ones of at least ``threshold`` bytes, into the shared file, storing a
    payload only the first time its bytes are seen (sha256), and removes the graph's own data
    files. One tensor is held in memory at a time. ONNX Runtime reads each graph's tensors from
    the shared file at their offsets; every session still holds its own copy in memory.
    """

    def __init__(self, path: str | Path, threshold: int = 1024):
        self.path = Path(path)
        self.threshold = threshold
        self._offsets: dict[str, tuple[int, int]] = {}
        self.stored_bytes = 0
        self.referenced_bytes = 0
        self.path.unlink(missing_ok=True)

    def _store(self, payload: bytes) -> tuple[int, int]:
        digest = hashlib.sha256(payload).hexdigest()
        self.referenced_bytes += len(payload)
        if digest not in self._offsets:
            with open(self.path, "ab") as out:
                out.write(b"\0" * ((-out.tell()) % EXTERNAL_ALIGNMENT))
                self._offsets[digest] = (out.tell(), len(payload))
                out.write(payload)
            self.stored_bytes += len(payload)
        return self._offsets[digest]

    def absorb(self, graph: str | Path) -> None:
        graph = Path(graph)
        directory = graph.parent
        if directory.resolve() != self.path.parent.resolve():
            raise ValueError(f"{graph}: a shared weight file serves graphs of its own directory only")
        model = onnx.load(str(graph), load_external_data=False)
        scattered: set[Path] = set()
        for tensor in _tensors_with_data(model):
            if tensor.data_location == TensorProto.EXTERNAL:
                entries = _external_entries(tensor)
                source = directory / entries["location"]
                with open(source, "rb") as handle:
                    handle.seek(int(entries.get("offset", 0)))
                    payload = handle.read(int(entries["length"])) if "length" in entries else handle.read()
                if source.resolve() != self.path.resolve():
                    scattered.add(source)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= self.threshold:
                payload = tensor.raw_data
            else:
                continue
            offset, length = self._store(payload)
            del tensor.external_data[:]
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        onnx.save(model, str(graph))
        for source in scattered:
            source.unlink(missing_ok=True)


def save_graph(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save inline when it fits in a protobuf, else with one external ``<graph>.data`` file."""
    path = Path(path)
    has_external = any(t.data_location == TensorProto.EXTERNAL for t in _tensors_with_data(model))
    if has_external or model.ByteSize() < PROTOBUF_LIMIT:
        onnx.save(model, str(path))  # external references (shared .data files) are kept as they are
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
    return path


# -- the prompt kernel, built node by node ---------------------------------------------------------

def prompt_kernel_graph(weight_in, bias_in, weight_out, bias_out, *, opset: int, inputs: tuple[str, str],
                        output: str) -> onnx.ModelProto:
    """``PromptStreamingMixin._apply_prompt_to_encoded`` as a graph, on numpy weights in NeMo's layout.

    ``inputs``: the encoder output ``[B, D, T]`` (float) and the prompt index ``[B]`` (int64); ``output``:
    ``[B, D, T]``. As NeMo: transpose to ``[B, T, D]``, concatenate the index's one-hot column over every
    frame (``OneHot`` then ``Expand``: NeMo's ``zeros().scatter_`` values), ``Linear(D + P, 2D)``, ReLU,
    ``Linear(2D, D)``, transpose back. The weights keep NeMo's names and ``[out, in]`` layout (a
    ``Transpose`` feeds each ``MatMul``; ONNX Runtime folds it once when the session starts), so the
    initializers read as the checkpoint's tensors; ``fold_weight_transposes`` makes the copy that
    dynamic quantization can read.
    """
    import numpy as np
    from onnx import numpy_helper

    hidden2, width = weight_in.shape
    d_model = weight_out.shape[0]
    num_prompts = width - d_model
    if weight_out.shape != (d_model, hidden2) or bias_in.shape != (hidden2,) or bias_out.shape != (d_model,) \
            or num_prompts < 1:
        raise ValueError(f"prompt_kernel shapes {weight_in.shape}, {bias_in.shape}, {weight_out.shape}, "
                         f"{bias_out.shape} are not Linear(D + P, 2D), Linear(2D, D)")
    encoded, index = inputs
    names = ("prompt_kernel.0.weight", "prompt_kernel.0.bias", "prompt_kernel.2.weight", "prompt_kernel.2.bias")
    initializers = [numpy_helper.from_array(np.ascontiguousarray(a, np.float32), name)
                    for a, name in zip((weight_in, bias_in, weight_out, bias_out), names)]
    initializers += [
        numpy_helper.from_array(np.array(num_prompts, np.int64), "/prompt/depth"),
        numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "/prompt/off_on"),
        numpy_helper.from_array(np.array([1], np.int64), "/prompt/one"),
    ]
    node = helper.make_node
    nodes = [
        node("Transpose", [encoded], ["/prompt/encoded_btd"], perm=[0, 2, 1], name="/prompt/Transpose_in"),
        node("OneHot", [index, "/prompt/depth", "/prompt/off_on"], ["/prompt/one_hot"], axis=-1,
             name="/prompt/OneHot"),
        node("Unsqueeze", ["/prompt/one_hot", "/prompt/one"], ["/prompt/one_hot_b1p"], name="/prompt/Unsqueeze"),
        node("Shape", [encoded], ["/prompt/frames"], start=2, end=3, name="/prompt/Shape"),
        node("Concat", ["/prompt/one", "/prompt/frames", "/prompt/one"], ["/prompt/expand_to"], axis=0,
             name="/prompt/Concat_shape"),
        node("Expand", ["/prompt/one_hot_b1p", "/prompt/expand_to"], ["/prompt/one_hot_btp"], name="/prompt/Expand"),
        node("Concat", ["/prompt/encoded_btd", "/prompt/one_hot_btp"], ["/prompt/concat"], axis=-1,
             name="/prompt/Concat"),
        node("Transpose", [names[0]], ["/prompt_kernel/0/weight_t"], perm=[1, 0], name="/prompt_kernel/0/Transpose"),
        node("MatMul", ["/prompt/concat", "/prompt_kernel/0/weight_t"], ["/prompt_kernel/0/MatMul_out"],
             name="/prompt_kernel/0/MatMul"),
        node("Add", ["/prompt_kernel/0/MatMul_out", names[1]], ["/prompt_kernel/0/out"], name="/prompt_kernel/0/Add"),
        node("Relu", ["/prompt_kernel/0/out"], ["/prompt_kernel/1/out"], name="/prompt_kernel/1/Relu"),
        node("Transpose", [names[2]], ["/prompt_kernel/2/weight_t"], perm=[1, 0], name="/prompt_kernel/2/Transpose"),
        node("MatMul", ["/prompt_kernel/1/out", "/prompt_kernel/2/weight_t"], ["/prompt_kernel/2/MatMul_out"],
             name="/prompt_kernel/2/MatMul"),
        node("Add", ["/prompt_kernel/2/MatMul_out", names[3]], ["/prompt_kernel/2/out"], name="/prompt_kernel/2/Add"),
        node("Transpose", ["/prompt_kernel/2/out"], [output], perm=[0, 2, 1], name="/prompt/Transpose_out"),
    ]
    graph = helper.make_graph(
        nodes, "prompt_kernel",
        [helper.make_tensor_value_info(encoded, TensorProto.FLOAT, ["B", d_model, "T"]),
         helper.make_tensor_value_info(index, TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["B", d_model, "T"])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="parity")
    model.ir_version = 8  # what opset 17's TorchScript exports carry: readable by older runtimes too
    onnx.checker.check_model(model, full_check=True)
    return model


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose ``Transpose`` nodes of an initializer are replaced by the transposed initializer (named
    after the node's output), so that ``MatMul`` reads a weight directly, as dynamic quantization needs."""
    from onnx import numpy_helper

    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    initializers = {init.name: init for init in folded.graph.initializer}
    kept = []
    for node in folded.graph.node:
        if node.op_type == "Transpose" and len(node.input) == 1 and node.input[0] in initializers:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(initializers[node.input[0]])
            folded.graph.initializer.append(numpy_helper.from_array(array.transpose(perm).copy(), node.output[0]))
            continue
        kept.append(onnx.NodeProto())
        kept[-1].CopyFrom(node)
    del folded.graph.node[:]
    folded.graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    remaining = []
    for init in folded.graph.initializer:
        if init.name in used:
            remaining.append(onnx.TensorProto())
            remaining[-1].CopyFrom(init)
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(remaining)
    return folded


# Matrix products and the input that holds their right-hand (weight) operand, float or quantized: what ONNX
# Runtime's quantizer turns a ``MatMul`` into (QOperator and fused forms alike).
MATMUL_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "MatMulInteger": 1, "DynamicQuantizeMatMul": 1,
                       "MatMulIntegerToFloat": 1, "QLinearMatMul": 3}
# Nodes a weight may pass through between its initializer and the product (QDQ form, a kept transpose).
_WEIGHT_PASSTHROUGH = {"DequantizeLinear", "Cast", "Identity", "Transpose"}


def matmul_weights(graph: onnx.GraphProto) -> list[tuple[str, list[int]]]:
    """Each matrix product's weight, in graph order: the initializer it reads (through dequantization, a
    cast or a transpose) and the shape the product sees, ``[in, out]``; products of two activations are
    left out. Shapes only: the element type is the quantizer's choice (int8, uint8, float)."""
    initializers = {init.name: list(init.dims) for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    found = []
    for node in graph.node:
        index = MATMUL_WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        name, transposes = node.input[index], []  # the product's side first
        while name not in initializers and name in producers and producers[name].op_type in _WEIGHT_PASSTHROUGH:
            producer = producers[name]
            if producer.op_type == "Transpose":
                transposes.append(next((list(a.ints) for a in producer.attribute if a.name == "perm"), None))
            name = producer.input[0]
        if name not in initializers:
            continue
        shape = initializers[name]
        for perm in reversed(transposes):  # from the initializer out; no perm: the axes reversed
            shape = shape[::-1] if perm is None else [shape[i] for i in perm]
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            shape = shape[::-1]
        found.append((name, shape))
    return found


def check_product_weights(graph: onnx.GraphProto, expected: Mapping[str, list[int]], where: str,
                          because: str) -> None:
    """The weights of ``graph``'s matrix products, in graph order, against ``expected``'s ``[out, in]``
    (PyTorch Linear) shapes, also in order: for a graph whose weights were renamed by ONNX Runtime's
    quantizer (``*_quantized``, MatMul's ``[in, out]``), whatever their element type. A count or a shape
    that differs is refused naming the tensor and both shapes."""
    from streaming_parity.backends.onnx.layout import GraphInterfaceError

    found = matmul_weights(graph)
    if len(found) != len(expected):
        raise GraphInterfaceError(f"{where}: {len(found)} matrix-product weights {found}, but {len(expected)} "
                                  f"expected ({', '.join(expected)})")
    for (name, shape), (source, source_shape) in zip(found, expected.items()):
        if shape != list(source_shape)[::-1]:
            raise GraphInterfaceError(f"{where}: {name} (quantized {source}, [in, out]) has shape {shape}, but "
                                      f"{because} need {list(source_shape)[::-1]}")

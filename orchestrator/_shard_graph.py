"""Read-only facts about an ONNX graph that the slicer needs: producers, consumers, constants, shapes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ranks._staged_runner import outer_references


class GraphIndex:
    """Indexes one top-level graph: who makes and who reads each tensor, which tensors are constants."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.graph = graph
        self.nodes = list(graph.node)
        self.graph_inputs = {i.name for i in graph.input}
        self.graph_outputs = [o.name for o in graph.output]
        # An initializer that is also a graph input can be overridden by the caller: not a constant.
        self.initializers = {t.name: t for t in graph.initializer if t.name not in self.graph_inputs}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        self.constant_nodes: dict[str, onnx.TensorProto] = {}
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(i)
            for name in outer_references(node):
                self.consumers.setdefault(name, []).append(i)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constant_nodes[node.output[0]] = attr.t
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.shapes = _infer_shapes(model, self.initializers)

    def initializer_shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else tuple(tensor.dims)

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of a small constant (initializer or Constant node), None when not constant."""
        tensor = self.initializers.get(name) or self.constant_nodes.get(name)
        if tensor is None:
            return None
        return numpy_helper.to_array(tensor)

    def shape(self, name: str) -> list | None:
        """Inferred shape: list of int (static), str (symbolic) or None (unknown) per dim; None when rank unknown."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def node_label(self, index: int) -> str:
        node = self.nodes[index]
        return node.name or f"{node.op_type}#{index} -> {node.output[0]}"

    def has_subgraph(self, index: int) -> bool:
        return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in self.nodes[index].attribute)




def _infer_shapes(model: onnx.ModelProto, initializers: dict) -> dict[str, list]:
    """Run ONNX shape inference on a skeleton of the model (big weights as typed inputs, no data copied)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(_without_big_weights(model, initializers))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference is a help, never a requirement: unknown shapes only mean fewer splits
        inferred = skeleton
    shapes: dict[str, list] = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[info.name] = dims
    return shapes


def elem_types(model: onnx.ModelProto, initializers: dict) -> dict[str, int]:
    """Element type of every tensor shape inference can type (used for value_info of collective nodes)."""
    skeleton = _without_big_weights(model, initializers)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:
        inferred = skeleton
    types = {t.name: t.data_type for t in model.graph.initializer}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _without_big_weights(model: onnx.ModelProto, initializers: dict, limit: int = 4096) -> onnx.ModelProto:
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for tensor in model.graph.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.name in initializers and count * 4 > limit:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    return skeleton

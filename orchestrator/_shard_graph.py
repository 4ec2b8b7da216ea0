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
        self.stand_ins: dict[str, int] = {}
        self.shapes = _infer_shapes(model, self.initializers, self.stand_ins)
        _probe_unknown_shapes(self)

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

    def shape_values(self, name: str, local_dim):
        """A 1-D shape value, element by element, as the whole model and as one rank compute it.

        Returns ``(elements, concat)`` or None when it cannot be followed. Each element is
        ``(whole, per_rank, source)``: integers computed with the stand-in sizes, per rank with
        ``local_dim(tensor, axis)`` for every ``Shape(tensor)`` read (its length on one rank).
        ``source`` names the constant that holds an element, so a per-rank value can be written
        there: ``(input index of the Concat, offset)``, or ``(None, offset)`` when ``name`` itself
        is the constant; None for computed elements. ``concat`` is the index of the Concat node
        that makes ``name``, or None. Exporters compute reshape targets as ``Concat(Shape(x)[0],
        Shape(x)[1], 192)``, and ``Shape(k)[1] * 2`` for repeated key/value heads.
        """
        value = self.constant_value(name)
        if value is not None:
            return [(int(v), int(v), (None, j)) for j, v in enumerate(value.reshape(-1))], None
        i = self.producer.get(name)
        if i is None:
            return None
        node = self.nodes[i]
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            elems = self._values(name, local_dim, 0)
            return None if elems is None else (elems, None)
        elems = []
        for k, part in enumerate(node.input):
            value = self.constant_value(part)
            if value is not None:
                elems += [(int(v), int(v), (k, j)) for j, v in enumerate(value.reshape(-1))]
                continue
            sub = self._values(part, local_dim, 0)
            if sub is None:
                return None
            elems += sub
        return elems, i

    def _values(self, name: str, local_dim, depth: int):
        if depth > 24:
            return None
        value = self.constant_value(name)
        if value is not None:
            return [(int(v), int(v), None) for v in np.reshape(value, -1)]
        i = self.producer.get(name)
        if i is None:
            return None
        node = self.nodes[i]
        if node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

        def sub(k):
            return self._values(node.input[k], local_dim, depth + 1) if len(node.input) > k and node.input[k] else None

        if op == "Shape":
            shape = self.shape(node.input[0])
            if shape is None:
                return None
            rank = len(shape)
            start, end = attrs.get("start", 0), attrs.get("end", rank)
            start = max(0, start + rank if start < 0 else start)
            end = min(rank, end + rank if end < 0 else end)
            out = []
            for a in range(start, end):
                if not isinstance(shape[a], int):
                    return None
                out.append((shape[a], local_dim(node.input[0], a, shape[a]), None))
            return out
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            return sub(0)
        if op == "Concat":
            out = []
            for k in range(len(node.input)):
                part = sub(k)
                if part is None:
                    return None
                out += part
            return out
        if op == "Gather" and attrs.get("axis", 0) == 0:
            data, idx = sub(0), self.constant_value(node.input[1])
            if data is None or idx is None:
                return None
            try:
                return [data[int(j)] for j in idx.reshape(-1)]
            except IndexError:
                return None
        if op == "Slice":
            data = sub(0)
            args = [self.constant_value(n) if n else None for n in list(node.input[1:]) + [""] * (4 - len(node.input[1:]))]
            if data is None or args[0] is None or args[1] is None:
                return None
            if args[2] is not None and [int(a) for a in args[2].reshape(-1)] not in ([0], [-1]):
                return None
            step = 1 if args[3] is None else int(args[3].reshape(-1)[0])
            start, end = int(args[0].reshape(-1)[0]), int(args[1].reshape(-1)[0])
            return data[slice(start, end, step)]
        if op == "ConstantOfShape":
            shape = sub(0)
            fill = attrs.get("value")
            v = 0 if fill is None else int(onnx.numpy_helper.to_array(fill).reshape(-1)[0])
            if shape is None or len(shape) != 1 or shape[0][0] != shape[0][1]:
                return None
            return [(v, v, None)] * shape[0][0]
        if op in ("Mul", "Add", "Sub", "Div", "Equal", "Max", "Min"):
            a, b = sub(0), sub(1)
            if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
                return None
            n = max(len(a), len(b))
            a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
            fn = {"Mul": lambda x, y: x * y, "Add": lambda x, y: x + y, "Sub": lambda x, y: x - y,
                  "Div": lambda x, y: x // y if y else 0, "Equal": lambda x, y: int(x == y),
                  "Max": max, "Min": min}[op]
            return [(fn(x[0], y[0]), fn(x[1], y[1]), None) for x, y in zip(a, b)]
        if op == "Where":
            c, a, b = sub(0), sub(1), sub(2)
            if c is None or a is None or b is None:
                return None
            n = max(len(c), len(a), len(b))
            c, a, b = [(v * n if len(v) == 1 else v) for v in (c, a, b)]
            if not len(c) == len(a) == len(b) == n:
                return None
            return [((x[0] if k[0] else y[0]), (x[1] if k[1] else y[1]), None) for k, x, y in zip(c, a, b)]
        return None

    def op_type_of(self, name: str) -> str | None:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i].op_type

    def node_label(self, index: int) -> str:
        node = self.nodes[index]
        return node.name or f"{node.op_type}#{index} -> {node.output[0]}"

    def has_subgraph(self, index: int) -> bool:
        return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in self.nodes[index].attribute)




# Stand-ins for dynamic input dimensions (batch, sequence, ...): distinct primes that are unlikely to be a
# model's width, head count or head size, so a product of them is recognisable after a Reshape merges them.
_DYNAMIC_STAND_INS = (7, 11, 13, 17, 19, 23, 29, 31)


def _infer_shapes(model: onnx.ModelProto, initializers: dict, stand_ins: dict) -> dict[str, list]:
    """Run ONNX shape inference on a skeleton of the model (big weights as typed inputs, no data copied).

    Dynamic input dimensions are given concrete stand-in values first, so that shapes computed at run
    time (``Concat(Shape(x)[0], Shape(x)[1], 192)``, as exporters write them) come out as numbers: the
    slicer compares the input and output shapes of a Reshape to see where the cut axis goes.
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(_without_big_weights(model, initializers))
    concrete = onnx.ModelProto()
    concrete.CopyFrom(skeleton)
    for info in concrete.graph.input:
        if info.name in initializers:
            continue
        for d in info.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                key = d.dim_param or f"?{len(stand_ins)}"
                if key not in stand_ins:
                    stand_ins[key] = _DYNAMIC_STAND_INS[len(stand_ins) % len(_DYNAMIC_STAND_INS)]
                d.Clear()
                d.dim_value = stand_ins[key]
    # value_info written by the exporter holds the symbolic shapes; inference fills in concrete ones.
    del concrete.graph.value_info[:]
    del concrete.graph.output[:]
    for out in skeleton.graph.output:
        info = concrete.graph.output.add()
        info.name = out.name
        if out.type.HasField("tensor_type"):
            info.type.tensor_type.elem_type = out.type.tensor_type.elem_type
    inferred = None
    for candidate in (concrete, skeleton):
        try:
            inferred = onnx.shape_inference.infer_shapes(candidate, strict_mode=False, data_prop=True)
            break
        except Exception:  # inference is a help, never a requirement: unknown shapes only mean fewer splits
            continue
    if inferred is None:
        inferred = skeleton
    shapes: dict[str, list] = {}
    # Shapes the model declares come first; what inference found (concrete) overrides them.
    declared = list(skeleton.graph.value_info) + list(skeleton.graph.output)
    for info in declared + list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
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


def _probe_unknown_shapes(index: "GraphIndex", weight_limit: int = 1 << 20) -> None:
    """Shapes inference could not fix (a mask expanded to a computed shape): run the nodes that make them.

    Only the part of the graph those tensors depend on runs, once, in ONNX Runtime, on inputs of the
    stand-in sizes, and only when that part holds little weight (masks and position ids are computed
    from the inputs alone). Anything that fails here just stays unknown.
    """
    wanted = [name for name, shape in index.shapes.items()
              if name in index.producer and not all(isinstance(d, int) for d in shape)]
    if not wanted:
        return
    needed: set[int] = set()
    stack = [index.producer[n] for n in wanted]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        if index.has_subgraph(i):
            return
        for name in index.nodes[i].input:
            if name in index.producer:
                stack.append(index.producer[name])
    inits = {name for i in needed for name in index.nodes[i].input if name in index.initializers}
    if sum(int(np.prod(index.initializers[n].dims, dtype=np.int64)) for n in inits) * 4 > weight_limit:
        return
    try:
        import onnxruntime as ort

        types = elem_types(index.model, index.initializers)
        wanted = [n for n in wanted if types.get(n)]
        graph = onnx.helper.make_graph(
            [index.nodes[i] for i in sorted(needed)], "probe",
            [vi for vi in index.model.graph.input if vi.name not in index.initializers],
            [onnx.helper.make_tensor_value_info(n, types[n], None) for n in wanted],
            [index.initializers[n] for n in inits],
        )
        probe = onnx.helper.make_model(graph, opset_imports=index.model.opset_import, ir_version=index.model.ir_version)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {}
        for arg in session.get_inputs():
            shape = index.shapes.get(arg.name) or []
            dims = [d if isinstance(d, int) else 7 for d in shape]
            if "int" in arg.type:
                feeds[arg.name] = np.ones(dims, dtype=np.int64 if "64" in arg.type else np.int32)
            elif "bool" in arg.type:
                feeds[arg.name] = np.ones(dims, dtype=bool)
            else:
                feeds[arg.name] = np.ones(dims, dtype=np.float16 if "16" in arg.type else
                                          np.float64 if "double" in arg.type else np.float32)
        for name, value in zip(wanted, session.run(wanted, feeds)):
            index.shapes[name] = list(np.shape(value))
    except Exception:  # a help, never a requirement
        return


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

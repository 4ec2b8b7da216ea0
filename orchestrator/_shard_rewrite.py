"""Writing one rank's graph from a split plan: sliced weights, per-rank shapes, collective nodes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._shard_analysis import Plan, _attrs
from ._shard_graph import GraphIndex

MS_DOMAIN = "com.microsoft"


@dataclass
class RankGraph:
    model: onnx.ModelProto
    weight_bytes: int
    collectives: list[dict] = field(default_factory=list)


class _Names:
    def __init__(self, index: GraphIndex):
        self.used = set(index.producer) | set(index.consumers) | set(index.initializers) | index.graph_inputs
        self.used.update(n.name for n in index.nodes)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}.{k}", k + 1
        self.used.add(name)
        return name


def initializer_uses(index: GraphIndex, plan: Plan) -> dict[str, set]:
    """Initializer name -> the set of slicing axes its uses need (None = whole)."""
    uses: dict[str, set] = {}
    for i, node in enumerate(index.nodes):
        for k, name in enumerate(node.input):
            if name in index.initializers:
                axis = plan.sliced_inputs.get((i, k))
                if i in plan.row_parallel and node.op_type == "Gemm" and k == 2:
                    axis = None
                uses.setdefault(name, set()).add(axis)
    for name in index.graph_outputs:
        if name in index.initializers:
            uses.setdefault(name, set()).add(None)
    for name, consumers in index.consumers.items():
        if name in index.initializers and any(index.has_subgraph(c) for c in consumers):
            uses.setdefault(name, set()).add(None)
    return uses


def build_rank_graph(index: GraphIndex, plan: Plan, rank: int, elem_types: dict[str, int],
                     metadata: dict[str, str], progress=None) -> RankGraph:
    tp = plan.tp
    names = _Names(index)
    uses = initializer_uses(index, plan)
    # Initializer name as read by a use with slicing axis `axis`.
    use_name: dict[tuple[str, object], str] = {}
    for name, axes in uses.items():
        for axis in axes:
            use_name[(name, axis)] = name if (len(axes) == 1 or axis is None) else names.fresh(f"{name}.shard_axis{axis}")

    new_inits: list[onnx.TensorProto] = []
    for tensor in index.graph.initializer:
        axes = uses.get(tensor.name, {None}) if tensor.name in index.initializers else {None}
        whole = None
        for axis in sorted(axes, key=lambda a: -1 if a is None else a):
            if whole is None:
                whole = numpy_helper.to_array(tensor)
            value = whole if axis is None else np.ascontiguousarray(np.split(whole, tp, axis=axis)[rank])
            out = numpy_helper.from_array(value, use_name.get((tensor.name, axis), tensor.name))
            new_inits.append(out)
        if progress is not None:
            progress.update(1)

    local = {t: names.fresh(f"{t}.local") for t in plan.gathered_outputs}
    gathered: dict[str, str] = {t: t for t in plan.gathered_outputs}
    reshape_consts: dict[tuple[str, tuple], str] = {}
    nodes: list[onnx.NodeProto] = []
    collectives: list[dict] = []
    value_infos: dict[str, int] = {}

    def collective(op: str, src: str, dst: str, origin: str, **attrs) -> onnx.NodeProto:
        node = helper.make_node(op, [src], [dst], name=names.fresh(f"{origin}.{op}"), domain=MS_DOMAIN, **attrs)
        elem = elem_types.get(origin)
        if elem:
            value_infos[src] = elem
            value_infos[dst] = elem
        collectives.append({"op": op, "node": node.name, "input": src, "output": dst, **attrs})
        return node

    for i, old in enumerate(index.nodes):
        node = onnx.NodeProto()
        node.CopyFrom(old)
        need_whole = set(plan.gathers.get(i, ()))
        for name in need_whole:
            if name not in gathered:
                spec = plan.splits[name]
                gathered[name] = names.fresh(f"{name}.gathered")
                nodes.append(collective("AllGather", local.get(name, name), gathered[name], name,
                                        group_size=tp, axis=spec.position()))
        for k, name in enumerate(old.input):
            if not name:
                continue
            if name in need_whole:
                node.input[k] = gathered[name]
            elif name in local:
                node.input[k] = local[name]
            elif name in index.initializers:
                axis = plan.sliced_inputs.get((i, k))
                node.input[k] = use_name.get((name, axis), name)
        if i in plan.reshapes:
            value = plan.reshapes[i]
            key = (old.input[1], tuple(value.tolist()))
            if key not in reshape_consts:
                reshape_consts[key] = names.fresh(f"{old.input[1]}.rank_local")
                new_inits.append(numpy_helper.from_array(value, reshape_consts[key]))
            node.input[1] = reshape_consts[key]
        for k, name in enumerate(old.output):
            if name in local:
                node.output[k] = local[name]
        if i in plan.row_parallel:
            out = old.output[0]
            partial = names.fresh(f"{out}.partial")
            node.output[0] = partial
            bias = None
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                bias = _scaled_bias(node, index, names, new_inits)
                del node.input[2]
                _drop_attr(node, "beta")
            nodes.append(node)
            if bias is None:
                nodes.append(collective("AllReduce", partial, out, out))
            else:
                reduced = names.fresh(f"{out}.reduced")
                nodes.append(collective("AllReduce", partial, reduced, out))
                # The bias of a row-parallel layer is added once, after the partial sums are reduced.
                nodes.append(helper.make_node("Add", [reduced, bias], [out], name=names.fresh(f"{out}.bias_add")))
            continue
        nodes.append(node)
        for name in old.output:
            if name in local:
                nodes.append(collective("AllGather", local[name], name, name, group_size=tp,
                                        axis=plan.splits[name].position()))

    model = onnx.ModelProto()
    _copy_header(index.model, model)
    graph = model.graph
    graph.name = index.graph.name
    graph.doc_string = index.graph.doc_string
    graph.node.extend(nodes)
    graph.input.extend(index.graph.input)
    graph.output.extend(index.graph.output)
    used = {n for node in nodes for n in node.input} | set(index.graph_outputs) | _subgraph_names(nodes)
    graph.initializer.extend(t for t in new_inits if t.name in used or t.name in index.graph_inputs)
    weight_bytes = sum(_nbytes(t) for t in graph.initializer)
    # Element types of collective inputs/outputs: collectives have no ONNX schema, so inference stops there.
    kept_info = [vi for vi in index.graph.value_info if vi.name not in plan.splits]
    graph.value_info.extend(kept_info)
    known = {vi.name for vi in kept_info}
    for name, elem in value_infos.items():
        if name not in known and name not in index.graph_outputs:
            graph.value_info.append(helper.make_tensor_value_info(name, elem, None))
    if collectives and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(value)))
    return RankGraph(model, weight_bytes, collectives)


def _copy_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> onnx.ModelProto:
    dst.ir_version = src.ir_version
    dst.opset_import.extend(src.opset_import)
    dst.producer_name = src.producer_name
    dst.producer_version = src.producer_version
    dst.domain = src.domain
    dst.model_version = src.model_version
    dst.doc_string = src.doc_string
    dst.metadata_props.extend(p for p in src.metadata_props if not p.key.startswith("orchestrator.shard."))
    dst.functions.extend(src.functions)
    return dst


def _scaled_bias(node, index, names, new_inits) -> str:
    bias = node.input[2]
    beta = _attrs(node).get("beta", 1.0)
    if beta == 1.0:
        return bias
    value = index.constant_value(bias)
    scaled = names.fresh(f"{bias}.times_beta")
    new_inits.append(numpy_helper.from_array((value * np.asarray(beta, value.dtype)).astype(value.dtype), scaled))
    return scaled


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


def _subgraph_names(nodes) -> set[str]:
    from ranks._staged_runner import outer_references

    out: set[str] = set()
    for node in nodes:
        out |= outer_references(node)
    return out


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize

"""Writing one rank's graph from a split plan: sliced weights, per-rank shapes, collective nodes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._shard_plan import Plan, node_attrs
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


def slice_piece(whole: np.ndarray, key, tp: int, rank: int) -> np.ndarray:
    """This rank's piece of a constant: ``key`` is an axis, or (axis, outer): ``outer`` blocks cut alike."""
    axis, outer = (key, 1) if isinstance(key, int) else key
    if outer == 1:
        return np.asarray(np.split(whole, tp, axis=axis)[rank], order="C")
    shape = list(whole.shape)
    blocks = whole.reshape(shape[:axis] + [outer, shape[axis] // outer] + shape[axis + 1:])
    piece = np.split(blocks, tp, axis=axis + 1)[rank]
    shape[axis] //= tp
    return np.asarray(piece.reshape(shape), order="C")


def key_axis(key) -> int | None:
    return key if key is None or isinstance(key, int) else key[0]


def build_rank_graph(index: GraphIndex, plan: Plan, rank: int, elem_types: dict[str, int],
                     metadata: dict[str, str], progress=None) -> RankGraph:
    tp = plan.tp
    names = _Names(index)
    uses = initializer_uses(index, plan)
    # Initializer name as read by a use with slicing axis `axis`.
    use_name: dict[tuple[str, object], str] = {}
    for name, axes in uses.items():
        for axis in axes:
            use_name[(name, axis)] = name if (len(axes) == 1 or axis is None) else names.fresh(
                f"{name}.shard_axis{key_axis(axis)}" + ("" if isinstance(axis, int) else f"_of{axis[1]}"))

    new_inits: list[onnx.TensorProto] = []
    for tensor in index.graph.initializer:
        axes = uses.get(tensor.name, {None}) if tensor.name in index.initializers else {None}
        whole = None
        for axis in sorted(axes, key=lambda a: (-1, 0) if a is None else (key_axis(a), 0 if isinstance(a, int) else a[1])):
            if whole is None:
                whole = numpy_helper.to_array(tensor)
            value = whole if axis is None else slice_piece(whole, axis, tp, rank)
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
        collectives.append({"op": op, "node": node.name, "input": src, "output": dst, "tensor": origin, **attrs})
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
        for (j, k), value in plan.input_overrides.items():
            if j != i:
                continue
            key = (old.input[k], tuple(value.reshape(-1).tolist()))
            if key not in reshape_consts:
                reshape_consts[key] = names.fresh(f"{old.input[k]}.rank_local")
                new_inits.append(numpy_helper.from_array(value, reshape_consts[key]))
            node.input[k] = reshape_consts[key]
        if i in plan.concat_overrides:
            # The shape target is computed at run time by a Concat of Shape(...) pieces and constants:
            # a copy of that Concat, with this rank's constants, computes this rank's target.
            c, parts = plan.concat_overrides[i]
            concat = onnx.NodeProto()
            concat.CopyFrom(index.nodes[c])
            concat.name = names.fresh(f"{index.nodes[c].name or 'Concat'}.rank_local")
            for k, value in parts.items():
                key = (concat.input[k], tuple(value.reshape(-1).tolist()))
                if key not in reshape_consts:
                    reshape_consts[key] = names.fresh(f"{concat.input[k]}.rank_local")
                    new_inits.append(numpy_helper.from_array(value, reshape_consts[key]))
                concat.input[k] = reshape_consts[key]
            concat.output[0] = names.fresh(f"{index.nodes[c].output[0]}.rank_local")
            nodes.append(concat)
            node.input[1] = concat.output[0]
        for (j, k), (axis, length) in plan.local_slices.items():
            if j != i:
                continue
            # A whole tensor of which this rank needs only its piece along the cut axis: no communication.
            piece = length // tp
            consts = []
            for label, value in (("starts", rank * piece), ("ends", (rank + 1) * piece), ("axes", axis)):
                cname = names.fresh(f"{old.input[k]}.local_{label}")
                new_inits.append(numpy_helper.from_array(np.array([value], np.int64), cname))
                consts.append(cname)
            sliced = names.fresh(f"{old.input[k]}.local_piece")
            nodes.append(helper.make_node("Slice", [node.input[k]] + consts, [sliced],
                                          name=names.fresh(f"{old.input[k]}.local_Slice")))
            node.input[k] = sliced
        if i in plan.embeddings:
            nodes.extend(_vocab_parallel_lookup(node, plan.embeddings[i], rank, tp, names, new_inits, elem_types,
                                                collective))
            continue
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
    pasts = {c["past"]: c for c in plan.cache.values() if c["past"] is not None}
    graph.input.extend(_local_cache_info(vi, plan, tp, pasts) for vi in index.graph.input)
    presents = {c["present"]: c for c in plan.cache.values()}
    graph.output.extend(_local_cache_info(vi, plan, tp, presents) for vi in index.graph.output)
    used = {n for node in nodes for n in node.input} | set(index.graph_outputs) | _subgraph_names(nodes)
    graph.initializer.extend(t for t in new_inits if t.name in used or t.name in index.graph_inputs)
    weight_bytes = sum(_nbytes(t) for t in graph.initializer)
    # Element types of collective inputs/outputs: collectives have no ONNX schema, so inference stops there.
    # Only element types are kept: many shapes differ per rank (split tensors, sliced weights behind a
    # Transpose, shape values), and an exporter's stale shape would make ONNX Runtime refuse the shard.
    kept_info = [helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None)
                 for vi in index.graph.value_info if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type]
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


def _local_cache_info(vi: onnx.ValueInfoProto, plan: Plan, tp: int, entries: dict) -> onnx.ValueInfoProto:
    """A cache input/output cut by heads is declared with this rank's heads (the rest of its shape as exported)."""
    entry = entries.get(vi.name)
    if entry is None or entry["axis"] is None:
        return vi
    local = onnx.ValueInfoProto()
    local.CopyFrom(vi)
    dim = local.type.tensor_type.shape.dim[entry["axis"]]
    dim.Clear()
    dim.dim_value = entry["heads"] // tp
    return local


def _vocab_parallel_lookup(node, rows: int, rank: int, tp: int, names, new_inits, elem_types, collective) -> list:
    """A token embedding split by vocabulary rows: look up the ids this rank owns, zeros elsewhere, sum.

    ids - first -> in [0, rows/tp)? -> Gather(local table, clamped ids) * in_range -> AllReduce
    """
    table, ids = node.input[0], node.input[1]
    out = node.output[0]
    piece = rows // tp
    id_type = elem_types.get(ids, onnx.TensorProto.INT64)
    id_dtype = helper.tensor_dtype_to_np_dtype(id_type)
    value_type = elem_types.get(out) or elem_types.get(table, onnx.TensorProto.FLOAT)

    def const(label, value, dtype):
        cname = names.fresh(f"{out}.vocab_{label}")
        new_inits.append(numpy_helper.from_array(np.array(value, dtype), cname))
        return cname

    first, size, zero = const("first", rank * piece, id_dtype), const("rows", piece, id_dtype), const("zero", 0, id_dtype)
    last_axis = const("last_axis", [-1], np.int64)
    t = {k: names.fresh(f"{out}.vocab_{k}") for k in ("local", "ge", "lt", "mine", "clamped", "rows_out", "mask",
                                                       "mask_typed", "partial")}
    nodes = [
        helper.make_node("Sub", [ids, first], [t["local"]], name=names.fresh(f"{out}.vocab_Sub")),
        helper.make_node("GreaterOrEqual", [t["local"], zero], [t["ge"]], name=names.fresh(f"{out}.vocab_GE")),
        helper.make_node("Less", [t["local"], size], [t["lt"]], name=names.fresh(f"{out}.vocab_Less")),
        helper.make_node("And", [t["ge"], t["lt"]], [t["mine"]], name=names.fresh(f"{out}.vocab_And")),
        helper.make_node("Where", [t["mine"], t["local"], zero], [t["clamped"]], name=names.fresh(f"{out}.vocab_Where")),
        helper.make_node("Gather", [table, t["clamped"]], [t["rows_out"]], name=names.fresh(f"{out}.vocab_Gather"), axis=0),
        helper.make_node("Unsqueeze", [t["mine"], last_axis], [t["mask"]], name=names.fresh(f"{out}.vocab_Unsqueeze")),
        helper.make_node("Cast", [t["mask"]], [t["mask_typed"]], name=names.fresh(f"{out}.vocab_Cast"), to=value_type),
        helper.make_node("Mul", [t["rows_out"], t["mask_typed"]], [t["partial"]], name=names.fresh(f"{out}.vocab_Mul")),
    ]
    nodes.append(collective("AllReduce", t["partial"], out, out))
    return nodes


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
    beta = node_attrs(node).get("beta", 1.0)
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

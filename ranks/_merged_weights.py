"""The weights of a merged decoder's two branches, held once (see ``_staged_runner``'s docstring).

``share_branch_weights`` reads the large initializers of the main graph (the weights both branches
read) once into ``SharedInitializers`` and writes the two inlined branches with those weights as
placeholders, so that neither inlined copy carries them. A node that computes from weights alone
(GPT-2's ``Transpose`` of the tied LM-head weight) would make ONNX Runtime's ConstantFolding fold a
private copy in each session, and folding a placeholder is not possible; so such nodes are evaluated
here, once for both branches (the same op on the same weights gives one array), their results join
the shared weights and the nodes leave the branches. A weight that nothing reads any more is dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._branches import inline_branch
from ._shared_weights import _FOLDABLE_WEIGHT_BYTES, SharedInitializers


def share_branch_weights(model: onnx.ModelProto) -> tuple[SharedInitializers, dict[bool, onnx.ModelProto]]:
    """(the shared weights, {condition value: that branch inlined, its shared weights as placeholders})."""
    large = {t.name for t in model.graph.initializer if nbytes(t) >= _FOLDABLE_WEIGHT_BYTES}
    shared = SharedInitializers(model, "", names=large)
    skeleton = _with_placeholders(model, set(shared.arrays))
    branches = {which: inline_branch(skeleton, which) for which in (True, False)}
    folded: dict[tuple, list[np.ndarray]] = {}
    for branch in branches.values():
        _fold_weight_nodes(branch, shared, folded)
    read = set()
    for branch in branches.values():
        read |= _reads(branch.graph)
    for name in [n for n in shared.arrays if n not in read]:
        shared.drop(name)
    return shared, branches


def placeholder(init: onnx.TensorProto) -> onnx.TensorProto:
    """An initializer with ``init``'s name, type and shape and no data, for a value add_initializer gives:
    external data at ``"."``, which a session resolves against ``/`` (``StageWeights.apply``): it exists, so
    ONNX Runtime's path check on load passes, and it is never read."""
    tensor = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "."), ("offset", "0"), ("length", str(nbytes(init)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def nbytes(init: onnx.TensorProto) -> int:
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize


def _with_placeholders(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers in ``names`` are placeholders (the weights are not copied)."""
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(out.graph, field, value)
    out.graph.initializer.extend(placeholder(t) if t.name in names else t for t in model.graph.initializer)
    return out


def _copy_field(message, field, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(message, field.name).extend(value)
    elif hasattr(value, "CopyFrom"):  # a message
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _fold_weight_nodes(branch: onnx.ModelProto, shared: SharedInitializers, folded: dict) -> None:
    """Evaluate the nodes of ``branch`` that compute from shared weights (and small constants) alone."""
    from onnx.reference import ReferenceEvaluator

    graph = branch.graph
    small = {t.name: t for t in graph.initializer if t.name not in shared.arrays and t.data_location != t.EXTERNAL}
    outputs = {o.name for o in graph.output}  # a graph output stays computed: a stage gives it
    kept, placeholders = [], []
    for node in graph.node:
        inputs = [n for n in node.input if n]
        reads_shared = any(n in shared.arrays for n in inputs)
        constant = all(n in shared.arrays or n in small for n in inputs)
        if (node.op_type == "Constant" or not reads_shared or not constant or len(node.output) != 1
                or node.output[0] in outputs
                or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)):
            kept.append(node)
            continue
        key = (node.domain, node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))
        if key not in folded:
            feeds = {n: shared.arrays[n] if n in shared.arrays else numpy_helper.to_array(small[n]) for n in inputs}
            try:
                folded[key] = [np.asarray(v, order="C") for v in ReferenceEvaluator(node).run(None, feeds)]
            except Exception:  # noqa: BLE001 - an op the reference cannot run stays a node (ConstantFolding is off then)
                folded[key] = None
        taken = shared.arrays.get(node.output[0])
        if folded[key] is None or (taken is not None and taken is not folded[key][0]):
            kept.append(node)  # (a name the other branch gave another value: left to ONNX Runtime)
            continue
        array = folded[key][0]
        shared.add(node.output[0], array)
        tensor = onnx.TensorProto(name=node.output[0], data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape)
        placeholders.append(placeholder(tensor))
    if len(kept) == len(graph.node):
        return
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(placeholders)
    names = {t.name for t in placeholders}
    infos = [vi for vi in graph.value_info if vi.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of ``graph`` reads, inside its subgraphs too."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for g in [attr.g] if attr.type == attr.GRAPH else list(attr.graphs):
                names |= _reads(g)
    return names

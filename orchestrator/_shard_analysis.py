"""Deciding how to split: propagate "which axis of which tensor is cut across ranks" through the graph.

Every tensor is either whole on every rank (replicated, the default) or cut
along one axis into ``tp`` contiguous equal pieces in rank order (a ``Split``).
A split starts at a *seed*: a linear layer (MatMul / Gemm with a constant 2-D
weight) whose input is whole, cut by output columns. Walking the nodes in
order, each node either carries a split through (elementwise ops, Reshape
of whole heads, Transpose, batched MatMul over a cut batch axis, Softmax /
LayerNorm over an uncut axis, ...), ends it with a partial sum (a linear
layer cut by input rows, or a MatMul contracting over the cut axis: one
AllReduce right after it), or cannot take it: then the tensor is gathered
whole first (one AllGather). Every rule either keeps the exact global value
reachable or gathers it, so a shard never computes something different.

The result is a ``Plan``: the per-tensor splits, which constants to slice,
which Reshape shapes to rewrite, and where the collectives go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ranks._errors import ShardError
from ranks._staged_runner import outer_references

from ._shard_graph import GraphIndex

UNARY_ELEMENTWISE = {
    "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Softplus",
    "Softsign", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "IsNaN", "IsInf", "Cast", "Identity", "Clip",
    "Dropout", "CastLike",
}
BINARY_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "PRelu", "Mod",
}
# Ops whose extra inputs are parameters, not data: only input 0 carries the split.
PARAMETER_INPUTS = {"Clip", "Dropout", "CastLike"}


@dataclass(frozen=True)
class Split:
    """A tensor cut along ``axis`` (negative, counted from the end) of global size ``dim`` into tp pieces."""

    axis: int
    dim: int
    rank: int | None
    seeds: frozenset[int]

    def position(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis


@dataclass
class Plan:
    tp: int
    allow_replicate: bool = False
    splits: dict[str, Split] = field(default_factory=dict)
    # (node index, input index) -> axis (non-negative) along which that constant input is sliced per rank.
    sliced_inputs: dict[tuple[int, int], int] = field(default_factory=dict)
    # node index -> rewritten (per-rank) shape value of its Reshape shape input.
    reshapes: dict[int, np.ndarray] = field(default_factory=dict)
    # node index -> heads before / per rank (for the manifest).
    reshape_heads: dict[int, tuple[int, int]] = field(default_factory=dict)
    # node indices whose (first) output is a partial sum: AllReduce right after.
    row_parallel: set[int] = field(default_factory=set)
    # node index -> names of split inputs it needs whole (AllGather before it).
    gathers: dict[int, list[str]] = field(default_factory=dict)
    # graph outputs that are split and must be gathered into their name.
    gathered_outputs: list[str] = field(default_factory=list)
    seeds: set[int] = field(default_factory=set)
    replicated_reasons: dict[str, str] = field(default_factory=dict)

    def has_collectives(self) -> bool:
        return bool(self.row_parallel or self.gathers or self.gathered_outputs)


class _Abandon(Exception):
    def __init__(self, seeds: frozenset[int], reason: str):
        super().__init__(reason)
        self.seeds = seeds
        self.reason = reason


def linear_weight(index: GraphIndex, i: int) -> tuple[str, int, int] | None:
    """(weight name, K, N) for a linear layer y = x @ W with W a constant 2-D initializer, else None."""
    node = index.nodes[i]
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if node.op_type == "MatMul":
        shape = index.initializer_shape(node.input[1])
        if shape is None or len(shape) != 2:
            return None
        return node.input[1], shape[0], shape[1]
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        if attrs.get("transA", 0):
            return None
        shape = index.initializer_shape(node.input[1])
        if shape is None or len(shape) != 2:
            return None
        k, n = (shape[1], shape[0]) if attrs.get("transB", 0) else shape
        return node.input[1], k, n
    return None


def plan_split(index: GraphIndex, tp: int, *, allow_replicate: bool) -> Plan:
    """Decide the split for ``tp`` ranks; raises ShardError for head counts / widths tp does not divide."""
    candidates = {i for i in range(len(index.nodes)) if linear_weight(index, i) is not None}
    disabled: dict[int, str] = {}
    while True:
        try:
            plan = _propagate(index, tp, candidates - disabled.keys(), allow_replicate, disabled)
        except _Abandon as exc:
            if not exc.seeds:
                raise ShardError(exc.reason) from None
            for seed in exc.seeds:
                disabled[seed] = exc.reason
            continue
        for seed, reason in disabled.items():
            plan.replicated_reasons[index.node_label(seed)] = reason
        return plan


def _propagate(index: GraphIndex, tp: int, seeds: set[int], allow_replicate: bool, disabled: dict) -> Plan:
    plan = Plan(tp=tp, allow_replicate=allow_replicate)
    splits = plan.splits
    for i, node in enumerate(index.nodes):
        if index.has_subgraph(i):
            for name in outer_references(node):
                if name in splits:
                    # Gathering inside a nested graph would mean rewriting it: keep this split's layers whole.
                    raise _Abandon(splits[name].seeds, f"{name} is read inside a subgraph of {index.node_label(i)}")
        in_splits = {k: splits[name] for k, name in enumerate(node.input) if name in splits}
        if not in_splits:
            if i in seeds:
                _seed(index, plan, i, allow_replicate, disabled)
            continue
        outputs = _carry(index, plan, i, in_splits)
        if outputs is None:
            # Cannot carry the split through this node: gather its split inputs whole first.
            for k, spec in in_splits.items():
                if spec.position() is None:
                    raise _Abandon(spec.seeds, f"the rank of {node.input[k]} is unknown, so it cannot be gathered")
            plan.gathers[i] = sorted({node.input[k] for k in in_splits})
            continue
        for name, spec in outputs.items():
            if spec is not None:
                splits[name] = _with_rank(index, name, spec)
    for name in index.graph_outputs:
        spec = splits.get(name)
        if spec is not None:
            if spec.position() is None:
                raise _Abandon(spec.seeds, f"the rank of graph output {name} is unknown, so it cannot be gathered")
            plan.gathered_outputs.append(name)
    plan.seeds = {s for spec in splits.values() for s in spec.seeds}
    return plan


def _seed(index: GraphIndex, plan: Plan, i: int, allow_replicate: bool, disabled: dict) -> None:
    node = index.nodes[i]
    weight, _k, n = linear_weight(index, i)
    label = index.node_label(i)
    if n % plan.tp:
        reason = (
            f"tensor-parallel degree {plan.tp} does not divide the hidden size {n} "
            f"(output columns of weight {weight} in {label})"
        )
        if not allow_replicate:
            raise ShardError(reason + "; choose a --tp that divides it, or --allow-replicate to keep it whole")
        disabled[i] = reason
        return
    rank = index.rank(node.input[0])
    if node.op_type == "Gemm":
        transb = _attrs(node).get("transB", 0)
        if len(node.input) > 2 and node.input[2]:
            c_shape = index.initializer_shape(node.input[2])
            if c_shape is None:
                disabled[i] = f"the bias of {label} is not a constant"
                return
            if c_shape and c_shape[-1] == n:
                if len(c_shape) == 2 and c_shape[0] != 1:
                    disabled[i] = f"the bias of {label} has shape {list(c_shape)}, not a row vector"
                    return
                plan.sliced_inputs[(i, 2)] = len(c_shape) - 1
        plan.sliced_inputs[(i, 1)] = 0 if transb else 1
        rank = 2
    else:
        plan.sliced_inputs[(i, 1)] = 1
    plan.splits[node.output[0]] = _with_rank(index, node.output[0], Split(-1, n, rank, frozenset({i})))


def _carry(index: GraphIndex, plan: Plan, i: int, in_splits: dict[int, Split]) -> dict[str, Split | None] | None:
    """Output splits of node ``i`` given its split inputs; None when it needs them whole."""
    node = index.nodes[i]
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or index.has_subgraph(i):
        return None
    seeds = frozenset().union(*(s.seeds for s in in_splits.values()))
    first = next(iter(in_splits.values()))
    if op in ("MatMul", "Gemm"):
        return _carry_matmul(index, plan, i, in_splits, seeds)
    if op in UNARY_ELEMENTWISE:
        if set(in_splits) != {0}:
            return None
        if op == "Dropout" and len(node.output) > 1 and node.output[1]:
            return None
        return {node.output[0]: Split(first.axis, first.dim, first.rank, seeds)}
    if op in BINARY_ELEMENTWISE:
        return _carry_elementwise(index, plan, i, in_splits, seeds)
    if op == "Transpose":
        pos = first.position()
        if pos is None:
            return None
        perm = _attrs(node).get("perm") or list(reversed(range(first.rank)))
        new_pos = list(perm).index(pos)
        return {node.output[0]: Split(new_pos - first.rank, first.dim, first.rank, seeds)}
    if op == "Reshape":
        return _carry_reshape(index, plan, i, first, seeds)
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        pos = first.position()
        if pos is None:
            return None
        default = -1 if index.opset >= 13 else 1
        axis = _attrs(node).get("axis", default)
        axis = axis + first.rank if axis < 0 else axis
        safe = pos != axis if index.opset >= 13 else pos < axis
        return {node.output[0]: first} if safe and set(in_splits) == {0} else None
    if op == "LayerNormalization":
        pos = first.position()
        if pos is None or set(in_splits) != {0} or any(node.output[1:]):
            return None
        axis = _attrs(node).get("axis", -1)
        axis = axis + first.rank if axis < 0 else axis
        return {node.output[0]: first} if pos < axis else None
    if op == "Shape":
        pos = first.position()
        if pos is None:
            return None
        attrs = _attrs(node)
        start = attrs.get("start", 0)
        end = attrs.get("end", first.rank)
        start = max(0, start + first.rank if start < 0 else start)
        end = min(first.rank, end + first.rank if end < 0 else end)
        # The shape of the uncut axes is the same on every rank as in the whole model.
        return {node.output[0]: None} if not start <= pos < end else None
    return None


def _carry_matmul(index, plan, i, in_splits, seeds):
    node = index.nodes[i]
    linear = linear_weight(index, i)
    if linear is not None and set(in_splits) == {0}:
        weight, k, _n = linear
        spec = in_splits[0]
        if spec.axis == -1:
            if spec.dim != k:
                return None
            # Row-parallel: each rank contracts its slice of K; the partial sums meet in one AllReduce.
            transb = node.op_type == "Gemm" and _attrs(node).get("transB", 0)
            plan.sliced_inputs[(i, 1)] = 1 if transb else 0
            plan.row_parallel.add(i)
            return {node.output[0]: None}
        if node.op_type == "Gemm":
            if spec.axis != -2 or len(node.input) > 2 and node.input[2] and _dim_at(index, node.input[2], -2) not in (None, 1):
                return None
            return {node.output[0]: Split(-2, spec.dim, 2, seeds)}
        # x cut along a row or batch axis: every rank multiplies its rows by the whole weight.
        return {node.output[0]: Split(spec.axis, spec.dim, spec.rank, seeds)}
    if node.op_type != "MatMul":
        return None
    ra, rb = index.rank(node.input[0]), index.rank(node.input[1])
    sa, sb = in_splits.get(0), in_splits.get(1)
    ra = sa.rank if sa is not None and sa.rank is not None else ra
    rb = sb.rank if sb is not None and sb.rank is not None else rb
    if ra is None or rb is None or ra < 2 or rb < 2:
        return None
    out_rank = max(ra, rb)
    if sa is not None and sb is not None:
        if sa.axis == sb.axis and sa.axis <= -3 and sa.dim == sb.dim:
            return {node.output[0]: Split(sa.axis, sa.dim, out_rank, seeds)}
        if sa.axis == -1 and sb.axis == -2 and sa.dim == sb.dim:
            plan.row_parallel.add(i)
            return {node.output[0]: None}
        return None
    if sa is not None:
        if sa.axis == -2:
            return {node.output[0]: Split(-2, sa.dim, out_rank, seeds)}
        if sa.axis <= -3 and _broadcasts_over(index, node.input[1], sa.axis):
            return {node.output[0]: Split(sa.axis, sa.dim, out_rank, seeds)}
        return None
    if sb.axis == -1:
        return {node.output[0]: Split(-1, sb.dim, out_rank, seeds)}
    if sb.axis <= -3 and _broadcasts_over(index, node.input[0], sb.axis):
        return {node.output[0]: Split(sb.axis, sb.dim, out_rank, seeds)}
    return None


def _carry_elementwise(index, plan, i, in_splits, seeds):
    node = index.nodes[i]
    specs = list(in_splits.values())
    first = specs[0]
    if any(s.axis != first.axis or s.dim != first.dim for s in specs):
        return None
    ranks = []
    slices = {}
    for k, name in enumerate(node.input):
        if not name:
            continue
        if k in in_splits:
            ranks.append(in_splits[k].rank)
            continue
        shape = index.shape(name)
        if shape is None:
            return None
        ranks.append(len(shape))
        pos = len(shape) + first.axis
        if pos < 0 or shape[pos] == 1:
            continue  # broadcasts along the cut axis: the same value on every rank is right
        if shape[pos] == first.dim and name in index.initializers:
            slices[(i, k)] = pos  # a per-channel constant (a bias): each rank takes its piece
            continue
        return None
    plan.sliced_inputs.update(slices)
    rank = None if any(r is None for r in ranks) else max(ranks)
    return {node.output[0]: Split(first.axis, first.dim, rank, seeds)}


def _carry_reshape(index, plan, i, spec, seeds):
    node = index.nodes[i]
    if _attrs(node).get("allowzero", 0) or node.input[1] in plan.splits:
        return None
    target = index.constant_value(node.input[1])
    in_shape = index.shape(node.input[0])
    if target is None or spec.rank is None or in_shape is None or len(in_shape) != spec.rank:
        return None
    target = [int(v) for v in target.reshape(-1)]
    pos = spec.position()
    if len(target) <= pos:
        return None
    # Axes before the cut must come through unchanged.
    for d in range(pos):
        if target[d] == 0 or (isinstance(in_shape[d], int) and target[d] == in_shape[d]):
            continue
        return None
    block = target[pos:]
    if any(v == 0 for v in block) or block.count(-1) > 1:
        return None
    tail = in_shape[pos + 1 :]
    known = [v for v in block if v != -1]
    if -1 in block:
        if block[0] == -1:
            # The cut axis is inferred: fine when the rest of the block is fixed.
            if not all(isinstance(d, int) for d in tail):
                return None
            inner = int(np.prod(tail, dtype=np.int64)) * spec.dim
            rest = int(np.prod(block[1:], dtype=np.int64))
            if rest <= 0 or inner % rest or (inner // rest) % plan.tp:
                return None
            heads = inner // rest
            new_block = block
        else:
            return None
    else:
        if not all(isinstance(d, int) for d in tail):
            return None
        if int(np.prod(known, dtype=np.int64)) != spec.dim * int(np.prod(tail, dtype=np.int64)):
            return None
        heads = block[0]
        if heads % plan.tp:
            raise _Abandon(
                seeds if plan.allow_replicate else frozenset(),
                f"tensor-parallel degree {plan.tp} does not divide the head count {heads} "
                f"(Reshape {index.node_label(i)} to {target}, shape input {node.input[1]})",
            )
        new_block = [heads // plan.tp] + block[1:]
    new_target = np.array(target[:pos] + new_block, dtype=np.int64)
    if new_target.tolist() != target:
        plan.reshapes[i] = new_target
        if len(block) > 1:  # splitting the width into (heads, head_dim): record the head count
            plan.reshape_heads[i] = (heads, heads // plan.tp)
    out_rank = len(target)
    return {node.output[0]: Split(pos - out_rank, heads, out_rank, seeds)}


def _with_rank(index: GraphIndex, name: str, spec: Split) -> Split:
    """Fill in an unknown rank from the tensor's declared or inferred shape."""
    if spec.rank is None and index.rank(name) is not None:
        return Split(spec.axis, spec.dim, index.rank(name), spec.seeds)
    return spec


def _dim_at(index: GraphIndex, name: str, axis: int):
    shape = index.shape(name)
    if shape is None:
        return "unknown"
    pos = len(shape) + axis
    return None if pos < 0 else shape[pos]


def _broadcasts_over(index: GraphIndex, name: str, axis: int) -> bool:
    """True when tensor ``name`` has no dimension, or a dimension of 1, at ``axis`` (counted from the end)."""
    dim = _dim_at(index, name, axis)
    return dim is None or dim == 1


def _attrs(node) -> dict:
    return {a.name: _attr_value(a) for a in node.attribute}


def _attr_value(attr):
    from onnx import helper

    return helper.get_attribute_value(attr)

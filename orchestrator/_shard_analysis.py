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

Models as exporters write them add a few rules:

- Reshape targets are followed by concrete shapes (dynamic dimensions get
  stand-in values, ``_shard_graph``), so a target computed at run time
  (``Concat(Shape(x)[0], Shape(x)[1], 192)``) is understood, and a per-rank
  copy of that Concat carries this rank's constants where they differ.
- A ``Split`` of a cut axis into equal parts (fused QKV) restarts the plan
  with that projection cut per part (``Split.outer``): each rank holds its
  heads of Q, of K and of V.
- Heads that ``tp`` does not divide (grouped-query attention's key/value
  heads) stay whole; a rank slices out the part its query heads read.
- A token embedding (Gather from a table indexed by a graph input) is cut by
  vocabulary rows, its partial rows summed by one AllReduce; a tied LM head
  (``MatMul(x, Transpose(table))``) is cut by vocabulary like any column layer.

- A decoder's key/value cache (``_shard_cache``): each past input is cut by heads
  (axis 1 of [batch, heads, past, head_dim]) when ``tp`` divides its heads, so the
  ``Concat`` with this step's keys/values carries the cut, and its present output
  stays cut (not gathered): each rank keeps its own heads' cache.

The result is a ``Plan`` (``_shard_plan``): the per-tensor splits, which
constants to slice, which shape inputs to rewrite, and where the collectives
go. The rules for Reshape, Expand and shape values are in ``_shard_shapes``.
"""

from __future__ import annotations


import numpy as np

from ranks._errors import ShardError
from ranks._staged_runner import outer_references

from ._shard_graph import GraphIndex
from ._shard_plan import Abandon, Plan, Regroup, Split, node_attrs, slice_key
from ._shard_shapes import carry_expand, carry_reshape, check_local_shapes

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


def linear_weight(index: GraphIndex, i: int) -> tuple[str, int, int] | None:
    """(weight name, K, N) for a linear layer y = x @ W with W a constant 2-D initializer, else None."""
    node = index.nodes[i]
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    if node.op_type == "MatMul":
        shape = index.initializer_shape(node.input[1])
        if shape is None:
            t = transposed_weight(index, i)
            if t is None:
                return None
            shape = index.initializer_shape(index.nodes[t].input[0])
            return index.nodes[t].input[0], shape[1], shape[0]
        if len(shape) != 2:
            return None
        return node.input[1], shape[0], shape[1]
    if node.op_type == "Gemm":
        attrs = node_attrs(node)
        if attrs.get("transA", 0):
            return None
        shape = index.initializer_shape(node.input[1])
        if shape is None or len(shape) != 2:
            return None
        k, n = (shape[1], shape[0]) if attrs.get("transB", 0) else shape
        return node.input[1], k, n
    return None


def transposed_weight(index: GraphIndex, i: int) -> int | None:
    """Index of a Transpose node that turns a constant 2-D initializer into input 1 of MatMul ``i``, else None.

    A tied LM head reads the token embedding ``[vocab, width]`` this way (GPT-2 as exported by torch).
    """
    t = index.producer.get(index.nodes[i].input[1])
    if t is None:
        return None
    node = index.nodes[t]
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    shape = index.initializer_shape(node.input[0])
    perm = node_attrs(node).get("perm") or [1, 0]
    if shape is None or len(shape) != 2 or list(perm) != [1, 0]:
        return None
    if index.consumers.get(node.output[0], []) != [i] or node.output[0] in index.graph_outputs:
        return None
    return t


def token_embedding(index: GraphIndex, i: int, tp: int) -> int | None:
    """Rows of the table when node ``i`` is a token embedding lookup that can be split by vocabulary rows.

    A Gather (axis 0) from a constant 2-D table whose indices come from a graph input (through
    Reshape/Cast/Squeeze...): that is the token ids. Position and token-type tables are indexed by
    computed values and stay whole: they are small, and splitting them would cost one more all-reduce.
    """
    node = index.nodes[i]
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node_attrs(node).get("axis", 0) != 0:
        return None
    shape = index.initializer_shape(node.input[0])
    if shape is None or len(shape) != 2 or shape[0] % tp or shape[0] < 2 * tp:
        return None
    name = node.input[1]
    for _ in range(8):
        if name in index.graph_inputs:
            # Position ids are a graph input of a decoder step with its cache: that table stays whole.
            return None if any(w in name.lower() for w in _NOT_TOKEN_IDS) else shape[0]
        p = index.producer.get(name)
        if p is None or index.nodes[p].op_type not in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"):
            return None
        name = index.nodes[p].input[0]
    return None


_NOT_TOKEN_IDS = ("position", "token_type", "segment")


def plan_split(index: GraphIndex, tp: int, *, allow_replicate: bool, cache: dict[str, str] | None = None,
               presents: list[str] | None = None) -> Plan:
    """Decide the split for ``tp`` ranks; raises ShardError for head counts / widths tp does not divide."""
    candidates = {i for i in range(len(index.nodes)) if linear_weight(index, i) is not None}
    disabled: dict[int, str] = {}
    seed_outer: dict[int, int] = {}
    heads_reasons: list[str] = []
    for _ in range(4 * len(candidates) + 8):
        try:
            plan = _propagate(index, tp, candidates - disabled.keys(), allow_replicate, disabled, seed_outer,
                              cache or {}, presents or [])
        except Regroup as exc:
            for seed in exc.seeds:
                seed_outer[seed] = seed_outer.get(seed, 1) * exc.factor
            continue
        except Abandon as exc:
            if not exc.seeds:
                raise ShardError(exc.reason) from None
            if exc.heads:
                heads_reasons.append(exc.reason)
            for seed in exc.seeds:
                disabled[seed] = exc.reason
            continue
        if heads_reasons and not plan.reshape_heads and not allow_replicate:
            # No attention could be cut: the head count is the user's problem, not something to work around.
            raise ShardError(heads_reasons[0] + "; choose a --tp that divides it, or --allow-replicate to keep it whole")
        for seed, reason in disabled.items():
            plan.replicated_reasons[index.node_label(seed)] = reason
        plan.seed_outer = dict(seed_outer)
        return plan
    raise ShardError("the split plan did not settle (a bug in the slicer): pass --allow-replicate")


def _propagate(index: GraphIndex, tp: int, seeds: set[int], allow_replicate: bool, disabled: dict,
               seed_outer: dict, cache: dict[str, str], presents: list[str]) -> Plan:
    plan = Plan(tp=tp, allow_replicate=allow_replicate)
    plan.seed_outer = seed_outer
    splits = plan.splits
    for past in cache:
        # The cache is cut by heads where the attention it feeds can be (checked against the present below).
        shape = index.shape(past)
        if shape is not None and len(shape) == 4 and isinstance(shape[1], int) and shape[1] % tp == 0:
            splits[past] = Split(-3, shape[1], 4, frozenset())
    for i, node in enumerate(index.nodes):
        if i in seeds and i not in disabled:
            t = transposed_weight(index, i)
            if t is not None:
                plan.transposed_weights[i] = t
        if token_embedding(index, i, tp) is not None and not any(n in splits for n in node.input):
            plan.embeddings[i] = index.initializer_shape(node.input[0])[0]
            plan.sliced_inputs[(i, 0)] = 0
            continue
        if index.has_subgraph(i):
            for name in outer_references(node):
                if name in splits:
                    # Gathering inside a nested graph would mean rewriting it: keep this split's layers whole.
                    raise Abandon(splits[name].seeds, f"{name} is read inside a subgraph of {index.node_label(i)}")
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
                    raise Abandon(spec.seeds, f"the rank of {node.input[k]} is unknown, so it cannot be gathered")
            for k, spec in in_splits.items():
                if spec.outer != 1:
                    raise Abandon(spec.seeds, f"{node.input[k]} would have to be gathered whole for "
                                               f"{index.node_label(i)}, and its pieces are interleaved")
            plan.gathers[i] = sorted({node.input[k] for k in in_splits})
            continue
        for name, spec in outputs.items():
            if spec is not None:
                splits[name] = _with_rank(index, name, spec)
    kept = _check_cache(index, plan, cache) | _lone_presents(plan, presents)
    for name in index.graph_outputs:
        spec = splits.get(name)
        if spec is not None and name not in kept:
            if spec.position() is None or spec.outer != 1:
                raise Abandon(spec.seeds, f"graph output {name} cannot be gathered whole")
            plan.gathered_outputs.append(name)
    check_local_shapes(index, plan)
    plan.seeds = {s for spec in splits.values() for s in spec.seeds}
    # A transposed (tied) weight's Transpose reads the initializer: slice it there, by rows.
    for i, t in list(plan.transposed_weights.items()):
        if i in plan.seeds and (i, 1) in plan.sliced_inputs:
            del plan.sliced_inputs[(i, 1)]
            plan.sliced_inputs[(t, 0)] = slice_key(0, plan.seed_outer.get(i, 1))
        elif i in plan.row_parallel and (i, 1) in plan.sliced_inputs:
            del plan.sliced_inputs[(i, 1)]
            plan.sliced_inputs[(t, 0)] = 1
        else:
            del plan.transposed_weights[i]
    return plan


def _check_cache(index: GraphIndex, plan: Plan, cache: dict[str, str]) -> set[str]:
    """Each past and its present cut alike (each rank keeps its present as its next past), or both whole."""
    for past, present in cache.items():
        before, after = plan.splits.get(past), plan.splits.get(present)
        shape = index.shape(past) or [None] * 4
        heads = shape[1] if len(shape) == 4 else None
        if before is None and after is None:
            plan.cache[past] = {"past": past, "present": present, "axis": None, "heads": heads, "heads_per_rank": heads}
            continue
        if before is None:
            raise Abandon(after.seeds, f"{present} would be cut by heads while {past} stays whole")
        if after is None or (after.position(), after.dim, after.outer) != (before.position(), before.dim, before.outer):
            readers = ", ".join(index.node_label(c) for c in index.consumers.get(past, []))
            raise ShardError(
                f"the cache input {past} is cut by heads ({before.dim} -> {before.dim // plan.tp} per rank), but its "
                f"present output {present} does not come out cut the same way (read by {readers or 'nothing'}); "
                f"a rank could not keep its present as its next past"
            )
        for i, names in plan.gathers.items():
            if past in names:
                raise ShardError(f"the cache input {past} would be gathered whole for {index.node_label(i)}")
        plan.cache[past] = {"past": past, "present": present, "axis": before.position(), "heads": before.dim,
                            "heads_per_rank": before.dim // plan.tp}
    return set(cache.values())


def _lone_presents(plan: Plan, presents: list[str]) -> set[str]:
    """A prefill graph's presents: cut by heads, each rank keeps its piece (the decode graph's pasts are cut alike)."""
    kept = set()
    for name in presents:
        spec = plan.splits.get(name)
        if spec is None:
            plan.cache[name] = {"past": None, "present": name, "axis": None, "heads": None, "heads_per_rank": None}
        elif spec.rank == 4 and spec.position() == 1 and spec.outer == 1:
            plan.cache[name] = {"past": None, "present": name, "axis": 1, "heads": spec.dim,
                                "heads_per_rank": spec.dim // plan.tp}
            kept.add(name)
    return kept


def _seed(index: GraphIndex, plan: Plan, i: int, allow_replicate: bool, disabled: dict) -> None:
    node = index.nodes[i]
    weight, _k, n = linear_weight(index, i)
    label = index.node_label(i)
    if n % plan.tp:
        reason = (
            f"tensor-parallel degree {plan.tp} does not divide the hidden size {n} "
            f"(output columns of weight {weight} in {label})"
        )
        if node.output[0] in index.graph_outputs:
            # An LM head over a vocabulary tp does not divide (GPT-2's 50257): whole on every rank, no gather.
            disabled[i] = reason + "; an output layer, so it stays whole"
            return
        if not allow_replicate:
            raise ShardError(reason + "; choose a --tp that divides it, or --allow-replicate to keep it whole")
        disabled[i] = reason
        return
    outer = plan.seed_outer.get(i, 1)
    if n % (outer * plan.tp):
        disabled[i] = f"{label}: {n} columns do not make {outer} parts of {plan.tp} pieces"
        return
    rank = index.rank(node.input[0])
    if node.op_type == "Gemm":
        transb = node_attrs(node).get("transB", 0)
        if len(node.input) > 2 and node.input[2]:
            c_shape = index.initializer_shape(node.input[2])
            if c_shape is None:
                disabled[i] = f"the bias of {label} is not a constant"
                return
            if c_shape and c_shape[-1] == n:
                if len(c_shape) == 2 and c_shape[0] != 1:
                    disabled[i] = f"the bias of {label} has shape {list(c_shape)}, not a row vector"
                    return
                plan.sliced_inputs[(i, 2)] = slice_key(len(c_shape) - 1, outer)
        plan.sliced_inputs[(i, 1)] = slice_key(0 if transb else 1, outer)
        rank = 2
    else:
        plan.sliced_inputs[(i, 1)] = slice_key(1, outer)
    plan.splits[node.output[0]] = _with_rank(index, node.output[0], Split(-1, n // outer, rank, frozenset({i}), outer))


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
        return {node.output[0]: first.moved(first.axis, first.rank, seeds)}
    if op in BINARY_ELEMENTWISE:
        return _carry_elementwise(index, plan, i, in_splits, seeds)
    pos = first.position()
    if pos is None:
        return None
    if op == "Transpose":
        perm = node_attrs(node).get("perm") or list(reversed(range(first.rank)))
        new_pos = list(perm).index(pos)
        return {node.output[0]: first.moved(new_pos - first.rank, first.rank, seeds)}
    if op in ("Reshape", "Expand"):
        if set(in_splits) != {0}:
            return None
        if op == "Reshape":
            return carry_reshape(index, plan, i, first, seeds)
        return carry_expand(index, plan, i, first, seeds)
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        default = -1 if index.opset >= 13 else 1
        axis = node_attrs(node).get("axis", default)
        axis = axis + first.rank if axis < 0 else axis
        safe = pos != axis if index.opset >= 13 else pos < axis
        return {node.output[0]: first} if safe and set(in_splits) == {0} else None
    if op == "LayerNormalization":
        if set(in_splits) != {0} or any(node.output[1:]):
            return None
        axis = node_attrs(node).get("axis", -1)
        axis = axis + first.rank if axis < 0 else axis
        return {node.output[0]: first} if pos < axis else None
    if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        axes = _const_axes(index, node, first.rank)
        if axes is None or pos in axes or set(in_splits) != {0}:
            return None
        keep = node_attrs(node).get("keepdims", 1)
        new_pos = pos if keep else pos - sum(1 for a in axes if a < pos)
        rank = first.rank if keep else first.rank - len(axes)
        return {node.output[0]: first.moved(new_pos - rank, rank, seeds)}
    if op == "Shape":
        attrs = node_attrs(node)
        start = attrs.get("start", 0)
        end = attrs.get("end", first.rank)
        start = max(0, start + first.rank if start < 0 else start)
        end = min(first.rank, end + first.rank if end < 0 else end)
        if start <= pos < end:
            # This rank's shape, not the whole model's: fine where it becomes a checked per-rank shape target.
            plan.local_shapes[node.output[0]] = seeds
        # The shape of the uncut axes is the same on every rank as in the whole model.
        return {node.output[0]: None}
    if op in ("Unsqueeze", "Squeeze"):
        if set(in_splits) != {0}:
            return None
        axes = _const_axes(index, node, first.rank + (0 if op == "Squeeze" else _count_axes(index, node)))
        if axes is None:
            return None
        if op == "Unsqueeze":
            rank = first.rank + len(axes)
            kept = [a for a in range(rank) if a not in axes]
            new_pos = kept[pos]
        else:
            if pos in axes:
                return None
            rank = first.rank - len(axes)
            new_pos = pos - sum(1 for a in axes if a < pos)
        return {node.output[0]: first.moved(new_pos - rank, rank, seeds)}
    if op == "Slice":
        if set(in_splits) != {0}:
            return None
        axes = index.constant_value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if axes is None:
            if len(node.input) > 3 and node.input[3]:
                return None
            axes = range(len(index.constant_value(node.input[1]).reshape(-1))) if index.constant_value(node.input[1]) is not None else None
        if axes is None:
            return None
        axes = {int(a) + first.rank if int(a) < 0 else int(a) for a in np.reshape(list(axes), -1)}
        return None if pos in axes else {node.output[0]: first}
    if op == "Concat":
        axis = node_attrs(node).get("axis", 0)
        axis = axis + first.rank if axis < 0 else axis
        specs = [in_splits.get(k) for k in range(len(node.input))]
        if axis == pos or any(s is None or (s.axis, s.dim, s.outer) != (first.axis, first.dim, first.outer) for s in specs):
            return None
        return {node.output[0]: first.moved(first.axis, first.rank, seeds)}
    if op == "Split":
        return _carry_split(index, plan, i, first, seeds)
    return None


def _count_axes(index, node) -> int:
    axes = index.constant_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if axes is None:
        axes = node_attrs(node).get("axes")
    return 0 if axes is None else len(np.reshape(axes, -1))


def _const_axes(index, node, rank: int) -> set[int] | None:
    """The axes of a Reduce/Squeeze/Unsqueeze node (attribute or constant input), non-negative; None when unknown."""
    axes = node_attrs(node).get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant_value(node.input[1])
        if value is None:
            return None
        axes = value.reshape(-1).tolist()
    if axes is None:
        return None
    return {int(a) + rank if int(a) < 0 else int(a) for a in axes}


def _carry_split(index, plan, i, spec, seeds):
    node = index.nodes[i]
    pos = spec.position()
    axis = node_attrs(node).get("axis", 0)
    axis = axis + spec.rank if axis < 0 else axis
    outputs = [o for o in node.output]
    if axis != pos:
        return {o: spec.moved(spec.axis, spec.rank, seeds) for o in outputs if o}
    n = len(outputs)
    sizes = index.constant_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if sizes is not None:
        sizes = [int(v) for v in sizes.reshape(-1)]
        if len(set(sizes)) != 1 or sum(sizes) != spec.length:
            return None
    elif spec.length % n:
        return None
    if spec.outer == 1 and n > 1:
        if spec.dim % (n * plan.tp):
            return None
        # A fused projection (QKV) split into n equal parts: its weight must be cut per part. Start over.
        raise Regroup(seeds, n)
    if spec.outer % n:
        return None
    if sizes is not None:
        plan.input_overrides[(i, 1)] = np.array([s // plan.tp for s in sizes], dtype=np.int64)
    return {o: Split(spec.axis, spec.dim, spec.rank, seeds, spec.outer // n) for o in outputs if o}


def _carry_matmul(index, plan, i, in_splits, seeds):
    node = index.nodes[i]
    linear = linear_weight(index, i)
    if linear is not None and set(in_splits) == {0}:
        weight, k, _n = linear
        spec = in_splits[0]
        if spec.axis == -1:
            if spec.length != k:
                return None
            # Row-parallel: each rank contracts its slice of K; the partial sums meet in one AllReduce.
            transb = node.op_type == "Gemm" and node_attrs(node).get("transB", 0)
            plan.sliced_inputs[(i, 1)] = slice_key(1 if transb else 0, spec.outer)
            plan.row_parallel.add(i)
            plan.pairs[i] = spec.seeds
            return {node.output[0]: None}
        if node.op_type == "Gemm":
            if spec.axis != -2 or len(node.input) > 2 and node.input[2] and _dim_at(index, node.input[2], -2) not in (None, 1):
                return None
            return {node.output[0]: spec.moved(-2, 2, seeds)}
        # x cut along a row or batch axis: every rank multiplies its rows by the whole weight.
        return {node.output[0]: spec.moved(spec.axis, spec.rank, seeds)}
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
        if sa.axis == sb.axis and sa.axis <= -3 and (sa.dim, sa.outer) == (sb.dim, sb.outer):
            return {node.output[0]: sa.moved(sa.axis, out_rank, seeds)}
        if sa.axis == -1 and sb.axis == -2 and (sa.dim, sa.outer) == (sb.dim, sb.outer):
            plan.row_parallel.add(i)
            plan.pairs[i] = seeds
            return {node.output[0]: None}
        return None
    if sa is not None:
        if sa.axis == -2:
            return {node.output[0]: sa.moved(-2, out_rank, seeds)}
        if sa.axis <= -3:
            if _broadcasts_over(index, node.input[1], sa.axis):
                return {node.output[0]: sa.moved(sa.axis, out_rank, seeds)}
            if _take_local_piece(index, plan, i, 1, sa):
                return {node.output[0]: sa.moved(sa.axis, out_rank, seeds)}
        return None
    if sb.axis == -1:
        return {node.output[0]: sb.moved(-1, out_rank, seeds)}
    if sb.axis <= -3:
        if _broadcasts_over(index, node.input[0], sb.axis) or _take_local_piece(index, plan, i, 0, sb):
            return {node.output[0]: sb.moved(sb.axis, out_rank, seeds)}
    return None


def _take_local_piece(index, plan, i, k, spec) -> bool:
    """A whole input with the full cut axis: each rank reads its piece of it (a Slice, no communication).

    This is how key/value heads that cannot be divided (grouped-query attention with fewer key/value
    heads than ranks) stay whole on every rank while the query heads are cut.
    """
    name = index.nodes[i].input[k]
    shape = index.shape(name)
    if shape is None or spec.outer != 1:
        return False
    pos = len(shape) + spec.axis
    if pos < 0 or shape[pos] != spec.length:
        return False
    plan.local_slices[(i, k)] = (pos, spec.length)
    return True


def _carry_elementwise(index, plan, i, in_splits, seeds):
    node = index.nodes[i]
    specs = list(in_splits.values())
    first = specs[0]
    if any((s.axis, s.dim, s.outer) != (first.axis, first.dim, first.outer) for s in specs):
        return None
    ranks = []
    slices = {}
    locals_ = {}
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
        if shape[pos] == first.length and name in index.initializers:
            slices[(i, k)] = slice_key(pos, first.outer)  # a per-channel constant (a bias): each rank takes its piece
            continue
        if shape[pos] == first.length and first.outer == 1:
            locals_[(i, k)] = (pos, first.length)  # whole on every rank: each rank reads its piece
            continue
        return None
    plan.sliced_inputs.update(slices)
    plan.local_slices.update(locals_)
    rank = None if any(r is None for r in ranks) else max(ranks)
    return {node.output[0]: first.moved(first.axis, rank, seeds)}


def _with_rank(index: GraphIndex, name: str, spec: Split) -> Split:
    """Fill in an unknown rank from the tensor's declared or inferred shape."""
    if spec.rank is None and index.rank(name) is not None:
        return spec.moved(spec.axis, index.rank(name))
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

"""Shapes through a split: where a cut axis goes through Reshape and Expand, and shape values per rank.

Exporters compute reshape targets at run time (``Concat(Shape(x)[0], Shape(x)[1], 192)``); the slicer
follows the cut by the concrete shapes of ``_shard_graph`` (dynamic dimensions have stand-in values),
computes each target as the whole model and as one rank would (``GraphIndex.shape_values``), and
where a rank needs its own constant, records a per-rank copy (``Plan.input_overrides`` for a constant
target, ``Plan.concat_overrides`` for a Concat of shape pieces). A shape read from a cut tensor is
per rank by itself: ``check_local_shapes`` makes sure such a value only feeds a target that wants the
rank's own size.
"""

from __future__ import annotations

import numpy as np

from ._shard_graph import GraphIndex
from ._shard_plan import Abandon, Plan, Split, node_attrs


_SHAPE_ARITHMETIC = {"Concat", "Squeeze", "Unsqueeze", "Cast", "Identity"}
# Elementwise ops that exporters also apply to shape vectors (TorchScript's Expand: Where(shape == -1, 1, shape)).
_SHAPE_MATH = {"Mul", "Add", "Sub", "Div", "Equal", "Where", "Max", "Min", "ConstantOfShape", "Shape"}


def _is_shape_vector(index: GraphIndex, name: str) -> bool:
    shape = index.shape(name)
    return shape is not None and len(shape) <= 1 and (not shape or (isinstance(shape[0], int) and shape[0] <= 8))


def check_local_shapes(index: GraphIndex, plan: Plan) -> None:
    """A shape read from a split tensor is per rank: it may only feed shape targets checked to want that."""
    pending = list(plan.local_shapes.items())
    seen = set()
    while pending:
        name, seeds = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.graph_outputs:
            raise Abandon(seeds, f"the shape value {name} differs per rank and is a graph output")
        for c in index.consumers.get(name, []):
            node = index.nodes[c]
            arithmetic = node.op_type in _SHAPE_ARITHMETIC or (
                node.op_type in ("Reshape", "Slice", "Gather") and node.input[0] == name) or (
                node.op_type in _SHAPE_MATH and _is_shape_vector(index, node.output[0]))
            if arithmetic and node.domain in ("", "ai.onnx"):
                pending += [(o, seeds) for o in node.output if o]
            elif c in plan.checked_shape_nodes and list(node.input).index(name) == 1:
                continue
            elif not _holds_local_dims(index, plan, name):
                continue  # the per-rank part was sliced away: Shape(x)[:-1] of x cut on its last axis
            else:
                raise Abandon(seeds, f"the shape value {name} differs per rank and is read by {index.node_label(c)}")


def _holds_local_dims(index: GraphIndex, plan: Plan, name: str) -> bool:
    """True unless shape value ``name`` is known element by element and is the same on every rank."""
    traced = index._values(name, _local_dim(plan), 0)
    return traced is None or any(whole != local for whole, local, _src in traced)


def _local_dim(plan: Plan):
    """local_dim(tensor, axis, whole length) -> its length on one rank, for GraphIndex.shape_values."""
    def local_dim(tensor: str, axis: int, length: int) -> int:
        spec = plan.splits.get(tensor)
        return length // plan.tp if spec is not None and spec.position() == axis else length

    return local_dim


def carry_reshape(index, plan, i, spec, seeds):
    """Where the cut axis goes through a Reshape, and the per-rank target that keeps it there.

    Works on concrete shapes (dynamic dimensions have stand-in values, see ``_shard_graph``): the
    input is (O, d, I) around the cut (O: everything outside, including ``outer`` blocks; d: the cut
    dimension; I: everything inside). The output axis p that starts inside d either holds whole
    multiples of d (merging heads: ``[B, S, H, hd] -> [B, S, H*hd]``) or a divisor of it (splitting
    the width into heads: ``[B, S, D] -> [B, S, H, hd]``, H divisible by tp).
    """
    node = index.nodes[i]
    if node.input[1] in plan.splits:
        return None
    in_shape, out_shape = index.shape(node.input[0]), index.shape(node.output[0])
    if _concrete(in_shape) and not _concrete(out_shape):
        out_shape = _traced_target(index, node, in_shape)
    if not _concrete(in_shape) or not _concrete(out_shape) or len(in_shape) != spec.rank:
        return None
    pos = spec.position()
    if in_shape[pos] != spec.length:
        return None
    outer = int(np.prod(in_shape[:pos], dtype=np.int64)) * spec.outer
    d = spec.dim
    inner = int(np.prod(in_shape[pos + 1:], dtype=np.int64))
    q = 1
    found = None
    for p, size in enumerate(out_shape):
        if outer % q:
            return None
        nxt = q * size
        if nxt <= outer:
            q = nxt
            continue
        if nxt % outer:
            return None
        new_outer, r = outer // q, nxt // outer
        found = (p, new_outer, r)
        break
    if found is None:
        return None
    p, new_outer, r = found
    heads = None
    if r % d == 0:
        if inner % (r // d):
            return None
        new_dim = r
    elif d % r == 0:
        heads = r
        if r % plan.tp:
            raise Abandon(
                seeds,
                f"tensor-parallel degree {plan.tp} does not divide the head count {r} "
                f"(Reshape {index.node_label(i)}, shape input {node.input[1]}); these heads stay whole on "
                f"every rank, each rank reads the ones its query heads use",
                heads=True,
            )
        new_dim = r
    else:
        return None
    if new_dim % plan.tp:
        return None
    local_out = list(out_shape)
    local_out[p] = out_shape[p] // plan.tp
    in_local = list(in_shape)
    in_local[pos] = in_shape[pos] // plan.tp
    allowzero = node_attrs(node).get("allowzero", 0)
    if not _per_rank_target(index, plan, i, local_out, in_local, allowzero, seeds, cut=p):
        return None
    if heads is not None:
        plan.reshape_heads[i] = (heads, heads // plan.tp)
    return {node.output[0]: Split(p - len(out_shape), new_dim, len(out_shape), seeds, new_outer)}


def _traced_target(index, node, in_shape) -> list | None:
    """A Reshape's output shape from its traced target, where shape inference left a dimension unknown.

    With a cache, a target holds ``past + sequence`` computed from two Shape reads, which inference
    does not add up; the stand-in sizes do.
    """
    traced = index.shape_values(node.input[1], lambda tensor, axis, length: length)
    if traced is None:
        return None
    target = [whole for whole, _local, _source in traced[0]]
    allowzero = node_attrs(node).get("allowzero", 0)
    if not allowzero:
        target = [in_shape[j] if v == 0 and j < len(in_shape) else v for j, v in enumerate(target)]
    if target.count(-1) > 1:
        return None
    if -1 in target:
        known = int(np.prod([v for v in target if v != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known <= 0 or total % known:
            return None
        target[target.index(-1)] = total // known
    return target if int(np.prod(target, dtype=np.int64)) == int(np.prod(in_shape, dtype=np.int64)) else None


def carry_expand(index, plan, i, spec, seeds):
    node = index.nodes[i]
    in_shape, out_shape = index.shape(node.input[0]), index.shape(node.output[0])
    if not _concrete(in_shape) or not _concrete(out_shape) or node.input[1] in plan.splits:
        return None
    pos = spec.position()
    out_pos = pos + len(out_shape) - len(in_shape)
    if out_shape[out_pos] != in_shape[pos]:
        return None  # broadcasting the cut axis itself
    target = index.shape_values(node.input[1], _local_dim(plan))
    if target is None or len(target[0]) != len(out_shape):
        return None
    local_out = list(out_shape)
    local_out[out_pos] = out_shape[out_pos] // plan.tp
    if not _per_rank_target(index, plan, i, local_out, None, 0, seeds, cut=out_pos, expand_axis=out_pos):
        return None
    return {node.output[0]: spec.moved(out_pos - len(out_shape), len(out_shape), seeds)}


def _per_rank_target(index, plan, i, local_out, in_local, allowzero, seeds, *, cut: int, expand_axis=None) -> bool:
    """Check (and where needed rewrite) node i's shape input so that each rank computes ``local_out``."""
    node = index.nodes[i]
    traced = index.shape_values(node.input[1], _local_dim(plan))
    if traced is None:
        return False
    elems, concat = traced
    if len(elems) != len(local_out):
        return False
    changes: dict = {}
    for j, (_whole, got, source) in enumerate(elems):
        want = local_out[j]
        if expand_axis is None:
            if got == -1:
                continue  # inferred: the rank's own size
            if got == 0 and not allowzero and in_local is not None:
                got = in_local[j]
        elif got == 1:
            continue  # Expand keeps the input's (per-rank) length
        if got == want:
            continue
        if source is None or j != cut:
            return False  # only the cut axis may differ per rank; anything else means we misread the target
        changes[source] = want
    plan.checked_shape_nodes.add(i)
    if not changes:
        return True
    if concat is None:
        value = index.constant_value(node.input[1]).copy().reshape(-1)
        for (_k, j), want in changes.items():
            value[j] = want
        plan.input_overrides[(i, 1)] = value.reshape(index.constant_value(node.input[1]).shape)
        return True
    parts = {}
    for (k, j), want in changes.items():
        if k not in parts:
            parts[k] = index.constant_value(index.nodes[concat].input[k]).copy()
        flat = parts[k].reshape(-1)
        flat[j] = want
    plan.concat_overrides[i] = (concat, parts)
    return True


def _concrete(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)

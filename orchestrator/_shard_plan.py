"""The slicer's vocabulary: how a tensor is cut (``Split``), the decisions made (``Plan``), and the signals
the propagation uses to start over (``Abandon``: keep some layers whole; ``Regroup``: cut a fused
projection per part)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Split:
    """A tensor cut along ``axis`` (negative, counted from the end) into tp pieces.

    The axis is ``outer`` blocks of ``dim`` each (length ``outer * dim``); every rank holds its
    ``dim / tp`` piece of every block. ``outer`` is 1 for a plain column split; 3 for a fused QKV
    projection cut per head (each rank holds its heads of Q, of K and of V); the batch size when
    a Reshape has merged the batch axis into the heads axis (``[B, H, S, d] -> [B*H, S, d]``).
    """

    axis: int
    dim: int
    rank: int | None
    seeds: frozenset[int]
    outer: int = 1

    def position(self) -> int | None:
        return None if self.rank is None else self.rank + self.axis

    def moved(self, axis: int, rank: int | None, seeds: frozenset[int] | None = None) -> "Split":
        return Split(axis, self.dim, rank, self.seeds if seeds is None else seeds, self.outer)

    @property
    def length(self) -> int:
        return self.outer * self.dim


@dataclass
class Plan:
    tp: int
    allow_replicate: bool = False
    splits: dict[str, Split] = field(default_factory=dict)
    # (node index, input index) -> how that constant input is sliced per rank: an axis (non-negative),
    # or (axis, outer) when the axis is ``outer`` blocks each cut into tp pieces (see Split).
    sliced_inputs: dict[tuple[int, int], object] = field(default_factory=dict)
    # (node index, input index) -> per-rank value of a constant input (a Reshape target, Split sizes).
    input_overrides: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    # node index -> (Concat node index, {Concat input index: per-rank value}): a run-time shape target
    # computed by that Concat is computed per rank by a copy of it with these constants.
    concat_overrides: dict[int, tuple[int, dict]] = field(default_factory=dict)
    # (node index, input index) -> (axis, length): a whole tensor this rank only needs its piece of.
    local_slices: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    # Gather node index -> vocabulary rows: token embedding split by rows, partial rows summed.
    embeddings: dict[int, int] = field(default_factory=dict)
    # linear node index -> index of the Transpose node that feeds it its (tied) weight.
    transposed_weights: dict[int, int] = field(default_factory=dict)
    # tensor computed from the shape of a split tensor (its value differs per rank) -> seeds.
    local_shapes: dict[str, frozenset] = field(default_factory=dict)
    # nodes whose shape input was checked to give the per-rank value it needs.
    checked_shape_nodes: set[int] = field(default_factory=set)
    # seed node index -> outer (blocks of a fused projection, e.g. 3 for QKV).
    seed_outer: dict[int, int] = field(default_factory=dict)
    # row-parallel node index -> the column-parallel seeds whose cut it ends (a Megatron pair).
    pairs: dict[int, frozenset] = field(default_factory=dict)
    # node index -> heads before / per rank (for the manifest).
    reshape_heads: dict[int, tuple[int, int]] = field(default_factory=dict)
    # node indices whose (first) output is a partial sum: AllReduce right after.
    row_parallel: set[int] = field(default_factory=set)
    # node index -> names of split inputs it needs whole (AllGather before it).
    gathers: dict[int, list[str]] = field(default_factory=dict)
    # graph outputs that are split and must be gathered into their name.
    gathered_outputs: list[str] = field(default_factory=list)
    seeds: set[int] = field(default_factory=set)
    # past input -> {"past", "present", "axis", "heads", "heads_per_rank"}: a decoder's key/value cache
    # (``_shard_cache``); heads_per_rank equals heads when the cache stays whole on every rank.
    cache: dict[str, dict] = field(default_factory=dict)
    replicated_reasons: dict[str, str] = field(default_factory=dict)

    def has_collectives(self) -> bool:
        return bool(self.row_parallel or self.gathers or self.gathered_outputs)


class Abandon(Exception):
    def __init__(self, seeds: frozenset[int], reason: str, heads: bool = False):
        super().__init__(reason)
        self.seeds = seeds
        self.reason = reason
        self.heads = heads


class Regroup(Exception):
    """A fused projection's output is split into ``factor`` equal parts: cut its weight per part."""

    def __init__(self, seeds: frozenset[int], factor: int):
        super().__init__(f"regroup {sorted(seeds)} by {factor}")
        self.seeds = seeds
        self.factor = factor


def slice_key(axis: int, outer: int):
    return axis if outer == 1 else (axis, outer)


def node_attrs(node) -> dict:
    return {a.name: _attr_value(a) for a in node.attribute}


def _attr_value(attr):
    from onnx import helper

    return helper.get_attribute_value(attr)

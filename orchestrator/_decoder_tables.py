"""A decoder's lookup tables: how many token ids its embedding holds, how many positions its position table.

GPT-2-style exports look positions up in a fixed table (``Gather(wpe, position_ids)``, 1024 rows in
GPT-2, 128 in our fixture); a position past its last row, or a token id past the vocabulary, fails
deep inside ONNX Runtime ("idx=128 must be within the inclusive range [-128,127]"), after ranks have
worked for a while. Knowing the tables' sizes lets a generation refuse up front: "a prompt of 8 tokens
and 200 new tokens need 207 positions; MODEL holds 128". Rotary embeddings (Llama) compute positions
and have no table: no position limit is found.

Both are a ``Gather`` on a 2-D initializer along axis 0. The token embedding's indices are the token
ids' values. A position table's come from the position ids (or, when the graph takes none, from the
attention mask or the inputs' shapes) and not from the ids' values; a token-type table reading its own
input is neither. Subgraphs (the branches of Optimum's merged decoder) are searched too.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

# The names exporters give the token ids and the positions (``_generate`` feeds them by these names too).
IDS_NAMES, POSITIONS_NAMES = ("input_ids",), ("position_ids",)


@dataclass(frozen=True)
class DecoderTables:
    vocabulary: int | None  # rows of the token embedding
    positions: int | None  # rows of the learned position table (None: none, e.g. rotary)


def decoder_tables(model: onnx.ModelProto) -> DecoderTables:
    """The sizes of the decoder's token embedding and position table (None where it has none)."""
    graphs = list(_graphs(model.graph))
    inputs = [i.name for i in model.graph.input]
    initializer_rows = {t.name: int(t.dims[0]) for g in graphs for t in g.initializer if len(t.dims) == 2}
    producers = {out: node for g in graphs for node in g.node for out in node.output if out}
    ids = next((n for n in inputs if n in IDS_NAMES), None)
    if ids is None:
        return DecoderTables(None, None)
    positions = next((n for n in inputs if n in POSITIONS_NAMES), None)
    # Without position ids, positions are counted from the mask or from shapes (the pasts' length plus the
    # ids' length): a Shape counts as reading a shape, not the ids themselves.
    sources = {positions} if positions else {n for n in inputs if "mask" in n} | {_SHAPE + n for n in inputs}
    vocabulary, limits = [], []
    for g in graphs:
        for node in g.node:
            if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in initializer_rows:
                continue
            if any(a.name == "axis" and helper.get_attribute_value(a) != 0 for a in node.attribute):
                continue
            upstream = _upstream_inputs(node.input[1], producers)
            if ids in upstream:
                vocabulary.append(initializer_rows[node.input[0]])
            elif upstream & sources:
                limits.append(initializer_rows[node.input[0]])
    return DecoderTables(min(vocabulary, default=None), min(limits, default=None))


_SHAPE = "shape of "


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _upstream_inputs(name: str, producers: dict[str, onnx.NodeProto]) -> set[str]:
    """The names without a producer (graph inputs, initializers) that ``name`` is computed from; what is
    only read for its shape as ``"shape of NAME"``."""
    seen, leaves, todo = set(), set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        node = producers.get(current)
        if node is None:
            leaves.add(current)
        elif node.op_type == "Shape":
            leaves |= {_SHAPE + leaf for leaf in _upstream_inputs(node.input[0], producers)}
        else:
            todo.extend(n for n in node.input if n)
    return leaves

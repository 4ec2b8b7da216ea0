"""What a split plan does, in words and numbers: ``orchestrate shard --explain``.

Per Megatron pair (column-parallel layers, then the row-parallel layer that ends their cut with one
all-reduce): which layers, whether it is attention (and its heads per rank) or an MLP; the token
embedding and LM head split by vocabulary; what stays whole on every rank and why; the collectives
per rank; and the bytes each rank sends per token against Megatron's minimum for the model.

Bytes are counted as ring algorithms send them: an all-reduce of W bytes sends 2 (tp-1)/tp W from
each rank, an all-gather whose result is W bytes sends (tp-1)/tp W. Megatron's minimum for a
model: two all-reduces of the residual width per transformer block (blocks counted by their
attention Softmax; a model without attention: one per row-parallel layer), one for a token
embedding split by vocabulary, and a gather of each output an LM head computes.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ._shard_analysis import linear_weight, token_embedding
from ._shard_plan import Plan
from ._shard_graph import GraphIndex


def _tokens(index: GraphIndex) -> int:
    """Stand-in value of "one token": the product of the first input's dynamic dimensions (1: per call)."""
    first = next((vi for vi in index.model.graph.input if vi.name not in index.initializers), None)
    if first is None:
        return 1
    dims = [d for d in first.type.tensor_type.shape.dim]
    count = 1
    for d in dims:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            count *= index.stand_ins.get(d.dim_param, 1) if d.dim_param else 1
    return count


def _per_token(index: GraphIndex, name: str, tokens: int) -> int | None:
    shape = index.shape(name)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    total = int(np.prod(shape, dtype=np.int64))
    return total // tokens if total % tokens == 0 else total


def _itemsize(types: dict, name: str) -> int:
    elem = types.get(name)
    return helper.tensor_dtype_to_np_dtype(elem).itemsize if elem else 4


def _sent(op: str, nbytes: float, tp: int) -> float:
    return (2 if op == "AllReduce" else 1) * (tp - 1) / tp * nbytes


def _prefix(names: list[str]) -> str | None:
    """The common part of layer names up to a separator (``h.0.attn.c_attn``, ``h.0.attn.c_proj`` -> ``h.0.attn``)."""
    common = names[0]
    for n in names[1:]:
        while not n.startswith(common):
            common = common[:-1]
    cut = max(common.rfind("."), common.rfind("/"))
    common = common[:cut] if cut > 0 else ""
    return common if len(common) > 3 else None


def explain(index: GraphIndex, plan: Plan, collectives: list[dict], types: dict, model_name: str) -> dict:
    """The structured report (also stored in the manifest as ``explain``); ``format_explain`` words it."""
    tp = plan.tp
    tokens = _tokens(index)
    heads_of: dict[frozenset, tuple[int, int]] = {}
    for i, heads in plan.reshape_heads.items():
        spec = plan.splits.get(index.nodes[i].output[0])
        if spec is not None:
            heads_of[spec.seeds] = heads
    layers = []
    for row, seeds in sorted(plan.pairs.items()):
        weights = [linear_weight(index, s)[0] for s in sorted(seeds) if linear_weight(index, s)]
        row_weight = linear_weight(index, row)
        names = weights + ([row_weight[0]] if row_weight else [])
        heads = next((h for s, h in heads_of.items() if s <= seeds), None)
        reduced = next((c for c in collectives if c["op"] == "AllReduce" and c["tensor"] == index.nodes[row].output[0]),
                       None)
        width = _per_token(index, index.nodes[row].output[0], tokens)
        labels = [index.node_label(s) for s in sorted(seeds)] + [index.node_label(row)]
        layers.append({
            "name": (names and _prefix(names)) or _prefix(labels) or f"pair {len(layers) + 1}",
            "kind": "attention" if heads else "mlp",
            "columns": [index.node_label(s) for s in sorted(seeds)],
            "fused_parts": max((plan.seed_outer.get(s, 1) for s in seeds), default=1),
            "rows": index.node_label(row),
            "heads": list(heads) if heads else None,
            "all_reduce": reduced["node"] if reduced else None,
            "values_per_token": width,
        })
    embeddings = [{"node": index.node_label(i), "table": index.nodes[i].input[0], "rows": rows,
                   "rows_per_rank": rows // tp} for i, rows in sorted(plan.embeddings.items())]
    heads_out = []
    for name in plan.gathered_outputs:
        spec = plan.splits[name]
        heads_out.append({"output": name, "columns": spec.length, "per_rank": spec.length // tp,
                          "layers": [index.node_label(s) for s in sorted(spec.seeds)]})
    replicated = _replicated(index, plan)
    counts: dict[str, int] = {}
    sent = 0.0
    for c in collectives:
        counts[c["op"]] = counts.get(c["op"], 0) + 1
        per = _per_token(index, c["tensor"], tokens)
        if per is not None:
            sent += _sent(c["op"], per * _itemsize(types, c["tensor"]), tp)
    minimum = _megatron_minimum(index, plan, types, tokens)
    return {
        "tp": tp,
        "model": model_name,
        "per": "token" if tokens > 1 else "call",
        "layers": layers,
        "embeddings": embeddings,
        "gathered_outputs": heads_out,
        "replicated": replicated,
        "collectives_per_rank": counts,
        "bytes_sent_per_token_per_rank": sent,
        "megatron_minimum_bytes_per_token_per_rank": minimum,
        "ratio_to_megatron": (sent / minimum) if minimum else None,
    }


def _megatron_minimum(index: GraphIndex, plan: Plan, types: dict, tokens: int) -> float:
    tp = plan.tp
    width = None
    table = next((i for i in range(len(index.nodes)) if token_embedding(index, i, 1) is not None), None)
    if table is not None:
        shape = index.initializer_shape(index.nodes[table].input[0])
        width, item = shape[1], _itemsize(types, index.nodes[table].input[0])
    else:
        first = next((vi for vi in index.model.graph.input if vi.name not in index.initializers), None)
        shape = index.shape(first.name) if first is not None else None
        if not shape or not isinstance(shape[-1], int):
            return 0.0
        width, item = shape[-1], _itemsize(types, first.name)
    blocks = sum(1 for n in index.nodes if n.op_type == "Softmax")
    reduces = 2 * blocks if blocks else len(plan.row_parallel)
    total = reduces * _sent("AllReduce", width * item, tp)
    if table is not None:
        total += _sent("AllReduce", width * item, tp)
    for name in index.graph_outputs:
        producer = index.producer.get(name)
        if producer is not None and linear_weight(index, producer) is not None:
            per = _per_token(index, name, tokens)
            if per is not None:
                total += _sent("AllGather", per * _itemsize(types, name), tp)
    return total


def _replicated(index: GraphIndex, plan: Plan) -> list[dict]:
    """Weights every rank holds whole, by why."""
    from ._shard_rewrite import initializer_uses

    uses = initializer_uses(index, plan)
    groups: dict[str, dict] = {}

    def add(why: str, name: str, nbytes: int):
        g = groups.setdefault(why, {"why": why, "tensors": 0, "bytes": 0, "examples": []})
        g["tensors"] += 1
        g["bytes"] += nbytes
        if len(g["examples"]) < 2:
            g["examples"].append(name)

    for tensor in index.model.graph.initializer:
        if uses.get(tensor.name, {None}) != {None} or tensor.name not in index.initializers:
            continue
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        consumers = index.consumers.get(tensor.name, [])
        ops = {index.nodes[c].op_type for c in consumers}
        linear = [c for c in consumers if linear_weight(index, c) and linear_weight(index, c)[0] == tensor.name]
        if linear:
            label = index.node_label(linear[0])
            why = plan.replicated_reasons.get(label) or "its layer is not on a cut path (no split reaches it)"
            add(f"linear layer kept whole: {why}", tensor.name, nbytes)
        elif any(c in plan.row_parallel for c in consumers) or _bias_after_reduce(index, plan, consumers):
            add("bias of a row-parallel layer: added once, after the all-reduce", tensor.name, nbytes)
        elif "Gather" in ops and len(tensor.dims) == 2:
            add("embedding table indexed by computed positions or types: small; splitting it would cost "
                "one more all-reduce", tensor.name, nbytes)
        elif ops & {"LayerNormalization", "Mul", "Add", "Div", "Sub", "SimplifiedLayerNormalization"} and len(tensor.dims) <= 1 \
                and nbytes > 64:
            add("norm weights and biases: they act on the residual stream, which is whole on every rank",
                tensor.name, nbytes)
        else:
            add("scalars, shape constants and other small tensors", tensor.name, nbytes)
    return sorted(groups.values(), key=lambda g: -g["bytes"])


def _bias_after_reduce(index: GraphIndex, plan: Plan, consumers: list[int]) -> bool:
    for c in consumers:
        node = index.nodes[c]
        if node.op_type != "Add":
            continue
        for name in node.input:
            p = index.producer.get(name)
            if p in plan.row_parallel:
                return True
    return False


def format_explain(report: dict) -> str:
    if report.get("branches"):
        merged = report["merged"]
        lines = [f"merged decoder: If {merged['node']} picks a branch by {merged['condition']}; each branch is "
                 f"planned as its own graph, the weights both read cut alike, and the shards keep both branches"]
        for branch, sub in report["branches"].items():
            lines.append(f"{branch} ({merged['condition']} {'true' if branch == 'then_branch' else 'false'}):")
            lines += ["  " + line for line in format_explain(sub).splitlines()]
        return "\n".join(lines)
    tp = report["tp"]
    per = report["per"]
    lines = [f"plan for {report['model']} at tp={tp} (Megatron: columns, then rows, one all-reduce per pair):"]
    for e in report["embeddings"]:
        lines.append(f"  token embedding {e['node']}: table {e['table']} split by vocabulary rows "
                     f"({e['rows']} -> {e['rows_per_rank']} per rank); each rank looks up the ids it owns, "
                     f"zeros elsewhere; 1 AllReduce")
    for layer in report["layers"]:
        what = layer["kind"]
        if layer["heads"]:
            what += f", heads {layer['heads'][0]} -> {layer['heads'][1]} per rank"
        fused = f" (fused: {layer['fused_parts']} parts, each cut per head)" if layer["fused_parts"] > 1 else ""
        width = f" of {layer['values_per_token']} values per {per}" if layer["values_per_token"] else ""
        lines.append(f"  {layer['name']} ({what}): columns {', '.join(layer['columns'])}{fused} -> rows "
                     f"{layer['rows']}; AllReduce{width}")
    for g in report["gathered_outputs"]:
        lines.append(f"  output {g['output']}: {', '.join(g['layers'])} split by columns ({g['columns']} -> "
                     f"{g['per_rank']} per rank); AllGather of the output")
    for r in report["replicated"]:
        lines.append(f"  whole on every rank: {r['tensors']} tensor{'s' if r['tensors'] != 1 else ''}, {r['bytes'] / 1024:.1f} KiB "
                     f"(e.g. {', '.join(r['examples'])}): {r['why']}")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(report["collectives_per_rank"].items())) or "none"
    lines.append(f"  collectives per rank: {counts}")
    minimum = report["megatron_minimum_bytes_per_token_per_rank"]
    ratio = report["ratio_to_megatron"]
    lines.append(f"  bytes each rank sends per {per}: {report['bytes_sent_per_token_per_rank']:.0f} "
                 f"(Megatron's minimum for this model: {minimum:.0f}"
                 + (f"; ratio {ratio:.2f})" if ratio is not None else ")"))
    return "\n".join(lines)

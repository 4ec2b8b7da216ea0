"""A graph that picks one of two subgraphs by a graph input: Optimum's merged decoder (``use_cache_branch``).

Optimum's ``decoder_model_merged.onnx`` is one ``If`` node whose condition is the bool graph input
``use_cache_branch``: its then branch is the decoder with past keys/values, its else branch the one
without, and both read the weights as initializers of the main graph (outer scope). Because the
condition is a graph input, the branch a call takes is known from its feeds alone, so such a graph
is the same as two plain graphs, one per value of the condition: ``inline_branch`` writes either of
them (the If replaced by that branch's nodes). The slicer plans and rewrites each of those and folds
them back into one If; a rank runs the one its feeds select (``StagedProgram``), because collectives
run between stages of the main graph and cannot run inside an If that ONNX Runtime executes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ._errors import InputError, ModelError

BRANCH_ATTRS = {True: "then_branch", False: "else_branch"}


def branching_if(model: onnx.ModelProto) -> int | None:
    """Index of the main graph's If node whose condition is a graph input, when there is exactly one; else None."""
    graph = model.graph
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    found = [k for k, node in enumerate(graph.node)
             if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input and node.input[0] in inputs]
    return found[0] if len(found) == 1 else None


def branch_graph(model: onnx.ModelProto, which: bool) -> onnx.GraphProto:
    node = model.graph.node[branching_if(model)]
    return next(a.g for a in node.attribute if a.name == BRANCH_ATTRS[which])


def condition_value(feeds: dict, name: str) -> bool:
    """The branch a call takes: the condition input as one bool."""
    if name not in feeds:
        raise InputError(f"input {name!r} (which branch of the model to run) was not given")
    value = np.asarray(feeds[name])
    if value.size != 1:
        raise InputError(f"input {name!r} must hold one bool (which branch to run), got shape {value.shape}")
    return bool(value.reshape(-1)[0])


def inline_branch(model: onnx.ModelProto, which: bool) -> onnx.ModelProto:
    """The model with its branching If replaced by the nodes of the branch taken when the condition is ``which``.

    The graph keeps every input (the condition too, now unread), so both inlined models take the same
    feeds as the original. Branch-local initializers join the main graph's; a branch output named
    otherwise than the If's output is passed on by an Identity.
    """
    at = branching_if(model)
    if at is None:
        raise ModelError("the model has no If node whose condition is a graph input")
    graph = model.graph
    node = graph.node[at]
    body = branch_graph(model, which)
    taken = {t.name for t in graph.initializer}
    clash = [t.name for t in body.initializer if t.name in taken]
    if clash:
        raise ModelError(f"the {BRANCH_ATTRS[which]} of {node.name or 'If'} has initializers named like the main "
                         f"graph's ({clash[:3]}); such a graph is not a merged decoder this can run")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(graph.node[:at])
    out.graph.node.extend(body.node)
    for inner, outer in zip(body.output, node.output):
        if outer and inner.name != outer:
            out.graph.node.append(helper.make_node("Identity", [inner.name], [outer],
                                                   name=f"{node.name or 'If'}.{BRANCH_ATTRS[which]}.{outer}"))
    out.graph.node.extend(graph.node[at + 1:])
    out.graph.initializer.extend(body.initializer)
    known = {vi.name for vi in graph.value_info} | {o.name for o in graph.output}
    out.graph.value_info.extend(vi for vi in body.value_info if vi.name not in known)
    return out


def fold_branches(model: onnx.ModelProto, branches: dict[bool, onnx.ModelProto]) -> onnx.ModelProto:
    """The inverse of ``inline_branch`` for a model whose main graph was only the branching If (Optimum's layout).

    ``branches``: the two inlined models after rewriting (sliced per rank), with the same graph inputs
    and outputs. Initializers both hold alike go to the main graph once (the shared weights); the rest
    stay in the branch that reads them. Inputs, outputs, header and metadata come from the then branch.
    """
    at = branching_if(model)
    if at is None or len(model.graph.node) != 1:
        raise ModelError("only a main graph that is one If node on a graph input can be folded back")
    node = model.graph.node[at]
    first, second = branches[True], branches[False]
    by_name = {True: {t.name: t for t in first.graph.initializer}, False: {t.name: t for t in second.graph.initializer}}
    shared = [t for name, t in by_name[True].items()
              if name in by_name[False] and by_name[False][name].SerializeToString() == t.SerializeToString()]
    shared_names = {t.name for t in shared}
    bodies = {}
    for which, inlined in branches.items():
        g = inlined.graph
        original = branch_graph(model, which)
        body = helper.make_graph(
            list(g.node), original.name, [], list(g.output),
            [t for t in g.initializer if t.name not in shared_names])
        body.value_info.extend(g.value_info)
        bodies[which] = body
    folded = onnx.ModelProto()
    folded.CopyFrom(first)
    g = folded.graph
    del g.node[:]
    del g.initializer[:]
    del g.value_info[:]
    g.initializer.extend(shared)
    attrs = [a for a in node.attribute if a.name not in BRANCH_ATTRS.values()]
    new_if = helper.make_node(node.op_type, list(node.input), list(node.output), name=node.name, domain=node.domain,
                              then_branch=bodies[True], else_branch=bodies[False])
    new_if.attribute.extend(attrs)
    g.node.append(new_if)
    for opset in second.opset_import:
        if not any(o.domain == opset.domain for o in folded.opset_import):
            folded.opset_import.append(opset)
    return folded


__all__ = ["BRANCH_ATTRS", "branching_if", "condition_value", "fold_branches", "inline_branch"]

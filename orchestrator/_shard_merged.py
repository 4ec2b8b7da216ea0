"""Slicing Optimum's merged decoder: an ``If`` on the graph input ``use_cache_branch`` (``ranks._branches``).

Each branch (then: the decoder with past keys/values; else: without) is inlined into a plain graph
and planned alone, as any decoder is. The weights both branches read are initializers of the main
graph, held once per rank, so both plans must cut each of them the same way; the cache and the
logits must come out alike too (a rank keeps the no-past branch's presents as the with-past
branch's pasts). Each rank's two rewritten branches are folded back into one If, so a shard takes
the same inputs as the merged model, ``use_cache_branch`` included.
"""

from __future__ import annotations

import onnx

from ranks._branches import BRANCH_ATTRS, branching_if, inline_branch
from ranks._errors import ShardError

from ._shard_rewrite import initializer_uses, key_axis


def branch_variants(model: onnx.ModelProto) -> dict:
    """{True: then branch inlined, False: else branch inlined} for a merged decoder, else {None: model}.

    Only a main graph that is the one If (Optimum's layout) is taken apart; anything else is planned as
    one graph, where what a subgraph reads stays whole.
    """
    at = branching_if(model)
    if at is None or len(model.graph.node) != 1:
        return {None: model}
    return {which: inline_branch(model, which) for which in (True, False)}


def branch_label(model: onnx.ModelProto, key) -> dict:
    return {} if key is None else {"branch": BRANCH_ATTRS[key]}


def branch_words(model: onnx.ModelProto, key: bool) -> str:
    node = model.graph.node[branching_if(model)]
    return f"the {BRANCH_ATTRS[key]} of {node.name or 'If'} ({node.input[0]} {'true' if key else 'false'})"


def _describe(axes: set) -> str:
    words = []
    for key in sorted(axes, key=lambda a: (-1, 0) if a is None else (key_axis(a), 0 if isinstance(a, int) else a[1])):
        if key is None:
            words.append("whole on every rank")
        elif isinstance(key, int):
            words.append(f"cut along axis {key}")
        else:
            words.append(f"cut along axis {key[0]} in {key[1]} parts")
    return " and ".join(words)


def check_branches_agree(model: onnx.ModelProto, analyses: dict, shared: list[str]) -> None:
    """Raise ShardError naming the weight (or cache tensor, or output) the two branches' plans cut differently.

    ``shared``: the main graph's initializers (the weights both branches read)."""
    (t_index, t_plan), (e_index, e_plan) = analyses[True], analyses[False]
    then_uses, else_uses = initializer_uses(t_index, t_plan), initializer_uses(e_index, e_plan)
    then_words, else_words = branch_words(model, True), branch_words(model, False)
    for name in shared:
        if name in then_uses and name in else_uses and then_uses[name] != else_uses[name]:
            raise ShardError(
                f"the weight {name} is {_describe(then_uses[name])} in {then_words} but {_describe(else_uses[name])} "
                f"in {else_words}; both branches read the one copy each rank holds, so their plans must cut it alike")
    then_cache = {c["present"]: (c["axis"], c["heads_per_rank"]) for c in t_plan.cache.values()}
    else_cache = {c["present"]: (c["axis"], c["heads_per_rank"]) for c in e_plan.cache.values()}
    for present in sorted(set(then_cache) | set(else_cache)):
        a, b = then_cache.get(present, (None, None)), else_cache.get(present, (None, None))
        if a != b:
            def how(cut):
                return "whole" if cut[0] is None else f"cut by heads ({cut[1]} per rank)"

            raise ShardError(
                f"the cache output {present} comes out {how(a)} from {then_words} but {how(b)} from {else_words}; "
                f"a rank keeps either branch's presents as its next past, so they must be cut alike")
    if sorted(t_plan.gathered_outputs) != sorted(e_plan.gathered_outputs):
        raise ShardError(
            f"{then_words} gathers the outputs {sorted(t_plan.gathered_outputs)} from pieces, but {else_words} "
            f"{sorted(e_plan.gathered_outputs)}; the two branches must give their outputs alike")


def merged_report(model: onnx.ModelProto, reports: dict) -> dict:
    """The explain report of a merged decoder: the with-past branch's at the top (what a decode step costs),
    both branches under ``branches``."""
    node = model.graph.node[branching_if(model)]
    report = dict(reports[True])
    report["merged"] = {"node": node.name or "If", "condition": node.input[0]}
    report["branches"] = {BRANCH_ATTRS[key]: r for key, r in reports.items()}
    return report


__all__ = ["branch_label", "branch_variants", "branch_words", "check_branches_agree", "merged_report"]

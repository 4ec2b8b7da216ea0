"""Slicing an ONNX model into tensor-parallel shards (Megatron-style) with collectives written in.

``shard_model("model.onnx", tp=2, out_dir="shards")`` writes
``shards/model0.onnx``, ``shards/model1.onnx`` and ``shards/model.manifest.json``
(layout: ``ranks._shard_manifest``). How each tensor is split is decided in
``_shard_analysis``; the per-rank graphs are written by ``_shard_rewrite``. Optimum's merged
decoder (an If on ``use_cache_branch``) is sliced branch by branch and folded back (``_shard_merged``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from ranks._branches import branch_graph, fold_branches
from ranks._model import load_onnx_header
from ranks._errors import ModelNotFoundError, ShardError
from ranks._shard_manifest import (
    FORMAT,
    META_ID,
    META_MANIFEST,
    META_RANK,
    META_WORLD_SIZE,
    manifest_path_for,
    shard_path_for,
    write_manifest,
)

from ._progress import progress_bar
from ._samples import save_model
from ranks._staged_runner import META_CACHE, META_POSITIONS

from ._decoder_tables import decoder_tables
from ._shard_analysis import linear_weight, plan_split
from ._shard_cache import cache_metadata, cache_pairs, lone_presents
from ._shard_explain import explain, format_explain
from ._shard_graph import GraphIndex, elem_types
from ._shard_merged import branch_label, branch_variants, branch_words, check_branches_agree, merged_report
from ._shard_rewrite import _nbytes, build_rank_graph, initializer_uses, key_axis

_PROTOBUF_LIMIT = 2**31 - 2**20  # a model proto above ~2 GB must keep its weights outside


@dataclass
class ShardResult:
    """What ``shard_model`` wrote."""

    model_path: Path  # DIR/MODEL.onnx: the name every rank is given; resolves to DIR/MODEL{rank}.onnx
    shard_paths: list[Path]
    manifest_path: Path
    manifest: dict

    @property
    def tp(self) -> int:
        return self.manifest["world_size"]

    @property
    def weight_fraction(self) -> float:
        """Largest per-rank weight bytes relative to the whole model's."""
        whole = self.manifest["weight_bytes_whole"] or 1
        return max(s["weight_bytes"] for s in self.manifest["shards"]) / whole

    def explain(self) -> str:
        """The plan in words: per layer what was paired, what stays whole and why, the traffic per token."""
        return format_explain(self.manifest["explain"])

    def summary(self) -> str:
        m = self.manifest
        counts: dict[str, int] = {}
        for w in m["weights"]:
            counts[w["split"]] = counts.get(w["split"], 0) + 1
        ops: dict[str | None, dict[str, int]] = {}
        for c in m["collectives"]:
            per = ops.setdefault(c.get("branch"), {})
            per[c["op"]] = per.get(c["op"], 0) + 1
        report = m.get("explain") or {}
        lines = [f"wrote {len(self.shard_paths)} shards of {m['source']['file']} to {self.manifest_path.parent}"]
        if report.get("merged"):
            lines.append(f"  merged decoder: If {report['merged']['node']} on {report['merged']['condition']}; "
                         f"each branch sliced alike, the shards keep both")
        lines.append("  weights: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        for branch, per in sorted(ops.items(), key=lambda kv: kv[0] or ""):
            lines.append("  collectives per rank" + (f" ({branch})" if branch else "") + ": "
                         + (", ".join(f"{v} {k}" for k, v in sorted(per.items())) or "none"))
        if not ops:
            lines.append("  collectives per rank: none")
        lines.append(f"  weight bytes per rank / whole: {self.weight_fraction:.3f}")
        if report.get("megatron_minimum_bytes_per_token_per_rank"):
            lines.append(f"  bytes each rank sends per {report['per']}: {report['bytes_sent_per_token_per_rank']:.0f}, "
                         f"Megatron's minimum {report['megatron_minimum_bytes_per_token_per_rank']:.0f} "
                         f"(ratio {report['ratio_to_megatron']:.2f})")
        heads: dict[tuple[int, int], list[str]] = {}
        for a in m["attention"]:
            heads.setdefault((a["heads"], a["heads_per_rank"]), []).append(a["node"])
        both = " over both branches" if report.get("merged") else ""
        for (whole, per_rank), nodes in heads.items():
            lines.append(f"  heads {whole} -> {per_rank} per rank ({len(nodes)} Reshape nodes{both}, e.g. {nodes[0]})")
        cache = m.get("cache") or []
        if cache:
            cut = [c for c in cache if c["axis"] is not None]
            how = (f"cut by heads ({cut[0]['heads']} -> {cut[0]['heads_per_rank']} per rank), kept by each rank"
                   if len(cut) == len(cache) else f"{len(cut)} cut by heads, {len(cache) - len(cut)} whole on every rank")
            if cache[0]["past"] is None:
                lines.append(f"  key/value cache: {len(cache)} presents without a past (a prefill graph; e.g. "
                             f"{cache[0]['present']}), {how}")
            else:
                lines.append(f"  key/value cache: {len(cache)} past/present pairs (e.g. {cache[0]['past']} -> "
                             f"{cache[0]['present']}), {how}")
        for node, reason in m["replicated_reasons"].items():
            lines.append(f"  kept whole: {node}: {reason}")
        return "\n".join(lines)


def shard_model(model_path: str | os.PathLike, tp: int, out_dir: str | os.PathLike, *,
                allow_replicate: bool = False, external_data: bool | None = None,
                progress: bool | None = None, cache: list[tuple[str, str]] | None = None) -> ShardResult:
    """Slice ``model_path`` into ``tp`` shards in ``out_dir``.

    ``allow_replicate``: write whole-model shards when nothing can be split (and keep
    layers whole whose widths ``tp`` does not divide) instead of raising.
    ``external_data``: weights in ``<shard>.data`` files; None mirrors the source.
    ``progress``: a bar on stderr; None shows it only when stderr is a terminal.
    ``cache``: (past input, present output) pairs of a decoder's key/value cache (``*`` for the varying
    part), when the exporter's names are not the common ones (``_shard_cache``).
    Raises ShardError (nothing to split, tp not dividing a width or head count),
    ModelNotFoundError.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ShardError(f"the tensor-parallel degree must be a positive integer, got {tp!r}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelNotFoundError(f"model {model_path} does not exist")
    out_dir = Path(out_dir)
    header = load_onnx_header(model_path)  # a clear ModelError for empty, corrupt or non-ONNX files
    source_external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer
    )
    data_files = sorted({
        e.value for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data if e.key == "location"
    })
    del header
    model = onnx.load(str(model_path))
    source_sha, source_bytes = _hash_files([model_path] + [model_path.parent / f for f in data_files])

    # Optimum's merged decoder (an If on the graph input use_cache_branch): each branch is planned and
    # rewritten as the plain graph it is, then the two are folded back into one If per rank (_shard_merged).
    positions = decoder_tables(model).positions  # (before a merged decoder's outer weights are dropped below)
    variants = branch_variants(model)
    whole_bytes = sum(_nbytes(t) for t in model.graph.initializer) + sum(
        _nbytes(t) for key in variants if key is not None for t in branch_graph(model, key).initializer)
    shared_weights = [t.name for t in model.graph.initializer]
    if None not in variants:
        del model.graph.initializer[:]  # each branch holds its copy now; only the If is needed from here
    analyses = {}
    for key, variant in variants.items():
        index = GraphIndex(variant)
        inputs = [i.name for i in variant.graph.input if i.name not in index.initializers]
        pairs = cache_pairs(inputs, index.graph_outputs, cache)
        try:
            plan = plan_split(index, tp, allow_replicate=allow_replicate, cache=pairs,
                              presents=lone_presents(inputs, index.graph_outputs, pairs, cache))
        except ShardError as exc:
            if key is None:
                raise
            raise ShardError(f"in {branch_words(model, key)}: {exc}") from None
        analyses[key] = (index, plan)
    if len(analyses) > 1:
        check_branches_agree(model, analyses, shared_weights)
    index, plan = next(iter(analyses.values()))
    if not plan.seeds:
        reasons = "; ".join(f"{k}: {v}" for k, v in plan.replicated_reasons.items())
        message = (
            f"nothing to split in {model_path}: no MatMul/Gemm with a constant 2-D weight could be cut "
            f"across {tp} ranks" + (f" ({reasons})" if reasons else "")
        )
        if not allow_replicate:
            raise ShardError(message + "; pass --allow-replicate to write whole-model shards anyway")

    if external_data is None:
        external_data = source_external or whole_bytes // max(tp, 1) > _PROTOBUF_LIMIT
    shard_id = hashlib.sha256(f"{source_sha}:{tp}:{int(allow_replicate)}:{FORMAT}".encode()).hexdigest()[:32]
    manifest_file = manifest_path_for(out_dir / model_path.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    types = {key: elem_types(a[0].model, a[0].initializers) for key, a in analyses.items()}

    shards = []
    paths = []
    collectives: dict = {}
    bar = progress_bar(tp * sum(len(a[0].graph.initializer) for a in analyses.values()),
                       f"shard {model_path.name} tp={tp}", unit="tensor", enabled=progress)
    try:
        for rank in range(tp):
            meta = {META_ID: shard_id, META_RANK: rank, META_WORLD_SIZE: tp, META_MANIFEST: manifest_file.name}
            if plan.cache:
                meta[META_CACHE] = cache_metadata(list(plan.cache.values()))
                if positions is not None:
                    meta[META_POSITIONS] = str(positions)
            built = {key: build_rank_graph(a[0], a[1], rank, types[key], meta, progress=bar)
                     for key, a in analyses.items()}
            rank_model = built[None].model if None in built else fold_branches(
                model, {key: b.model for key, b in built.items()})
            path = shard_path_for(out_dir / model_path.name, rank)
            _check_and_save(rank_model, path, external_data)
            weight_bytes = sum(_nbytes(t) for t in rank_model.graph.initializer) + sum(
                _nbytes(t) for key in built if key is not None for t in branch_graph(rank_model, key).initializer)
            shards.append({"rank": rank, "file": path.name, "weight_bytes": weight_bytes})
            paths.append(path)
            if rank == 0:
                collectives = {key: b.collectives for key, b in built.items()}
            del built, rank_model
    finally:
        bar.close()

    reports = {key: explain(a[0], a[1], collectives[key], types[key], model_path.name) for key, a in analyses.items()}
    manifest = {
        "format": FORMAT,
        "shard_id": shard_id,
        "world_size": tp,
        "source": {"file": model_path.name, "sha256": source_sha, "bytes": source_bytes},
        "shards": shards,
        "weight_bytes_whole": whole_bytes,
        "external_data": bool(external_data),
        "weights": _weight_entries(index, plan),
        "attention": [dict(_attention_entry(a[0], a[1], i, heads, per_rank), **branch_label(model, key))
                      for key, a in analyses.items() for i, (heads, per_rank) in sorted(a[1].reshape_heads.items())],
        "collectives": [dict(c, **branch_label(model, key)) for key, cs in collectives.items() for c in cs],
        "replicated_reasons": {(f"{branch_label(model, key)['branch']}: " if key is not None else "") + node: reason
                               for key, a in analyses.items() for node, reason in a[1].replicated_reasons.items()},
        "cache": list(plan.cache.values()),
        "positions": positions if plan.cache else None,
        "explain": reports[None] if None in reports else merged_report(model, reports),
    }
    write_manifest(manifest_file, manifest)
    return ShardResult(out_dir / model_path.name, paths, manifest_file, manifest)


def _attention_entry(index: GraphIndex, plan, i: int, heads: int, per_rank: int) -> dict:
    """One head-splitting Reshape; ``shape``/``shard_shape`` are None when its target is computed at run time."""
    node = index.nodes[i]
    constant = index.constant_value(node.input[1])
    override = plan.input_overrides.get((i, 1))
    shard_shape = override if override is not None else constant
    return {
        "node": index.node_label(i),
        "shape_input": node.input[1],
        "shape": None if constant is None else [int(v) for v in constant.reshape(-1)],
        "shard_shape": None if shard_shape is None else [int(v) for v in shard_shape.reshape(-1)],
        "heads": heads,
        "heads_per_rank": per_rank,
    }


def _weight_entries(index: GraphIndex, plan) -> list[dict]:
    uses = initializer_uses(index, plan)
    # A linear layer's weight is named by what it means (Megatron): cut by output columns or input rows,
    # whichever axis that is in storage (Gemm with transB keeps output columns on axis 0).
    labels = {}
    for (i, k), _axis in plan.sliced_inputs.items():
        if k == 1 and linear_weight(index, i) is not None:
            labels[index.nodes[i].input[1]] = "rows" if i in plan.row_parallel else "columns"
    for i, t in plan.transposed_weights.items():
        labels[index.nodes[t].input[0]] = "rows" if i in plan.row_parallel else "columns"
    for i in plan.embeddings:
        labels[index.nodes[i].input[0]] = "vocabulary"
    entries = []
    for tensor in index.model.graph.initializer:
        shape = list(tensor.dims)
        axes = uses.get(tensor.name, {None})
        entry = {
            "name": tensor.name,
            "dtype": str(helper.tensor_dtype_to_np_dtype(tensor.data_type)),
            "shape": shape,
        }
        if axes == {None}:
            entry.update(split="replicated", axis=None, shard_shape=shape)
        elif len(axes) == 1:
            (key,) = axes
            axis = key_axis(key)
            label = labels.get(tensor.name) or (
                "columns" if axis == len(shape) - 1 else "rows" if axis == 0 else "axis"
            )
            shard_shape = list(shape)
            shard_shape[axis] //= plan.tp
            entry.update(split=label, axis=axis, shard_shape=shard_shape)
            if not isinstance(key, int):
                entry["parts"] = key[1]  # a fused projection (QKV): each part cut alike
        else:
            entry.update(split="mixed", axis=None, shard_shape=shape,
                         copies=sorted(key_axis(a) for a in axes if a is not None))
        entries.append(entry)
    return entries


def _check_and_save(model: onnx.ModelProto, path: Path, external_data: bool) -> None:
    data_file = path.with_name(path.name + ".data")
    if not external_data and data_file.exists():
        data_file.unlink()  # a stale data file from an earlier run would confuse readers
    if external_data:
        save_model(model, path, external_data=True)
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(model)
        save_model(model, path)


def _hash_files(paths: list[Path]) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                total += len(chunk)
    return digest.hexdigest(), total


__all__ = ["ShardResult", "shard_model"]

"""Running a shard on stock ONNX Runtime: cut the graph at its collective nodes, run the pieces in order.

ONNX Runtime's CPU wheel has no kernels for ``com.microsoft`` ``AllReduce``
and ``AllGather``. A shard is therefore cut into *stages*: each stage is a
sub-model holding the ordinary nodes that can run once the collectives
before them are done. Between two stages the collectives run through a
``Communicator``::

    feeds -> stage 0 -> AllReduce/AllGather -> stage 1 -> ... -> stage S -> outputs

A node's stage is the number of collectives on its longest path from the
graph inputs, so independent work is never pushed behind a collective it
does not need. Each stage's inputs are the graph inputs and earlier results
it reads; its initializers are the ones its nodes use.

``StagedRunner`` duck-types ``onnxruntime.InferenceSession`` (``get_inputs``,
``get_outputs``, ``run``), so code written for a session runs a shard.

A merged decoder (``_branches``) becomes one staged program per branch, and both read the same
weights (the main graph's initializers). They are read once into ``SharedInitializers``
(``_merged_weights``) and every stage session that reads one runs on that copy
(``SessionOptions.add_initializer``, weight-rewriting optimizers off, as for the thread pool: see
``_shared_weights``). The stage model handed to the session does not carry those weights either:
each is a placeholder, an external-data initializer whose location is ``"."`` with the weight's type
and shape; the session resolves it against ``/`` (``session.model_external_initializers_file_folder_path``:
a directory that exists, so ONNX Runtime's check on load passes, even in a process whose working
directory was removed). ONNX Runtime takes an ``add_initializer`` value only for a name that is a
graph initializer (a graph input would stay a required feed), and with the value given it never
reads the placeholder's data; without it, the build fails (a directory is not data). A node that
computes from weights alone is evaluated once for both branches (``_merged_weights``), so that no
session folds its own copy of the result.

Prepacking: the no-past (prefill) branch runs with it off, on the shared copy alone. The with-past
(decode) branch, run every step, keeps it by default (``ORCH_MERGED_DECODE_PREPACKING``): MLAS then
packs its MatMul weights into a private copy, as a with-past decoder's shard alone does, and decode
steps run as fast as that shard's. Measured on a 50 MB GPT-2 at TP=2 (``benchmarks/merged_decoder.py``):
without prepacking a decode step at batch 8 took 1.35x as long (batch 1: 1.0x, where MLAS multiplies
a vector without packing); a prefill of 16 tokens took 1.5x as long at batch 1 (+1.7 ms: one pass over
the weights), 1.15x at batch 8.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._branches import BRANCH_ATTRS, branching_if, condition_value, inline_branch
from ._comm_base import Communicator
from ._env import merged_decode_prepacking
from ._errors import InputError, ModelError, ModelNotFoundError, ShardError, is_ort_error, ort_message
from ._shard_manifest import META_ID, META_MANIFEST, META_RANK, META_WORLD_SIZE, read_manifest, shard_metadata
from ._merged_weights import placeholder, share_branch_weights
from ._shared_weights import SharedInitializers, disabled_optimizers, release_freed_heap

COLLECTIVE_OPS = ("AllReduce", "AllGather")
# Shard metadata: JSON list of a decoder's cache pairs ({"past", "present", "axis", "heads", "heads_per_rank"},
# axis null when the cache stays whole on every rank), written by ``orchestrate shard``.
META_CACHE = "orchestrator.shard.cache"
# The positions a decoder's learned position table holds (absent when it has none), for generation's check.
META_POSITIONS = "orchestrator.shard.positions"
MS_DOMAIN = "com.microsoft"


def is_collective(node: onnx.NodeProto) -> bool:
    return node.domain == MS_DOMAIN and node.op_type in COLLECTIVE_OPS


def has_collectives(model: onnx.ModelProto) -> bool:
    """True when the graph holds com.microsoft AllReduce/AllGather nodes (a tensor-parallel shard)."""
    return any(is_collective(n) for n in model.graph.node)


@dataclass
class Collective:
    op: str  # "AllReduce" or "AllGather"
    input: str
    output: str
    axis: int | None = None  # AllGather only


@dataclass
class Stage:
    nodes: list = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    session: object | None = None


@dataclass(frozen=True)
class Arg:
    """What ``InferenceSession.get_inputs()`` returns: name, type string, shape."""

    name: str
    type: str
    shape: list


@dataclass
class StageWeights:
    """The shared weights one stage session runs on: give them to its options with ``apply``."""

    shared: SharedInitializers
    names: list[str]
    disabled_optimizers: list[str]
    prepacking: bool = False  # True: the session packs its MatMul weights into its own copy (faster, more memory)

    def apply(self, options) -> list[str]:
        """Add the weights to ``options`` (an ``onnxruntime.SessionOptions``); returns the optimizers the
        session must be built without (``InferenceSession(..., disabled_optimizers=...)``)."""
        self.shared.apply(options, self.names, prepacking=self.prepacking)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", "/")
        return list(self.disabled_optimizers)


def default_session_factory(threads: int | None = None, providers: list[str] | None = None) -> Callable:
    """Sessions that do not spin: several stage sessions share the cores of one rank.

    The factory is called as ``make_session(model, weights=None)``: ``model`` a path or a model's
    bytes, ``weights`` a ``StageWeights`` when the stage runs on shared weights.
    """
    import onnxruntime as ort

    def make_session(model_bytes, weights: StageWeights | None = None):
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors reach the user as exceptions, not also as ORT's log lines
        # Idle pool threads of one stage would spin while another stage runs: 4x slower on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        disabled = weights.apply(options) if weights is not None else []
        return ort.InferenceSession(model_bytes, options, providers=providers or ["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)

    return make_session


def takes_weights(make_session: Callable) -> bool:
    """True when a session factory accepts ``weights=`` (a factory written for one argument gets none)."""
    try:
        params = inspect.signature(make_session).parameters
    except (TypeError, ValueError):
        return False
    return "weights" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class StagedProgram:
    """A model cut at its collectives into stages with one session each; collectives are left to the caller.

    A model that picks one of two subgraphs by a graph input (Optimum's merged decoder, ``_branches``)
    whose subgraphs hold collectives becomes two programs, one per branch, with their own stages;
    ``select(feeds)`` gives the one a call runs (every rank takes the same branch: the feeds agree).
    The weights both read are held once (``shared``; see the module docstring), unless the session
    factory takes no ``weights=``.

    ``shared``: initializers of ``model`` that its stage sessions take from there (a branch gets its parent's).
    ``decode_prepacking``: whether the with-past branch (condition true) keeps prepacking; None reads
    ``ORCH_MERGED_DECODE_PREPACKING``. ``prepacking``: whether this program's sessions on shared weights keep it.
    """

    def __init__(self, model: onnx.ModelProto, make_session: Callable | None = None, *, label: str = "model",
                 shared: SharedInitializers | None = None, decode_prepacking: bool | None = None,
                 prepacking: bool = False):
        self.label = label
        make_session = make_session or default_session_factory()
        self.shared = shared
        graph = model.graph
        initializer_names = {t.name for t in graph.initializer}
        self.inputs = [_arg(vi) for vi in graph.input if vi.name not in initializer_names]
        self.outputs = [_arg(vi) for vi in graph.output]
        self.condition: str | None = None
        self.branches: dict[bool, StagedProgram] = {}
        at = branching_if(model)
        if at is not None and any(is_collective(n) for n in _subgraph_nodes(graph.node[at])):
            self.condition = graph.node[at].input[0]
            if decode_prepacking is None:
                decode_prepacking = merged_decode_prepacking()
            inlined = None
            if self.shared is None and takes_weights(make_session):
                # Each branch has its own sessions: without this, the weights both read would be held twice.
                self.shared, inlined = share_branch_weights(model)
            self.branches = {}
            for which in (True, False):
                branch = inlined.pop(which) if inlined else inline_branch(model, which)
                self.branches[which] = StagedProgram(branch, make_session,
                                                     label=f"{label} ({BRANCH_ATTRS[which]})", shared=self.shared,
                                                     prepacking=which and decode_prepacking)
                del branch
                release_freed_heap()  # the inlined copy of the model
            self.stages = []
            return
        self.stages = cut_stages(model)
        types = _known_types(model)
        for k, stage in enumerate(self.stages):
            for c in stage.collectives:
                if c.input in types:
                    types.setdefault(c.output, types[c.input])
            if not stage.nodes:
                continue
            reads = {n for node in stage.nodes for n in node.input} | {n for node in stage.nodes for n in outer_references(node)}
            names = sorted(reads & set(self.shared.ort_values)) if self.shared is not None else []
            sub = _stage_model(model, stage, types, f"{graph.name or 'graph'}_stage{k}", placeholders=set(names))
            try:
                if names:
                    weights = StageWeights(self.shared, names, disabled_optimizers(sub, set(names)), prepacking)
                    stage.session = make_session(sub.SerializeToString(), weights=weights)
                else:
                    stage.session = make_session(sub.SerializeToString())
            except Exception as exc:
                raise ModelError(f"{label}: cannot build stage {k} of {len(self.stages)}: {exc}") from exc
            for out in stage.session.get_outputs():
                elem = _ELEM_OF.get(out.type)
                if elem:
                    types.setdefault(out.name, elem)
            for c in stage.collectives:
                if c.input in types:
                    types.setdefault(c.output, types[c.input])
            stage.nodes = []  # the sessions hold what they need; drop our copy of the weights

    @property
    def collective_count(self) -> int:
        """Collectives per call (for a model with branches: of the branch with the most)."""
        if self.branches:
            return max(b.collective_count for b in self.branches.values())
        return sum(len(s.collectives) for s in self.stages)

    def select(self, feeds: dict) -> "StagedProgram":
        """The program a call with these feeds runs: this one, or the branch its condition input picks."""
        if self.condition is None:
            return self
        return self.branches[condition_value(feeds, self.condition)]

    def all_stages(self) -> list[Stage]:
        """Every stage of this program and of its branches."""
        return list(self.stages) + [s for b in self.branches.values() for s in b.all_stages()]

    def run_stage(self, k: int, env: dict) -> None:
        stage = self.stages[k]
        if stage.session is None:
            return
        try:
            feeds = {name: env[name] for name in stage.inputs}
        except KeyError as exc:
            raise InputError(f"{self.label}: input {exc.args[0]!r} was not given") from None
        try:
            results = stage.session.run(stage.outputs, feeds)
        except Exception as exc:
            if not is_ort_error(exc):
                raise
            # ONNX Runtime's own types become ours, which keep their type across processes
            raise ModelError(f"{self.label}: running stage {k} of {len(self.stages)} failed: {ort_message(exc)}") from None
        env.update(zip(stage.outputs, results))


class StagedRunner:
    """One rank of a tensor-parallel shard, run stage by stage with collectives through ``comm``.

    ``model``: a path (``MODEL{rank}.onnx``) or a loaded ModelProto (external data loaded).
    ``comm``: the Communicator of the ranks that run the sibling shards.
    ``make_session``: callable(model_bytes, weights=None) -> InferenceSession-like, for each stage
    (``default_session_factory``; a factory without ``weights=`` makes a merged decoder's branches hold
    their weights each). ``decode_prepacking``: see ``StagedProgram``.

    ``run`` may be called from several threads: runs are serialized, because every rank must
    issue its collectives in the same order. Requests must reach the ranks in the same order
    (one driver per job does that: the per-rank program, ``ShardedModel``).

    Raises ShardError when the shard was made for another world size or rank,
    when it does not belong to the manifest beside it, or when the ranks hold
    shards of different slicing runs.
    """

    is_staged = True  # lets callers tell it from a plain InferenceSession

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, comm: Communicator,
                 make_session: Callable | None = None, *, decode_prepacking: bool | None = None):
        self.comm = comm
        if isinstance(model, onnx.ModelProto):
            proto, self.path, label = model, None, f"shard of rank {comm.rank}"
        else:
            self.path = Path(model)
            if not self.path.exists():
                raise ModelNotFoundError(f"shard {self.path} does not exist (rank {comm.rank} of {comm.size})")
            proto, label = onnx.load(str(self.path)), str(self.path)
        self._validate(proto, label)
        meta = shard_metadata(proto)
        # A decoder's key/value cache cut by heads: each rank's past and present hold its own heads.
        self.cache = [c for c in json.loads(meta.get(META_CACHE, "[]") or "[]")]
        self.max_positions = int(meta[META_POSITIONS]) if meta.get(META_POSITIONS) else None
        self.program = StagedProgram(proto, make_session, label=label, decode_prepacking=decode_prepacking)
        self._input_names = [a.name for a in self.program.inputs]
        # Graph outputs gathered whole by an AllGather (logits of an LM head split by vocabulary):
        # output name -> the axis along which each rank holds its piece.
        self.gathered_outputs = {c.output: c.axis for stage in self.program.all_stages() for c in stage.collectives
                                 if c.op == "AllGather" and c.output in {a.name for a in self.program.outputs}}
        # Every rank must issue its collectives in the same order: one run at a time per rank.
        self._lock = threading.Lock()

    def _validate(self, proto: onnx.ModelProto, label: str) -> None:
        meta = shard_metadata(proto)
        comm = self.comm
        if META_WORLD_SIZE in meta and int(meta[META_WORLD_SIZE]) != comm.size:
            alone = (f" (this process runs alone: launch {meta[META_WORLD_SIZE]} ranks with mpirun or a rank table)"
                     if comm.size == 1 else "")
            raise ShardError(f"{label} is one of {meta[META_WORLD_SIZE]} shards, but the communicator has "
                             f"{comm.size} rank{'s' if comm.size != 1 else ''}{alone}")
        if META_RANK in meta and int(meta[META_RANK]) != comm.rank:
            raise ShardError(f"{label} is the shard of rank {meta[META_RANK]}, but it was loaded by rank {comm.rank}")
        if self.path is not None and META_ID in meta:
            # The manifest the shard names, and the one its file name implies (MODEL{rank}.onnx -> MODEL):
            # a file copied in from another run disagrees with at least one of them.
            candidates = {self.path.with_name(meta.get(META_MANIFEST, "")) if meta.get(META_MANIFEST) else None}
            stem, rank_text = self.path.stem, meta.get(META_RANK, "")
            if rank_text and stem.endswith(rank_text):
                candidates.add(self.path.with_name(stem[: -len(rank_text)] + ".manifest.json"))
            for manifest_file in sorted(c for c in candidates if c is not None and c.exists()):
                manifest = read_manifest(manifest_file)
                if manifest["shard_id"] != meta.get(META_ID):
                    raise ShardError(
                        f"{label} comes from slicing run {meta.get(META_ID)}, but {manifest_file} describes run "
                        f"{manifest['shard_id']}: the shard directory mixes files of different `orchestrate shard` runs"
                    )
        if comm.size > 1:
            # Every rank takes part, shard or not, so that this collective cannot leave a peer waiting.
            digest = bytes.fromhex(meta.get(META_ID, "0" * 16)[:16].ljust(16, "0"))
            ids = comm.allgather(np.frombuffer(digest, dtype=np.int64).copy(), axis=0)
            if len(set(ids.tolist())) > 1:
                names = {r: f"{int(v) & (2**64 - 1):016x}" for r, v in enumerate(ids.tolist())}
                raise ShardError(
                    f"the ranks loaded shards of different slicing runs (rank: run id prefix) {names}; "
                    f"this rank {comm.rank} loaded {label}"
                )

    # -- InferenceSession's surface -----------------------------------------
    def get_inputs(self) -> list[Arg]:
        return list(self.program.inputs)

    def get_outputs(self) -> list[Arg]:
        return list(self.program.outputs)

    def get_providers(self) -> list[str]:
        for stage in self.program.all_stages():
            if stage.session is not None and hasattr(stage.session, "get_providers"):
                return stage.session.get_providers()
        return ["CPUExecutionProvider"]

    def run(self, output_names, input_feed: dict, run_options=None) -> list[np.ndarray]:
        """The whole model's outputs. A cache cut by heads is taken whole (each rank slices its heads) and
        given back whole (gathered), so that callers written for the unsliced model work unchanged."""
        names = output_names or [a.name for a in self.program.outputs]
        feed = dict(input_feed)
        presents = {}
        for c in self.cache:
            if c["axis"] is None:
                continue
            presents[c["present"]] = c["axis"]
            value = feed.get(c["past"])
            if value is not None and np.ndim(value) > c["axis"] and np.shape(value)[c["axis"]] == c["heads"]:
                piece = c["heads_per_rank"]
                feed[c["past"]] = np.take(value, range(self.comm.rank * piece, (self.comm.rank + 1) * piece), axis=c["axis"])
        outputs = self.run_local(names, feed)
        # (every rank gathers the same presents in the same order: the collectives stay matched)
        return [self.comm.allgather(v, axis=presents[n]) if n in presents else v for n, v in zip(names, outputs)]

    def run_local(self, output_names, input_feed: dict, local=()) -> list[np.ndarray]:
        """Run the shard on this rank's feeds; outputs named in ``local`` are this rank's pieces (not gathered).

        A cache cut by heads goes in and comes out as this rank's heads: a decode loop feeds each
        present back as the next past without any communication.
        """
        names = output_names or [a.name for a in self.program.outputs]
        missing = [n for n in self._input_names if n not in input_feed]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model takes {self._input_names}")
        env = dict(input_feed)
        local = set(local)
        program = self.program.select(input_feed)
        with self._lock:
            for k, stage in enumerate(program.stages):
                program.run_stage(k, env)
                for c in stage.collectives:
                    if c.op == "AllReduce":
                        env[c.output] = self.comm.allreduce(env[c.input], "sum")
                    elif c.output in local:
                        env[c.output] = env[c.input]
                    else:
                        env[c.output] = self.comm.allgather(env[c.input], axis=c.axis)
        try:
            return [env[n] for n in names]
        except KeyError as exc:
            raise InputError(f"unknown output {exc.args[0]!r}; the model gives {[a.name for a in self.program.outputs]}") from None

    def close(self) -> None:
        for stage in self.program.all_stages():
            stage.session = None


def cut_stages(model: onnx.ModelProto) -> list[Stage]:
    """Cut a graph at its collective nodes (see the module docstring)."""
    graph = model.graph
    level: dict[str, int] = {}
    placed: list[tuple[int, onnx.NodeProto]] = []
    for node in graph.node:
        reads = [n for n in node.input if n] + sorted(outer_references(node))
        lv = max((level.get(n, 0) for n in reads), default=0)
        if is_collective(node):
            for out in node.output:
                level[out] = lv + 1
        else:
            for out in node.output:
                level[out] = lv
        placed.append((lv, node))
    count = max((lv for lv, _ in placed), default=0) + 1
    stages = [Stage() for _ in range(count)]
    for lv, node in placed:
        if is_collective(node):
            if len(node.input) != 1 or len(node.output) != 1:
                raise ModelError(f"collective {node.name or node.op_type} must have one input and one output")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            axis = None
            if node.op_type == "AllGather":
                if "axis" not in attrs:
                    # ONNX Runtime's schema and its shape inference disagree on the default: refuse to guess.
                    raise ModelError(f"AllGather {node.name or node.output[0]} has no axis attribute; give it one")
                axis = int(attrs["axis"])
            stages[lv].collectives.append(Collective(node.op_type, node.input[0], node.output[0], axis))
        else:
            stages[lv].nodes.append(node)
    initializer_names = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    later_reads: list[set[str]] = [set() for _ in range(count)]
    for lv, node in placed:
        reads = set(n for n in node.input if n) | outer_references(node)
        for k in range(lv):
            later_reads[k] |= reads  # read at stage lv, so needed from any earlier stage
    for k, stage in enumerate(stages):
        produced = [o for node in stage.nodes for o in node.output if o]
        produced_set = set(produced)
        reads: list[str] = []
        for node in stage.nodes:
            for n in list(node.input) + sorted(outer_references(node)):
                if n and n not in produced_set and n not in initializer_names and n not in reads:
                    reads.append(n)
        stage.inputs = reads
        needed_later = later_reads[k] | {c.input for c in stage.collectives} | graph_outputs
        stage.outputs = [o for o in produced if o in needed_later]
    return stages


def _stage_model(model: onnx.ModelProto, stage: Stage, types: dict[str, int], name: str,
                 placeholders: set[str] = frozenset()) -> onnx.ModelProto:
    """The stage's sub-model; the initializers in ``placeholders`` are placeholders (module docstring)."""
    graph = model.graph
    shapes = {vi.name: vi for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    reads = {n for node in stage.nodes for n in node.input} | {n for node in stage.nodes for n in outer_references(node)}
    inits = [placeholder(t) if t.name in placeholders else t for t in graph.initializer if t.name in reads]
    inputs = []
    for n in stage.inputs:
        if n in shapes and shapes[n].type.tensor_type.elem_type:
            inputs.append(shapes[n])
        elif n in types:
            inputs.append(helper.make_tensor_value_info(n, types[n], None))
        else:
            raise ModelError(f"cannot tell the element type of {n!r}, an input of stage {name}")
    outputs = []
    for n in stage.outputs:
        if n in shapes and shapes[n].type.tensor_type.elem_type:
            outputs.append(shapes[n])
        elif n in types:
            outputs.append(helper.make_tensor_value_info(n, types[n], None))
        else:
            outputs.append(onnx.ValueInfoProto(name=n))
    sub_graph = helper.make_graph(stage.nodes, name, inputs, outputs, inits)
    stage_io = set(stage.inputs) | set(stage.outputs)
    sub_graph.value_info.extend(vi for vi in graph.value_info if vi.name not in stage_io and vi.name in _names(stage))
    sub = onnx.ModelProto()
    sub.ir_version = model.ir_version
    sub.opset_import.extend(model.opset_import)  # com.microsoft stays: stages may hold its other contrib ops
    sub.functions.extend(model.functions)
    sub.graph.CopyFrom(sub_graph)
    return sub


def _names(stage: Stage) -> set[str]:
    return {o for node in stage.nodes for o in node.output}


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    try:
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)
        del skeleton.graph.initializer[:]
        skeleton.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer
        )
        infos += list(onnx.shape_inference.infer_shapes(skeleton, strict_mode=False).graph.value_info)
    except Exception:
        pass  # inference only fills gaps; the sessions report the rest
    for vi in infos:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return types


def _subgraph_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Every node inside a node's subgraphs, at any depth."""
    found = []
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in g.node:
                found.append(inner)
                found += _subgraph_nodes(inner)
    return found


def outer_references(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside a node's subgraphs (If/Loop/Scan bodies), at any depth."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(outer_references(inner) - local)
    return names


def _arg(vi: onnx.ValueInfoProto) -> Arg:
    tensor_type = vi.type.tensor_type
    elem = TensorProto.DataType.Name(tensor_type.elem_type).lower() if tensor_type.elem_type else "undefined"
    shape = []
    if tensor_type.HasField("shape"):
        for d in tensor_type.shape.dim:
            shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None))
    return Arg(vi.name, f"tensor({elem})", shape)


_ELEM_OF = {
    f"tensor({TensorProto.DataType.Name(v).lower()})": v
    for v in TensorProto.DataType.values()
    if v != TensorProto.UNDEFINED
}

"""The shard manifest: what ``orchestrate shard`` wrote, read back by every rank.

``shard_model`` writes ``DIR/MODEL.manifest.json`` beside ``DIR/MODEL0.onnx``
... ``DIR/MODEL{N-1}.onnx``. Each shard also carries three metadata
properties (``orchestrator.shard.id``, ``.rank``, ``.world_size``,
``.manifest``: the manifest's file name) so that a shard file alone says
which slicing run and which rank it belongs to.

Manifest layout (JSON object, format ``orchestrator.shard/1``):

===================  ==========================================================
key                  value
===================  ==========================================================
format               ``"orchestrator.shard/1"``
shard_id             hex digest naming this slicing run; equal to every
                     shard's ``orchestrator.shard.id`` metadata property
world_size           number of ranks N (the tensor-parallel degree)
source               ``{"file", "sha256", "bytes"}`` of the unsliced model
                     (``bytes`` counts the .onnx file plus its external data)
shards               list of N ``{"rank", "file", "weight_bytes"}``; ``file``
                     is relative to the manifest's directory
weight_bytes_whole   bytes of all initializers of the source model
external_data        true when shard weights are in ``<file>.data`` files
weights              one entry per initializer of the source:
                     ``{"name", "dtype", "shape", "split", "axis",
                     "shard_shape"}`` where ``split`` is ``"columns"`` (last
                     axis cut in N contiguous pieces), ``"rows"`` (first axis),
                     ``"axis"`` (another axis, given in ``axis``),
                     ``"vocabulary"`` (a token embedding table cut by rows),
                     ``"replicated"`` (whole on every rank) or ``"mixed"``
                     (used both ways: a whole copy and ``copies`` of pieces);
                     ``"parts": P`` when the cut axis is P equal parts each cut
                     alike (a fused QKV projection: P = 3)
attention            one entry per head-splitting Reshape: ``{"node",
                     "shape_input", "shape", "shard_shape", "heads",
                     "heads_per_rank"}``; ``shape``/``shard_shape`` are null
                     when the target is computed at run time
collectives          one entry per collective node written into the shards:
                     ``{"op", "node", "input", "output", "tensor", "axis"}``
                     (``tensor``: the source model's tensor it makes whole;
                     ``axis`` only for AllGather)
replicated_reasons   ``{node name: why its weight stayed whole}`` for linear
                     layers that were left replicated
explain              the plan in numbers (``orchestrate shard --explain``):
                     ``{"tp", "model", "per", "layers", "embeddings",
                     "gathered_outputs", "replicated", "collectives_per_rank",
                     "bytes_sent_per_token_per_rank",
                     "megatron_minimum_bytes_per_token_per_rank",
                     "ratio_to_megatron"}`` (``orchestrator/_shard_explain.py``)
===================  ==========================================================
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._errors import ModelNotFoundError, ShardError

FORMAT = "orchestrator.shard/1"
META_ID = "orchestrator.shard.id"
META_RANK = "orchestrator.shard.rank"
META_WORLD_SIZE = "orchestrator.shard.world_size"
META_MANIFEST = "orchestrator.shard.manifest"


def manifest_path_for(model_path: str | os.PathLike) -> Path:
    """``DIR/MODEL.onnx`` -> ``DIR/MODEL.manifest.json``."""
    path = Path(model_path)
    return path.with_name(path.stem + ".manifest.json")


def shard_path_for(model_path: str | os.PathLike, rank: int) -> Path:
    """``DIR/MODEL.onnx`` -> ``DIR/MODEL{rank}.onnx``."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}{rank}{path.suffix or '.onnx'}")


def write_manifest(path: str | os.PathLike, manifest: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and check a manifest; raises ShardError naming the file and the bad field."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"shard manifest {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"shard manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"shard manifest {path}: format is {found!r}, expected {FORMAT!r}")
    for key in ("shard_id", "world_size", "shards", "source"):
        if key not in manifest:
            raise ShardError(f"shard manifest {path} has no {key!r} field")
    size = manifest["world_size"]
    if not isinstance(size, int) or size < 1 or len(manifest["shards"]) != size:
        raise ShardError(
            f"shard manifest {path}: world_size {size!r} does not match its {len(manifest['shards'])} shard entries"
        )
    return manifest


def shard_metadata(model) -> dict[str, str]:
    """The ``orchestrator.shard.*`` metadata properties of a loaded ModelProto (empty if not a shard)."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("orchestrator.shard.")}

"""Finding a rank's shard file: ``shards/MODEL.onnx`` -> ``shards/MODEL{rank}.onnx``.

As MindSpore Lite's GPU sample resolves ``xxx.mindir`` to ``xxx0.mindir``:
the path names the model, each rank loads its own piece, and the manifest
beside the pieces must agree with the size of the launch.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._errors import ModelNotFoundError, ShardError
from ._shard_manifest import manifest_path_for, read_manifest, shard_path_for


def resolve_shard_path(path: str | os.PathLike, rank: int, size: int | None = None) -> Path:
    """The file rank ``rank`` of ``size`` should load for ``path``.

    An existing ``path`` is returned as it is. Otherwise ``MODEL{rank}.onnx``
    beside it, checked against ``MODEL.manifest.json`` when that exists (its world
    size against ``size``, unless ``size`` is None: then the communicator's size
    is checked later, when the shard is loaded).
    Raises ShardError when the manifest was written for another world size,
    ModelNotFoundError naming the files looked for when the shard is missing.
    """
    path = Path(path)
    if path.exists():
        return path
    manifest_file = manifest_path_for(path)
    shard = shard_path_for(path, rank)
    if manifest_file.exists():
        manifest = read_manifest(manifest_file)
        if size is not None and manifest["world_size"] != size:
            made = manifest["world_size"]
            if size == 1:  # started alone: slicing for one rank is not the fix
                raise ShardError(
                    f"the shards of {path} were made for {made} ranks ({manifest_file}), but this process runs "
                    f"alone (a world of 1 rank: not started by mpirun -n {made} or with a rank table); launch "
                    f"{made} ranks, or run the whole model in one process"
                )
            raise ShardError(
                f"the shards of {path} were made for {made} ranks ({manifest_file}), "
                f"but this launch has {size} ranks; re-run `orchestrate shard --tp {size}` or launch "
                f"{made} ranks"
            )
        entry = next((s for s in manifest["shards"] if s.get("rank") == rank), None)
        if entry is not None:
            shard = manifest_file.parent / entry["file"]
        if not shard.exists():
            raise ModelNotFoundError(f"rank {rank}'s shard {shard} is missing (listed in {manifest_file})")
        return shard
    if shard.exists():
        return shard
    if size is None or size == 1:  # a process on its own: the shard naming would only puzzle
        raise ModelNotFoundError(f"model file {path} does not exist")
    raise ModelNotFoundError(f"model file {path} does not exist, nor does rank {rank}'s shard {shard}")

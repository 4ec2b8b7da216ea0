"""The wire protocol between ``ShardedModel`` (master) and its rank processes, defined once.

Every rank holds a ZeroMQ DEALER socket connected to the master's ROUTER (a
Unix socket in the master's temporary directory). A message is a list of frames::

    [kind, header (JSON, UTF-8), buffer 0, buffer 1, ...]

=========  ==============  ====================================================
kind       direction       header / buffers
=========  ==============  ====================================================
READY      rank -> master  {"v", "rank", "size", "inputs", "outputs"}; sent
                           once the rank's shard is built and every rank has
                           passed a barrier (so a READY from all means ready)
PREDICT    master -> rank  {"v", "id", "arrays": [{"name", "dtype", "shape"}]}
                           + one raw C-order buffer per array
REPLY      rank -> master  {"v", "id", "rank", "seconds", "arrays": [...]} +
                           buffers; ``seconds``: the rank's time in run()
ERROR      rank -> master  {"v", "id", "rank", "error": pack_exception dict
                           without its pickled bytes}; the pickled bytes are
                           buffer 0 (may be empty)
EXIT       master -> rank  {"v"}: leave the loop, close the communicator
=========  ==============  ====================================================
"""

from __future__ import annotations

import json

import numpy as np

VERSION = 1
READY, PREDICT, REPLY, ERROR, EXIT = b"READY", b"PREDICT", b"REPLY", b"ERROR", b"EXIT"


def encode(kind: bytes, header: dict, arrays: dict[str, np.ndarray] | None = None, extra: list[bytes] = ()) -> list:
    header = {"v": VERSION, **header}
    frames = []
    if arrays is not None:
        header["arrays"] = []
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            header["arrays"].append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
            frames.append(memoryview(array).cast("B") if array.size else b"")
    return [kind, json.dumps(header).encode()] + frames + list(extra)


def decode(frames: list) -> tuple[bytes, dict, dict[str, np.ndarray], list[bytes]]:
    kind = bytes(frames[0])
    header = json.loads(bytes(frames[1]))
    if header.get("v") != VERSION:
        raise ValueError(f"protocol version {header.get('v')!r} received, {VERSION} expected")
    arrays = {}
    specs = header.get("arrays", [])
    for spec, frame in zip(specs, frames[2:]):
        arrays[spec["name"]] = np.frombuffer(frame, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
    return kind, header, arrays, [bytes(f) for f in frames[2 + len(specs):]]

"""The pipe messages between the batch-split master and its workers, defined once.

Every message is a dict with a protocol version (``v``), a kind, and the
request id it belongs to (0 outside requests). Tensors never travel in a
message: a message carries ``TensorSpec`` tuples that say where in the
worker's shared-memory slot (see ``_worker_memory``) the bytes lie.

==============  ===============  ==================================================
kind            direction        body
==============  ===============  ==================================================
BUILD_FINISH    worker->master   device_id, pid, inputs, outputs (name, dtype, shape
                                 with -1 for free dimensions), cores, threads
PREDICT         master->worker   slot (handle), inputs [TensorSpec] in the slot,
                                 out_offset, out_capacity (the slot's output area);
                                 block (handle or None), placement [TensorSpec]:
                                 where in the request's block each output goes,
                                 with the shape the master expects; forget
                                 [handle]: released blocks to unmap
REPLY           worker->master   status "ok": placed (True: outputs lie in the
                                 block as placed; False: in the slot), outputs
                                 [TensorSpec]; status "need_space": needed
                                 (bytes); the worker holds the outputs until COLLECT
COLLECT         master->worker   slot, out_offset, out_capacity: write the held
                                 outputs of request ``id`` there (after a grow)
ERROR           worker->master   error: ``ranks._remote_errors.pack_exception``
EXIT            master->worker   (none): close the slot mapping and exit 0
==============  ===============  ==================================================

Order (the master's side of it lives in ``_parallel_predictor``): a worker
sends exactly one BUILD_FINISH or ERROR after starting; then, for each
PREDICT, exactly one REPLY or ERROR, with one more REPLY or ERROR after each
COLLECT. The master never sends a second PREDICT to a worker before the
answer to the first, so the slot has one owner at a time.
"""

from __future__ import annotations

from typing import NamedTuple

from ._errors import WorkerError

VERSION = 1

BUILD_FINISH = "BUILD_FINISH"
PREDICT = "PREDICT"
REPLY = "REPLY"
COLLECT = "COLLECT"
ERROR = "ERROR"
EXIT = "EXIT"

KINDS = (BUILD_FINISH, PREDICT, REPLY, COLLECT, ERROR, EXIT)

STATUS_OK = "ok"
STATUS_NEED_SPACE = "need_space"


class TensorSpec(NamedTuple):
    """Where one tensor lies in a slot: its bytes are ``slot[offset : offset + nbytes]``."""

    name: str
    dtype: str  # numpy dtype string, e.g. "<f4"
    shape: tuple
    offset: int
    nbytes: int


def message(kind: str, request_id: int = 0, **body) -> dict:
    """A message of ``kind`` for request ``request_id``."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; the protocol knows {list(KINDS)}")
    return {"v": VERSION, "kind": kind, "id": request_id, **body}


def check(msg, sender: str) -> dict:
    """``msg`` if it is a message of this protocol version, else a WorkerError naming ``sender``."""
    if not isinstance(msg, dict) or "kind" not in msg:
        raise WorkerError(f"{sender} sent {type(msg).__name__} {msg!r:.200}, which is not a message of the worker protocol")
    if msg.get("v") != VERSION:
        raise WorkerError(
            f"{sender} speaks worker protocol version {msg.get('v')!r}, this master speaks {VERSION}: "
            f"master and worker come from different installations of the orchestrator"
        )
    if msg["kind"] not in KINDS:
        raise WorkerError(f"{sender} sent unknown message kind {msg['kind']!r}; the protocol knows {list(KINDS)}")
    return msg

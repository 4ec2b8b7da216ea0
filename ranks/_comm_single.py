"""A world of one: every verb is a copy, so one-device runs and tests share the code path."""

from __future__ import annotations

import numpy as np

from ._comm_base import REDUCE_OPS, Communicator
from ._comm_util import as_array, check_out
from ._env import default_timeout
from ._errors import CommError


class SingleCommunicator(Communicator):
    backend = "single"

    def __init__(self, timeout: float | None = None):
        super().__init__(0, 1, default_timeout() if timeout is None else timeout)
        self._mailbox: dict[int, list[np.ndarray]] = {}

    def allreduce(self, array, op="sum", *, out=None):
        if op not in REDUCE_OPS:
            raise ValueError(f"allreduce op must be one of {REDUCE_OPS}, got {op!r}")
        if out is None:
            return np.array(array, copy=True)
        arr = as_array(array, "allreduce", 0)
        check_out(out, arr.shape, arr.dtype, "allreduce", 0)
        np.copyto(out, arr)
        return out

    def allgather(self, array, axis=0, *, out=None):
        array = np.asarray(array)
        if array.ndim and not -array.ndim <= axis < array.ndim:
            raise ValueError(f"allgather axis {axis} is out of range for an array of {array.ndim} dimensions")
        # As on the other backends, a 0-d array gathers as shape (1,): one entry per rank.
        piece = array.reshape(1) if array.ndim == 0 else array
        if out is None:
            return np.array(piece, copy=True)
        arr = as_array(piece, "allgather", 0)
        check_out(out, arr.shape, arr.dtype, "allgather", 0)
        np.copyto(out, arr)
        return out

    def broadcast(self, array, root=0):
        if root != 0:
            raise ValueError(f"broadcast root {root} does not exist in a world of size 1")
        return np.array(array, copy=True)

    def barrier(self):
        return None

    def send(self, array, dest, tag=0):
        if dest != 0:
            raise ValueError(f"send to rank {dest}: a world of size 1 has only rank 0")
        self._mailbox.setdefault(tag, []).append(np.array(array, copy=True))

    def recv(self, source, tag=0):
        if source != 0:
            raise ValueError(f"recv from rank {source}: a world of size 1 has only rank 0")
        queue = self._mailbox.get(tag)
        if not queue:
            # Nobody else could ever send it: fail now rather than wait out the timeout.
            raise CommError(f"recv on rank 0 of 1: nothing was sent with tag {tag}, and no other rank exists")
        return queue.pop(0)

    def close(self):
        self._mailbox.clear()

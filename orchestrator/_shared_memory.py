"""Shared-memory slots of the batch-split master: one per worker, owned by the master.

A slot is one POSIX shared-memory segment (``/dev/shm/orch_pp<master pid>_<worker>_<generation>_<random>``)
laid out as::

    0                  out_offset (= in_capacity)          size
    | inputs ...       | outputs ...                        |

Every tensor starts on a 64-byte boundary; where each one lies is said by the
``TensorSpec`` tuples of the PREDICT and REPLY messages (``_worker_protocol``).
The master creates the segment and reuses it for every request; when a
request needs more room it creates a bigger one under a new name (the
generation goes up) and unlinks the old one, and the worker maps the new name
when a PREDICT or COLLECT names it.

Who may touch the slot follows from the messages, so no flags live in the
memory itself:

=================  ==========================  ===========================  ==================
state              entered when                master may                   worker may
=================  ==========================  ===========================  ==================
FREE               REPLY/ERROR received        write inputs, grow, unlink   nothing
WORKER_OWNS        PREDICT or COLLECT sent     nothing                      read inputs,
                                                                            write outputs
MASTER_READS       REPLY "ok" received         read outputs (-> FREE)       nothing
=================  ==========================  ===========================  ==================

Unlinking. The master unlinks every slot on ``close()``, after an error, and
from a ``weakref.finalize`` hook at interpreter exit. If the master is killed
(SIGKILL), each worker notices (its pipe reaches EOF or its parent pid
changes) and unlinks the slot it has mapped before exiting; a slot that no
worker had mapped yet is unlinked by ``multiprocessing``'s resource tracker,
which the master's segments are registered with and which outlives the master
until the last worker is gone.
"""

from __future__ import annotations

import os
import secrets
from multiprocessing import shared_memory

import numpy as np

from ._worker_protocol import TensorSpec

ALIGN = 64
PAGE = 4096
MIN_SEGMENT = 64 * 1024
PREFIX = "orch_pp"


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def _round_up(nbytes: int) -> int:
    return max(MIN_SEGMENT, (nbytes + PAGE - 1) // PAGE * PAGE)


def segment_prefix(master_pid: int | None = None) -> str:
    """The name prefix of every slot of the master with this pid (this process by default)."""
    return f"{PREFIX}{os.getpid() if master_pid is None else master_pid}_"


def layout(arrays: list[tuple[str, np.dtype, tuple]], start: int) -> tuple[list[TensorSpec], int]:
    """TensorSpecs for (name, dtype, shape) placed one after another from ``start``; and the end offset."""
    specs = []
    offset = start
    for name, dtype, shape in arrays:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        specs.append(TensorSpec(name, dtype.str, tuple(int(d) for d in shape), offset, nbytes))
        offset = aligned(offset + nbytes)
    return specs, offset


def view(buf, spec: TensorSpec) -> np.ndarray:
    """The array ``spec`` describes, as a view into ``buf`` (no copy)."""
    return np.ndarray(spec.shape, dtype=np.dtype(spec.dtype), buffer=buf, offset=spec.offset)


class Slot:
    """The master's slot for one worker: create, grow, write inputs, read outputs, unlink."""

    def __init__(self, worker_index: int):
        self.worker_index = worker_index
        self.generation = 0
        self.in_capacity = 0
        self.out_capacity = 0
        self._shm: shared_memory.SharedMemory | None = None

    @property
    def name(self) -> str | None:
        return self._shm.name if self._shm is not None else None

    @property
    def size(self) -> int:
        return self._shm.size if self._shm is not None else 0

    @property
    def out_offset(self) -> int:
        return self.in_capacity

    def ensure(self, in_bytes: int, out_bytes: int) -> None:
        """Make room for ``in_bytes`` of inputs and ``out_bytes`` of outputs (state FREE only)."""
        if self._shm is not None and in_bytes <= self.in_capacity and out_bytes <= self.out_capacity:
            return
        # Grow with headroom so that a batch creeping up does not reallocate on every request.
        in_capacity = self.in_capacity if in_bytes <= self.in_capacity else _round_up(in_bytes + in_bytes // 4)
        out_capacity = self.out_capacity if out_bytes <= self.out_capacity else _round_up(out_bytes + out_bytes // 4)
        self._replace(in_capacity, out_capacity)

    def _replace(self, in_capacity: int, out_capacity: int) -> None:
        self.generation += 1
        name = f"{segment_prefix()}{self.worker_index}_{self.generation}_{secrets.token_hex(4)}"
        new = shared_memory.SharedMemory(name=name, create=True, size=in_capacity + out_capacity)
        self.unlink()
        self._shm = new
        self.in_capacity, self.out_capacity = in_capacity, out_capacity

    def write_inputs(self, specs: list[TensorSpec], arrays: list[np.ndarray]) -> None:
        buf = self._shm.buf
        for spec, array in zip(specs, arrays):
            target = view(buf, spec)
            np.copyto(target, array, casting="no")
            del target

    def read_into(self, spec: TensorSpec, target: np.ndarray) -> None:
        source = view(self._shm.buf, spec)
        np.copyto(target, source, casting="no")
        del source

    def read(self, spec: TensorSpec) -> np.ndarray:
        source = view(self._shm.buf, spec)
        copy = source.copy()
        del source
        return copy

    def unlink(self) -> None:
        """Close and unlink the segment; harmless when there is none or it is already gone."""
        shm, self._shm = self._shm, None
        self.in_capacity = self.out_capacity = 0
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:
            pass  # an array still views it; the mapping goes when that array does
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class Attachments:
    """The worker's side: the slot it has mapped, by name (the newest one only)."""

    def __init__(self):
        self._shm: shared_memory.SharedMemory | None = None

    def buffer(self, name: str):
        if self._shm is None or self._shm.name != name:
            self.close()
            # Attaching registers the name with the master's resource tracker (the
            # worker shares it); that set-add is harmless, so it is not undone here:
            # unregistering would drop the master's registration with it.
            self._shm = shared_memory.SharedMemory(name=name, create=False)
        return self._shm.buf

    def close(self) -> None:
        shm, self._shm = self._shm, None
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass

    def unlink(self) -> None:
        """Unlink the mapped slot: only when the master is gone and cannot do it."""
        shm = self._shm
        if shm is not None:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass

"""Shared memory of the batch-split master: input slots and output blocks, all owned by the master.

Names start with ``orch_pp<master pid>_``, so a test (or an operator) can
tell which master a segment belongs to.

**Slot** (one per worker, reused across requests): ``/dev/shm/orch_pp<pid>_<worker>_<generation>_<random>``::

    0                  out_offset (= in_capacity)          size
    | inputs ...       | outputs (fallback path) ...        |

**Block** (one per request, shared by all workers): ``/dev/shm/orch_pp<pid>_out<request>_<random>``,
the request's joined outputs laid out one after another exactly as the arrays
the caller gets back. Worker w writes (or ONNX Runtime writes, through I/O
binding) its rows of each output at the offset where those rows lie in the
joined array, so joining costs no copy. The master unlinks the block's name
as soon as every worker has answered; the memory lives on, mapped, inside
the returned arrays, and goes when they do. A block is only used when the
output shapes of a request can be predicted (learned from an earlier request
with the same input shapes); otherwise, or when a worker's outputs turn out
to have other shapes, the worker writes them to its slot's output area and
the master joins them with a copy.

Every tensor starts on a 64-byte boundary; where each one lies is said by the
``TensorSpec`` tuples of the PREDICT and REPLY messages (``_worker_protocol``).
When a request needs more room in a slot, the master creates a bigger segment
under a new name (the generation goes up) and unlinks the old one; the
worker maps the new name when a PREDICT or COLLECT names it.

Who may touch a slot (and a request's block) follows from the messages, so
no flags live in the memory itself:

=================  ==========================  ===========================  ==================
state              entered when                master may                   worker may
=================  ==========================  ===========================  ==================
FREE               REPLY/ERROR received        write inputs, grow, unlink   nothing
WORKER_OWNS        PREDICT or COLLECT sent     nothing                      read inputs,
                                                                            write outputs
MASTER_READS       REPLY "ok" received         read outputs (-> FREE)       nothing
=================  ==========================  ===========================  ==================

Unlinking. The master unlinks every slot on ``close()``, after an error, and
from a ``weakref.finalize`` hook at interpreter exit, and every block when
its request ends, however it ends. If the master is killed (SIGKILL), each
worker notices (its pipe reaches EOF or its parent pid changes) and unlinks
the slot and block it has mapped before exiting; a segment that no worker had
mapped yet is unlinked by ``multiprocessing``'s resource tracker, which every
segment is registered with and which outlives the master until the last
worker is gone.
"""

from __future__ import annotations

import mmap
import os
import secrets
import sys
from multiprocessing import resource_tracker, shared_memory

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

    def view(self, spec: TensorSpec) -> np.ndarray:
        """A view of the slot (valid until the next request: copy before letting it out)."""
        return view(self._shm.buf, spec)

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


class OutputBlock:
    """A segment for joined outputs, lent to the caller inside the returned arrays and reused once they are gone."""

    def __init__(self, number: int, size: int):
        self.name = f"{segment_prefix()}out{number}_{secrets.token_hex(4)}"
        self.size = size
        path = f"/dev/shm/{self.name}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        # Registered like multiprocessing's own segments, so the resource tracker
        # unlinks it if this process is killed before unlink() runs.
        resource_tracker.register("/" + self.name, "shared_memory")
        self._linked = True
        self._idle_refs = sys.getrefcount(self._mmap)

    def in_use(self) -> bool:
        """True while any array made by ``array`` (or a view of one) is alive.

        Every such array holds a reference to the mapping (numpy collapses a
        view's base to the object that owns the memory), so the mapping's
        reference count says whether the caller still holds any of them.
        """
        return self._mmap is None or sys.getrefcount(self._mmap) > self._idle_refs

    def array(self, spec: TensorSpec) -> np.ndarray:
        """The tensor at ``spec``: a view that keeps the mapping alive."""
        count = int(np.prod(spec.shape, dtype=np.int64))
        return np.frombuffer(self._mmap, dtype=np.dtype(spec.dtype), count=count, offset=spec.offset).reshape(spec.shape)

    def release(self) -> None:
        """Unlink the name and drop our mapping; arrays still holding it keep the memory until they go."""
        if self._linked:
            self._linked = False
            try:
                os.unlink(f"/dev/shm/{self.name}")
            except FileNotFoundError:
                pass
            resource_tracker.unregister("/" + self.name, "shared_memory")
        self._mmap = None


class BlockPool:
    """The master's output blocks: a free one big enough is reused, else one is made (at most ``limit``)."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self.blocks: list[OutputBlock] = []
        self.released: list[str] = []  # names the workers should unmap (told in the next PREDICT)
        self._made = 0

    def take(self, size: int) -> OutputBlock | None:
        """A block of at least ``size`` bytes that no caller holds, or None when all are lent out."""
        free = [b for b in self.blocks if not b.in_use()]
        fitting = [b for b in free if b.size >= size]
        if fitting:
            return min(fitting, key=lambda b: b.size)
        if free:
            self._drop(free[0])
        if len(self.blocks) >= self.limit:
            return None
        self._made += 1
        block = OutputBlock(self._made, _round_up(size + size // 8))
        self.blocks.append(block)
        return block

    def _drop(self, block: OutputBlock) -> None:
        self.blocks.remove(block)
        self.released.append(block.name)
        block.release()

    def take_released(self) -> list[str]:
        names, self.released = self.released, []
        return names

    def release_all(self) -> None:
        for block in self.blocks:
            block.release()
        self.blocks = []


class Attachments:
    """The worker's side: the slot it has mapped (the newest one) and the output blocks it has seen."""

    MAX_BLOCKS = 16

    def __init__(self):
        self._shm: shared_memory.SharedMemory | None = None
        self._blocks: dict[str, shared_memory.SharedMemory] = {}

    def block(self, name: str):
        if name not in self._blocks:
            if len(self._blocks) >= self.MAX_BLOCKS:
                self.forget([next(iter(self._blocks))])
            # Attaching registers the name with the master's resource tracker (the
            # worker shares it); that set-add is harmless, so it is not undone here:
            # unregistering would drop the master's registration with it.
            self._blocks[name] = shared_memory.SharedMemory(name=name, create=False)
        return self._blocks[name].buf

    def forget(self, names) -> None:
        """Unmap blocks the master has released."""
        for name in names:
            shm = self._blocks.pop(name, None)
            if shm is not None:
                try:
                    shm.close()
                except BufferError:
                    pass

    def buffer(self, name: str):
        if self._shm is None or self._shm.name != name:
            self.close_slot()
            self._shm = shared_memory.SharedMemory(name=name, create=False)
        return self._shm.buf

    def close_slot(self) -> None:
        shm, self._shm = self._shm, None
        if shm is not None:
            try:
                shm.close()
            except BufferError:
                pass

    def close(self) -> None:
        self.close_slot()
        self.forget(list(self._blocks))

    def unlink(self) -> None:
        """Unlink the mapped slot and blocks: only when the master is gone and cannot do it."""
        try:
            mapped = [self._shm, *list(self._blocks.values())]
        except RuntimeError:  # the main thread changed the dict meanwhile: once more
            mapped = [self._shm, *list(self._blocks.values())]
        for shm in mapped:
            if shm is not None:
                try:
                    shm.unlink()
                except FileNotFoundError:
                    pass

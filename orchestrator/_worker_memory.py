"""The batch-split master's shared memory: the layout of input slots and output blocks, and who may touch them.

Segments come from ``ranks._shared_memory`` (kind ``pp``, owned by the
master: ``orch_pp_<master pid>_<stamp>_...``), in its default mode: a memfd
that the workers open through ``/proc/<master pid>/fd/<fd>`` where that
works, else a named ``/dev/shm`` segment. Messages carry a segment's handle;
``segment_names`` and the tests speak of names.

**Slot** (one per worker, reused across requests; tag ``w<worker>g<generation>``)::

    0                  out_offset (= in_capacity)          size
    | inputs ...       | outputs (fallback path) ...        |

**Block** (one per request, shared by all workers; tag ``out<number>``),
the request's joined outputs laid out one after another exactly as the arrays
the caller gets back. Worker w writes (or ONNX Runtime writes, through I/O
binding) its rows of each output at the offset where those rows lie in the
joined array, so joining costs no copy. The master unlinks the block as soon
as every worker has answered; the memory lives on, mapped, inside the
returned arrays, and goes when they do. A block is only used when the
output shapes of a request can be predicted (learned from an earlier request
with the same input shapes); otherwise, or when a worker's outputs turn out
to have other shapes, the worker writes them to its slot's output area and
the master joins them with a copy.

Every tensor starts on a 64-byte boundary; where each one lies is said by the
``TensorSpec`` tuples of the PREDICT and REPLY messages (``_protocol``).
When a request needs more room in a slot, the master creates a bigger segment
(the generation goes up) and unlinks the old one; the worker maps the new
handle when a PREDICT or COLLECT names it.

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

Unlinking (the general rules are in ``ranks._shared_memory``). The master
unlinks every slot on ``close()``, after an error, and from a
``weakref.finalize`` hook at interpreter exit (the home's ``atexit`` and
signal handler back that up), and every block when its request ends,
however it ends. If the master is killed (SIGKILL): memfd segments vanish
with the last mapping; named ones are removed by each worker as it notices
(its pipe reaches EOF or its parent pid changes: it removes what it mapped
and sweeps every segment of the dead master, mapped or not) and by any later
sweep on this host.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from ranks import _shared_memory
from ranks._shared_memory import Segment

from ._protocol import TensorSpec

ALIGN = 64
PAGE = 4096
MIN_SEGMENT = 64 * 1024
KIND = "pp"


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def _round_up(nbytes: int) -> int:
    return max(MIN_SEGMENT, (nbytes + PAGE - 1) // PAGE * PAGE)


def segment_prefix(master_pid: int | None = None) -> str:
    """The name prefix of every segment of the master with this pid (this process by default)."""
    return f"{_shared_memory.PREFIX}{KIND}_{os.getpid() if master_pid is None else master_pid}_"


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
        self._segment: Segment | None = None

    @property
    def name(self) -> str | None:
        return self._segment.name if self._segment is not None else None

    @property
    def handle(self) -> str | None:
        """What the worker attaches (``ranks._shared_memory.attach``)."""
        return self._segment.handle if self._segment is not None else None

    @property
    def size(self) -> int:
        return self._segment.size if self._segment is not None else 0

    @property
    def out_offset(self) -> int:
        return self.in_capacity

    def ensure(self, in_bytes: int, out_bytes: int) -> None:
        """Make room for ``in_bytes`` of inputs and ``out_bytes`` of outputs (state FREE only)."""
        if self._segment is not None and in_bytes <= self.in_capacity and out_bytes <= self.out_capacity:
            return
        # Grow with headroom so that a batch creeping up does not reallocate on every request.
        in_capacity = self.in_capacity if in_bytes <= self.in_capacity else _round_up(in_bytes + in_bytes // 4)
        out_capacity = self.out_capacity if out_bytes <= self.out_capacity else _round_up(out_bytes + out_bytes // 4)
        self._replace(in_capacity, out_capacity)

    def _replace(self, in_capacity: int, out_capacity: int) -> None:
        self.generation += 1
        new = _shared_memory.create(KIND, in_capacity + out_capacity, tag=f"w{self.worker_index}g{self.generation}")
        self.unlink()
        self._segment = new
        self.in_capacity, self.out_capacity = in_capacity, out_capacity

    def write_inputs(self, specs: list[TensorSpec], arrays: list[np.ndarray]) -> None:
        buf = self._segment.mmap
        for spec, array in zip(specs, arrays):
            target = view(buf, spec)
            np.copyto(target, array, casting="no")
            del target

    def view(self, spec: TensorSpec) -> np.ndarray:
        """A view of the slot (valid until the next request: copy before letting it out)."""
        return view(self._segment.mmap, spec)

    def read_into(self, spec: TensorSpec, target: np.ndarray) -> None:
        source = view(self._segment.mmap, spec)
        np.copyto(target, source, casting="no")
        del source

    def read(self, spec: TensorSpec) -> np.ndarray:
        source = view(self._segment.mmap, spec)
        copy = source.copy()
        del source
        return copy

    def unlink(self) -> None:
        """Unlink and unmap the segment; harmless when there is none or it is already gone."""
        segment, self._segment = self._segment, None
        self.in_capacity = self.out_capacity = 0
        if segment is not None:
            segment.close()  # an array still viewing it keeps the mapping until it goes


class OutputBlock:
    """A segment for joined outputs, lent to the caller inside the returned arrays and reused once they are gone."""

    def __init__(self, number: int, size: int):
        self._segment: Segment | None = _shared_memory.create(KIND, size, tag=f"out{number}")
        self.name = self._segment.name
        self.handle = self._segment.handle
        self.size = size
        self._mmap = self._segment.mmap
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
        """Unlink and drop our mapping; arrays still holding it keep the memory until they go."""
        segment, self._segment = self._segment, None
        if segment is not None:
            segment.unlink()
        self._mmap = None


class BlockPool:
    """The master's output blocks: a free one big enough is reused, else one is made (at most ``limit``)."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self.blocks: list[OutputBlock] = []
        self.released: list[str] = []  # handles the workers should unmap (told in the next PREDICT)
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
        self.released.append(block.handle)
        block.release()

    def take_released(self) -> list[str]:
        handles, self.released = self.released, []
        return handles

    def release_all(self) -> None:
        for block in self.blocks:
            block.release()
        self.blocks = []


class Attachments:
    """The worker's side: the slot it has mapped (the newest one) and the output blocks it has seen, by handle."""

    MAX_BLOCKS = 16

    def __init__(self, master_pid: int | None = None):
        self.master_pid = master_pid
        self._slot: Segment | None = None
        self._blocks: dict[str, Segment] = {}

    def block(self, handle: str):
        if handle not in self._blocks:
            if len(self._blocks) >= self.MAX_BLOCKS:
                self.forget([next(iter(self._blocks))])
            self._blocks[handle] = _shared_memory.attach(handle)
        return self._blocks[handle].mmap

    def forget(self, handles) -> None:
        """Unmap blocks the master has released."""
        for handle in handles:
            segment = self._blocks.pop(handle, None)
            if segment is not None:
                segment.close()

    def buffer(self, handle: str):
        if self._slot is None or self._slot.handle != handle:
            self.close_slot()
            self._slot = _shared_memory.attach(handle)
        return self._slot.mmap

    def close_slot(self) -> None:
        segment, self._slot = self._slot, None
        if segment is not None:
            segment.close()

    def close(self) -> None:
        self.close_slot()
        self.forget(list(self._blocks))

    def unlink(self, wait: float = 1.0) -> None:
        """Remove the master's named segments: only when the master is gone and cannot do it.

        What this worker has mapped goes at once. Every other named segment of
        the master (a slot of another worker, a block nobody mapped) goes once
        the master is dead, which takes a moment after its pipe closed: up to
        ``wait`` seconds are spent waiting for that.
        """
        try:
            mapped = [self._slot, *list(self._blocks.values())]
        except RuntimeError:  # the main thread changed the dict meanwhile: once more
            mapped = [self._slot, *list(self._blocks.values())]
        for segment in mapped:
            if segment is not None:
                _shared_memory.remove(segment.handle)
        if self.master_pid is None:
            return
        prefix = segment_prefix(self.master_pid)
        deadline = time.monotonic() + wait
        while any(n.startswith(prefix) for n in _listdir(_shared_memory.SHM_DIR)):
            if _shared_memory.remove_stale([self.master_pid]) or time.monotonic() > deadline:
                return
            time.sleep(0.02)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []

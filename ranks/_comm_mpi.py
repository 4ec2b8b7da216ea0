"""The ``mpi`` backend: a thin layer over mpi4py's buffer (uppercase) verbs.

How a collective stays bounded by the timeout without slowing the data path:

1. *Arrival* (nonblocking, polled with a deadline): a tiny ``Iallreduce``
   (MAX) of a 4-integer signature (sequence number, operation, dtype, shape)
   that every rank must reach. It costs a few microseconds, proves that every
   rank has entered the same collective, and catches ranks that call
   different collectives or pass different shapes, which would otherwise
   deadlock or corrupt memory inside MPI. When the deadline passes,
   ``CommTimeoutError`` names the ranks that had not arrived: ranks on this
   host publish how far they got in a small shared-memory window, so the
   error names them exactly; for ranks on other hosts it says so.
2. *Data* (blocking uppercase ``Allreduce``/``Allgather``/``Bcast``): MPI's
   tuned algorithms, measured faster than their nonblocking twins from 64 KB
   up. Every rank has arrived, so the call can only stall if a peer dies
   inside it; Open MPI and MPICH then abort the whole job. A watchdog thread
   covers the rest: if the data phase outlives the timeout it prints the
   error and aborts the job, so nothing waits forever.

After a timeout the communicator is broken (MPI cannot cancel a pending
collective): later calls raise ``CommError``, and at interpreter exit the job
is aborted rather than left to hang in ``MPI_Finalize``. Likewise an uncaught
exception in any rank aborts the job (as ``python -m mpi4py`` does), so its
peers fail at once instead of waiting out their timeout.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import zlib

import numpy as np

from . import _shm
from ._comm_base import Communicator
from ._comm_util import DTYPE_CODE, DTYPES, OP_CODE, as_array, check_op, check_rank, check_tag, gather_axis
from ._env import default_timeout
from ._errors import CommError, CommTimeoutError

_OPS = ("allreduce", "allgather", "broadcast", "barrier")
_HEADER_LEN = 68  # dtype code, ndim, up to 66 dimensions (numpy allows 64)


def _mpi():
    from mpi4py import MPI

    return MPI


class MpiCommunicator(Communicator):
    """Ranks of an MPI communicator (default ``COMM_WORLD``).

    ``allgather`` accepts shapes that differ along ``axis`` (it switches to
    ``Allgatherv``); all other dimensions and the dtype must agree.
    """

    backend = "mpi"

    def __init__(self, comm=None, timeout: float | None = None):
        MPI = _mpi()
        self._MPI = MPI
        base = MPI.COMM_WORLD if comm is None else comm
        # Our own context, so user traffic on COMM_WORLD never matches ours.
        self._comm = base.Dup()
        super().__init__(self._comm.Get_rank(), self._comm.Get_size(), default_timeout() if timeout is None else timeout)
        if self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        self._seq = 0
        self._broken: str | None = None
        self._closed = False
        self._pending: list = []
        self._sig = np.zeros(6, np.int64)
        self._sig_out = np.zeros(6, np.int64)
        self._reductions = {
            "sum": MPI.SUM,
            "max": MPI.MAX,
            "min": MPI.MIN,
            "prod": MPI.PROD,
        }
        self._bool_reductions = {"sum": MPI.LOR, "max": MPI.LOR, "min": MPI.LAND, "prod": MPI.LAND}
        self._host = MPI.Get_processor_name()
        self._setup_progress_window()
        self._watchdog = _Watchdog(self)
        _install_abort_hooks(self)

    # -- where every rank is: a shared-memory window per host -----------------
    def _setup_progress_window(self) -> None:
        # A plain /dev/shm segment rather than an MPI shared window: Open MPI's
        # one-sided components print errors on hosts without UCX hardware.
        MPI = self._MPI
        self._node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self._local = self._node.Get_rank()
        nbytes = 16 * self._node.Get_size()
        self._segment = None
        if self._local == 0:
            try:
                name, self._segment = _shm.create("mpi", nbytes)
            except OSError:
                name = ""
        else:
            name = None
        name = self._node.bcast(name, root=0)
        if name and self._local != 0:
            try:
                self._segment = _shm.attach(name)
            except OSError:
                self._segment = None
        self._node.Barrier()  # everyone attached (or gave up): the name can go
        if self._local == 0 and name:
            _shm.unlink(name)
        if self._segment is not None:
            self._progress = np.ndarray(buffer=self._segment, dtype=np.int64, shape=(self._node.Get_size(), 2))
        else:  # no /dev/shm: errors cannot say which local rank is behind, nothing else changes
            self._progress = np.zeros((self._node.Get_size(), 2), np.int64)
        self._progress[self._local] = (0, -1)
        self._node_world = self._node.allgather(self.rank)
        self._hosts = self._comm.allgather(self._host)

    def _enter(self, op: str) -> int:
        if self._closed:
            raise CommError(f"{op} on rank {self.rank} of {self.size}: the communicator is closed")
        if self._broken is not None:
            raise CommError(f"{op} on rank {self.rank} of {self.size}: the communicator is broken by an earlier error: {self._broken}")
        self._seq += 1
        self._progress[self._local, 0] = self._seq
        self._progress[self._local, 1] = _OPS.index(op) if op in _OPS else 4
        return self._seq

    def _describe_missing(self) -> str:
        behind = []
        for j, world in enumerate(self._node_world):
            if world == self.rank:
                continue
            seq, opcode = (int(x) for x in self._progress[j])
            if seq < self._seq:
                last = f"operation #{seq} ({_op_name(opcode)})" if seq else "no operation yet"
                behind.append(f"rank {world} (it is at {last})")
        remote = [r for r in range(self.size) if self._hosts[r] != self._host]
        parts = []
        if behind:
            parts.append("waiting for " + ", ".join(behind))
        if remote:
            parts.append(f"ranks on other hosts not checked: {remote}")
        if not parts:
            parts.append("every rank on this host arrived; a rank on another host or MPI itself did not answer")
        return "; ".join(parts)

    # -- the two phases ------------------------------------------------------
    def _arrive(self, op: str, seq: int, code: int, dtype_code: int, shape_key: int, count: int = 0) -> bool:
        """Nonblocking agreement on the call, polled until the deadline.

        Returns whether every rank passed the same ``count`` (allgather rows).
        """
        s = self._sig
        s[0] = seq
        s[1] = -seq
        s[2] = (code << 8) | dtype_code
        s[3] = shape_key
        s[4] = count
        s[5] = -count
        request = self._comm.Iallreduce(s, self._sig_out, self._MPI.MAX)
        self._poll(request, op, seq)
        out = self._sig_out
        if out[0] != seq or -out[1] != seq or out[2] != s[2] or out[3] != s[3]:
            self._mismatch(op, seq)
        return out[4] == -out[5]

    def _poll(self, request, op: str, seq: int) -> None:
        if request.Test():
            return
        start = time.monotonic()
        deadline = start + self.timeout
        spins = 0
        while not request.Test():
            spins += 1
            if spins & 1023 == 0:
                now = time.monotonic()
                if now > deadline:
                    message = (
                        f"{op} #{seq} on rank {self.rank} of {self.size} timed out after {now - start:.1f} s: "
                        f"{self._describe_missing()}"
                    )
                    self._broken = message
                    raise CommTimeoutError(message)
                if now - start > 0.05:
                    # Long waits (a peer still computing) should not burn the core it needs.
                    time.sleep(0.0002)

    def _mismatch(self, op: str, seq: int) -> None:
        # Every rank got the same MAX, so every rank lands here; find out who called what.
        mine = (seq, op)
        calls = self._comm.allgather(mine)  # everyone arrived, so this cannot hang
        different = [f"rank {r}: {o} #{s}" for r, (s, o) in enumerate(calls) if (s, o) != mine]
        message = (
            f"{op} #{seq} on rank {self.rank} of {self.size}: the ranks disagree on the call "
            f"(operation, dtype, shape or root); " + ("; ".join(different) if different else "same operation, different arguments")
        )
        self._broken = message
        raise CommError(message)

    def _data(self, op: str, seq: int, fn, *args) -> None:
        watchdog = self._watchdog
        watchdog.arm(op, seq, time.monotonic() + self.timeout)
        try:
            fn(*args)
        finally:
            watchdog.disarm()

    # -- verbs ---------------------------------------------------------------
    def allreduce(self, array, op="sum"):
        check_op(op)
        arr = as_array(array, f"allreduce on rank {self.rank}")
        seq = self._enter("allreduce")
        self._arrive("allreduce", seq, 1 + OP_CODE[op], DTYPE_CODE[arr.dtype], _shape_key(arr.shape))
        if arr.dtype == np.float16:
            # MPI has no half type; reduce in float32 (exact for max/min, more exact for sum/prod).
            wide = arr.astype(np.float32)
            out = np.empty_like(wide)
            self._data("allreduce", seq, self._comm.Allreduce, wide, out, self._reductions[op])
            return out.astype(np.float16)
        out = np.empty_like(arr)
        mpi_op = self._bool_reductions[op] if arr.dtype == np.bool_ else self._reductions[op]
        self._data("allreduce", seq, self._comm.Allreduce, arr, out, mpi_op)
        return out

    def allgather(self, array, axis=0):
        arr = as_array(array, f"allgather on rank {self.rank}")
        axis = gather_axis(arr.shape, axis)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        seq = self._enter("allgather")
        other_dims = arr.shape[:axis] + arr.shape[axis + 1 :]
        send = arr if axis == 0 else np.ascontiguousarray(np.moveaxis(arr, axis, 0))
        # Shapes may differ along the axis: agree on everything else, and learn
        # from the same tiny reduction whether the row counts are all equal.
        even = self._arrive(
            "allgather", seq, 10 + axis, DTYPE_CODE[arr.dtype], _shape_key((arr.ndim,) + other_dims), send.shape[0]
        )
        row_shape = send.shape[1:]
        raw = send.reshape(-1).view(np.uint8)
        MPI = self._MPI
        if even:
            n = send.shape[0]
            out = np.empty((self.size * n,) + row_shape, dtype=send.dtype)
            self._data("allgather", seq, self._comm.Allgather, [raw, MPI.BYTE], [out.reshape(-1).view(np.uint8), MPI.BYTE])
        else:
            counts = np.zeros(self.size, np.int64)
            self._data("allgather", seq, self._comm.Allgather, np.array([send.shape[0]], np.int64), counts)
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * send.dtype.itemsize
            out = np.empty((int(counts.sum()),) + row_shape, dtype=send.dtype)
            sizes = [int(c) * row_bytes for c in counts]
            displs = [int(d) for d in np.cumsum([0] + sizes[:-1])]
            self._data(
                "allgather", seq, self._comm.Allgatherv, [raw, MPI.BYTE],
                [out.reshape(-1).view(np.uint8), (sizes, displs), MPI.BYTE],
            )
        if axis != 0:
            out = np.ascontiguousarray(np.moveaxis(out, 0, axis))
        return out

    def broadcast(self, array, root=0):
        root = check_rank(root, self.size, "broadcast root")
        header = np.zeros(_HEADER_LEN, np.int64)
        if self.rank == root:
            arr = as_array(array, f"broadcast on rank {self.rank}")
            _write_header(header, arr)
        seq = self._enter("broadcast")
        self._arrive("broadcast", seq, 20 + root, 0, 0)
        self._data("broadcast", seq, self._comm.Bcast, header, root)
        dtype, shape = _read_header(header)
        if self.rank != root:
            arr = np.empty(shape, dtype=dtype)
        if arr.size:
            self._data("broadcast", seq, self._comm.Bcast, [arr.reshape(-1).view(np.uint8), self._MPI.BYTE], root)
        return arr if self.rank != root else np.array(arr, copy=True)

    def barrier(self):
        seq = self._enter("barrier")
        self._arrive("barrier", seq, 30, 0, 0)

    def send(self, array, dest, tag=0):
        """Queue ``array`` for ``dest`` and return without waiting for the receiver.

        Like the zmq backend (and unlike a bare ``MPI_Send``), two ranks may both
        send before they receive. The data is copied, so the caller may reuse
        ``array`` at once; pending sends finish in the background of later
        calls and are waited for (bounded by the timeout) in ``close``.
        """
        dest = check_rank(dest, self.size, "send dest")
        tag = check_tag(tag)
        arr = np.array(as_array(array, f"send on rank {self.rank}"), copy=True)
        if self._broken is not None or self._closed:
            self._enter("send")
        header = np.zeros(_HEADER_LEN, np.int64)
        _write_header(header, arr)
        requests = [self._comm.Isend(header, dest, tag)]
        if arr.size:
            requests.append(self._comm.Isend([arr.reshape(-1).view(np.uint8), self._MPI.BYTE], dest, tag))
        # Keep the buffers alive until MPI is done with them.
        self._pending.append((requests, header, arr, dest, tag))
        self._prune_pending()

    def _prune_pending(self) -> None:
        self._pending = [p for p in self._pending if not self._MPI.Request.Testall(p[0])]

    def recv(self, source, tag=0):
        source = check_rank(source, self.size, "recv source")
        tag = check_tag(tag)
        if self._broken is not None or self._closed:
            self._enter("recv")
        self._prune_pending()
        header = np.zeros(_HEADER_LEN, np.int64)
        what = f"recv from rank {source} (tag {tag})"
        self._wait(self._comm.Irecv(header, source, tag), what, source)
        dtype, shape = _read_header(header)
        arr = np.empty(shape, dtype=dtype)
        if arr.size:
            self._wait(self._comm.Irecv([arr.reshape(-1).view(np.uint8), self._MPI.BYTE], source, tag), what, source)
        return arr

    def _wait(self, request, what: str, peer: int) -> None:
        start = time.monotonic()
        deadline = start + self.timeout
        spins = 0
        while not request.Test():
            spins += 1
            if spins & 255 == 0:
                now = time.monotonic()
                if now > deadline:
                    try:
                        request.Cancel()
                    except Exception:
                        pass
                    message = (
                        f"{what} on rank {self.rank} of {self.size} timed out after {now - start:.1f} s: "
                        f"rank {peer} did not answer"
                    )
                    self._broken = message
                    raise CommTimeoutError(message)
                if now - start > 0.05:
                    time.sleep(0.0002)

    def close(self):
        if self._closed:
            return
        try:
            if self._broken is None:
                for requests, _, _, dest, tag in list(self._pending):
                    for request in requests:
                        self._wait(request, f"close: delivering a send to rank {dest} (tag {tag})", dest)
                self._pending.clear()
        finally:
            self._closed = True
            self._watchdog.stop()
        # Freeing the window and the duplicated communicator is collective;
        # a broken communicator (a peer missing) would hang there, so skip it:
        # MPI releases both at finalize or abort.
        if self._broken is None:
            try:
                self._node.Free()
                self._comm.Free()
            except Exception:
                pass


def _op_name(code: int) -> str:
    return _OPS[code] if 0 <= code < len(_OPS) else "send/recv"


def _shape_key(shape: tuple[int, ...]) -> int:
    return zlib.crc32(np.asarray(shape, dtype=np.int64).tobytes()) | (len(shape) << 32)


def _write_header(header: np.ndarray, arr: np.ndarray) -> None:
    if arr.ndim > _HEADER_LEN - 2:
        raise ValueError(f"arrays of {arr.ndim} dimensions are not supported (at most {_HEADER_LEN - 2})")
    header[0] = DTYPE_CODE[arr.dtype]
    header[1] = arr.ndim
    header[2 : 2 + arr.ndim] = arr.shape


def _read_header(header: np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    ndim = int(header[1])
    return DTYPES[int(header[0])], tuple(int(x) for x in header[2 : 2 + ndim])


class _Watchdog:
    """Aborts the MPI job when a blocking data phase outlives the timeout.

    Arming and disarming are two attribute writes; the thread wakes twice a
    second and only starts on the first call that lasts longer than that.
    """

    def __init__(self, comm: MpiCommunicator):
        self._comm = comm
        self._armed: tuple[str, int, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self, op: str, seq: int, deadline: float) -> None:
        self._armed = (op, seq, deadline)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="orch-mpi-watchdog", daemon=True)
                    self._thread.start()

    def disarm(self) -> None:
        self._armed = None

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            armed = self._armed
            if armed is None or time.monotonic() <= armed[2]:
                continue
            op, seq, _ = armed
            comm = self._comm
            message = (
                f"ranks.CommTimeoutError: {op} #{seq} on rank {comm.rank} of {comm.size} did not finish within "
                f"{comm.timeout:.1f} s after every rank had arrived (a peer died inside MPI?); aborting the MPI job"
            )
            _abort(comm, message)


def _abort(comm: MpiCommunicator, message: str) -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except Exception:
        pass
    try:
        comm._MPI.COMM_WORLD.Abort(1)
    finally:
        import os

        os._exit(1)


_HOOKED: list[MpiCommunicator] = []


def _install_abort_hooks(comm: MpiCommunicator) -> None:
    """Uncaught exception or exit after a timeout: abort the job instead of hanging in MPI_Finalize."""
    _HOOKED.append(comm)
    if len(_HOOKED) > 1:
        return
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        live = [c for c in _HOOKED if c.size > 1 and not c._closed]
        broken = [c for c in _HOOKED if c._broken is not None]
        if live or broken:
            comm_ = (live or broken)[0]
            _abort(comm_, f"rank {comm_.rank} of {comm_.size}: uncaught {exc_type.__name__}; aborting the MPI job so the other ranks do not wait")

    sys.excepthook = excepthook

    def at_exit():
        broken = [c for c in _HOOKED if c._broken is not None]
        if broken:
            _abort(broken[0], f"rank {broken[0].rank} of {broken[0].size}: exiting after a failed collective; aborting the MPI job")

    # atexit runs last-registered first, so this runs before mpi4py's MPI_Finalize.
    atexit.register(at_exit)

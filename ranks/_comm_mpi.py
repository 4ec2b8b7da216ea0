"""The ``mpi`` backend: a thin layer over mpi4py's buffer (uppercase) verbs.

How a collective stays bounded by the timeout without slowing the data path:

1. *Arrival* (nonblocking, polled with a deadline): an ``Ibarrier`` for
   allreduce, broadcast and barrier (measured +3 us over the blocking call
   alone at 4 KB), an ``Iallgather`` of (sequence number, call key, row
   count) for allgather, which needs the counts anyway and checks every
   rank's call. Before arriving, each rank publishes (sequence number, verb,
   call key) in a small per-host shared-memory segment: after the barrier a
   rank compares its call with those of the ranks on its host (different
   verb, dtype, shape, op or root: ``CommError`` instead of a deadlock or
   corrupted memory inside MPI), and when the deadline passes
   ``CommTimeoutError`` names the ranks that had not arrived and what they
   were doing; ranks on other hosts are listed as not checked.
2. *Data* (blocking uppercase ``Allreduce``/``Allgather``/``Bcast``): MPI's
   tuned algorithms, measured faster than their nonblocking twins from 64 KB
   up. Every rank has arrived, so the call can only stall if a peer dies
   inside it; Open MPI and MPICH then abort the whole job. A watchdog thread
   covers the rest: if the data phase outlives the timeout it prints the
   error and aborts the job, so nothing waits forever.

*Fast mode* (``arrival_check=False``; ``[comm] mpi_arrival_check=false``;
``ORCH_MPI_ARRIVAL_CHECK=false``): step 1 is skipped. Each rank still
publishes its call in the per-host segment (a few hundred nanoseconds), then
goes straight into the blocking MPI call under the watchdog, so a faster rank
starts its transfer at once, as raw mpi4py does. The price: a missing peer is
no longer a catchable ``CommTimeoutError``; when the call outlives the timeout
the watchdog prints the op, this rank and the local peers that are behind
(from the segment) and aborts the job. Calls that differ between ranks (verb,
dtype, shape, op, root) are not detected: MPI may fail, hang until the
watchdog fires, or deliver wrong data. ``allgather`` needs the same shape on
every rank (as ``MPI_Allgather``); ``barrier`` keeps its checked arrival.

After a timeout the communicator is broken (MPI cannot cancel a pending
collective): later calls raise ``CommError``, and at interpreter exit the job
is aborted rather than left to hang in ``MPI_Finalize``. Likewise an uncaught
exception in any rank aborts the job (as ``python -m mpi4py`` does), so its
peers fail at once instead of waiting out their timeout.
"""

from __future__ import annotations

import array
import atexit
import os
import re
import struct
import sys
import threading
import time

import numpy as np

from . import _env, _shared_memory
from ._comm_base import Communicator
from ._comm_util import (
    DTYPE_CODE, DTYPES, OP_CODE, ResultPool, as_array, check_op, check_out, check_rank, check_tag, gather_axis, gathered_shape,
)
from ._env import default_timeout, mpi_arrival_check
from ._errors import CommError, CommTimeoutError, PeerLostError

_OPS = ("allreduce", "allgather", "broadcast", "barrier")
_OP_INDEX = {name: i for i, name in enumerate(_OPS)}
_OP_INDEX.update(send=4, recv=4)
_ROW = struct.Struct("3q")  # (sequence number, call key, row count): allgather's arrival message
_CALL = struct.Struct("3q")  # a rank's (verb, call key, row count) in the per-host segment, then:
_SEQ = struct.Struct("q")  # its sequence number, written last: a reader that sees it sees the rest
_STRIDE = 128  # two cache lines per rank, so ranks never write the same line: the call slots, then:
_LIVENESS_SECONDS = 0.1  # how often a waiting collective looks whether its local peers' processes still exist
# How long a peer must be seen gone before it is blamed: its launcher's watcher reports its exit meanwhile
# (orchestrate launch names a rank that left with code 0 as the root cause only when it has its record).
_DEAD_GRACE_SECONDS = 0.5
_CLOSED_AT = 64  # where a rank that closed its communicator writes its last call's number + 1 (0: open)
_CLOSED = struct.Struct("q")
# Two slots per rank, by parity of the sequence number: a peer may run one call
# ahead (a barrier, an empty allgather, a broadcast root) while this rank still
# reads its entry for the current one; it cannot run two ahead.
_SLOT = 32
_PROGRESS = struct.Struct("4q")  # one slot read whole: (verb, call key, row count, sequence number)
_BOTH_SEQS = struct.Struct("24xq24xq")
_WATCHDOG_TICK = 0.25  # seconds between the watchdog's looks at the armed call
_HEADER_LEN = 68  # dtype code, ndim, up to 66 dimensions (numpy allows 64)


def _mpi(timeout: float | None = None):
    """mpi4py's ``MPI`` with MPI initialised; when this call initialises it, within ``timeout`` s (ORCH_TIMEOUT).

    ``MPI_Init`` waits for every rank of the job (Open MPI 5 exchanges the ranks' addresses there),
    with no timeout of its own: a rank that never starts, or never gets to MPI, would keep its
    peers in ``from mpi4py import MPI`` forever. So mpi4py is imported without initialising
    (``rc.initialize = False``) and ``_join`` calls ``MPI_Init_thread`` under a deadline.
    A program that imported ``mpi4py.MPI`` itself first has initialised MPI its own way: kept.
    """
    if _JOIN_FAILED:
        raise CommError(f"MPI cannot be used in this process: joining the MPI job failed: {_JOIN_FAILED[0]}")
    if "mpi4py.MPI" not in sys.modules:
        import mpi4py

        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = True  # as if mpi4py had initialised it: MPI_Finalize at exit
    from mpi4py import MPI

    if not MPI.Is_initialized() and not MPI.Is_finalized():
        _join(MPI, default_timeout() if timeout is None else timeout)
    return MPI


# --- joining the job: MPI_Init under a deadline ---------------------------------------------------
_JOIN_FAILED: list[str] = []  # the message, once joining timed out: MPI is unusable in this process
_BEACONS: list = []
_BEACON = "orch-mpi-join/{job}/{rank}"  # an abstract unix socket: "this rank has called MPI_Init" (no file to leave)


def _launcher_rank_size() -> tuple[int | None, int | None]:
    """This process's rank and the world size as the MPI launcher's environment gives them (None: not said)."""
    def first(*variables):
        for var in variables:
            value = (var.get() or "").strip()
            if value.isdigit():
                return int(value)
        return None

    return (first(_env.OMPI_COMM_WORLD_RANK, _env.PMI_RANK, _env.PMIX_RANK),
            first(_env.OMPI_COMM_WORLD_SIZE, _env.PMI_SIZE))


def _job_key(process=None) -> str | None:
    """What the ranks of one MPI job on one host share: the PMIx namespace (Open MPI), else the pid of
    the launcher's daemon they run under (MPICH's hydra_pmi_proxy). ``process``: a psutil.Process
    (default: this one)."""
    import psutil

    try:
        process = process or psutil.Process()
        environ = process.environ() if process.pid != os.getpid() else os.environ
        if environ.get(_env.PMIX_NAMESPACE.name):
            return "pmix:" + environ[_env.PMIX_NAMESPACE.name]
        for parent in process.parents():
            if parent.name().startswith(("hydra_pmi_proxy", "prted", "prterun", "orted")):
                return f"daemon:{parent.pid}"
    except (psutil.Error, OSError):
        pass
    return None


def _rank_of(environ) -> int | None:
    for var in (_env.OMPI_COMM_WORLD_RANK, _env.PMI_RANK, _env.PMIX_RANK):
        value = environ.get(var.name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _process_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and has not ended (a zombie has ended: its parent has not
    reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _local_rank_pids(job: str) -> dict[int, int]:
    """Rank -> pid of the processes of ``job`` on this host, whatever they are doing (the program,
    not the launchers' watcher around it, nor the program's own children)."""
    import psutil

    found: dict[int, list] = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            if process.pid == os.getpid() or any("_rank_wrapper.py" in part for part in process.info["cmdline"] or ()):
                continue
            rank = _rank_of(process.environ())
            if rank is not None and _job_key(process) == job:
                found.setdefault(rank, []).append(process.info)
        except (psutil.Error, OSError):
            continue
    pids = {}
    for rank, infos in found.items():
        own = {info["pid"] for info in infos}
        top = [info["pid"] for info in infos if info["ppid"] not in own]  # not a child of another of the rank's processes
        pids[rank] = min(top or own)
    return pids


def _has_called_init(job: str, rank: int) -> bool:
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect("\0" + _BEACON.format(job=job, rank=rank))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _describe_not_joined(rank: int | None, size: int | None, job: str | None) -> str:
    """Which ranks this one is waiting for in MPI_Init, as far as this host can tell."""
    if rank is None or size is None or job is None:
        return "waiting for the other ranks (the launcher's environment does not say which job this is)"
    try:
        pids = _local_rank_pids(job)
    except Exception as exc:  # the message must go out whatever happens
        return f"waiting for the other ranks (could not look for them on this host: {exc})"
    here, elsewhere, inside = [], [], []
    for peer in range(size):
        if peer == rank:
            continue
        if _has_called_init(job, peer):
            inside.append(peer)
        elif peer in pids:
            here.append(f"rank {peer} (pid {pids[peer]}; it has not called MPI_Init)")
        else:
            elsewhere.append(peer)
    parts = []
    if here:
        parts.append("waiting for " + ", ".join(here))
    if elsewhere:
        ranks = f"rank {elsewhere[0]}" if len(elsewhere) == 1 else "ranks " + ", ".join(map(str, elsewhere))
        parts.append(f"{'waiting for ' if not here else ''}{ranks}, not running on this host (on another host, or not started)")
    if not parts:
        parts.append("every rank on this host has called MPI_Init; MPI itself did not answer")
    return "; ".join(parts)


def _join(MPI, timeout: float) -> None:
    """``MPI_Init_thread`` within ``timeout`` s, else ``CommTimeoutError`` naming the ranks not there.

    mpi4py's own ``Init_thread`` holds the GIL while MPI waits, so no deadline could fire: the call
    goes through ctypes (which releases it) in a daemon thread, the same libmpi that mpi4py loaded.
    After a timeout MPI is half-initialised and stays so: the process may still print and raise,
    but it leaves with ``os._exit(1)`` (an exit hook), never through ``MPI_Finalize``, which would hang.
    """
    import ctypes
    import socket

    import mpi4py

    rank, size = _launcher_rank_size()
    job = _job_key()
    beacon = None
    if job is not None and rank is not None:
        beacon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            beacon.bind("\0" + _BEACON.format(job=job, rank=rank))
            beacon.listen(8)
        except OSError:
            beacon.close()
            beacon = None
    init = ctypes.CDLL(MPI.__file__).MPI_Init_thread  # found among the extension's dependencies: its libmpi
    init.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int))
    init.restype = ctypes.c_int
    required = getattr(MPI, "THREAD_" + str(mpi4py.rc.thread_level).upper(), MPI.THREAD_MULTIPLE)
    provided = ctypes.c_int(0)
    result: list[int] = []
    done = threading.Event()

    def call():
        result.append(init(None, None, required, ctypes.byref(provided)))
        done.set()

    # Without a launcher this process is an MPI singleton (a world of one). Open MPI's shared-memory
    # transport would make it a 16 MB /dev/shm/sm_segment.* file that only mpirun's daemon removes, so
    # it outlived every singleton; a world of one has no peer to share memory with: no sm transport.
    singleton = rank is None and size is None and not _env.OMPI_BTL.is_set()
    if singleton:
        os.environ[_env.OMPI_BTL.name] = "^sm"
    started = time.monotonic()
    threading.Thread(target=call, name="orch-mpi-init", daemon=True).start()
    try:
        if not done.wait(timeout):
            who = f"rank {rank} of {size}" if rank is not None and size is not None else "this rank"
            message = (f"joining the MPI job (MPI_Init) on {who} timed out after {time.monotonic() - started:.1f} s: "
                       f"{_describe_not_joined(rank, size, job)}")
            _JOIN_FAILED.append(message)
            atexit.register(_leave_without_finalize)  # runs before mpi4py's MPI_Finalize
            raise CommTimeoutError(message)
    finally:
        if singleton and done.is_set():
            os.environ.pop(_env.OMPI_BTL.name, None)  # read by MPI_Init only: not for this process's children
        if beacon is not None:
            if done.is_set():
                beacon.close()  # the rank has joined
            else:
                _BEACONS.append(beacon)  # still in MPI_Init: it says so until the process ends
    if result[0] != 0:
        raise CommError(f"MPI_Init_thread failed on rank {rank} with MPI error code {result[0]}")


def _leave_without_finalize() -> None:
    # MPI's shared-memory files this process maps: MPICH unlinks its segment only once every local rank
    # has attached it, which the rank that never came never will. The job is over: nobody needs them.
    try:
        with open("/proc/self/maps") as maps:
            names = set(re.findall(r"/dev/shm/((?:mpich_shm_|sm_segment\.)\S+)", maps.read()))
    except OSError:
        names = set()
    for name in names:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1)


class MpiCommunicator(Communicator):
    """Ranks of an MPI communicator (default ``COMM_WORLD``).

    ``shared_memory=False`` makes the ranks meet through MPI (``Ibarrier``,
    ``Iallgather``) even when they share a host, as ranks on several hosts do.

    ``allgather`` accepts shapes that differ along ``axis`` (it switches to
    ``Allgatherv``); all other dimensions and the dtype must agree.

    ``arrival_check=False`` is the fast mode (see the module docstring); None
    reads ``ORCH_MPI_ARRIVAL_CHECK`` (default true).
    """

    backend = "mpi"
    abort_ends_process = True

    def __init__(
        self, comm=None, timeout: float | None = None, *, shared_memory: bool | None = None, arrival_check: bool | None = None
    ):
        MPI = _mpi(timeout)
        if arrival_check is None:
            arrival_check = mpi_arrival_check()
        if not isinstance(arrival_check, (bool, np.bool_)):
            raise TypeError(f"arrival_check must be True, False or None, got {arrival_check!r}")
        self.arrival_check = bool(arrival_check)
        self._want_shm_arrival = shared_memory is not False
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
        self._liveness_at = 0.0  # when _dead_peer next looks at the local peers' processes
        self._watched_peers: list[int] = []  # set once the peers' pids are known (below)
        self._seen_dead: dict[int, float] = {}  # world rank -> when _dead_peer first saw its process gone
        self._pending: list = []
        self._pool = ResultPool()
        self._gather_in = array.array("q", bytes(24))
        self._gather_out = array.array("q", bytes(24 * self.size))
        self._gather_unpack = struct.Struct(f"{3 * self.size}q").unpack_from
        # Hot-path plans, filled by the first call of each kind (see ``allreduce``/``allgather``).
        self._reduce_plans: dict = {}
        self._equal_rows = True  # False once some allgather had uneven shapes: always take the general path then
        self._gather_plans: dict = {}
        self._reductions = {
            "sum": MPI.SUM,
            "max": MPI.MAX,
            "min": MPI.MIN,
            "prod": MPI.PROD,
        }
        self._bool_reductions = {"sum": MPI.LOR, "max": MPI.LOR, "min": MPI.LAND, "prod": MPI.LAND}
        self._host = MPI.Get_processor_name()
        self._setup_progress_window()
        modes = self._comm.allgather(self.arrival_check)
        if modes.count(self.arrival_check) != self.size:
            # One rank checking arrival and another not would deadlock at the first collective.
            self._node.Free()
            self._comm.Free()
            raise CommError(
                f"rank {self.rank} of {self.size}: the ranks disagree on arrival_check (ORCH_MPI_ARRIVAL_CHECK, "
                f"[comm] mpi_arrival_check): " + ", ".join(f"rank {r}: {m}" for r, m in enumerate(modes))
            )
        self._watchdog = _Watchdog(self)
        self._watchdog.start()  # a thread that sleeps; arming it is one attribute write per call
        _install_abort_hooks(self)

    # -- where every rank is: a shared-memory window per host -----------------
    def _setup_progress_window(self) -> None:
        # A segment of our own (``_shared_memory``) rather than an MPI shared window:
        # Open MPI's one-sided components print errors on hosts without UCX hardware.
        MPI = self._MPI
        self._node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self._local = self._node.Get_rank()
        nbytes = _STRIDE * self._node.Get_size()
        self._segment = self._share_progress_segment(nbytes)
        if self._segment is not None:
            self._progress_buf = self._segment.mmap
        else:  # no shared memory: errors cannot say which local rank is behind, nothing else changes
            self._progress_buf = bytearray(nbytes)
        for slot in (0, _SLOT):
            _CALL.pack_into(self._progress_buf, _STRIDE * self._local + slot, -1, 0, 0)
        self._my_row = _STRIDE * self._local
        self._node_world = self._node.allgather(self.rank)
        self._local_peers = [j for j in range(self._node.Get_size()) if j != self._local]
        self._row_offsets = [(_STRIDE * j, world) for j, world in enumerate(self._node_world)]
        # Each rank's host and pid, for errors that name a peer (one small collective, once).
        where = self._comm.allgather((self._host, os.getpid()))
        self._hosts = [host for host, _ in where]
        self._pids = [pid for _, pid in where]
        # The local peers whose processes this one can see (all of them, unless a peer runs in another pid
        # namespace): only those are looked at for a death (_dead_peer); they are all alive now.
        self._watched_peers = [j for j in self._local_peers if _process_running(self._pids[self._node_world[j]])]
        # Every rank on this host and the segment shared: arrival through shared memory
        # (a fraction of a microsecond) instead of an Ibarrier (about 3 us).
        everyone_here = self._want_shm_arrival and self._node.Get_size() == self.size and self._segment is not None
        self._shm_arrival = bool(self._comm.allreduce(1 if everyone_here else 0, op=MPI.MIN))

    def _share_progress_segment(self, nbytes: int):
        """Local rank 0 makes the per-host segment, the others attach it; None where that failed.

        memfd first (``_shared_memory``'s default), a named segment when some
        local rank could not open the memfd (another pid namespace, another
        user). The name lives from ``create`` to the allreduce below only.
        """
        node = self._node
        for mode in (None, "named"):
            segment = None
            handle = ""
            if self._local == 0:
                try:
                    segment = _shared_memory.create("mpi", nbytes, mode=mode)
                    handle = segment.handle
                except OSError:
                    pass
            handle = node.bcast(handle, root=0)
            if handle and self._local != 0:
                try:
                    segment = _shared_memory.attach(handle)
                except (OSError, ValueError):
                    segment = None
            # Every local rank has attached or given up: the name can go.
            everyone = node.allreduce(0 if segment is None else 1, op=self._MPI.MIN)
            if self._local == 0 and segment is not None:
                segment.unlink()
            if everyone or "@" not in handle:
                return segment
            if segment is not None:
                segment.close()
        return None

    def _enter(self, op: str, key: int = 0, count: int = 0) -> int:
        """Count the call and publish (seq, op, key, count) for the ranks on this host."""
        if self._closed or self._broken is not None:
            self._refuse(op)
        seq = self._seq = self._seq + 1
        at = self._my_row + (seq & 1) * _SLOT
        _CALL.pack_into(self._progress_buf, at, _OP_INDEX[op], key, count)
        _SEQ.pack_into(self._progress_buf, at + 24, seq)  # last: x86 keeps the order of stores
        return seq

    def _refuse(self, op: str):
        if self._closed:
            raise CommError(f"{op} on rank {self.rank} of {self.size}: the communicator is closed")
        raise CommError(f"{op} on rank {self.rank} of {self.size}: the communicator is broken by an earlier error: {self._broken}")

    def _barrier_arrive(self, op: str, seq: int, key: int) -> None:
        """Arrival: every rank has entered call ``seq``; the ranks on this host make the same call.

        Once all have arrived no local peer can be past this call (the data
        phase needs this rank too), except a broadcast root whose send finished
        or a rank leaving a barrier: a peer already further is not compared.
        """
        if self._shm_arrival:
            self._shm_wait(op, seq)
        else:
            self._poll(self._comm.Ibarrier(), op, seq)
        buf = self._progress_buf
        index = _OP_INDEX[op]
        slot = (seq & 1) * _SLOT
        for j in self._local_peers:
            their_op, their_key, _, their_seq = _PROGRESS.unpack_from(buf, _STRIDE * j + slot)
            if their_seq == seq and (their_op != index or their_key != key):
                self._local_mismatch(op, seq, j, their_op, their_key, key)

    def _shm_wait(self, op: str, seq: int) -> None:
        """Until every local peer has published call ``seq`` (spin, then nap), bounded by the timeout."""
        buf = self._progress_buf
        unpack = _BOTH_SEQS.unpack_from
        for j in self._local_peers:
            offset = _STRIDE * j
            if max(unpack(buf, offset)) >= seq:
                continue
            self._wait_until(lambda: max(unpack(buf, offset)) >= seq, op, seq, nap_after=0.002)

    def _gather_arrive(self, op: str, seq: int, key: int, count: int) -> list[int]:
        """Arrival for allgather: checks every rank's call and returns every rank's row count.

        On one host the counts are read from the shared segment (``_enter``
        published them); otherwise a nonblocking allgather of (seq, key, count).
        """
        if self._shm_arrival:
            self._shm_wait(op, seq)
            buf = self._progress_buf
            counts = [0] * self.size
            slot = (seq & 1) * _SLOT
            index = _OP_INDEX[op]
            for offset, world in self._row_offsets:
                their_op, their_key, their_count, their_seq = _PROGRESS.unpack_from(buf, offset + slot)
                if their_seq != seq or their_key != key or their_op != index:
                    if their_seq != seq:
                        what = f"is not making this call (it is at call #{their_seq})"
                    elif their_op != _OP_INDEX[op]:
                        what = f"called {_op_name(their_op)} #{seq}"
                    else:
                        what = "passed a different dtype, axis or shape"
                    message = f"{op} #{seq} on rank {self.rank} of {self.size}: the ranks disagree on the call; rank {world} {what}"
                    self._broken = message
                    raise CommError(message)
                counts[world] = their_count
            return counts
        _ROW.pack_into(self._gather_in, 0, seq, key, count)
        self._poll(self._comm.Iallgather(self._gather_in, self._gather_out), op, seq)
        values = self._gather_unpack(self._gather_out)
        size = self.size
        if values[0::3].count(seq) != size or values[1::3].count(key) != size:
            for rank in range(size):
                their_seq, their_key = values[3 * rank], values[3 * rank + 1]
                if their_seq != seq or their_key != key:
                    message = (
                        f"{op} #{seq} on rank {self.rank} of {size}: the ranks disagree on the call; rank {rank} "
                        + (f"is not making this call (it reports call #{their_seq})" if their_seq != seq
                           else "passed a different dtype, axis or shape")
                    )
                    self._broken = message
                    raise CommError(message)
        return values[2::3]

    def _local_mismatch(self, op, seq, j, their_op, their_key, key):
        world = self._node_world[j]
        if their_op != _OP_INDEX[op]:
            what = f"rank {world} called {_op_name(their_op)} #{seq}"
        else:
            what = f"rank {world} passed a different dtype, shape, op or root"
        message = f"{op} #{seq} on rank {self.rank} of {self.size}: the ranks disagree on the call; {what}"
        self._broken = message
        raise CommError(message)

    def _describe_missing(self) -> str:
        behind = []
        for j, world in enumerate(self._node_world):
            if world == self.rank:
                continue
            seq, opcode = self._last_call(j)
            if seq < self._seq:
                last = f"operation #{seq} ({_op_name(opcode)})" if seq else "no operation yet"
                behind.append(f"rank {world} (pid {self._pids[world]}; it is at {last})")
        remote = [r for r in range(self.size) if self._hosts[r] != self._host]
        parts = []
        if behind:
            parts.append("waiting for " + ", ".join(behind))
        if remote:
            parts.append(f"ranks on other hosts not checked: {remote}")
        if not parts:
            parts.append("every rank on this host arrived; a rank on another host or MPI itself did not answer")
        return "; ".join(parts)

    def _closed_peers(self, seq: int) -> list[tuple[int, int]]:
        """(world rank, its last call) of the local peers that closed their communicator before call ``seq``."""
        if self._segment is None:
            return []
        gone = []
        for j in self._local_peers:
            (closed,) = _CLOSED.unpack_from(self._progress_buf, _STRIDE * j + _CLOSED_AT)
            if 0 < closed <= seq:
                gone.append((self._node_world[j], closed - 1))
        return gone

    def _last_call(self, j: int) -> tuple[int, int]:
        """(number, opcode) of the last call local peer ``j`` started, from its row of the per-host segment."""
        opcode, _, _, seq = max(
            _PROGRESS.unpack_from(self._progress_buf, _STRIDE * j), _PROGRESS.unpack_from(self._progress_buf, _STRIDE * j + _SLOT),
            key=lambda row: row[3],
        )
        return seq, opcode

    def _dead_peer(self, op: str, seq: int, done) -> None:
        """PeerLostError when a local peer's process is gone without closing its communicator (``os._exit``, a
        crash that MPI did not turn into an abort): it will never come, so waiting for the timeout would only
        delay the report and blame this call. Looked at every ``_LIVENESS_SECONDS``; blamed once seen gone for
        ``_DEAD_GRACE_SECONDS`` and ``done()`` is still false (a peer that made its part of this call may exit
        before we see the end)."""
        now = time.monotonic()
        if self._segment is None or now < self._liveness_at:
            return
        self._liveness_at = now + _LIVENESS_SECONDS
        for j in self._watched_peers:
            world = self._node_world[j]
            pid = self._pids[world]
            (closed,) = _CLOSED.unpack_from(self._progress_buf, _STRIDE * j + _CLOSED_AT)
            if closed or _process_running(pid):
                continue
            seen = self._seen_dead.setdefault(world, now)
            if now - seen < _DEAD_GRACE_SECONDS or done():
                continue
            last, opcode = self._last_call(j)
            did = f"after operation #{last} ({_op_name(opcode)})" if last else "before its first operation"
            message = (
                f"{op} #{seq} on rank {self.rank} of {self.size}: rank {world} (pid {pid}) "
                f"exited {did} without closing its communicator and will make no more calls; every rank must make "
                f"the same collective calls (to stop every rank at once, call comm.abort(reason))"
            )
            self._broken = message
            raise PeerLostError(message)

    def _check_no_peer_left(self, op: str, seq: int) -> None:
        """PeerLostError at once when a peer this call waits for has closed its communicator (it will never come)."""
        gone = self._closed_peers(seq)
        if gone:
            world, last = gone[0]
            message = (
                f"{op} #{seq} on rank {self.rank} of {self.size}: rank {world} (pid {self._pids[world]}) closed its "
                f"communicator after operation #{last} and will make no more calls; every rank must make the same "
                f"collective calls (to stop every rank at once, call comm.abort(reason))"
            )
            self._broken = message
            raise PeerLostError(message)

    def _wait_until(self, done, op: str, seq: int, nap_after: float) -> None:
        """Spin until ``done()``; after ``nap_after`` seconds nap between checks; CommTimeoutError at the timeout."""
        start = time.monotonic()
        deadline = start + self.timeout
        spins = 0
        while not done():
            spins += 1
            if spins & 1023 == 0:
                now = time.monotonic()
                self._check_no_peer_left(op, seq)
                self._dead_peer(op, seq, done)
                if now > deadline:
                    message = (
                        f"{op} #{seq} on rank {self.rank} of {self.size} timed out after {now - start:.1f} s: "
                        f"{self._describe_missing()}"
                    )
                    self._broken = message
                    raise CommTimeoutError(message)
                if now - start > nap_after:
                    # A peer still computing: do not burn the core it may need.
                    time.sleep(0.0001 if now - start < 0.05 else 0.0005)

    # -- the two phases ------------------------------------------------------
    def _poll(self, request, op: str, seq: int) -> None:
        try:
            if request.Test():
                return
            self._wait_until(request.Test, op, seq, nap_after=0.05)
        except self._MPI.Exception as exc:
            # Typically ranks calling different collectives, whose messages do not fit each other.
            message = (
                f"{op} #{seq} on rank {self.rank} of {self.size}: MPI failed while the ranks met ({exc}); "
                f"do all ranks make the same collective calls in the same order?"
            )
            self._broken = message
            raise CommError(message) from None

    def _data(self, op: str, seq: int, fn, *args) -> None:
        watchdog = self._watchdog
        watchdog.arm(seq)
        try:
            fn(*args)
        finally:
            watchdog.disarm()

    # -- verbs ---------------------------------------------------------------
    # The hot path. What the first call of a kind (shape, dtype with byte
    # order, op or axis) works out is kept as a plan; later calls of that kind
    # skip the checks and the key hashing. Measured at 4 KB on one rank: a
    # fast-mode allgather 4.1 -> 2.6 us, allreduce 3.2 -> 2.6 us (raw mpi4py
    # 1.2 and 2.0 us). Anything unusual (float16, 0-d, axis != 0, uneven
    # shapes) takes the general path, unchanged.
    def allreduce(self, array, op="sum", *, out=None):
        arr = array if array.__class__ is np.ndarray else np.asarray(array)
        plan = self._reduce_plans.get((arr.shape, arr.dtype, op))
        if plan is None:
            return self._allreduce_general(array, op, out)
        if not arr.flags.c_contiguous:
            arr = np.asarray(arr, order="C")
        key, mpi_op, pooled = plan
        if out is None:
            out = self._pool.empty(arr.shape, arr.dtype) if pooled else np.empty_like(arr)
            send = arr
        else:
            if out.__class__ is not np.ndarray or out.shape != arr.shape or out.dtype != arr.dtype:
                check_out(out, arr.shape, arr.dtype, "allreduce", self.rank)
            flags = out.flags
            if not (flags.c_contiguous and flags.writeable):
                check_out(out, arr.shape, arr.dtype, "allreduce", self.rank)
            send = self._MPI.IN_PLACE if out is arr else arr
        if self.arrival_check:
            seq = self._enter("allreduce", key)
            self._barrier_arrive("allreduce", seq, key)
        else:
            seq = self._enter("allreduce")
        watchdog = self._watchdog
        watchdog._armed = seq
        try:
            self._comm.Allreduce(send, out, mpi_op)
        finally:
            watchdog._armed = None
        return out

    def _allreduce_general(self, array, op, out):
        if op not in self._reductions:
            check_op(op)
        arr = as_array(array, "allreduce", self.rank)
        char = arr.dtype.char
        if out is not None:
            check_out(out, arr.shape, arr.dtype, "allreduce", self.rank)
        if self.arrival_check:
            # Only ints inside: hash() of str is salted per process, of ints it is the same everywhere.
            key = hash((ord(char), OP_CODE[op], arr.shape))
            seq = self._enter("allreduce", key)
            self._barrier_arrive("allreduce", seq, key)
        else:
            seq = self._enter("allreduce")
        if char == "e":
            # MPI has no half type; reduce in float32 (exact for max/min, more exact for sum/prod).
            wide = arr.astype(np.float32)
            self._data("allreduce", seq, self._comm.Allreduce, self._MPI.IN_PLACE, wide, self._reductions[op])
            if out is None:
                return wide.astype(np.float16)
            np.copyto(out, wide, casting="same_kind")
            return out
        if out is None:
            out = np.empty_like(arr) if arr.nbytes < ResultPool.MIN_BYTES else self._pool.empty(arr.shape, arr.dtype)
            send = arr
        else:
            send = self._MPI.IN_PLACE if out is arr else arr
        mpi_op = self._bool_reductions[op] if char == "?" else self._reductions[op]
        if arr is array and len(self._reduce_plans) < 256:  # a native, contiguous array: later calls like it take the hot path
            self._reduce_plans[(arr.shape, arr.dtype, op)] = (key if self.arrival_check else 0, mpi_op, arr.nbytes >= ResultPool.MIN_BYTES)
        # The data phase, inlined (this is the hot path): the watchdog covers it.
        watchdog = self._watchdog
        watchdog._armed = seq
        try:
            self._comm.Allreduce(send, out, mpi_op)
        finally:
            watchdog._armed = None
        return out

    def allgather(self, array, axis=0, *, out=None):
        arr = array if array.__class__ is np.ndarray else np.asarray(array)
        plan = self._gather_plans.get((arr.shape, arr.dtype, axis))
        if plan is None or not self._equal_rows:
            return self._allgather_general(array, axis, out)
        if not arr.flags.c_contiguous:
            arr = np.asarray(arr, order="C")
        key, rows, full, pooled = plan
        if out is None:
            target = self._pool.empty(full, arr.dtype) if pooled else np.empty(full, arr.dtype)
        else:
            flags = out.flags if out.__class__ is np.ndarray else None
            if flags is None or out.shape != full or out.dtype != arr.dtype or not (flags.c_contiguous and flags.writeable):
                # A wrong out= (named by the general path), or a right one for shapes that differ between ranks.
                return self._allgather_general(array, axis, out)
            target = out
        if self.arrival_check:
            seq = self._enter("allgather", key, rows)
            counts = self._gather_arrive("allgather", seq, key, rows)
            if counts.count(rows) != len(counts):
                # Another rank's shape differs along the axis this time: the general path's data phase.
                self._equal_rows = False
                return self._allgather_general(array, axis, out, (seq, counts))
        else:
            seq = self._enter("allgather", 0, rows)
        watchdog = self._watchdog
        watchdog._armed = seq
        try:
            self._comm.Allgather(arr, target)
        finally:
            watchdog._armed = None
        return target

    def _allgather_general(self, array, axis, out, arrived=None):
        """Every case; ``arrived``: (seq, counts) when the hot path already made the arrival."""
        arr = as_array(array, "allgather", self.rank)
        shape = arr.shape
        if axis != 0 or not shape:
            axis = gather_axis(shape, axis)
            if not shape:
                arr = arr.reshape(1)
                shape = (1,)
        char = arr.dtype.char
        if out is not None and (
            out.__class__ is not np.ndarray or out.dtype != arr.dtype or out.ndim != len(shape)
            or out.shape[:axis] + out.shape[axis + 1 :] != shape[:axis] + shape[axis + 1 :]
        ):
            # Wrong before any rank moves: fail here (the shape along ``axis`` is checked once the counts are known).
            check_out(out, gathered_shape(shape, axis, self.size), arr.dtype, "allgather", self.rank)
        send = arr if axis == 0 else np.asarray(np.moveaxis(arr, axis, 0), order="C")
        rows = send.shape[0]
        key = hash((ord(char), axis, len(shape), shape[:axis] + shape[axis + 1 :]))
        if arrived is not None:
            seq, counts = arrived
            equal = counts.count(rows) == len(counts)
            total = sum(counts)
        elif self.arrival_check:
            seq = self._enter("allgather", key, rows)
            # Arrival that also tells every rank's row count and call key (shapes may differ along the axis).
            counts = self._gather_arrive("allgather", seq, key, rows)
            equal = counts.count(rows) == len(counts)
            total = sum(counts)
        else:
            # No arrival, so no counts: every rank must pass the same shape (as MPI_Allgather).
            seq = self._enter("allgather", 0, rows)
            equal = True
            total = rows * self.size
        if equal and axis == 0 and char != "e" and send is array and len(self._gather_plans) < 256:
            # A native, contiguous array gathered along axis 0: later calls like it take the hot path.
            full = (total,) + send.shape[1:]
            pooled = send.itemsize * send.size * self.size >= ResultPool.MIN_BYTES
            self._gather_plans[(send.shape, send.dtype, 0)] = (key if self.arrival_check else 0, rows, full, pooled)
        row_shape = send.shape[1:]
        if char == "e":  # MPI has no half type; moving bytes needs none
            send = send.view(np.uint16)
        full = (total,) + row_shape
        wrong_out = None
        target = None  # where MPI writes: ``out`` itself when the layouts agree
        if out is not None:
            want = full if axis == 0 else shape[:axis] + (total,) + shape[axis + 1 :]
            if out.shape != want or not out.flags.c_contiguous or not out.flags.writeable:
                wrong_out = (want, out)  # still take part, so the peers do not stall; raise afterwards
            elif axis == 0:
                target = out.view(np.uint16) if char == "e" else out
        direct = target is not None
        if target is None:
            nbytes = send.itemsize * total
            for d in row_shape:
                nbytes *= d
            target = np.empty(full, send.dtype) if nbytes < ResultPool.MIN_BYTES else self._pool.empty(full, send.dtype)
        watchdog = self._watchdog
        watchdog._armed = seq
        try:
            if equal:
                self._comm.Allgather(send, target)
            else:
                row_items = 1
                for d in row_shape:
                    row_items *= d
                sizes = [c * row_items for c in counts]
                displs = [sum(sizes[:r]) for r in range(len(sizes))]
                self._comm.Allgatherv(send, [target, (sizes, displs)])
        finally:
            watchdog._armed = None
        if wrong_out is not None:
            check_out(wrong_out[1], wrong_out[0], arr.dtype, "allgather", self.rank)
        if direct:
            return out
        if char == "e":
            target = target.view(np.float16)
        if axis != 0:
            if out is not None:
                np.copyto(out, np.moveaxis(target, 0, axis))
                return out
            return np.asarray(np.moveaxis(target, 0, axis), order="C")
        return target

    def broadcast(self, array, root=0):
        root = check_rank(root, self.size, "broadcast root")
        header = np.zeros(_HEADER_LEN, np.int64)
        if self.rank == root:
            arr = as_array(array, "broadcast", self.rank)
            _write_header(header, arr)
        seq = self._enter("broadcast", root)
        if self.arrival_check:
            self._barrier_arrive("broadcast", seq, root)
        self._data("broadcast", seq, self._comm.Bcast, header, root)
        dtype, shape = _read_header(header)
        if self.rank != root:
            arr = np.empty(shape, dtype=dtype)
        if arr.size:
            self._data("broadcast", seq, self._comm.Bcast, [arr.reshape(-1).view(np.uint8), self._MPI.BYTE], root)
        return arr if self.rank != root else np.array(arr, copy=True)

    def barrier(self):
        seq = self._enter("barrier")
        self._barrier_arrive("barrier", seq, 0)

    def send(self, array, dest, tag=0):
        """Queue ``array`` for ``dest`` and return without waiting for the receiver.

        Like the zmq backend (and unlike a bare ``MPI_Send``), two ranks may both
        send before they receive. The data is copied, so the caller may reuse
        ``array`` at once; pending sends finish in the background of later
        calls and are waited for (bounded by the timeout) in ``close``.
        """
        dest = check_rank(dest, self.size, "send dest")
        tag = check_tag(tag)
        arr = np.array(as_array(array, "send", self.rank), copy=True)
        if self._broken is not None or self._closed:
            self._refuse("send")
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
            self._refuse("recv")
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

    def abort(self, reason: str) -> None:
        _abort(self, reason)

    def close(self):
        if self._closed:
            return
        if getattr(self, "_segment", None) is not None and self._broken is None:
            # Said before the collective frees below, which wait for the peers: one still calling a collective
            # learns at once that this rank will not come (else it would wait out its timeout).
            _CLOSED.pack_into(self._progress_buf, self._my_row + _CLOSED_AT, self._seq + 1)
        try:
            if self._broken is None:
                for requests, _, _, dest, tag in list(self._pending):
                    for request in requests:
                        self._wait(request, f"close: delivering a send to rank {dest} (tag {tag})", dest)
                self._pending.clear()
        finally:
            self._closed = True
            self._watchdog.stop()
            self._pool.clear()
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
    # hash() of a tuple of ints is the same in every process (only str/bytes hashing is salted).
    return hash(shape)


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

    Arming and disarming are two attribute writes (the call's sequence
    number, then None: no clock read on the hot path). The thread wakes four
    times a second; it notes when it first sees a number armed and aborts once
    the same number has stayed armed for the timeout, so it fires between
    ``timeout`` and ``timeout + 0.5`` s after the call began, never before.
    The op's name is read back from this rank's row of the progress segment.
    """

    def __init__(self, comm: MpiCommunicator):
        self._comm = comm
        self._armed: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self, seq: int) -> None:
        if self._thread is None:
            self.start()
        self._armed = seq

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="orch-mpi-watchdog", daemon=True)
                self._thread.start()

    def disarm(self) -> None:
        self._armed = None

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        seen, since = None, 0.0
        comm = self._comm
        while not self._stop.wait(_WATCHDOG_TICK):
            seq = self._armed
            now = time.monotonic()
            if seq is None or seq != seen:
                seen, since = seq, now  # a new call (armed at most one tick ago) or none
                continue
            if now - since < comm.timeout:
                continue
            opcode = _PROGRESS.unpack_from(comm._progress_buf, comm._my_row + (seq & 1) * _SLOT)[0]
            op = _op_name(opcode)
            if comm.arrival_check:
                message = (
                    f"ranks.CommTimeoutError: {op} #{seq} on rank {comm.rank} of {comm.size} did not finish within "
                    f"{comm.timeout:.1f} s after every rank had arrived (a peer died inside MPI?); aborting the MPI job"
                )
            else:
                try:
                    behind = comm._describe_missing()
                except Exception as exc:  # the message must go out whatever happens
                    behind = f"(could not read the peers' progress: {exc})"
                message = (
                    f"ranks.CommTimeoutError: {op} #{seq} on rank {comm.rank} of {comm.size} did not finish within "
                    f"{comm.timeout:.1f} s (fast mode, no arrival check): {behind}; aborting the MPI job"
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

"""The ``zmq`` backend: ranks addressed by a rank table, over TCP, with a shared-memory fast path.

Sockets
    Rank ``r`` binds one ROUTER at ``tcp://<server_id of r>:<base_port + r>``
    (the host's address, as HCCL defines ``server_id``; ``device_ip`` is the
    NPU's own address and is not used here) and connects one
    DEALER to every peer's ROUTER, with routing id ``str(r)``. So every
    message from ``p`` to ``r`` travels p's DEALER -> r's ROUTER, in order.
    A socket monitor on each DEALER reports a peer's connection closing (its
    process died) and ZeroMQ heartbeats catch a host that vanished.

Wire protocol (the only place it is defined)
    frames: ``[header]`` or ``[header, payload]`` (the ROUTER adds the
    sender's routing id in front). ``header`` = ``_HEAD`` struct:

    ====== ======= =====================================================
    field  type    meaning
    ====== ======= =====================================================
    magic  4s      ``b"ORZ1"``: protocol version 1
    kind   u8      HELLO, READY, DATA, BYE (closing), ABORT (failed)
    op     u8      the verb (``_OP``) of a DATA message
    dtype  u8      dtype code (``_comm_util.DTYPES``)
    ndim   u8      number of dimensions
    seq    i64     collective sequence number, or the tag of send/recv
    aux    i64     root of broadcast, axis of allgather, op of allreduce
    shape  ndim*i64
    ====== ======= =====================================================

    HELLO and READY carry a JSON payload (READY: ``shm``, whether this rank
    can use the segment, and from rank 0 ``segment``, its handle); ABORT
    carries the reason (UTF-8).

Handshake (order matters)
    1. Every rank binds, connects and sends HELLO to every peer, then waits
       for every peer's HELLO: a rank missing at the timeout is named in
       ``CommTimeoutError``. No shared memory exists yet, so a rank stopped
       here (a peer that never comes: a missing shard, a port in use,
       Ctrl-C to the launcher; SIGTERM or SIGKILL alike) leaves nothing in
       ``/dev/shm``.
    2. Every rank decides from the HELLOs whether all ranks share this host
       (same boot id and mount namespace). If so, rank 0 creates the segment
       through ``_shared_memory`` (memfd when every rank shares its pid
       namespace, so peers can open ``/proc/<its pid>/fd/<fd>``; a named
       ``/dev/shm`` segment otherwise) and sends READY carrying its handle.
       Every other rank first waits for rank 0's READY, attaches, and only
       then sends its own READY(ok) to every peer.
    3. Every rank waits for every READY. Rank 0 unlinks the segment as soon
       as it has them all: each rank attached (or gave up) before sending
       READY, so nobody can still need the name. It lives only while every
       rank is known to be in this handshake; if rank 0 is SIGKILLed inside
       that window a named segment is left for the next sweep (see
       ``_shared_memory``), a memfd is freed by the kernel.
    Reordering would break it: a peer sending READY before attaching would
    let rank 0 unlink under it; rank 0 unlinking before every READY would
    leave a slow peer without a segment; creating before the HELLOs (as this
    backend once did) leaves a 6 MB name behind a rank killed while it
    waits for a peer. Only after step 3 does any collective run, so no DATA
    can meet a peer that is not listening.

Collectives
    Over TCP, every rank sends its array to every peer and reduces (or
    concatenates) in rank order, so every rank computes bitwise the same
    result. Over shared memory see ``_comm_zmq_shm_group``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time
from collections import deque

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import _shared_memory
from ._comm_base import Communicator
from ._comm_zmq_shm_group import ShmGroup
from ._comm_util import (
    DTYPE_CODE,
    DTYPES,
    OP_CODE,
    as_array,
    check_op,
    check_out,
    check_rank,
    check_tag,
    concat_gathered,
    gather_axis,
    gathered_shape,
    reduce_arrays,
)
from ._env import default_timeout
from ._errors import CommError, CommTimeoutError, PeerLostError, PortInUseError
from ._rank_table import RankTable, this_host_addresses

_MAGIC = b"ORZ1"
_HEAD = struct.Struct("!4sBBBBqq")
_HELLO, _READY, _DATA, _BYE, _ABORT = 1, 2, 3, 4, 5
_KIND_NAMES = {_HELLO: "hello", _READY: "ready", _DATA: "data", _BYE: "bye", _ABORT: "abort"}
_OP = {"allreduce": 1, "allgather": 2, "broadcast": 3, "barrier": 4, "send": 5}
_OP_NAMES = {v: k for k, v in _OP.items()}
_COLLECTIVE_OPS = (1, 2, 3, 4)
_ZERO_COPY_BYTES = 65536
_LOST_GRACE = 0.3  # seconds between a peer's connection closing and giving up on it (its last data may still be in flight)


def _encode_header(kind: int, op: int, arr: np.ndarray | None, seq: int, aux: int = 0) -> bytes:
    if arr is None:
        return _HEAD.pack(_MAGIC, kind, op, 0, 0, seq, aux)
    if arr.ndim > 255:
        raise ValueError(f"arrays of {arr.ndim} dimensions cannot be sent")
    head = _HEAD.pack(_MAGIC, kind, op, DTYPE_CODE[arr.dtype], arr.ndim, seq, aux)
    return head + struct.pack(f"!{arr.ndim}q", *arr.shape)


class _Message:
    __slots__ = ("source", "kind", "op", "dtype", "shape", "seq", "aux", "payload")

    def __init__(self, source, kind, op, dtype, shape, seq, aux, payload):
        self.source, self.kind, self.op, self.dtype, self.shape = source, kind, op, dtype, shape
        self.seq, self.aux, self.payload = seq, aux, payload

    def array(self) -> np.ndarray:
        """The payload as a read-only array view of the received frame."""
        buf = self.payload.buffer if self.payload is not None else b""
        count = int(np.prod(self.shape, dtype=np.int64))
        return np.frombuffer(buf, dtype=self.dtype, count=count).reshape(self.shape)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


class ZmqCommunicator(Communicator):
    """Rank ``rank`` of the ranks listed in ``rank_table`` (a ``RankTable`` or a path).

    ``base_port``: rank r listens on ``base_port + r`` (default ``ORCH_BASE_PORT``, 29500).
    ``shared_memory``: None (default) uses the same-host fast path when every
    rank is on one server and the ranks share a kernel and mount namespace;
    False forces TCP; True requires shared memory and fails if it cannot be used.
    ``path`` tells which one is in use: ``"shm"`` or ``"tcp"``.
    """

    backend = "zmq"

    def __init__(
        self,
        rank: int,
        rank_table: RankTable | str | os.PathLike,
        *,
        base_port: int | None = None,
        timeout: float | None = None,
        shared_memory: bool | None = None,
        chunk_bytes: int = 1 << 20,
    ):
        from ._env import BASE_PORT

        table = rank_table if isinstance(rank_table, RankTable) else RankTable.load(rank_table)
        size = table.world_size
        rank = check_rank(rank, size, f"rank (rank table {table.source} lists {size} ranks)")
        timeout = default_timeout() if timeout is None else float(timeout)
        if timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        super().__init__(rank, size, timeout)
        self.table = table
        self.base_port = BASE_PORT.get_int() if base_port is None else int(base_port)
        if not 1 <= self.base_port or self.base_port + size - 1 > 65535:
            raise ValueError(f"base_port {self.base_port} + {size} ranks does not fit in TCP ports 1..65535")
        self.endpoints = [f"tcp://{_bracket(table.device(r).address)}:{self.base_port + r}" for r in range(size)]
        self.path = "tcp"
        self._seq = 0
        self._closed = False
        self._broken: str | None = None
        self._inbox: dict[tuple, deque] = {}
        self._peer_state: dict[int, str] = {}  # rank -> "closed" / "failed: reason"
        self._lost_at: dict[int, float] = {}
        self._connected: set[int] = set()
        self._trackers: list = []
        self._shm: ShmGroup | None = None
        self._ctx = zmq.Context(io_threads=1)
        self._router = None
        self._dealers: dict[int, zmq.Socket] = {}
        self._monitors: dict[zmq.Socket, int] = {}
        _shared_memory.sweep_once()  # named segments that SIGKILLed ranks on this host left behind
        try:
            self._open_sockets()
            self._handshake(shared_memory, chunk_bytes)
        except BaseException:
            self._teardown(send_bye=False)
            raise

    # -- setup ---------------------------------------------------------------
    def _open_sockets(self) -> None:
        me = self.table.device(self.rank)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        self._router = router
        bind_ip = _bind_address(me.address, self.rank, self.table.source)
        endpoint = f"tcp://{_bracket(bind_ip)}:{self.base_port + self.rank}"
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EADDRINUSE:
                hint = "another job or process holds it; choose another base_port ([comm] base_port= or ORCH_BASE_PORT)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                resolved = f" ({bind_ip})" if bind_ip != me.server_id else ""
                hint = (
                    f"rank {self.rank}'s server_id {me.server_id!r}{resolved} is not an address of this host "
                    f"(this host: {_host_addresses()}); start rank {self.rank} on that server, or put this host's "
                    f"address in its server_id (ranks listen on server_id; device_ip is the NPU's own address)"
                )
            else:
                hint = str(exc)
            error = PortInUseError if exc.errno == zmq.EADDRINUSE else CommError
            raise error(f"rank {self.rank} of {self.size}: cannot listen on {endpoint} (from rank table {self.table.source}): {hint}") from None
        identity = str(self.rank).encode()
        for peer in range(self.size):
            if peer == self.rank:
                continue
            dealer = self._ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.ROUTING_ID, identity)
            dealer.setsockopt(zmq.LINGER, 1000)
            dealer.setsockopt(zmq.SNDHWM, 0)
            dealer.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
            dealer.setsockopt(zmq.RECONNECT_IVL, 50)
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            dealer.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
            monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            dealer.connect(self.endpoints[peer])
            self._dealers[peer] = dealer
            self._monitors[monitor] = peer
        self._poller = zmq.Poller()
        self._poller.register(router, zmq.POLLIN)
        for monitor in self._monitors:
            self._poller.register(monitor, zmq.POLLIN)

    def _handshake(self, shared_memory: bool | None, chunk_bytes: int) -> None:
        servers = {d.server_id for d in self.table.devices}
        candidate = shared_memory is not False and len(servers) == 1 and self.size > 1 and _shared_memory.available()
        if shared_memory and not candidate:
            raise CommError(
                f"rank {self.rank}: shared_memory=True, but the rank table {self.table.source} spreads the ranks over "
                f"servers {sorted(servers)} (or this host offers no shared memory); shared memory needs one host"
            )
        # Step 1 (see the module docstring): hellos, with no shared memory in existence yet.
        hello = {
            "rank": self.rank, "size": self.size, "host": socket.gethostname(), "pid": os.getpid(),
            "boot_id": _boot_id(), "mnt_ns": _namespace("mnt"), "pid_ns": _namespace("pid"),
            "chunk": chunk_bytes, "base_port": self.base_port,
        }
        payload = json.dumps(hello).encode()
        for peer, dealer in self._dealers.items():
            dealer.send_multipart([_encode_header(_HELLO, 0, None, 0), payload])
        hellos = {self.rank: hello}
        for msg in self._collect(_HELLO, 0, 0, [p for p in self._dealers], "joining (waiting for every rank's hello)"):
            info = json.loads(bytes(msg.payload.buffer))
            if info.get("size") != self.size:
                raise CommError(
                    f"rank {self.rank}: rank {msg.source} ({info.get('host')}, pid {info.get('pid')}) runs with world size "
                    f"{info.get('size')} but this rank with {self.size}; do both use the same rank table?"
                )
            if info.get("base_port") != self.base_port:
                raise CommError(
                    f"rank {self.rank}: rank {msg.source} uses base port {info.get('base_port')} but this rank "
                    f"{self.base_port}; give every rank the same [comm] base_port"
                )
            hellos[msg.source] = info
        self.peers = hellos
        same_host = all(
            h["boot_id"] == hello["boot_id"] and h["mnt_ns"] == hello["mnt_ns"] and h["boot_id"] for h in hellos.values()
        )
        use = candidate and same_host
        chunk = int(hellos[0]["chunk"])  # rank 0 lays the segment out: its chunk size is everyone's
        segment = None
        try:
            # Step 2: rank 0 creates and offers; the others attach before they say READY.
            if use and self.rank == 0:
                same_pids = all(h["pid_ns"] == hello["pid_ns"] and h["pid_ns"] for h in hellos.values())
                try:
                    segment = _shared_memory.create("zmq", ShmGroup.segment_size(self.size, chunk),
                                                    mode=None if same_pids else "named")
                except OSError:
                    segment = None
                everyone = segment is not None
                self._send_ready(everyone, segment.handle if segment is not None else "")
                waiting_for = list(self._dealers)
            elif use:
                (offer,) = self._collect(_READY, 0, 0, [0], "joining (waiting for rank 0's ready)")
                offered = json.loads(bytes(offer.payload.buffer))
                try:
                    if offered.get("segment"):
                        segment = _shared_memory.attach(offered["segment"])
                except (OSError, ValueError):
                    segment = None
                ok = segment is not None and segment.size >= ShmGroup.segment_size(self.size, chunk)
                self._send_ready(ok)
                everyone = ok and offered["shm"]
                waiting_for = [p for p in self._dealers if p != 0]
            else:
                self._send_ready(False)
                everyone = False
                waiting_for = list(self._dealers)
            # Step 3: every READY; then rank 0 unlinks (every rank has attached or given up).
            for msg in self._collect(_READY, 0, 0, waiting_for, "joining (waiting for every rank's ready)"):
                everyone = everyone and json.loads(bytes(msg.payload.buffer))["shm"]
            if segment is not None:
                segment.unlink()
            if everyone:
                self._shm = ShmGroup(self, segment, chunk, {r: h["pid"] for r, h in hellos.items()},
                                     same_pids=all(h["pid_ns"] == hello["pid_ns"] for h in hellos.values()))
                self.path = "shm"
                segment = None
            elif shared_memory:
                raise CommError(f"rank {self.rank}: shared_memory=True, but not every rank could map the shared segment")
        finally:
            if segment is not None:
                segment.close()

    def _send_ready(self, ok: bool, segment: str = "") -> None:
        payload = json.dumps({"shm": ok, "segment": segment}).encode()
        for dealer in self._dealers.values():
            dealer.send_multipart([_encode_header(_READY, 0, None, 0), payload])

    # -- receiving -----------------------------------------------------------
    def _pump(self, wait_ms: int) -> None:
        """Move whatever arrived into the inbox, waiting up to ``wait_ms`` for something."""
        events = dict(self._poller.poll(wait_ms))
        if not events:
            return
        router = self._router
        if router in events:
            while True:
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._file(frames)
        for monitor, peer in self._monitors.items():
            if monitor in events:
                while True:
                    try:
                        event = recv_monitor_message(monitor, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        self._connected.add(peer)
                        self._lost_at.pop(peer, None)
                    elif event["event"] == zmq.EVENT_DISCONNECTED and peer in self._connected:
                        self._lost_at.setdefault(peer, time.monotonic())

    def _file(self, frames) -> None:
        if len(frames) < 2:
            return
        try:
            source = int(frames[0].bytes)
            head = frames[1].bytes
            magic, kind, op, dtype_code, ndim, seq, aux = _HEAD.unpack_from(head)
        except (ValueError, struct.error):
            return  # not one of ours (a port scanner, a stale job): ignore
        if magic != _MAGIC or not 0 <= source < self.size:
            return
        shape = struct.unpack_from(f"!{ndim}q", head, _HEAD.size) if ndim else ()
        payload = frames[2] if len(frames) > 2 else None
        if kind == _BYE:
            self._peer_state.setdefault(source, "closed its communicator")
            return
        if kind == _ABORT:
            reason = bytes(payload.buffer).decode(errors="replace") if payload is not None else ""
            self._peer_state[source] = f"failed: {reason}"
            return
        msg = _Message(source, kind, op, DTYPES[dtype_code] if dtype_code < len(DTYPES) else None, shape, seq, aux, payload)
        key = (source, kind, op if kind == _DATA else 0, seq)
        self._inbox.setdefault(key, deque()).append(msg)

    def _collect(self, kind: int, op: int, seq: int, sources: list[int], what: str) -> list[_Message]:
        """One message (kind, op, seq) from every rank in ``sources``, bounded by the timeout."""
        got: list[_Message] = []
        missing = list(sources)
        start = time.monotonic()
        deadline = start + self.timeout
        while True:
            still = []
            for source in missing:
                queue = self._inbox.get((source, kind, op, seq))
                if queue:
                    got.append(queue.popleft())
                    if not queue:
                        del self._inbox[(source, kind, op, seq)]
                else:
                    still.append(source)
            missing = still
            if not missing:
                return got
            now = time.monotonic()
            self._check_peers(missing, what, start, now)
            if kind == _DATA and op != _OP["send"]:
                self._check_same_call(missing, op, seq, what)
            if now >= deadline:
                self._fail(CommTimeoutError(self._timeout_text(what, missing, now - start)))
            self._pump(max(1, min(int((deadline - now) * 1000) + 1, 100)))

    def _check_same_call(self, waiting_for: list[int], op: int, seq: int, what: str) -> None:
        """A peer whose collective number ``seq`` is another verb would never send what we wait for."""
        for peer in waiting_for:
            for other in _COLLECTIVE_OPS:
                if other != op and (peer, _DATA, other, seq) in self._inbox:
                    self._fail(CommError(
                        f"{what} on rank {self.rank} of {self.size}: rank {peer} called {_OP_NAMES[other]} #{seq} instead"
                    ))

    def _check_peers(self, waiting_for: list[int], what: str, start: float, now: float) -> None:
        problem = self._peer_problem(waiting_for, what, start, now)
        if problem is not None:
            self._fail(problem)

    def _who(self, peer: int) -> str:
        """``rank 1 (pid 4242 on host node1)`` once its hello is in, else ``rank 1``: errors name the process."""
        info = getattr(self, "peers", {}).get(peer)
        return f"rank {peer} (pid {info.get('pid')} on host {info.get('host')})" if info else f"rank {peer}"

    def _peer_problem(self, waiting_for: list[int], what: str, start: float, now: float) -> PeerLostError | None:
        for peer in waiting_for:
            state = self._peer_state.get(peer)
            if state is not None:
                return PeerLostError(
                    f"{what} on rank {self.rank} of {self.size}: {self._who(peer)} {state} (waited {now - start:.1f} s)"
                )
            lost = self._lost_at.get(peer)
            if lost is not None and now - lost > _LOST_GRACE:
                return PeerLostError(
                    f"{what} on rank {self.rank} of {self.size}: lost {self._who(peer)} at {self.endpoints[peer]} "
                    f"(its connection closed: the process exited or died; waited {now - start:.1f} s)"
                )
        return None

    def _timeout_text(self, what: str, missing: list[int], waited: float) -> str:
        who = ", ".join(f"rank {p} at {self.endpoints[p]}" for p in missing)
        return f"{what} on rank {self.rank} of {self.size} timed out after {waited:.1f} s waiting for {who}"

    def _fail(self, exc: Exception):
        """Mark the communicator broken, tell the peers, raise ``exc``."""
        if self._broken is None:
            self._broken = str(exc)
            if self._shm is not None:
                self._shm.mark_failed()
            reason = str(exc).encode()
            for dealer in self._dealers.values():
                try:
                    dealer.send_multipart([_encode_header(_ABORT, 0, None, 0), reason], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        raise exc

    # -- sending -------------------------------------------------------------
    def _send(self, peer: int, header: bytes, arr: np.ndarray | None) -> None:
        dealer = self._dealers[peer]
        try:
            if arr is None:
                dealer.send(header)
            elif arr.nbytes < _ZERO_COPY_BYTES:
                dealer.send_multipart([header, arr.reshape(-1).data])
            else:
                tracker = dealer.send_multipart([header, arr.reshape(-1).data], copy=False, track=True)
                self._trackers.append((tracker, peer))
        except zmq.Again:
            self._fail(CommTimeoutError(
                f"send on rank {self.rank} of {self.size}: rank {peer} at {self.endpoints[peer]} took no data for {self.timeout:.1f} s"
            ))

    def _settle(self, what: str) -> None:
        """Wait until ZeroMQ no longer reads the caller's arrays (zero-copy sends)."""
        start = time.monotonic()
        for tracker, peer in self._trackers:
            while not tracker.done:
                now = time.monotonic()
                self._check_peers([peer], what, start, now)
                if now - start > self.timeout:
                    self._trackers.clear()
                    self._fail(CommTimeoutError(self._timeout_text(what + " (sending)", [peer], now - start)))
                try:
                    tracker.wait(0.05)
                except zmq.NotDone:
                    self._pump(0)
        self._trackers.clear()

    def _enter(self, op: str) -> int:
        if self._closed:
            raise CommError(f"{op} on rank {self.rank} of {self.size}: the communicator is closed")
        if self._broken is not None:
            raise CommError(f"{op} on rank {self.rank} of {self.size}: the communicator is broken by an earlier error: {self._broken}")
        self._seq += 1
        return self._seq

    def _exchange(self, op: str, seq: int, arr: np.ndarray | None, aux: int, targets, sources) -> list[_Message]:
        header = _encode_header(_DATA, _OP[op], arr, seq, aux)
        for peer in targets:
            self._send(peer, header, arr)
        msgs = self._collect(_DATA, _OP[op], seq, list(sources), f"{op} #{seq}")
        self._settle(f"{op} #{seq}")
        for msg in msgs:
            if msg.aux != aux:
                self._fail(CommError(
                    f"{op} #{seq} on rank {self.rank} of {self.size}: rank {msg.source} called it with "
                    f"{_AUX_NAME[op]} {msg.aux} but this rank with {aux}"
                ))
        return msgs

    # -- verbs ---------------------------------------------------------------
    def allreduce(self, array, op="sum", *, out=None):
        check_op(op)
        arr = as_array(array, "allreduce", self.rank)
        if out is not None:
            check_out(out, arr.shape, arr.dtype, "allreduce", self.rank)  # before any rank moves
            result = self._allreduce(arr, op)
            np.copyto(out, result)
            return out
        return self._allreduce(arr, op)

    def _allreduce(self, arr, op):
        seq = self._enter("allreduce")
        if self._shm is not None:
            return self._shm.allreduce(arr, op, seq)
        peers = list(self._dealers)
        msgs = self._exchange("allreduce", seq, arr, OP_CODE[op], peers, peers)
        by_rank = {self.rank: arr}
        for msg in msgs:
            if msg.dtype != arr.dtype or msg.shape != arr.shape:
                self._fail(CommError(
                    f"allreduce #{seq} on rank {self.rank} of {self.size}: rank {msg.source} sent {msg.dtype} {msg.shape} "
                    f"but this rank has {arr.dtype} {arr.shape}"
                ))
            by_rank[msg.source] = msg.array()
        return reduce_arrays(op, [by_rank[r] for r in range(self.size)])

    def allgather(self, array, axis=0, *, out=None):
        arr = as_array(array, "allgather", self.rank)
        axis = gather_axis(arr.shape, axis)
        if out is None:
            return self._allgather(arr, axis)
        shape = arr.shape or (1,)
        if not isinstance(out, np.ndarray) or out.dtype != arr.dtype or out.ndim != len(shape):
            check_out(out, gathered_shape(shape, axis, self.size), arr.dtype, "allgather", self.rank)
        result = self._allgather(arr, axis)  # the length along ``axis`` is known once every rank's piece is here
        check_out(out, result.shape, result.dtype, "allgather", self.rank)
        np.copyto(out, result)
        return out

    def _allgather(self, arr, axis):
        seq = self._enter("allgather")
        if self._shm is not None:
            return self._shm.allgather(arr, axis, seq)
        peers = list(self._dealers)
        msgs = self._exchange("allgather", seq, arr, axis, peers, peers)
        by_rank = {self.rank: arr}
        for msg in msgs:
            by_rank[msg.source] = msg.array()
        try:
            return concat_gathered([by_rank[r] for r in range(self.size)], axis)
        except CommError as exc:
            self._fail(CommError(f"allgather #{seq} on rank {self.rank} of {self.size}: {exc}"))

    def broadcast(self, array, root=0):
        root = check_rank(root, self.size, "broadcast root")
        arr = as_array(array, "broadcast", self.rank) if self.rank == root else None
        seq = self._enter("broadcast")
        if self._shm is not None:
            return self._shm.broadcast(arr, root, seq)
        if self.rank == root:
            self._exchange("broadcast", seq, arr, root, list(self._dealers), [])
            return np.array(arr, copy=True)
        (msg,) = self._exchange("broadcast", seq, None, root, [], [root])
        return np.array(msg.array(), copy=True)

    def barrier(self):
        seq = self._enter("barrier")
        if self._shm is not None:
            self._shm.barrier("barrier", seq)
            return
        peers = list(self._dealers)
        self._exchange("barrier", seq, None, 0, peers, peers)

    def send(self, array, dest, tag=0):
        """Queue ``array`` for ``dest``; returns without waiting for the receiver."""
        dest = check_rank(dest, self.size, "send dest")
        tag = check_tag(tag)
        arr = np.array(as_array(array, "send", self.rank), copy=True)
        if self._closed or self._broken is not None:
            self._enter("send")
        if dest == self.rank:
            msg = _Message(dest, _DATA, _OP["send"], arr.dtype, arr.shape, tag, 0, None)
            msg.payload = zmq.Frame(arr.tobytes())
            self._inbox.setdefault((dest, _DATA, _OP["send"], tag), deque()).append(msg)
            return
        self._send(dest, _encode_header(_DATA, _OP["send"], arr, tag), arr)
        self._trackers.clear()  # our own copy: nothing to wait for

    def recv(self, source, tag=0):
        source = check_rank(source, self.size, "recv source")
        tag = check_tag(tag)
        if self._closed or self._broken is not None:
            self._enter("recv")
        (msg,) = self._collect(_DATA, _OP["send"], tag, [source], f"recv from rank {source} (tag {tag})")
        return np.array(msg.array(), copy=True)

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._teardown(send_bye=self._broken is None)

    def _teardown(self, send_bye: bool) -> None:
        # Every step bounded; the context goes last and is destroyed (not merely
        # terminated), so a socket left open by an error cannot block interpreter exit.
        try:
            if self._shm is not None:
                self._shm.close()
                self._shm = None
        finally:
            for dealer in self._dealers.values():
                if send_bye:
                    try:
                        dealer.send(_encode_header(_BYE, 0, None, 0), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                try:
                    dealer.disable_monitor()
                except zmq.ZMQError:
                    pass
            for monitor in self._monitors:
                monitor.close(linger=0)
            for dealer in self._dealers.values():
                # Linger lets the last results, the goodbye or the failure notice reach live peers.
                dealer.close(linger=1000 if send_bye else 300)
            if self._router is not None:
                self._router.close(linger=0)
            self._ctx.destroy(linger=0)

    def __del__(self):
        try:
            if not self._closed:
                self._closed = True
                self._teardown(send_bye=False)
        except Exception:
            pass


_AUX_NAME = {"allreduce": "op code", "allgather": "axis", "broadcast": "root", "barrier": "argument"}

def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _bind_address(address: str, rank: int, source: str) -> str:
    """The IPv4 address rank ``rank`` listens on: its ``server_id``, resolved when it is a name."""
    try:
        socket.inet_pton(socket.AF_INET, address)
        return address
    except OSError:
        pass
    try:
        return socket.gethostbyname(address)
    except OSError:
        raise CommError(
            f"rank {rank}: cannot resolve its server_id {address!r} (from rank table {source}) to an address to "
            f"listen on; this host's addresses are {_host_addresses()}"
        ) from None


def _host_addresses() -> str:
    """This host's IP addresses for an error message (names left out: they are not what failed to match)."""
    found = this_host_addresses()
    ips = sorted(a for a in found if _is_ipv4(a)) + sorted(a for a in found if ":" in a)
    return ", ".join(ips) + f", host name {socket.gethostname()}"


def _is_ipv4(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return False
    return True

"""The zmq communicator's same-host fast path: collectives through one shared segment.

The segment (kind ``zmq``) comes from ``_shared_memory``: rank 0 creates it
after every rank's HELLO and unlinks it once every rank has sent READY (see
the handshake in ``_comm_zmq``); this module only lays it out and runs the
collectives in it.

Memory layout::

    control   N blocks of 160 int64 (1280 bytes, so counters of different ranks never share a cache line)
              [0] arrivals   how many barriers this rank has entered
              [1] state      0 running, 1 closed, 2 failed
              [8:80]         the call of an odd sequence number, [80:152] of an even one
                             (a rank may announce its next call while a slower peer still
                             checks the previous one), each:
                +0 op        verb code of the collective (see _OP)
                +1 seq       its sequence number
                +2 dtype     dtype code
                +3 ndim      dimensions of the array
                +4 aux       reduce op / gather axis / broadcast root
                +5 rows      allgather: length along the gather axis
                +6:+70 shape
    inputs    2 x N slots of ``chunk`` bytes (double-buffered: round k uses half k % 2)
    results   2 slots of ``chunk`` bytes

Barrier: a rank increments its own arrival counter and waits until every
other rank's counter is at least as large. Waiting spins briefly (the peer
is usually microseconds away), then yields the core, then sleeps in short
naps, checking the deadline, the peers' state words and their sockets.

Allreduce, per chunk (round k, half h = k % 2)::

    copy my chunk, except my own part, into inputs[h][me]       barrier
    reduce my part over all ranks in rank order -> results[h]   barrier
    copy the other ranks' parts from results[h] into my output

Rank order makes every rank's result bitwise identical. Double buffering
makes a barrier at the end of a round unnecessary: a rank can only write
half h again two rounds later, after a barrier that every reader of half h
had to reach first. Allgather and broadcast need one barrier per round.

Memory ordering: the writer stores data, then its counter; readers load the
counter, then data. x86-64's total store order keeps that order without
explicit fences.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import numpy as np

from ._comm_util import ResultPool, DTYPE_CODE, DTYPES, OP_CODE, reduce_into
from ._errors import CommError, CommTimeoutError, PeerLostError

_BLOCK = 160
_ARRIVALS, _STATE = 0, 1
_CALL_AT, _CALL_LEN = 8, 72
_OPCODE, _SEQ, _DTYPE, _NDIM, _AUX, _ROWS, _SHAPE = 0, 1, 2, 3, 4, 5, 6
_MAX_DIMS = 64
_RUNNING, _CLOSED, _FAILED = 0, 1, 2
_OP = {"allreduce": 1, "allgather": 2, "broadcast": 3, "barrier": 4}
_OP_NAMES = {v: k for k, v in _OP.items()}
_SPIN_SECONDS = 0.0002
_YIELD_SECONDS = 0.005


class ShmGroup:
    """The ranks of ``comm`` meeting in ``segment`` (a ``_shared_memory.Segment`` every rank has mapped)."""

    def __init__(self, comm, segment, chunk: int, pids: dict[int, int], same_pids: bool):
        self.comm = comm
        self.rank = comm.rank
        self.size = comm.size
        self.chunk = chunk
        self.segment = segment
        self.mapping = mapping = segment.mmap
        self.pids = pids
        self.same_pids = same_pids
        n = self.size
        self.ctl = np.ndarray((n, _BLOCK), dtype=np.int64, buffer=mapping)
        self._inputs_at = n * _BLOCK * 8
        self._results_at = self._inputs_at + 2 * n * chunk
        self.ctl[self.rank, _ARRIVALS] = 0
        self.ctl[self.rank, _STATE] = _RUNNING
        self.arrivals = 0
        self.round = 0
        self.others = [r for r in range(n) if r != self.rank]
        self.pool = ResultPool()

    @staticmethod
    def segment_size(size: int, chunk: int) -> int:
        return size * _BLOCK * 8 + 2 * size * chunk + 2 * chunk

    # -- views ---------------------------------------------------------------
    def _input(self, rank: int, half: int, dtype, count: int) -> np.ndarray:
        offset = self._inputs_at + (half * self.size + rank) * self.chunk
        return np.frombuffer(self.mapping, dtype=dtype, count=count, offset=offset)

    def _result(self, half: int, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.mapping, dtype=dtype, count=count, offset=self._results_at + half * self.chunk)

    # -- synchronisation -----------------------------------------------------
    def _announce(self, op: str, seq: int, arr: np.ndarray | None, aux: int, rows: int = 0) -> None:
        row = self._call(self.rank, seq)
        row[_OPCODE] = _OP[op]
        row[_SEQ] = seq
        row[_AUX] = aux
        row[_ROWS] = rows
        if arr is not None:
            if arr.ndim > _MAX_DIMS:
                raise ValueError(f"arrays of {arr.ndim} dimensions are not supported (at most {_MAX_DIMS})")
            row[_DTYPE] = DTYPE_CODE[arr.dtype]
            row[_NDIM] = arr.ndim
            row[_SHAPE : _SHAPE + arr.ndim] = arr.shape
        else:
            row[_DTYPE] = -1
            row[_NDIM] = 0

    def _call(self, rank: int, seq: int) -> np.ndarray:
        at = _CALL_AT + (seq & 1) * _CALL_LEN
        return self.ctl[rank, at : at + _CALL_LEN]

    def barrier(self, op: str, seq: int) -> None:
        self.wait(op, seq, self.arrive())

    def arrive(self) -> int:
        """First half of a barrier: announce this rank's arrival (work may follow before ``wait``)."""
        self.arrivals += 1
        self.ctl[self.rank, _ARRIVALS] = self.arrivals
        return self.arrivals

    def wait(self, op: str, seq: int, target: int) -> None:
        """Second half: until every rank has arrived at barrier ``target``."""
        ctl = self.ctl
        for peer in self.others:
            if ctl[peer, _ARRIVALS] >= target:
                continue
            self._wait_for(peer, target, op, seq)

    def _wait_for(self, peer: int, target: int, op: str, seq: int) -> None:
        ctl = self.ctl
        start = time.monotonic()
        # Spin: the peer is usually a few microseconds behind.
        while time.monotonic() - start < _SPIN_SECONDS:
            for _ in range(64):
                if ctl[peer, _ARRIVALS] >= target:
                    return
        deadline = start + self.comm.timeout
        nap = 0.00005
        last_check = 0.0
        while True:
            if ctl[peer, _ARRIVALS] >= target:
                return
            now = time.monotonic()
            if now - last_check > 0.01:
                last_check = now
                self._check(peer, target, op, seq, start, now)
                if now > deadline:
                    self.comm._fail(CommTimeoutError(self._timeout_text(op, seq, target, now - start)))
            if now - start < _YIELD_SECONDS:
                os.sched_yield()
            else:
                time.sleep(nap)
                nap = min(nap * 2, 0.001)

    def _check(self, peer: int, target: int, op: str, seq: int, start: float, now: float) -> None:
        comm = self.comm
        what = f"{op} #{seq}"
        comm._pump(0)  # BYE / ABORT messages and connection events
        problem = comm._peer_problem([peer], what, start, now)
        state = int(self.ctl[peer, _STATE])
        if problem is None and state != _RUNNING:
            detail = "closed its communicator" if state == _CLOSED else comm._peer_state.get(peer, "failed")
            problem = PeerLostError(
                f"{what} on rank {self.rank} of {self.size}: {comm._who(peer)} {detail} (waited {now - start:.1f} s)"
            )
        if problem is None and self.same_pids and not _alive(self.pids.get(peer)):
            problem = PeerLostError(
                f"{what} on rank {self.rank} of {self.size}: {comm._who(peer)} exited (waited {now - start:.1f} s)"
            )
        # The peer may have arrived and then closed or exited in between: that is no loss.
        if problem is not None and self.ctl[peer, _ARRIVALS] < target:
            comm._fail(problem)

    def _timeout_text(self, op: str, seq: int, target: int, waited: float) -> str:
        behind = []
        for peer in self.others:
            if self.ctl[peer, _ARRIVALS] < target:
                call = max((self._call(peer, 0), self._call(peer, 1)), key=lambda c: int(c[_SEQ]))
                peer_seq = int(call[_SEQ])
                doing = _OP_NAMES.get(int(call[_OPCODE]), "nothing")
                where = f"it is in {doing} #{peer_seq}" if peer_seq else "it has not started any collective"
                behind.append(f"rank {peer} (pid {self.pids.get(peer)}; {where})")
        return (
            f"{op} #{seq} on rank {self.rank} of {self.size} timed out after {waited:.1f} s waiting for "
            + ", ".join(behind)
        )

    def _agree(self, op: str, seq: int, keys: tuple[int, ...]) -> None:
        """After the first barrier: every rank must be in the same call with matching arguments."""
        mine = self._call(self.rank, seq)
        for peer in self.others:
            theirs = self._call(peer, seq)
            if theirs[_OPCODE] != _OP[op] or theirs[_SEQ] != seq:
                self.comm._fail(CommError(
                    f"{op} #{seq} on rank {self.rank} of {self.size}: rank {peer} called "
                    f"{_OP_NAMES.get(int(theirs[_OPCODE]), '?')} #{int(theirs[_SEQ])} instead"
                ))
            for key in keys:
                if key == _SHAPE:
                    ndim = int(mine[_NDIM])
                    same = theirs[_SHAPE : _SHAPE + ndim].tolist() == mine[_SHAPE : _SHAPE + ndim].tolist()
                else:
                    same = theirs[key] == mine[key]
                if not same:
                    self.comm._fail(CommError(
                        f"{op} #{seq} on rank {self.rank} of {self.size}: rank {peer} passed {self._describe(peer, seq)} "
                        f"but this rank {self._describe(self.rank, seq)}"
                    ))

    def _describe(self, rank: int, seq: int) -> str:
        row = self._call(rank, seq)
        code = int(row[_DTYPE])
        dtype = DTYPES[code] if 0 <= code < len(DTYPES) else None
        shape = tuple(int(x) for x in row[_SHAPE : _SHAPE + int(row[_NDIM])])
        return f"dtype {dtype} shape {shape} (argument {int(row[_AUX])})"

    # -- collectives -----------------------------------------------------------
    def allreduce(self, arr: np.ndarray, op: str, seq: int) -> np.ndarray:
        self._announce("allreduce", seq, arr, OP_CODE[op])
        flat = arr.reshape(-1)
        out = self.pool.empty(arr.shape, arr.dtype)
        out_flat = out.reshape(-1)
        total = flat.size
        per_chunk = max(1, self.chunk // arr.itemsize)
        n, me = self.size, self.rank
        first = True
        start = 0
        while first or start < total:
            end = min(total, start + per_chunk)
            length = end - start
            half = self.round & 1
            self.round += 1
            bounds = [start + (length * k) // n for k in range(n + 1)]
            lo, hi = bounds[me], bounds[me + 1]
            mine = self._input(me, half, arr.dtype, length)
            # My own part stays in my array: the others need every part but theirs... and mine.
            mine[: lo - start] = flat[start:lo]
            mine[hi - start :] = flat[hi:end]
            self.barrier("allreduce", seq)
            if first:
                self._agree("allreduce", seq, (_DTYPE, _NDIM, _AUX, _SHAPE))
                first = False
            result = self._result(half, arr.dtype, length)
            part = out_flat[lo:hi]
            sources = [flat[lo:hi] if r == me else self._input(r, half, arr.dtype, length)[lo - start : hi - start] for r in range(n)]
            if n == 1:
                part[...] = sources[0]
            else:
                _REDUCE2[arr.dtype == np.bool_][op](sources[0], sources[1], out=part)
                for src in sources[2:]:
                    reduce_into(op, part, src)
            result[lo - start : hi - start] = part
            self.barrier("allreduce", seq)
            out_flat[start:lo] = result[: lo - start]
            out_flat[hi:end] = result[hi - start :]
            start = end
        return out

    def allgather(self, arr: np.ndarray, axis: int, seq: int) -> np.ndarray:
        if arr.ndim == 0:
            arr = arr.reshape(1)
        send = arr if axis == 0 else np.asarray(np.moveaxis(arr, axis, 0), order="C")
        self._announce("allgather", seq, send, axis, rows=send.shape[0])
        # Everyone's rows: known only after the first barrier, so round 0 is sent blind.
        mine_bytes = send.reshape(-1).view(np.uint8)
        rows = None
        out_bytes = None
        offsets = None
        sizes = None
        k = 0
        while True:
            half = self.round & 1
            self.round += 1
            lo = k * self.chunk
            piece = mine_bytes[lo : lo + self.chunk]
            self._input(self.rank, half, np.uint8, piece.size)[:] = piece
            target = self.arrive()
            if out_bytes is not None:
                # While the peers copy their pieces in, place my own.
                out_bytes[offsets[self.rank] + lo : offsets[self.rank] + lo + piece.size] = piece
            self.wait("allgather", seq, target)
            if rows is None:
                self._agree_gather(seq, send)
                rows = [int(self._call(r, seq)[_ROWS]) for r in range(self.size)]
                row_bytes = math.prod(send.shape[1:]) * send.itemsize
                sizes = [r_ * row_bytes for r_ in rows]
                offsets = [0, *itertools.accumulate(sizes[:-1])]
                out = self.pool.empty((sum(rows),) + send.shape[1:], send.dtype)
                out_bytes = out.reshape(-1).view(np.uint8)
                rounds = max(1, -(-max(sizes) // self.chunk))
                out_bytes[offsets[self.rank] : offsets[self.rank] + piece.size] = piece  # round 0's own piece
            for r in self.others:
                take = max(0, min(self.chunk, sizes[r] - lo))
                if take:
                    out_bytes[offsets[r] + lo : offsets[r] + lo + take] = self._input(r, half, np.uint8, take)
            k += 1
            if k >= rounds:
                break
        if axis != 0:
            out = np.asarray(np.moveaxis(out, 0, axis), order="C")
        return out

    def _agree_gather(self, seq: int, send: np.ndarray) -> None:
        self._agree("allgather", seq, (_DTYPE, _NDIM, _AUX))
        mine = self._call(self.rank, seq)
        ndim = int(mine[_NDIM])
        for peer in self.others:
            theirs = self._call(peer, seq)
            if theirs[_SHAPE + 1 : _SHAPE + ndim].tolist() != mine[_SHAPE + 1 : _SHAPE + ndim].tolist():
                axis = int(mine[_AUX])
                self.comm._fail(CommError(
                    f"allgather #{seq} on rank {self.rank} of {self.size}: rank {peer} passed {self._describe(peer, seq)} "
                    f"but this rank {self._describe(self.rank, seq)}; shapes may differ only along axis {axis}"
                ))

    def broadcast(self, arr: np.ndarray | None, root: int, seq: int) -> np.ndarray:
        me = self.rank
        self._announce("broadcast", seq, arr if me == root else None, root)
        if me == root:
            src_bytes = arr.reshape(-1).view(np.uint8)
        out = None
        k = 0
        while True:
            half = self.round & 1
            self.round += 1
            lo = k * self.chunk
            if me == root:
                piece = src_bytes[lo : lo + self.chunk]
                self._input(me, half, np.uint8, piece.size)[:] = piece
            self.barrier("broadcast", seq)
            if out is None:
                self._agree("broadcast", seq, (_AUX,))
                row = self._call(root, seq)
                dtype = DTYPES[int(row[_DTYPE])]
                shape = tuple(int(x) for x in row[_SHAPE : _SHAPE + int(row[_NDIM])])
                out = np.array(arr, copy=True) if me == root else self.pool.empty(shape, dtype)
                out_bytes = out.reshape(-1).view(np.uint8)
                nbytes = out_bytes.size
                rounds = max(1, -(-nbytes // self.chunk))
            if me != root:
                take = min(self.chunk, nbytes - lo)
                if take > 0:
                    out_bytes[lo : lo + take] = self._input(root, half, np.uint8, take)
            k += 1
            if k >= rounds:
                return out

    # -- lifetime --------------------------------------------------------------
    def mark_failed(self) -> None:
        self.ctl[self.rank, _STATE] = _FAILED

    def close(self) -> None:
        try:
            if self.ctl[self.rank, _STATE] == _RUNNING:
                self.ctl[self.rank, _STATE] = _CLOSED
        except (ValueError, TypeError):
            pass
        self.ctl = None
        self.pool.clear()
        self.mapping = None
        self.segment.close()  # an array the caller still holds keeps the mapping until it goes


_peers: dict[int, object] = {}


def _alive(pid: int | None) -> bool:
    """Whether peer ``pid`` still runs code (checked while waiting for it, so its Process is kept)."""
    if not pid:
        return True
    import psutil

    try:
        process = _peers.get(pid)
        if process is None:
            process = _peers[pid] = psutil.Process(pid)
        return process.is_running() and process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        _peers.pop(pid, None)
        return False


_REDUCE2 = {
    False: {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply},
    True: {"sum": np.logical_or, "max": np.logical_or, "min": np.logical_and, "prod": np.logical_and},
}

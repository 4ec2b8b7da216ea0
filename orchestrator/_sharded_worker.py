"""One rank of a ``ShardedModel``: build this rank's shard, then answer the master's requests.

``python -m orchestrator._sharded_worker --model PATH --master ipc://DIR/master.sock
--backend mpi|zmq [--rank R --size N --rank_table FILE] [--threads T] [--master_pid PID]``

Every rank gets every request from the master (not through a collective),
so ranks that sit idle between requests never run into a collective's
timeout. Rank 0 replies with the outputs; the other ranks reply with an
empty REPLY so the master knows they finished (or an ERROR).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import zmq

from ranks._remote_errors import pack_exception, where_header
from ranks._shard_files import resolve_shard_path
from ranks._staged_runner import StagedRunner, default_session_factory

from . import _sharded_protocol as proto

_POLL_MS = 500


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator._sharded_worker")
    p.add_argument("--model", required=True)
    p.add_argument("--master", required=True)
    p.add_argument("--backend", choices=("mpi", "zmq"), required=True)
    p.add_argument("--rank", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--rank_table")
    p.add_argument("--base_port", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--master_pid", type=int)
    p.add_argument("--timeout", type=float)
    return p


def make_communicator(args):
    if args.backend == "mpi":
        from ranks._comm_mpi import MpiCommunicator

        return MpiCommunicator(timeout=args.timeout)
    from ranks._world import create_communicator

    return create_communicator(backend="zmq", rank=args.rank, size=args.size, rank_table=args.rank_table,
                               base_port=args.base_port, timeout=args.timeout)


def _master_alive(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(args.master)
    comm = None
    rank = args.rank if args.rank is not None else "?"
    where = where_header(f"rank {rank}")
    try:
        try:
            comm = make_communicator(args)
            rank = comm.rank
            where = where_header(f"rank {comm.rank} of {comm.size}")
            path = resolve_shard_path(args.model, comm.rank, comm.size)
            runner = StagedRunner(path, comm, make_session=default_session_factory(threads=args.threads))
            # Every rank built its shard before any READY: the master starts no request on a half-built job.
            comm.barrier()
        except BaseException as exc:
            _send_error(sock, exc, where, rank, None)
            return 1
        sock.send_multipart(proto.encode(proto.READY, {
            "rank": comm.rank, "size": comm.size,
            "inputs": [a.name for a in runner.get_inputs()], "outputs": [a.name for a in runner.get_outputs()],
        }))
        while True:
            if not sock.poll(_POLL_MS):
                if not _master_alive(args.master_pid):
                    return 1  # orphaned: the master is gone, nobody will send EXIT
                continue
            kind, header, arrays, _ = proto.decode(sock.recv_multipart())
            if kind == proto.EXIT:
                return 0
            if kind != proto.PREDICT:
                continue
            try:
                started = time.perf_counter()
                outputs = runner.run(None, arrays)
                seconds = time.perf_counter() - started
            except BaseException as exc:
                _send_error(sock, exc, where, comm.rank, header.get("id"))
                return 1  # peers may be stuck in a collective: this job is over
            names = [a.name for a in runner.get_outputs()]
            payload = dict(zip(names, outputs)) if comm.rank == 0 else {}
            reply = {"id": header["id"], "rank": comm.rank, "seconds": seconds}
            sock.send_multipart(proto.encode(proto.REPLY, reply, payload))
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:
                pass
        sock.close()
        ctx.term()


def _send_error(sock, exc, where, rank, request_id) -> None:
    packed = pack_exception(exc, where)
    pickled = packed.pop("pickled", b"")
    sock.send_multipart(proto.encode(proto.ERROR, {"id": request_id, "rank": rank, "error": packed}, extra=[pickled]))


if __name__ == "__main__":
    sys.exit(main())

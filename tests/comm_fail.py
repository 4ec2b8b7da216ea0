"""A rank program that misbehaves on purpose, for the failure tests.

    python tests/comm_fail.py MODE BAD_RANK mpi TIMEOUT [mpi-arrival]   (ranks meet through MPI, as across hosts)
    python tests/comm_fail.py MODE BAD_RANK mpi TIMEOUT fast            (no arrival check: a timeout aborts the job)
    python tests/comm_fail.py MODE BAD_RANK zmq TIMEOUT RANK TABLE BASE_PORT [tcp]

Every rank does one allreduce (so all are connected), then the bad rank
misbehaves while the others start allreduce #2:
    raise   raises ValueError
    raise_in_with  raises ValueError inside ``with comm:`` (whose exit must still stop the job)
    kill    SIGKILLs itself
    hang    sleeps far beyond the timeout instead of joining
    mismatch  calls allgather instead
    leave   closes its communicator and exits 0 (a rank that leaves early without comm.abort())
    absent  (zmq only) the bad rank is never started: the others wait in the handshake
Each good rank prints ``FAILED <ExceptionType>: <message>`` and exits 3.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    import faulthandler

    # Should this ever hang, say where, and exit (the tests must leave nothing running).
    faulthandler.dump_traceback_later(60, exit=True)
    mode, bad, backend, timeout = argv[0], int(argv[1]), argv[2], float(argv[3])
    from ranks import CommError

    try:
        if backend == "mpi":
            from ranks import MpiCommunicator

            comm = MpiCommunicator(timeout=timeout, shared_memory=False if argv[4:5] == ["mpi-arrival"] else None,
                                   arrival_check=argv[4:5] != ["fast"])
        else:
            from ranks import ZmqCommunicator

            rank, table, port = int(argv[4]), argv[5], int(argv[6])
            shm = False if len(argv) > 7 and argv[7] == "tcp" else None
            comm = ZmqCommunicator(rank, table, base_port=port, timeout=timeout, shared_memory=shm)
        print(f"READY rank {comm.rank} pid {os.getpid()}", flush=True)
        first = comm.allreduce(np.ones(4, np.float32))
        assert first[0] == comm.size
        if mode == "raise_in_with":
            with comm:
                if comm.rank == bad:
                    raise ValueError(f"rank {bad} raises on purpose inside with")
                start = time.monotonic()
                comm.allreduce(np.ones(1 << 16, np.float32))
            print("UNEXPECTED: allreduce #2 returned", flush=True)
            return 0
        if comm.rank == bad:
            if mode == "raise":
                raise ValueError(f"rank {bad} raises on purpose")
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "hang":
                time.sleep(timeout * 20)
                return 0
            if mode == "mismatch":
                comm.allgather(np.ones(4, np.float32))
                return 0
            if mode == "exit0":
                os._exit(0)  # gone without closing its communicator: the peers must not wait it out
            if mode == "leave":
                comm.close()  # as leaving ``with comm:`` does, then sys.exit(0): the peers must not wait it out
                return 0
        start = time.monotonic()
        comm.allreduce(np.ones(1 << 16, np.float32))
        print("UNEXPECTED: allreduce #2 returned", flush=True)
        return 0
    except CommError as exc:
        waited = time.monotonic() - start if "start" in locals() else -1
        print(f"FAILED {type(exc).__name__} after {waited:.2f} s: {exc}", flush=True)
        if backend == "zmq":
            comm_obj = locals().get("comm")
            if comm_obj is not None:
                comm_obj.close()
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A rank of the fault matrix (tests/test_fault_matrix.py): joins its peers, then one rank misbehaves.

    python fault_rank.py --fault KIND --bad-rank R [--marker TEXT]
                         [--rank_id N --device_id N --config_file INI]   (the seeds' flags)

Written as a user writes a rank program: ``create_communicator()`` picks the
backend (mpi under mpirun, zmq from the rank table of ``--config_file`` or
``RANK_TABLE_FILE``); no error is caught, so a peer's failure ends this rank
the way it ends a user's. The timeout is ``ORCH_TIMEOUT``.

Every rank that joins prints ``JOINING rank R pid P at UNIX_TIME`` before it creates its
communicator, ``READY rank R pid P`` once its communicator exists, runs
allreduce #1 (so every rank is connected) and prints ``CONNECTED rank R pid P``.
Then the bad rank prints ``FAULT KIND rank R pid P at UNIX_TIME`` and:

    raise          raises RuntimeError (uncaught; the communicator is not closed by a ``with``)
    raise_in_with  raises RuntimeError inside ``with create_communicator() as comm:``
    exit0          leaves through ``os._exit(0)`` while the others wait
    sigkill        SIGKILLs itself
    sigsegv        SIGSEGVs itself (a NULL read through ctypes)
    sigstop        SIGSTOPs itself (a hang; the others time out); once continued, joins allreduce #2
    absent         never joins: it prints ``FAULT`` and sleeps before creating its communicator (under
                   mpirun, before MPI_Init: the communicator's first import initializes MPI)
    wait           sleeps (a rank busy elsewhere, for the faults that come from outside)
    none           nothing: every rank prints ``WAITING rank R pid P`` and sleeps (for the faults
                   of the launcher or caller, which come from outside)

while the others start allreduce #2. ``--marker`` is unused: tests find leftovers by it.
"""

import argparse
import os
import signal
import sys
import time

import numpy as np

from ranks import create_communicator


def fault(kind: str, rank: int) -> None:
    print(f"FAULT {kind} rank {rank} pid {os.getpid()} at {time.time():.6f}", flush=True)
    if kind in ("raise", "raise_in_with"):
        raise RuntimeError(f"rank {rank} broke on purpose ({kind})")
    if kind == "exit0":
        os._exit(0)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sigsegv":
        import ctypes

        ctypes.string_at(0)
    if kind == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return  # continued (fg, SIGCONT): on to allreduce #2, as the stuck program would
    # wait, none: until stopped from outside
    while True:
        time.sleep(1)


def work(comm, args) -> None:
    print(f"READY rank {comm.rank} pid {os.getpid()}", flush=True)
    comm.allreduce(np.ones(4, np.float32))
    print(f"CONNECTED rank {comm.rank} pid {os.getpid()}", flush=True)
    if args.fault == "none":
        print(f"WAITING rank {comm.rank} pid {os.getpid()}", flush=True)
        while True:
            time.sleep(1)
    if comm.rank == args.bad_rank:
        fault(args.fault, comm.rank)
    comm.allreduce(np.ones(1 << 12, np.float32))
    print(f"UNEXPECTED: rank {comm.rank} finished allreduce #2", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", required=True)
    parser.add_argument("--bad-rank", type=int, default=1)
    parser.add_argument("--marker", default="")
    parser.add_argument("--rank_id", type=int)
    parser.add_argument("--device_id", type=int)
    parser.add_argument("--config_file")
    args = parser.parse_args()

    me = args.rank_id
    if me is None:
        me = int(os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") or os.environ.get("RANK") or 0)
    if args.fault == "absent" and me == args.bad_rank:
        fault("absent", me)
    print(f"JOINING rank {me} pid {os.getpid()} at {time.time():.6f}", flush=True)
    if args.fault == "raise_in_with":
        with create_communicator(rank=args.rank_id, config_file=args.config_file) as comm:
            work(comm, args)
        return 0
    comm = create_communicator(rank=args.rank_id, config_file=args.config_file)
    work(comm, args)
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An MPI rank for the launcher tests: prints its rank, all-reduces its rank, optionally fails.

    python mpi_rank.py [--bad-rank R] [--bad raise|sigkill|exit0] [--marker TEXT]

``exit0`` leaves through ``os._exit(0)`` without MPI_Finalize while the others wait in allreduce.
"""

import argparse
import os
import signal
import sys

from mpi4py import MPI


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bad-rank", type=int, default=-1)
    parser.add_argument("--bad", default="raise")
    parser.add_argument("--marker", default="")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    print(f"mpi rank {rank} of {size} pid {os.getpid()}", flush=True)
    if rank == args.bad_rank:
        if args.bad == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if args.bad == "exit0":
            print(f"mpi rank {rank} leaves early", flush=True)
            os._exit(0)
        raise RuntimeError(f"mpi rank {rank} broke on purpose")
    total = comm.allreduce(rank, op=MPI.SUM)
    print(f"rank {rank} allreduce sum {total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

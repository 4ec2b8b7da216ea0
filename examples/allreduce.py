"""All-reduce a tensor across ranks: under mpirun, from a rank table, or alone.

    mpirun -n 2 python examples/allreduce.py                                   # mpi backend
    python examples/allreduce.py --rank_id 0 --config_file comm.ini &          # zmq backend, the
    python examples/allreduce.py --rank_id 1 --config_file comm.ini            #   ranks of a rank table
    python examples/allreduce.py                                               # a world of one
    mpirun -n 2 python -m mpi4py examples/allreduce.py --bad-rank 1            # rank 1 raises instead

comm.ini names the rank table (and optionally the backend, timeout and base port):

    [ascend_context]
    rank_table_file=rank_tables/local_2p.json
    [comm]
    base_port=29500

Each rank contributes ``[rank + 1] * 4``; every rank prints the sum and checks it.
Same flags as the per-rank program, so ``orchestrate launch rank-table`` can start it.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ranks import create_communicator, export_torchrun_env, resolve_identity  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank_id", type=int, help="this rank (default: from mpirun or RANK)")
    parser.add_argument("--device_id", type=int, help="this rank's device (printed only)")
    parser.add_argument("--config_file", help="config_file.ini with the rank table and [comm] settings")
    parser.add_argument("--backend", choices=("mpi", "zmq", "single"), help="default: automatic")
    parser.add_argument("--bad-rank", type=int, metavar="R",
                        help="rank R raises instead of joining the all-reduce, to show how a failure is reported")
    args = parser.parse_args()

    identity = resolve_identity(rank_id=args.rank_id, device_id=args.device_id)
    export_torchrun_env(identity)
    with create_communicator(args.backend, rank=identity.rank if args.rank_id is not None else None,
                             config_file=args.config_file) as comm:
        if comm.rank == args.bad_rank:
            raise RuntimeError(f"rank {comm.rank} broke on purpose (--bad-rank)")
        mine = np.full(4, comm.rank + 1, dtype=np.float32)
        total = comm.allreduce(mine)
        expected = sum(range(1, comm.size + 1))
        ok = bool(np.all(total == expected))
        print(f"rank {comm.rank} of {comm.size} ({comm.backend}, device {identity.device_id}): "
              f"allreduce -> {total.tolist()} {'OK' if ok else f'WRONG, expected {expected}'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""A rank that meets its peers over ZeroMQ, for the rank-table launcher tests.

    python zmq_rank.py [--bad-rank R] [--bad error|hang] [--slow-exit S] [--marker TEXT]
                       --rank_id N --device_id N --config_file INI     (the rank-table launcher's flags)

The rank table and base port come from the ini (``[ascend_context] rank_table_file``,
``[comm] base_port``). Every rank joins one allreduce, then the bad rank misbehaves while
the others wait in allreduce #2:

    error  does what ``python -m ranks`` does on an error: prints ``error: ShardError: ...``,
           aborts its communicator (the others fail at once with PeerLostError), then takes
           ``--slow-exit`` seconds to exit 1, as a rank freeing large models does
    hang   waits forever (the job is ended from outside)

The others print ``error: <type>: <message>`` for a communication error and exit 1.
``--marker`` is not used: tests put a unique word there to find leftovers.
"""

import argparse
import os
import sys
import time

import numpy as np

from ranks import CommError, ShardError, create_communicator


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bad-rank", type=int, default=-1)
    parser.add_argument("--bad", default="error")
    parser.add_argument("--slow-exit", type=float, default=0.0)
    parser.add_argument("--marker", default="")
    parser.add_argument("--rank_id", type=int, required=True)
    parser.add_argument("--device_id", type=int)
    parser.add_argument("--config_file", required=True)
    args = parser.parse_args()

    comm = create_communicator("zmq", rank=args.rank_id, config_file=args.config_file)
    try:
        comm.allreduce(np.ones(4, np.float32))
        print(f"rank {comm.rank} of {comm.size} pid {os.getpid()} connected", flush=True)
        if comm.rank == args.bad_rank:
            if args.bad == "hang":
                print(f"rank {comm.rank} waits forever", flush=True)
                while True:
                    time.sleep(1)
            error = ShardError(f"rank {comm.rank} was given another rank's shard (on purpose)")
            print(f"error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            comm.abort(f"rank {comm.rank}: {type(error).__name__}; stopping the job")
            time.sleep(args.slow_exit)
            return 1
        if args.bad == "hang":
            print(f"rank {comm.rank} waits forever", flush=True)
        comm.allreduce(np.ones(1 << 16, np.float32))
        print(f"rank {comm.rank} done", flush=True)
        return 0
    except CommError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        comm.close()


if __name__ == "__main__":
    sys.exit(main())

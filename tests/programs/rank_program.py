"""A rank for the launcher tests: says hello, then one rank misbehaves on purpose.

    python rank_program.py [--bad-rank R[,R...]] [--bad raise|exit3|exit0|sigkill|segfault|hang] [--stagger S]
                           [--others ok|hang|ignore-term|stop] [--grandchild] [--delay S] [--marker TEXT]
                           [--rank_id N --device_id N --config_file INI]   (the rank-table launcher's flags)

The rank comes from --rank_id, else RANK, else the MPI launchers' variables.
``--bad exit0`` leaves at once through ``os._exit(0)``; ``--others stop`` SIGSTOPs itself (then
waits forever once continued). ``--marker`` is not used: tests put a unique word there to find leftovers with pgrep -f.
"""

import argparse
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bad-rank", default="", help="comma-separated ranks that misbehave")
    parser.add_argument("--stagger", type=float, default=0.0, help="the i-th bad rank waits delay + i * stagger")
    parser.add_argument("--bad", default="raise")
    parser.add_argument("--others", default="ok")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--marker", default="")
    parser.add_argument("--rank_id", type=int)
    parser.add_argument("--device_id", type=int)
    parser.add_argument("--config_file")
    args = parser.parse_args()

    rank = args.rank_id
    if rank is None:
        for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
            if os.environ.get(name):
                rank = int(os.environ[name])
                break
    world = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE")
    print(
        f"hello from rank {rank} of {world} pid {os.getpid()} device {args.device_id} "
        f"config {args.config_file} local_rank {os.environ.get('LOCAL_RANK')}",
        flush=True,
    )
    print(f"rank {rank} says hi on stderr", file=sys.stderr, flush=True)
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"grandchild-{args.marker}"])
        print(f"grandchild pid {child.pid}", flush=True)

    bad_ranks = [int(r) for r in args.bad_rank.split(",") if r.strip()]
    if rank in bad_ranks:
        time.sleep(args.delay + bad_ranks.index(rank) * args.stagger)
        if args.bad == "raise":
            raise RuntimeError(f"rank {rank} broke on purpose")
        if args.bad == "exit3":
            print(f"rank {rank} exits with 3", file=sys.stderr, flush=True)
            return 3
        if args.bad == "exit0":
            print(f"rank {rank} leaves early with os._exit(0)", flush=True)
            os._exit(0)
        if args.bad == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if args.bad == "segfault":
            import ctypes

            ctypes.string_at(0)
        if args.bad == "hang":
            while True:
                time.sleep(1)
        raise SystemExit(f"unknown --bad {args.bad}")

    if args.others == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.others == "stop":
        print(f"rank {rank} stops itself", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    if args.others in ("hang", "ignore-term", "stop"):
        print(f"rank {rank} waits forever", flush=True)
        while True:
            time.sleep(1)
    print(f"rank {rank} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``orchestrate serve``: serve servables with MindSpore Serving's and KServe v2's gRPC and HTTP protocols.

    orchestrate serve SERVABLES [--servable add] [--grpc-port 5500] [--http-port 1500] [--workers N] [--device-ids 0,1]
    orchestrate serve --master [SERVABLES --local-workers N] [--grpc-port 5500] [--http-port P] [--master-port 6100]
    orchestrate serve --worker SERVABLES --master-address HOST:PORT [--worker-port 6200] [--http-port P]

The gRPC port serves MindSpore Serving's MSService and KServe v2's GRPCInferenceService; the
HTTP port (``--http-port``, also called ``--rest-port``) MindSpore Serving's REST, KServe v2's
``/v2/...`` and ``/metrics``.

The first form is the lightweight deployment (master and models in this
process); the others the cluster. ``--local-workers N`` starts N worker
processes of SERVABLES beside the master (started and watched by the project's
supervisor). Serves until Ctrl-C or SIGTERM, which stop everything cleanly.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from ranks._command_line import (UsageError, non_negative_float, non_negative_int, port_number, positive_float,
                                 positive_int)
from ranks._log import get_logger

log = get_logger("serving")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve servables over MindSpore Serving's and KServe v2's gRPC and HTTP protocols (one process, or master and workers)",
        description="Serve the servables of a directory (NAME/servable_config.py, NAME/1/model.onnx, ...) with "
                    "MindSpore Serving's protocols, in one process or as a master and workers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    parser.add_argument("servables", nargs="?", metavar="SERVABLES", help="the servable directory")
    role = parser.add_mutually_exclusive_group()
    role.add_argument("--master", action="store_true", help="the cluster's master: workers join it on --master-port")
    role.add_argument("--worker", action="store_true", help="a cluster worker: joins the master at --master-address")
    parser.add_argument("--servable", action="append", default=[], metavar="NAME",
                        help="serve this servable of SERVABLES (repeatable; default: every one)")
    parser.add_argument("--version", type=non_negative_int, default=0, help="version to serve (default 0: the newest)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address the servers listen on (default 127.0.0.1; 0.0.0.0 for every address)")
    parser.add_argument("--grpc-port", type=port_number, default=5500, help="gRPC port (default 5500; 0: a free one)")
    parser.add_argument("--rest-port", "--http-port", dest="rest_port", type=port_number, default=None,
                        help="HTTP port: MindSpore Serving's REST, KServe v2 (/v2/...) and /metrics (default: none)")
    parser.add_argument("--master-port", type=port_number, default=6100,
                        help="--master: the port workers join on (default 6100)")
    parser.add_argument("--master-address", metavar="HOST:PORT", help="--worker: where the master listens")
    parser.add_argument("--worker-address", default=None,
                        help="--worker: the address this worker listens on (default: --address)")
    parser.add_argument("--worker-port", type=port_number, default=6200, help="--worker: its port (default 6200)")
    parser.add_argument("--register-timeout", type=positive_float, default=None, metavar="SECONDS",
                        help="--worker: how long to try to reach the master before giving up (default 30)")
    parser.add_argument("--local-workers", type=non_negative_int, default=0,
                        help="--master: start this many worker processes of SERVABLES beside the master")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="pool workers per servable (default 0: from the usable cores)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="threads per pool worker (default: shared out)")
    parser.add_argument("--device-ids", default="0",
                        help="comma-separated device ids; several: each batch split over one worker process per id")
    parser.add_argument("--max-batch", type=positive_int, default=None,
                        help="with_batch_dim servables: instances joined into one batch (default 32; 1: no batching)")
    parser.add_argument("--batch-delay-ms", type=non_negative_float, default=None,
                        help="how long a batch waits for more instances (default 1 ms)")
    parser.add_argument("--queue-size", type=positive_int, default=None, help="instances a servable holds at once (default 1024)")
    parser.add_argument("--timeout", type=positive_float, default=None, help="seconds per request (default ORCH_TIMEOUT)")
    parser.add_argument("--max-msg-mb", type=positive_int, default=100, help="largest request or reply, in MB (default 100)")
    parser.set_defaults(func=run)


def parse_device_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--device-ids must be comma-separated integers like 0,1; got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise UsageError(f"--device-ids must name devices >= 0, like 0,1; got {text!r}")
    return ids


def servable_names(directory: str, chosen: list[str]) -> list[str]:
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"SERVABLES {directory} is not a directory (expected NAME/servable_config.py inside)")
    found = sorted(p.name for p in root.iterdir() if (p / "servable_config.py").is_file())
    if chosen:
        unknown = [n for n in chosen if n not in found]
        if unknown:
            raise UsageError(f"--servable {', '.join(unknown)}: not in {directory} (servables there: {', '.join(found) or 'none'})")
        return chosen
    if not found:
        raise UsageError(f"{directory} holds no servable (a folder with servable_config.py)")
    return found


def servable_options(args) -> dict:
    options = {"device_ids": parse_device_ids(args.device_ids), "workers_num": args.workers, "thread_num": args.threads}
    for key, value in (("max_batch", args.max_batch), ("batch_delay_ms", args.batch_delay_ms),
                       ("queue_size", args.queue_size), ("timeout", args.timeout)):
        if value is not None:
            options[key] = value
    return options


def check(args) -> None:
    if args.worker:
        if not args.servables:
            raise UsageError("--worker needs SERVABLES, the directory of the servables it serves")
        if not args.master_address or ":" not in args.master_address:
            raise UsageError(f"--worker needs --master-address HOST:PORT, got {args.master_address!r}")
        host, _, port = args.master_address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError(f"--master-address must be HOST:PORT with PORT in 1-65535, got {args.master_address!r}")
        if args.local_workers:
            raise UsageError("--local-workers belongs to the master, not to a --worker")
    elif args.master:
        if args.local_workers and not args.servables:
            raise UsageError("--local-workers needs SERVABLES, the directory its workers serve")
        if args.servables and not args.local_workers:
            raise UsageError("--master serves through its workers: give --local-workers N with SERVABLES, or start "
                             "workers with `orchestrate serve --worker SERVABLES --master-address HOST:PORT`")
    else:
        if not args.servables:
            raise UsageError("give SERVABLES (the servable directory), or --master / --worker for a cluster")
        if args.local_workers:
            raise UsageError("--local-workers belongs to --master")


def run(args) -> int:
    from .serving import master, worker
    from .serving._listen import check_can_listen
    from .serving._process import PROCESS

    check(args)
    options = servable_options(args)
    names = servable_names(args.servables, args.servable) if args.servables else []
    directory = str(Path(args.servables).resolve()) if args.servables else ""
    # Every port checked before any servable loads: one in use fails at once, with its one error line.
    for what, ip, port in listen_plan(args, names):
        check_can_listen(what, ip, port)
    group = None
    started = False
    try:
        if args.worker:
            host, _, port = args.master_address.rpartition(":")
            for i, name in enumerate(names):
                worker.start_servable(directory, name, args.version, master_ip=host, master_port=int(port),
                                      worker_ip=args.worker_address or args.address,
                                      worker_port=args.worker_port + i if args.worker_port else 0,
                                      max_msg_mb_size=args.max_msg_mb, **options,
                                      **({"register_timeout": args.register_timeout} if args.register_timeout else {}))
            if args.rest_port is not None:  # this worker's own HTTP: its metrics, its servables over KServe
                master.start_restful_server(args.worker_address or args.address, args.rest_port, args.max_msg_mb)
        elif args.master:
            master.start_grpc_server(args.address, args.grpc_port, args.max_msg_mb)
            if args.rest_port is not None:
                master.start_restful_server(args.address, args.rest_port, args.max_msg_mb)
            master_port = master.start_master_server(args.address, args.master_port, args.max_msg_mb)
            if args.local_workers:
                group = start_local_workers(args, master_port)
                PROCESS.before_stop.append(group.stop)  # while the master still answers their Leave
        else:
            for name in names:
                worker.start_servable_in_master(directory, name, args.version, **options)
            master.start_grpc_server(args.address, args.grpc_port, args.max_msg_mb)
            if args.rest_port is not None:
                master.start_restful_server(args.address, args.rest_port, args.max_msg_mb)
        started = True
        master.wait()
    except BaseException:
        PROCESS.stop(announce=started)  # a failed start: its error line alone, no "Serving stopped"
        raise
    finally:
        if group is not None:
            group.stop()
    return 0


def listen_plan(args, names: list[str]) -> list[tuple[str, str, int]]:
    """(server, address, port) of every server this command starts, named as the server names itself."""
    if args.worker:
        ip = args.worker_address or args.address
        if args.worker_port and args.worker_port + len(names) - 1 > 65535:
            raise UsageError(f"--worker-port {args.worker_port}: the {len(names)} servables listen on it and the "
                             f"ports after it, past 65535")
        plan = [("serving worker", ip, args.worker_port + i if args.worker_port else 0) for i in range(len(names))]
        return plan + ([("RESTful server", ip, args.rest_port)] if args.rest_port is not None else [])
    plan = [("serving gRPC server", args.address, args.grpc_port)]
    if args.rest_port is not None:
        plan.append(("RESTful server", args.address, args.rest_port))
    if args.master:
        plan.append(("serving master server", args.address, args.master_port))
    return plan


def start_local_workers(args, master_port: int):
    """N ``orchestrate serve --worker`` processes on free ports, under the supervisor; a watch logs any that ends."""
    from launchers import ProcessSpec, Supervisor, python_module

    argv_tail = [args.servables, "--worker", "--master-address", f"{args.address}:{master_port}",
                 "--address", args.address, "--worker-port", "0", "--version", str(args.version),
                 "--device-ids", args.device_ids, "--workers", str(args.workers), "--threads", str(args.threads),
                 "--max-msg-mb", str(args.max_msg_mb)]
    for flag, value in (("--max-batch", args.max_batch), ("--batch-delay-ms", args.batch_delay_ms),
                        ("--queue-size", args.queue_size), ("--timeout", args.timeout)):
        if value is not None:
            argv_tail += [flag, str(value)]
    for name in args.servable:
        argv_tail += ["--servable", name]
    specs = []
    for i in range(args.local_workers):
        argv, env = python_module("orchestrator._cli", "serve", *argv_tail)
        specs.append(ProcessSpec(i, argv, env=env, label=f"serving worker {i}"))
    group = Supervisor(specs)
    group.start()

    def watch():
        seen = set()

        def report() -> None:
            for exit_ in group.exits():
                if exit_.rank in seen:
                    continue
                seen.add(exit_.rank)
                if exit_.stopped:
                    continue
                how = f"signal {exit_.signal}" if exit_.signal else f"exit code {exit_.exitcode}"
                left = len(specs) - len(seen)
                then = (f"the master serves on with the {left} other(s)" if left
                        else "no local worker is left (the master serves what other workers register)")
                print(f"serving worker {exit_.rank} (pid {exit_.pid} on {exit_.host}) ended with {how}; {then}",
                      file=sys.stderr, flush=True)

        while len(seen) < len(specs):
            ended = group.join(0.5)
            report()  # after the join too: the last worker's end is said like the others'
            if ended:
                break

    threading.Thread(target=watch, name="serving local workers watch", daemon=True).start()
    return group

"""``orchestrate launch mpi ...`` and ``orchestrate launch rank-table ...``: start and watch many ranks.

Only argument parsing and exit codes live here; the launchers are in the
``launchers`` package (config dataclass -> launcher -> process group).

Exit codes: 0 when every rank succeeded; the first failed rank's own status
when one failed (its exit code, or 128 + the signal number; ``python -m ranks``
exits 2 for a usage error such as a missing model, 1 for a runtime error); 124
when ``--timeout`` ran out; 130 on Ctrl-C (143 on SIGTERM); 2 when nothing could
be started (bad option, no mpirun, bad rank table).
"""

from __future__ import annotations

import argparse
import signal
import sys

from ranks._command_line import ArgumentParser, non_negative_float, positive_float, positive_int, split_list

EPILOG_MPI = """\
examples:
  orchestrate launch mpi -n 2 -- python -m ranks --model_path=shards/model.onnx
  orchestrate launch mpi -n 4 -H host1:2,host2:2 --log-dir logs -- python -m ranks --model_path=shards/model.onnx
  orchestrate launch mpi -np 2 -- python -m ranks --model_path=shards/model.onnx   (mpirun's spelling)
  orchestrate launch mpi -n 2 --hostfile hosts --mca btl self,tcp --mca btl_tcp_if_include 10.0.0.0/24 \
      --mca oob_tcp_if_include 10.0.0.0/24 -- python -m ranks --model_path=shards/model.onnx
A first word "python" (or "python3") runs as this interpreter, so the ranks use the same environment.
"""

EPILOG_TABLE = """\
each local rank runs: PROGRAM ARGS --device_id=D --rank_id=R --config_file=INI
with RANK, WORLD_SIZE and LOCAL_RANK exported. example:
  orchestrate launch rank-table rank_tables/local_2p.json --config-file config_file.ini -- \\
      python -m ranks --model_path=shards/model.onnx
"""


# ``orchestrate launch ...`` bypasses the top-level parser (see _cli.main): argparse
# cannot mix a positional RANK_TABLE, options and a trailing command line, so
# the command line after ``--`` is cut off before parsing.
PASSTHROUGH = "launch"


def run_passthrough(argv: list[str]) -> int:
    """Parse ``orchestrate launch`` arguments (everything after ``--`` is the program) and run."""
    argv = list(argv)
    program = None
    if "--" in argv:
        cut = argv.index("--")
        argv, program = argv[:cut], argv[cut + 1 :]
    parser = ArgumentParser(prog="orchestrate")
    register(parser.add_subparsers(dest="command", required=True))
    args, unknown = parser.parse_known_args(["launch", *argv])
    if unknown:
        hint = ("; put the program after --, e.g. orchestrate launch mpi -n 2 -- python -m ranks --model_path=m.onnx"
                if program is None else "")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if program is not None:
        if args.program:
            parser.error(f"put the whole program after --: unexpected {' '.join(args.program)!r} before it")
        args.program = program
    if not args.program:
        parser.error("no program: give the command every rank runs after --, e.g. -- python -m ranks --model_path=m.onnx")
    return int(args.func(args) or 0)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="start many ranks (through mpirun or from a rank table) and watch them",
        description="Start many ranks and watch them: every line prefixed with its rank, the first failure "
        "reported, the other ranks stopped, nothing left running.",
    )
    kinds = parser.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")

    mpi = kinds.add_parser(
        "mpi",
        help="run PROGRAM on N ranks through mpirun",
        description="Build and run the mpirun command for PROGRAM on N ranks.",
        epilog=EPILOG_MPI,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # -np as mpirun users type it; argparse takes a one-dash long option as it is.
    mpi.add_argument("-n", "-np", "--np", dest="nprocs", type=positive_int, required=True, metavar="N",
                     help="number of ranks")
    mpi.add_argument("-H", "--host", dest="hosts", help="hosts for mpirun, e.g. host1:2,host2:2 (passed through)")
    mpi.add_argument("--hostfile", help="hostfile for mpirun (passed through)")
    mpi.add_argument("--bind-to", default="none", help="mpirun's process binding (default: none; Open MPI's own "
                     "default binds each rank to ONE core, which starves multi-threaded ranks)")
    over = mpi.add_mutually_exclusive_group()
    over.add_argument("--oversubscribe", dest="oversubscribe", action="store_true", default=None,
                      help="allow more ranks than cores (default: on when -n exceeds this host's cores and no hosts are given)")
    over.add_argument("--no-oversubscribe", dest="oversubscribe", action="store_false")
    mpi.add_argument("--mpirun", help="the mpirun/mpiexec to use (default: ORCH_MPIRUN, else next to this Python, then on PATH)")
    mpi.add_argument("--mpirun-arg", dest="mpirun_args", action="append", default=[], metavar="ARG",
                     help="one more argument for mpirun, before the program (repeatable), e.g. --mpirun-arg=--mca ...")
    mpi.add_argument("--mca", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="an Open MPI parameter, passed as --mca NAME VALUE (repeatable), e.g. --mca plm_rsh_agent AGENT "
                     "or --mca btl_tcp_if_include 10.0.0.0/24")
    mpi.add_argument("--print-command", action="store_true", help="print the mpirun command line before running it")
    _common_options(mpi)
    mpi.set_defaults(func=_run_mpi)

    table = kinds.add_parser(
        "rank-table",
        help="start this host's ranks of an HCCL rank table",
        description="Start one process per rank the rank table lists for this host.",
        epilog=EPILOG_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    table.add_argument("rank_table", metavar="RANK_TABLE", help="HCCL rank table JSON")
    table.add_argument("--config-file", dest="config_file", required=True,
                       help="ini file handed to every rank as --config_file")
    table.add_argument("--server", dest="servers", action="append", metavar="SERVER_ID",
                       help="this host's server_id in the table (default: matched by this host's names and "
                       "addresses); repeatable or comma-separated")
    _common_options(table)
    table.set_defaults(func=_run_rank_table)


def _common_options(parser) -> None:
    parser.add_argument("--log-dir", help="also write each rank's output to LOG_DIR/rank_N.log")
    parser.add_argument("--timeout", type=positive_float, help="seconds the whole job may run before it is stopped (default: no limit)")
    parser.add_argument("--stop-timeout", type=non_negative_float,
                        help="seconds between SIGTERM and SIGKILL when stopping ranks (default: ORCH_STOP_TIMEOUT, 10)")
    parser.add_argument("program", nargs="*", metavar="-- PROGRAM ARGS",
                        help="the command every rank runs, after --")


def _program(args) -> list[str]:
    return list(args.program)


def _run_mpi(args) -> int:
    from launchers import MpiLaunchConfig, MpiLauncher

    def build():
        config = MpiLaunchConfig(
            nprocs=args.nprocs,
            program=_program(args),
            hosts=args.hosts,
            hostfile=args.hostfile,
            log_dir=args.log_dir,
            timeout=args.timeout,
            bind_to=args.bind_to if args.bind_to not in ("", "default") else None,
            oversubscribe=args.oversubscribe,
            mpirun=args.mpirun,
            mpirun_args=args.mpirun_args,
            mca=[tuple(pair) for pair in args.mca],
            stop_timeout=args.stop_timeout,
        )
        launcher = MpiLauncher(config)
        if args.print_command:
            print("orchestrate launch mpi: " + " ".join(launcher.command), file=sys.stderr, flush=True)
        return launcher

    return _launch("mpi", build)


def _run_rank_table(args) -> int:
    from launchers import RankTableLaunchConfig, RankTableLauncher

    def build():
        return RankTableLauncher(
            RankTableLaunchConfig(
                rank_table=args.rank_table,
                config_file=args.config_file,
                program=_program(args),
                servers=split_list(args.servers) or None,
                log_dir=args.log_dir,
                timeout=args.timeout,
                stop_timeout=args.stop_timeout,
            )
        )

    return _launch("rank-table", build)


def _launch(kind: str, build) -> int:
    from launchers import LaunchError, LaunchInterruptedError, LaunchTimeoutError, RankFailedError
    from ranks._errors import ConfigError

    name = f"orchestrate launch {kind}"
    try:
        launcher = build()
    except (ConfigError, LaunchError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    try:
        launcher.run()
    except RankFailedError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return (exc.first.shell_code or 1) if exc.first is not None else 1
    except LaunchTimeoutError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 124
    except LaunchInterruptedError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 128 + int(getattr(signal, exc.signal_name, signal.SIGINT))
    except LaunchError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0

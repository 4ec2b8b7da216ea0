"""``orchestrate rank ...``: the per-rank program, the same as ``python -m ranks ...``."""

from __future__ import annotations

import argparse

PASSTHROUGH = "rank"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank",
        help="run one rank of a model (same as python -m ranks)",
        add_help=False,
        description="Run one rank; every argument is passed to python -m ranks.",
    )
    parser.add_argument("rank_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    return run_passthrough(args.rank_args)


def run_passthrough(argv: list[str]) -> int:
    from ranks import rank_main

    return rank_main(argv)

"""The ``orchestrate`` command: one sub-command per job, each defined in its own module.

Each ``_cli_*`` module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (taking the parsed namespace, returning an exit code).
Argument parsing stays here and in those modules; the work itself lives in
the packages, so every layer can be used without the command line.
"""

from __future__ import annotations

import argparse
import sys

from . import _cli_launch, _cli_predict, _cli_rank, _cli_rank_table, _cli_sample, _cli_shard

COMMANDS = [_cli_rank, _cli_rank_table, _cli_sample, _cli_launch, _cli_predict, _cli_shard]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrate",
        description="Run ONNX models across processes, ranks and hosts.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Commands that hand every argument on (like ``rank``) bypass our parser,
    # which would otherwise claim options such as --model_path=... for itself.
    for module in COMMANDS:
        name = getattr(module, "PASSTHROUGH", None)
        if name and argv[:1] == [name]:
            return int(module.run_passthrough(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

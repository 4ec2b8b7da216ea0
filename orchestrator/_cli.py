"""The ``orchestrate`` command: one sub-command per job, each defined in its own module.

Each ``_cli_*`` module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (taking the parsed namespace, returning an exit code).
Argument parsing stays here and in those modules; the work itself lives in
the packages, so every layer can be used without the command line.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
import warnings

from ranks._command_line import SPELLING_NOTE, ArgumentParser, add_version_option, remove_made_directories, report
from ranks._errors import OrchestratorError

from . import (_cli_convert, _cli_generate, _cli_launch, _cli_predict, _cli_rank, _cli_rank_table, _cli_sample, _cli_serve,
               _cli_shard)

COMMANDS = [_cli_rank, _cli_rank_table, _cli_sample, _cli_launch, _cli_predict, _cli_shard, _cli_generate, _cli_serve,
            _cli_convert]

EPILOG = f"""\
exit codes: 0 done; 1 a runtime error (a model that fails, a rank or worker that dies);
2 a usage error (bad flag or value, malformed config or rank table, missing input file).
{SPELLING_NOTE}"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="orchestrate",
        description="Run ONNX (and MINDIR) models across processes, ranks and hosts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_option(parser)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``orchestrate``: 0, 1 for a runtime error, 2 for a usage error (``ranks._command_line``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Commands that hand every argument on (like ``rank``) bypass our parser,
    # which would otherwise claim options such as --model_path=... for itself.
    for module in COMMANDS:
        name = getattr(module, "PASSTHROUGH", None)
        if name and argv[:1] == [name]:
            return int(module.run_passthrough(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"orchestrate {args.command}"
    _one_line_warnings(prog)
    restore = _unwind_on_sigterm()
    try:
        code = int(args.func(args) or 0)
    except (OrchestratorError, OSError) as exc:
        remove_made_directories()
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            return _quiet_broken_pipe()
        return report(exc, prog)
    except (KeyboardInterrupt, _Terminated) as exc:
        # Everything on the way out has been stopped and removed by now (ranks, workers, scratch directories):
        # one line, not a traceback, and the shell's status for the signal.
        remove_made_directories()
        name, code = ("SIGTERM", 143) if isinstance(exc, _Terminated) else ("SIGINT", 130)
        print(f"{prog}: interrupted by {name}", file=sys.stderr, flush=True)
        return code
    except BaseException:
        remove_made_directories()
        raise
    finally:
        restore()  # main() may run inside another program (tests): leave its SIGTERM as it was
    if code != 0:
        remove_made_directories()
    return code


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` and ``with`` on the way out runs (a scratch
    directory is removed, ranks are stopped), as Ctrl-C's KeyboardInterrupt does; not an Exception, so that
    no ``except Exception`` on the way swallows it."""


def _unwind_on_sigterm():
    """SIGTERM unwinds like Ctrl-C, unless something already handles it (commands that handle it themselves,
    ``serve`` and ``launch``, install their own handlers over this one). Returns what puts the handler back."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminated)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (``orchestrate ... | head``): its write end
    then polls as an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_broken_pipe() -> int:
    """Stop quietly, as other command-line tools do when their reader stops reading: no error line, status 141
    (128 + SIGPIPE); standard output goes to /dev/null so that Python's own flush at exit does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def _one_line_warnings(prog: str) -> None:
    """A warning (e.g. more worker threads than cores) as one line, like the errors, not Python's file:line form."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What every command line of the project shares: ``python -m ranks`` and each ``orchestrate`` sub-command.

==========  ===============================================================
exit code   meaning
==========  ===============================================================
0           done
1           a runtime error: a model that fails to build or run, a worker or
            rank that dies, a file that cannot be written mid-way
2           a usage error: a bad flag or value, a malformed config/ini/rank
            table, a missing or unreadable file named on the command line,
            shards that do not fit the launch
==========  ===============================================================

Options are accepted in both spellings, ``--model-path`` and ``--model_path``,
as torchrun does; help shows the one each parser registers (snake_case for
the per-rank program, whose flags the seeds write that way; dash-case for
``orchestrate``).
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from ._errors import ConfigError, InputError, ModelNotFoundError, OrchestratorError, ShardError

USAGE_ERROR = 2
RUNTIME_ERROR = 1

# Raised by a user's choice of flags, values or files: exit code 2. Everything
# else the project raises is a runtime error: exit code 1.
_USAGE_ERRORS = (ConfigError, InputError, ShardError, ModelNotFoundError)

SPELLING_NOTE = "Options may be written with - or _ between words: --model-path and --model_path are the same."


class UsageError(ConfigError):
    """A bad flag value found by the command line itself; reported without a type name, exit code 2."""


class CommandError(OrchestratorError):
    """A runtime failure the command line words itself (a write that failed); no type name, exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that takes every long option in both spellings.

    Only the spelling given to ``add_argument`` is registered, so help and
    usage show one; a command-line token in the other spelling (``--log_dir``
    for ``--log-dir``, abbreviations too) is rewritten before argparse sees
    it. ``add_alias`` keeps an old name working without showing it. Tokens
    after ``--`` are left alone: they belong to another program.
    Sub-parsers (``add_subparsers``) are of this class too.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._aliases: dict[str, str] = {}

    def add_alias(self, alias: str, option: str) -> None:
        """Accept ``alias`` (either spelling) for the registered ``option``; help does not show it."""
        if option not in self._option_string_actions:
            raise ValueError(f"{option} is not an option of {self.prog}")
        self._aliases[_spelling_key(alias)] = option

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._respell(args), namespace)

    def error(self, message: str):
        """A usage error is one line, as every other error of the command line: what is wrong and where help
        is (argparse would print the whole usage block first), then exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        text = super().format_help()
        if any("-" in o[2:] or "_" in o[2:] for o in self._option_string_actions if o.startswith("--")):
            text += "\n" + SPELLING_NOTE + "\n"
        return text

    def _respell(self, args: list[str]) -> list[str]:
        known = [o for o in self._option_string_actions if o.startswith("--")]
        by_key = {_spelling_key(o): o for o in known}
        out = []
        for i, token in enumerate(args):
            # After "--" the tokens are another program's; after a sub-command's name, its parser's.
            if token == "--" or (self._subparsers is not None and not token.startswith("-")):
                out.extend(args[i:])
                break
            if token.startswith("--") and len(token) > 2:
                name, eq, value = token.partition("=")
                if name not in self._option_string_actions:
                    token = self._registered(name, by_key) + eq + value
            out.append(token)
        return out

    def _registered(self, name: str, by_key: dict[str, str]) -> str:
        key = _spelling_key(name)
        if key in self._aliases:
            return self._aliases[key]
        if key in by_key:
            return by_key[key]
        if self.allow_abbrev:
            matches = {o for k, o in by_key.items() if k.startswith(key)}
            matches |= {o for k, o in self._aliases.items() if k.startswith(key)}
            if len(matches) == 1:
                return matches.pop()
        return name  # argparse reports it (unknown or ambiguous) in its own words


def _spelling_key(option: str) -> str:
    return "--" + option[2:].replace("_", "-") if option.startswith("--") else option


def version() -> str:
    """This project's version: from the installed package's metadata, else from pyproject.toml beside it."""
    from importlib import metadata

    try:
        return metadata.version("orchestrator")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as handle:
            return str(tomllib.load(handle)["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"orchestrator {version()}",
                        help="print the version and exit")


# -- argument types: a bad value is argparse's "argument --batch: invalid ..." and exit code 2


def positive_int(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 1-65535, or 0: a free one the system picks."""
    value = _number(int, text, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1-65535 (0: a free one), got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def split_list(values: list[str] | None) -> list[str]:
    """A repeatable option whose values may also be comma-separated: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _number(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


# -- errors


def exit_code(exc: BaseException) -> int:
    """2 for a usage error (see the module docstring), 1 for anything else."""
    return USAGE_ERROR if isinstance(exc, _USAGE_ERRORS) else RUNTIME_ERROR


def report(exc: BaseException, prog: str | None = None) -> int:
    """Print ``exc`` as one line on stderr and return its exit code."""
    prefix = f"{prog}: " if prog else ""
    kind = "" if isinstance(exc, (UsageError, CommandError)) else f"{type(exc).__name__}: "
    print(f"{prefix}error: {kind}{exc}", file=sys.stderr, flush=True)
    return exit_code(exc)


# -- files named on the command line


def check_input_files(files: list[str], flag: str = "--input") -> None:
    """Fail before any work when an input file is missing; InputError (exit code 2)."""
    for file in files:
        if not Path(file).is_file():
            what = "is a directory, not a file" if Path(file).is_dir() else "does not exist"
            raise InputError(f"input file {file} {what} ({flag})")


def prepare_output(path: str | os.PathLike, flag: str, *, directory: bool = False) -> Path:
    """Check that ``path`` (a file, or a directory with ``directory=True``) can be written; create its parents.

    Called before the work, so a bad ``-o``/``--output`` costs nothing. Raises
    UsageError naming the flag and the path when a parent is a file, a file
    path is a directory, or the directory cannot be created or written.
    """
    path = Path(path)
    folder = path if directory else path.parent
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot write {flag} {path}: {blocker} is a file, not a directory")
    if not directory and path.is_dir():
        raise UsageError(f"cannot write {flag} {path}: it is a directory; give a file name")
    try:
        made = [p for p in [folder, *folder.parents] if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        _MADE.extend(made)
    except OSError as exc:
        raise UsageError(f"cannot write {flag} {path}: cannot create directory {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not directory and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write {flag} {path}: permission denied")
    return path


# Directories prepare_output created (deepest first), for a command that fails to take back if still empty.
_MADE: list[Path] = []


def remove_made_directories() -> None:
    """Remove what prepare_output created and nothing was written into: a failed command leaves no empty folder."""
    while _MADE:
        folder = _MADE.pop(0)
        try:
            folder.rmdir()
        except OSError:
            _MADE.clear()  # not empty (or gone): its parents are not empty either
            return


def write_failed(path: str | os.PathLike, flag: str, exc: OSError) -> CommandError:
    """The runtime error for a write that failed after the checks (disk full, a path gone meanwhile)."""
    return CommandError(f"writing {flag} {path} failed: {exc.strerror or exc}")


def read_numpy_file(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    """The arrays of a ``.npz`` (by name) or the array of a ``.npy``; InputError for anything else.

    Pickled data is never loaded: an input file is data, not code.
    """
    kind = path.suffix
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise InputError(f"input file {path} cannot be read: {exc.strerror or exc}") from None
    if kind == ".npz" and not magic.startswith(b"PK"):
        raise InputError(f"input file {path} is not a valid .npz file (numpy.savez writes one)")
    if kind == ".npy" and magic != b"\x93NUMPY":
        raise InputError(f"input file {path} is not a valid .npy file (numpy.save writes one)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        return loaded
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
            raise InputError(f"input file {path} holds Python objects (pickled data), which are never loaded; "
                             f"save plain numeric arrays") from None
        raise InputError(f"input file {path} is not a valid {kind} file: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"input file {path} is not a valid {kind} file: {exc}") from None

"""Where the ranks' output goes: each line prefixed with its rank on the console,
one log file per rank, and the last lines kept for the failure report.

Reader threads (one per pipe) call ``RankOutput.line``; a lock keeps lines
from different ranks whole on the console.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable


def prefix(label: str) -> str:
    return f"[{label}] "


def log_name(key) -> str:
    """``0`` -> ``rank_0.log``; ``"mpirun"`` -> ``mpirun.log``."""
    return f"rank_{key}.log" if isinstance(key, int) else f"{key}.log"


class RankOutput:
    """Console, log files and tails for a set of ranks (keys are ranks, or a name such as "mpirun").

    ``log_dir``: write every line of rank r, without prefix, to
    ``log_dir/rank_r.log`` (created when missing). ``stdout``/``stderr``: the
    console streams (default: this process's). ``tail_lines``: how many last
    lines of each rank to keep for a failure report.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        *,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        tail_lines: int = 20,
        console: bool = True,
    ):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._stdout = stdout
        self._stderr = stderr
        self._console = console
        self._tail_lines = tail_lines
        self._lock = threading.Lock()
        self._logs: dict[object, IO[str]] = {}
        self._err_tail: dict[object, collections.deque] = {}
        self._out_tail: dict[object, collections.deque] = {}
        self._last_time: dict[object, float] = {}
        self._closed = False

    def open(self, keys) -> None:
        """Create the log directory and one (empty) log per key, so a silent rank still has its file."""
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for key in keys:
            self._log(key)

    def _log(self, key) -> IO[str] | None:
        if self.log_dir is None or self._closed:
            return None
        log = self._logs.get(key)
        if log is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / log_name(key), "w", encoding="utf-8", buffering=1)
            self._logs[key] = log
        return log

    def line(self, key, label: str, stream: str, text: str) -> None:
        """One line (without its newline) that rank ``key`` wrote to ``stream`` ("stdout" or "stderr")."""
        self.emit(key, stream, text, prefix(label) + text)

    def emit(self, key, stream: str, text: str, console_text: str | None) -> None:
        """Record ``text`` for ``key`` (tail and log) and write ``console_text`` (if any) to the console."""
        with self._lock:
            self._last_time[key] = time.time()
            tails = self._err_tail if stream == "stderr" else self._out_tail
            tail = tails.get(key)
            if tail is None:
                tail = tails[key] = collections.deque(maxlen=max(self._tail_lines, 1))
            tail.append(text)
            log = self._log(key)
            if log is not None:
                log.write(text + "\n")
            if self._console and console_text is not None:
                out = (self._stderr or sys.stderr) if stream == "stderr" else (self._stdout or sys.stdout)
                try:
                    out.write(console_text + "\n")
                    out.flush()
                except (OSError, ValueError):
                    pass  # a closed console must not kill the reader: the log still has the line

    def tail(self, key) -> tuple[str, ...]:
        """The last lines ``key`` wrote to stderr, or to stdout when stderr got nothing."""
        with self._lock:
            err = self._err_tail.get(key)
            if err:
                return tuple(err)[-self._tail_lines :] if self._tail_lines > 0 else ()
            out = self._out_tail.get(key)
            return tuple(out)[-self._tail_lines :] if out and self._tail_lines > 0 else ()

    def last_time(self, key) -> float | None:
        """The Unix time ``key``'s last line (on either stream) arrived, None when it wrote none."""
        with self._lock:
            return self._last_time.get(key)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for log in self._logs.values():
                log.close()
            self._logs.clear()


def pump(pipe, on_line: Callable[[str], None]) -> None:
    """Read ``pipe`` (binary) to its end, calling ``on_line`` with each decoded line.

    NUL bytes are dropped, and a line that held nothing else with them: Open
    MPI's prterun ends its abort message with a lone NUL, which a console
    shows as ``^@`` and which no log or report should carry.
    """
    try:
        for raw in iter(pipe.readline, b""):
            if b"\0" in raw:
                raw = raw.replace(b"\0", b"")
                if not raw.strip():
                    continue
            on_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    except (OSError, ValueError):
        pass  # the pipe was closed under us while stopping: nothing more to read
    finally:
        try:
            pipe.close()
        except OSError:
            pass

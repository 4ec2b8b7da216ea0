"""How a rank ended, and the report a user reads when ranks fail.

One ``RankExit`` per rank that ended (torchrun calls them failure records).
The report names the EARLIEST failure as the root cause, with its last lines
of stderr, then lists the other failures (what followed), then the ranks the
launcher stopped itself because of the first one.

"Earliest" is when a rank failed, not when its process ended: a rank that
prints its error and aborts its communicator may take a while to exit (freeing
models, closing sockets), while the peer it took down prints PeerLostError and
exits at once. So:

- a rank whose last line is a ``PeerLostError`` (the communicators' error for
  "a peer closed its communicator or vanished mid-operation") failed because
  of another rank, and comes after the ranks that failed for other reasons;
- among the rest, a rank that exited on its own counts from its last line of
  output when that came shortly before its exit (``RankExit.failed_at``),
  else from its exit;
- when every failure lost a peer, a rank that had already exited with code 0
  and that their errors name (it left with ``os._exit(0)``, say, while they
  waited for it in a collective) is the root cause (``left_early``).

Only failures close together in time are compared this way: after the first
one the launcher gives the others a short grace, then stops them, and a
rank it stopped is not a failure of its own.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass, field
from typing import Sequence

from ._errors import RankFailedError

# Longest time between a rank's error line and its exit for the line to date the failure
# (tearing down a rank that holds large models can take seconds).
ERROR_LINE_WINDOW = 5.0
_PEER_LOST = re.compile(r"\bPeerLostError\b")


def signal_name(signum: int) -> str:
    """``9`` -> ``"SIGKILL"``; an unknown number -> ``"signal 99"``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def signal_number(name: str) -> int | None:
    try:
        return int(signal.Signals[name])
    except KeyError:
        return None


@dataclass(frozen=True)
class RankExit:
    """How one rank's process ended.

    ``exitcode`` is set when the process exited, ``signal`` (a name such as
    ``"SIGKILL"``) when a signal killed it. ``stopped`` is true when the
    launcher itself had already asked it to stop (SIGTERM/SIGKILL after another
    rank failed, a time limit or Ctrl-C), so it is not a failure of its own.
    ``time`` is the Unix time the exit was seen; ``tail`` the last lines of the
    rank's stderr (or stdout when stderr was empty); ``last_output`` the Unix
    time its last line (on either stream) was read, None when it wrote none.
    ``label``: what reports call a child that is not a rank ("worker for
    device 0"); None for a rank, which reports call "rank N of W".
    """

    rank: int
    host: str
    pid: int
    exitcode: int | None
    signal: str | None
    time: float
    tail: tuple[str, ...] = field(default=())
    stopped: bool = False
    last_output: float | None = None
    label: str | None = None

    @property
    def failed(self) -> bool:
        return self.signal is not None or (self.exitcode or 0) != 0

    @property
    def lost_a_peer(self) -> bool:
        """Its last line is a PeerLostError: it failed because another rank did."""
        return bool(self.tail) and _PEER_LOST.search(self.tail[-1]) is not None

    @property
    def peer_lost_line(self) -> str:
        """The line of its PeerLostError, which names the peer it lost: the last line, or the last that names
        the error (the MPI door writes "uncaught PeerLostError; aborting the MPI job" after it)."""
        for line in reversed(self.tail):
            if _PEER_LOST.search(line) and "aborting the MPI job" not in line:
                return line
        return self.tail[-1] if self.tail else ""

    @property
    def failed_at(self) -> float:
        """When it failed: the time of its last line when it exited by itself within
        ``ERROR_LINE_WINDOW`` seconds of that line (the line is its error), else its exit time."""
        if self.exitcode is not None and self.last_output is not None:
            if 0.0 <= self.time - self.last_output <= ERROR_LINE_WINDOW:
                return self.last_output
        return self.time

    @property
    def shell_code(self) -> int:
        """The status a shell would show: the exit code, or 128 + the signal number."""
        if self.signal is not None:
            return 128 + (signal_number(self.signal) or 0)
        return self.exitcode or 0

    def how(self) -> str:
        """``"exit code 1"`` or ``"signal SIGSEGV (11)"``."""
        if self.signal is not None:
            number = signal_number(self.signal)
            return f"signal {self.signal} ({number})" if number is not None else f"signal {self.signal}"
        return f"exit code {self.exitcode}"

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "host": self.host,
            "pid": self.pid,
            "exitcode": self.exitcode,
            "signal": self.signal,
            "time": self.time,
            "tail": list(self.tail),
            "stopped": self.stopped,
            "last_output": self.last_output,
            **({"label": self.label} if self.label is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "RankExit":
        return cls(
            rank=int(data["rank"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            exitcode=None if data.get("exitcode") is None else int(data["exitcode"]),
            signal=data.get("signal"),
            time=float(data["time"]),
            tail=tuple(str(line) for line in data.get("tail", ())),
            stopped=bool(data.get("stopped", False)),
            last_output=None if data.get("last_output") is None else float(data["last_output"]),
            label=data.get("label"),
        )


def format_time(unix_time: float) -> str:
    """Local wall-clock time with milliseconds and the zone, e.g. ``2026-11-21 23:59:01.123 UTC``."""
    base = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_time))
    return f"{base}.{int((unix_time % 1) * 1000):03d} {time.strftime('%Z', time.localtime(unix_time))}"


def split_failures(exits: list[RankExit]) -> tuple[list[RankExit], list[RankExit]]:
    """(failures, root cause first, ranks the launcher stopped) among ``exits``.

    Failures are ordered by ``failed_at``, those that lost a peer after the others.

    When every failed rank was stopped by the launcher (say, Ctrl-C or a time
    limit), there is no failure of their own: the first list is empty.
    """
    failures = sorted((e for e in exits if e.failed and not e.stopped), key=lambda e: (e.lost_a_peer, e.failed_at, e.time, e.rank))
    stopped = sorted((e for e in exits if e.stopped and e.failed), key=lambda e: e.rank)
    return failures, stopped


def name(exit_: RankExit, world: int | None = None) -> str:
    """``rank 1 of 4``, or the child's label (``worker for device 0``)."""
    if exit_.label is not None:
        return exit_.label
    return f"rank {exit_.rank}" + (f" of {world}" if world else "")


def where(exit_: RankExit, world: int | None = None) -> str:
    """``rank 1 of 4 on host h (pid 123)``: the same header ``ranks._remote_errors.where_header`` writes."""
    return f"{name(exit_, world)} on host {exit_.host} (pid {exit_.pid})"


def _when(exit_: RankExit) -> str:
    """``at <time>``: when it failed, and when it exited if that was noticeably later."""
    later = exit_.time - exit_.failed_at
    return f"at {format_time(exit_.failed_at)}" + (f" (exited {later:.1f} s later)" if later >= 0.05 else "")


def _output_lines(exit_: RankExit) -> list[str]:
    """When it ended and the last lines it wrote, indented under a report's headline."""
    if not exit_.tail:
        return [f"  {_when(exit_)}; it wrote nothing to stderr or stdout"]
    what = "last line" if len(exit_.tail) == 1 else f"last {len(exit_.tail)} lines"
    return [f"  {_when(exit_)}; {what} of its output:"] + [f"    | {line}" for line in exit_.tail]


def _stopped_line(stopped: list[RankExit]) -> list[str]:
    if not stopped:
        return []
    if all(e.label is None for e in stopped):
        parts = ", ".join(f"{e.rank} (pid {e.pid}, {e.how()})" for e in stopped)
        return [f"ranks stopped afterwards: {parts}"]
    parts = ", ".join(f"{name(e)} (pid {e.pid}, {e.how()})" for e in stopped)
    return [f"stopped afterwards: {parts}"]


_PEER_NAMED = re.compile(r"\brank (\d+) \(pid (\d+)(?: on host ([^)\s]+))?\)")


def lost_elsewhere(failures: list[RankExit], exits: list[RankExit]) -> str | None:
    """When every failure here lost a peer and the first names a rank on another host, which this launcher
    did not run: that rank, as its error names it (``rank 3 (pid 3500 on host hostb)``); else None."""
    if not failures or not all(f.lost_a_peer for f in failures):
        return None
    named = _PEER_NAMED.search(failures[0].peer_lost_line)
    if named is None or not named.group(3) or named.group(3) == failures[0].host:
        return None  # no host named (the MPI door names only peers on its own host), or this one
    if int(named.group(1)) in {e.rank for e in exits}:
        return None
    return f"rank {named.group(1)} (pid {named.group(2)} on host {named.group(3)})"


def format_report(failures: list[RankExit], stopped: list[RankExit], world: int | None = None,
                  exits: list[RankExit] | None = None) -> str:
    """The multi-line failure report: the first failure in full, then the rest in one line each. When the ranks
    here only lost a peer that runs elsewhere, that peer heads the report: it is the root cause."""
    first = failures[0]
    count = f" (first of {len(failures)} failed ranks)" if len(failures) > 1 else ""
    remote = lost_elsewhere(failures, exits if exits is not None else failures)
    if remote is not None:
        here = "the rank here" if len(failures) == 1 else f"the {len(failures)} ranks here"
        lines = [f"{remote}, on another host, was lost first: {here} failed because of it (see that host's "
                 f"report for how it ended)",
                 f"{where(first, world)} failed{count}: {first.how()}"]
    else:
        lines = [f"{where(first, world)} failed{count}: {first.how()}"]
    lines.extend(_output_lines(first))
    if len(failures) > 1:
        lines.append("what followed (the other ranks that failed; those that lost a peer come last):")
        for other in failures[1:]:
            last = f": {other.tail[-1]}" if other.tail else ""
            lines.append(f"  {where(other)} failed: {other.how()} {_when(other)}{last}")
    lines.extend(_stopped_line(stopped))
    return "\n".join(lines)


def early_exit(exits: list[RankExit], not_reported: Sequence[int] = ()) -> tuple[RankExit, list[int]] | None:
    """(the first rank that exited with code 0 while others still ran, those others), or None.

    For a job that failed although no rank failed on its own: under MPI a rank
    that leaves without MPI_Finalize (``os._exit(0)``, say) makes mpirun end
    the job. ``not_reported``: ranks that never said how they ended (still
    running when the job was torn down).
    """
    for first in sorted((e for e in exits if not e.failed and not e.stopped), key=lambda e: (e.time, e.rank)):
        later = {e.rank for e in exits if e.rank != first.rank and (e.stopped or e.time > first.time)}
        still_running = sorted(later | (set(not_reported) - {first.rank}))
        if still_running:
            return first, still_running
    return None


def format_early_exit(first: RankExit, still_running: list[int], stopped: list[RankExit], world: int | None = None) -> str:
    """The report for ``early_exit``'s rank: it is the root cause although its exit code is 0."""
    ranks = f"rank {still_running[0]} was" if len(still_running) == 1 else f"ranks {', '.join(map(str, still_running))} were"
    lines = [f"{where(first, world)} exited with {first.how()} before the job finished, while {ranks} still running"]
    lines.extend(_output_lines(first))
    lines.extend(_stopped_line(stopped))
    return "\n".join(lines)


def left_early(exits: list[RankExit], failures: list[RankExit]) -> RankExit | None:
    """The rank that exited with code 0 and so took down the ranks in ``failures``, or None.

    Only when every failure lost a peer (a rank that leaves with code 0 while its peers wait
    in a collective, ``os._exit(0)`` say, fails nobody's exit code but its own peers'): the
    rank that ended on its own before the first of them, and that their errors name.
    """
    if not failures or not all(f.lost_a_peer for f in failures):
        return None
    for candidate in sorted((e for e in exits if not e.failed and not e.stopped), key=lambda e: (e.time, e.rank)):
        named = re.compile(rf"\brank {candidate.rank}\b")
        if candidate.time <= failures[0].time and any(named.search(f.peer_lost_line) for f in failures):
            return candidate
    return None


def failure_error(exits: list[RankExit], world: int | None = None) -> RankFailedError | None:
    """A ``RankFailedError`` describing ``exits``, or None when no rank failed on its own.

    When the only failures are peers lost to a rank that exited with code 0 before the job
    finished (``left_early``), that rank is the root cause: it is named first, and ``first``.
    """
    failures, stopped = split_failures(exits)
    if not failures:
        return None
    early = left_early(exits, failures)
    if early is not None:
        still_running = sorted({f.rank for f in failures} | {s.rank for s in stopped})
        lines = format_early_exit(early, still_running, [], world).splitlines()
        lines.append("what followed (the other ranks that failed; those that lost a peer come last):")
        for other in failures:
            lines.append(f"  {where(other)} failed: {other.how()} {_when(other)}: {other.tail[-1]}")
        lines.extend(_stopped_line(stopped))
        return RankFailedError("\n".join(lines), [early] + failures, stopped)
    return RankFailedError(format_report(failures, stopped, world, exits), failures, stopped)

"""Start N rank processes, watch them, stop them all when one fails.

The core every launcher here uses: the rank-table launcher runs one process
per local rank through it, the MPI launcher runs ``mpirun`` through it.

Each rank starts in its own session (so a stop reaches its children too) and,
on Linux, with a parent-death signal (so it dies with the launcher even when
the launcher is SIGKILLed). Two reader threads per rank prefix its lines
(and date each rank's last line); one waiter thread per rank records its exit
the moment it happens. Together they order failures (see ``_failures``).

When a rank fails, the others get a short grace (``failure_grace``, 1 s) to
end on their own before they are stopped: the rank that failed first may
still be exiting when the peer it took down has already gone, and stopping
it then would record it as stopped by the launcher, hiding the root cause.
A rank counts as stopped only when the launcher signalled it while it was
still running.

Stopping, torchrun's way: SIGTERM to every rank's process group, ONE shared
deadline (``stop_timeout``), then SIGKILL to whatever is left, then a sweep of
each group for stragglers (grandchildren that ignored SIGTERM). Each SIGTERM
is followed by SIGCONT: a stopped (SIGSTOPped, or Ctrl-Z'd) process keeps
SIGTERM pending until it is continued, and would cost the whole deadline.
``stop`` may be called any number of times, from any thread.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ranks import _env, _shared_memory
from ranks._log import get_logger

from ._errors import LaunchError, LaunchInterruptedError, LaunchTimeoutError

from ._failures import RankExit, failure_error, signal_name
from ._output import RankOutput, pump

log = get_logger("launch")

# How long a waiter thread waits for a dead rank's pipes to drain before it
# records the exit without the last lines (a grandchild may hold them open).
_DRAIN_SECONDS = 2.0
# After the first failure, how long the other ranks may take to end on their own
# (at most the stop timeout) before they are stopped.
FAILURE_GRACE = 1.0


@dataclass(frozen=True)
class ProcessSpec:
    """One rank to start: its number, its command line, extra environment variables.

    ``env`` is added to this process's environment. ``label`` is the console
    prefix (default ``"rank N"``).
    """

    rank: int
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    label: str | None = None

    def __post_init__(self):
        if not self.argv:
            raise LaunchError(f"rank {self.rank}: empty command line")
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))

    @property
    def name(self) -> str:
        return self.label or f"rank {self.rank}"


def resolve_program(program: Sequence[str]) -> list[str]:
    """``python``/``python3`` as the first word becomes this interpreter (``sys.executable``).

    mpirun starts ranks with a plain environment (on other hosts through ssh,
    where a virtual environment is not active), so a bare ``python`` would
    often be another interpreter without this project installed.
    """
    argv = list(program)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment plus ``extra``, with Python's output unbuffered and faulthandler on.

    Unbuffered so each printed line reaches the console (and the failure
    report) at once, not lost in a buffer when the rank is killed; faulthandler
    so a segfault still prints the Python stack. A user's own setting wins.
    """
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env.setdefault(_env.PYTHONUNBUFFERED.name, "1")
    env.setdefault(_env.PYTHONFAULTHANDLER.name, "1")
    return env


def _parent_death_hook():
    """A preexec function that asks Linux to SIGKILL the child when the launcher dies, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)
    parent = os.getpid()

    def hook():
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the line above
            os._exit(1)

    return hook


def _unread_bytes(pipe) -> int:
    """Bytes waiting in ``pipe`` that no reader has taken yet (0 when closed or unknown)."""
    try:
        buffer = array.array("i", [0])
        fcntl.ioctl(pipe.fileno(), termios.FIONREAD, buffer)
        return buffer[0]
    except (OSError, ValueError, AttributeError):
        return 0


def _drain(readers, pipes, seconds: float) -> None:
    """Wait until a dead rank's output has been read: the readers hit end of file, or (when a
    grandchild keeps the pipes open) nothing is left unread; at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(r.is_alive() for r in readers):
            return
        if not any(_unread_bytes(p) for p in pipes):
            # what was written is taken; give the readers a moment to hand the last lines on
            settle = time.monotonic() + 0.25
            for reader in readers:
                reader.join(max(0.0, settle - time.monotonic()))
            return
        time.sleep(0.01)


def has_exited(pid: int) -> bool:
    """True when child ``pid`` has ended (a zombie not yet reaped, or already reaped), without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # its waiter thread reaped it
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, from /proc; [] when none."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


class ProcessGroup:
    """Rank processes started together and stopped together.

    >>> group = ProcessGroup([ProcessSpec(0, ["python", "a.py"]), ProcessSpec(1, ["python", "a.py"])])
    >>> exits = group.run(timeout=60)   # raises RankFailedError naming the first failure

    ``output``: where lines go (default: the console, prefixed ``[rank N]``).
    ``stop_timeout``: seconds between SIGTERM and SIGKILL (default
    ORCH_STOP_TIMEOUT). ``world_size``: for reports ("rank 1 of 4").
    ``die_with_parent``: give each rank a parent-death signal; Linux ties it to
    the THREAD that calls ``start``, so call ``start`` from a thread that lives
    as long as the ranks should (turn it off otherwise). ``failure_grace``:
    seconds the other ranks may take to end on their own after the first
    failure before they are stopped (default ``FAILURE_GRACE``, at most
    ``stop_timeout``).
    """

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        output: RankOutput | None = None,
        stop_timeout: float | None = None,
        world_size: int | None = None,
        die_with_parent: bool = True,
        failure_grace: float | None = None,
    ):
        if not specs:
            raise LaunchError("no ranks to start: the list of processes is empty")
        ranks = [s.rank for s in specs]
        if len(set(ranks)) != len(ranks):
            raise LaunchError(f"each rank must appear once, got ranks {ranks}")
        self.specs = list(specs)
        self.output = output if output is not None else RankOutput(
            tail_lines=_env.LOG_TAIL_LINES.get_int() or 20
        )
        self.stop_timeout = _env.stop_timeout() if stop_timeout is None else float(stop_timeout)
        self.failure_grace = min(FAILURE_GRACE, self.stop_timeout) if failure_grace is None else float(failure_grace)
        self.world_size = world_size
        self.host = socket.gethostname()
        self._die_with_parent = die_with_parent
        self._procs: dict[int, subprocess.Popen] = {}
        self._readers: dict[int, list[threading.Thread]] = {}
        self._waiters: list[threading.Thread] = []
        self._exits: dict[int, RankExit] = {}
        self._signalled: set[int] = set()  # ranks the launcher signalled while they still ran
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop_started: float | None = None
        self._stop_done = threading.Event()
        self._stop_lock = threading.Lock()
        self._interrupted: str | None = None
        self._external_error: BaseException | None = None
        self._hurry = False

    # --- starting ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start every rank. Raises ``LaunchError`` (after stopping those already started) when one cannot start."""
        if self._procs:
            raise LaunchError("this process group was already started")
        try:
            self.output.open([s.rank for s in self.specs])
        except OSError as exc:
            raise LaunchError(f"cannot write the ranks' logs: {exc}") from exc
        hook = _parent_death_hook() if self._die_with_parent else None
        # Every Popen happens before any of our threads exist: a preexec hook
        # after fork is only safe while this process has no other threads of ours.
        for spec in self.specs:
            try:
                self._procs[spec.rank] = subprocess.Popen(
                    list(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=child_environment(spec.env),
                    cwd=spec.cwd,
                    start_new_session=True,
                    preexec_fn=hook,
                )
            except OSError as exc:
                self._start_threads()
                self.stop()
                raise LaunchError(f"cannot start {spec.name}: {spec.argv[0]!r}: {exc.strerror or exc}") from exc
            log.info("started %s (pid %d): %s", spec.name, self._procs[spec.rank].pid, " ".join(map(str, spec.argv)))
        self._start_threads()

    def _start_threads(self) -> None:
        specs = {s.rank: s for s in self.specs}
        for rank, proc in self._procs.items():
            spec = specs[rank]
            readers = []
            for stream, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
                t = threading.Thread(
                    target=pump,
                    args=(pipe, self._line_callback(spec, stream)),
                    name=f"{spec.name} {stream}",
                    daemon=True,
                )
                t.start()
                readers.append(t)
            self._readers[rank] = readers
            waiter = threading.Thread(target=self._watch, args=(spec, proc), name=f"{spec.name} waiter", daemon=True)
            waiter.start()
            self._waiters.append(waiter)

    def _line_callback(self, spec: ProcessSpec, stream: str):
        output, rank, label = self.output, spec.rank, spec.name

        def on_line(text: str) -> None:
            output.line(rank, label, stream, text)

        return on_line

    def _watch(self, spec: ProcessSpec, proc: subprocess.Popen) -> None:
        code = proc.wait()
        seen = time.time()
        with self._lock:
            stopped = spec.rank in self._signalled
        _drain(self._readers.get(spec.rank, ()), (proc.stdout, proc.stderr), _DRAIN_SECONDS)
        record = RankExit(
            rank=spec.rank,
            host=self.host,
            pid=proc.pid,
            exitcode=code if code >= 0 else None,
            signal=signal_name(-code) if code < 0 else None,
            time=seen,
            tail=self.output.tail(spec.rank),
            stopped=stopped,
            last_output=self.output.last_time(spec.rank),
        )
        with self._lock:
            self._exits[spec.rank] = record
        self._changed.set()

    # --- watching ---------------------------------------------------------------------------
    @property
    def pids(self) -> dict[int, int]:
        """Rank -> pid of every started rank."""
        return {rank: proc.pid for rank, proc in self._procs.items()}

    def exits(self) -> list[RankExit]:
        """The ranks that have ended so far, by rank."""
        with self._lock:
            return [self._exits[r] for r in sorted(self._exits)]

    def running(self) -> list[int]:
        with self._lock:
            return [r for r in self._procs if r not in self._exits]

    def _names(self, ranks) -> str:
        names = {s.rank: s.name for s in self.specs}
        return ", ".join(names[r] for r in ranks)

    def interrupt(self, signum: int) -> None:
        """Make ``wait`` stop every rank and raise ``LaunchInterruptedError`` (safe in a signal handler)."""
        self._interrupted = signal_name(signum)
        self._changed.set()

    def request_stop(self, error: BaseException) -> None:
        """Make ``wait`` stop every rank and raise ``error`` (for failures seen outside the group's own
        processes, such as a rank under mpirun reporting through its wrapper). Not for signal handlers."""
        if self._external_error is None:
            self._external_error = error
        self._changed.set()

    def _on_signal(self, signum, _frame) -> None:
        # Only flags: setting the Event here could deadlock on its lock if the
        # signal lands while this thread holds it; ``wait`` and ``stop`` poll often enough.
        if self._stop_started is not None or self._interrupted:
            self._hurry = True  # a second Ctrl-C: do not wait out the deadline
        self._interrupted = self._interrupted or signal_name(signum)

    def wait(self, timeout: float | None = None) -> list[RankExit]:
        """Block until every rank ended well, one failed, ``timeout`` seconds passed, or an interrupt.

        Returns each rank's ``RankExit`` (all exit code 0). On a failure, gives
        the others ``failure_grace`` seconds to end on their own, stops the
        rest and raises ``RankFailedError`` (first failure in ``.first``); on
        the time limit raises ``LaunchTimeoutError``; after ``interrupt``
        raises ``LaunchInterruptedError``. No rank is left running when it raises.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        failure_seen: float | None = None
        while True:
            now = time.monotonic()
            exits = self.exits()
            if failure_seen is None and (
                self._external_error is not None or any(e.failed and not e.stopped for e in exits)
            ):
                failure_seen = now
            if self._interrupted and failure_seen is None:
                return self._raise_interrupted()
            if failure_seen is not None and (
                len(exits) == len(self._procs) or now - failure_seen >= self.failure_grace or self._interrupted
            ):
                self.stop()
                if self._external_error is not None:
                    raise self._external_error
                error = failure_error(self.exits(), self.world_size)
                if error is not None:
                    raise error
                return self.exits()  # not reached: a failure once seen stays in the records
            if failure_seen is None and len(exits) == len(self._procs):
                self._sweep(signal.SIGTERM)
                return exits
            if failure_seen is None and deadline is not None and now >= deadline:
                running = self._names(self.running())
                self.stop()
                raise LaunchTimeoutError(
                    f"{running} still running after {now - started:.1f} s (the launcher's time limit "
                    f"is {timeout:g} s); stopped them: SIGTERM, then SIGKILL after {self.stop_timeout:g} s"
                )
            if failure_seen is not None:
                wait_for = 0.05
            else:
                wait_for = 0.2 if deadline is None else max(0.0, min(0.2, deadline - now))
            self._changed.wait(wait_for)
            self._changed.clear()

    def _raise_interrupted(self):
        running = self._names(self.running()) or "none"
        self.stop()
        raise LaunchInterruptedError(
            f"interrupted by {self._interrupted}: stopped every rank (still running were: {running})",
            self._interrupted,
        )

    # --- stopping ---------------------------------------------------------------------------
    def stop(self) -> list[RankExit]:
        """Stop every rank still running: SIGTERM, one shared deadline, SIGKILL. Idempotent; returns all exits."""
        with self._stop_lock:
            if self._stop_done.is_set():
                return self.exits()
            with self._lock:
                if self._stop_started is None:
                    self._stop_started = time.time()
            for rank in self.running():
                pid = self._procs[rank].pid
                # A rank that already ended on its own (its waiter has not recorded it yet)
                # is not one the launcher stopped; its group is swept below.
                with self._lock:
                    if has_exited(pid):
                        continue
                    self._signalled.add(rank)
                self._terminate_group(pid)
            deadline = time.monotonic() + self.stop_timeout
            while self.running() and time.monotonic() < deadline and not self._hurry:
                self._changed.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                self._changed.clear()
            if self._signalled:
                log.info("stopping %s with SIGTERM (deadline %.1f s)", self._names(sorted(self._signalled)), self.stop_timeout)
            for rank in self.running():
                log.warning("%s did not end within %.1f s of SIGTERM; sending SIGKILL", self._names([rank]), self.stop_timeout)
                self._signal_group(self._procs[rank].pid, signal.SIGKILL)
            # A SIGKILLed process is reaped at once; the waiters record it.
            for waiter in self._waiters:
                waiter.join(_DRAIN_SECONDS + 5.0)
            self._sweep(signal.SIGKILL)
            # Named segments of ranks that died owning them (SIGKILL cannot be caught); memfd ones free themselves.
            _shared_memory.remove_stale()
            self.output.close()
            self._stop_done.set()
            return self.exits()

    def _sweep(self, first_signal: signal.Signals) -> None:
        """Stop stragglers left in the ranks' process groups (children of a rank that already ended)."""
        groups = [pid for pid in (p.pid for p in self._procs.values()) if group_members(pid)]
        if not groups:
            return
        for pgid in groups:
            if first_signal == signal.SIGTERM:
                self._terminate_group(pgid)
            else:
                self._signal_group(pgid, first_signal)
        if first_signal != signal.SIGKILL:
            deadline = time.monotonic() + self.stop_timeout
            while any(group_members(g) for g in groups) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pgid in groups:
                if group_members(pgid):
                    self._signal_group(pgid, signal.SIGKILL)

    @classmethod
    def _terminate_group(cls, pgid: int) -> None:
        """SIGTERM, then SIGCONT so that a stopped member acts on it now (in this order: a member
        continued first could run on before the SIGTERM reaches it)."""
        cls._signal_group(pgid, signal.SIGTERM)
        cls._signal_group(pgid, signal.SIGCONT)

    @staticmethod
    def _signal_group(pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    # --- all in one -------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> list[RankExit]:
        """``start`` then ``wait``; SIGINT/SIGTERM/SIGHUP to this process stop every rank.

        The signal handlers are installed only when called from the main
        thread (Python's rule) and are restored afterwards.
        """
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            self.start()
            exits = self.wait(timeout)
            self.output.close()
            return exits
        finally:
            try:
                self.stop()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

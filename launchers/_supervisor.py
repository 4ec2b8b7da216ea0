"""The one supervisor: start a set of child processes, watch them, name the first failure, stop them all.

Every part of the project that runs child processes goes through ``Supervisor``:
the rank-table launcher (one child per local rank), the MPI launcher (one
child: ``mpirun``), ``ShardedModel`` (its ranks, or mpirun), ``ParallelPredictor``
(one worker per device), and the pool and serving workers to come. It knows
nothing about command-line options (those are parsed a layer above) or about
what the children say to their master (``orchestrator._protocol``).

Starting (``start``). Each child is a ``ProcessSpec``: argv, extra environment,
cwd, file descriptors to inherit (say, one end of a socketpair). It starts in
its own session, so a stop reaches its children too, and on Linux with a
parent-death signal (SIGKILL), so it dies with this process even when this
process is SIGKILLed. Linux sends that signal when the THREAD that forked the
child ends, so every child is forked by one long-lived thread of the supervisor
(``_Spawner``), whichever thread calls ``start``. ``python_module`` builds the
argv of a child that runs a module of this installation (``python -m ...``).

Watching. Two reader threads per child prefix its lines (and date each
child's last line) into a ``RankOutput``; one waiter thread per child records
its exit (``RankExit``: code or signal, time, last lines) the moment it
happens. A master asks without blocking (``exits``, ``running``, ``exit_of``,
``failure``, ``suspended``) or waits (``join``); a launcher blocks in ``wait``.

The first failure (``failure``, ``wait``): the failure records are ordered as
``_failures`` describes, the earliest named as the root cause. When a child
fails, the others get a short grace (``failure_grace``, 1 s) to end on their
own before ``wait`` stops them: the child that failed first may still be
exiting when the peer it took down has already gone, and stopping it then
would record it as stopped by the launcher, hiding the root cause. A child
counts as stopped only when the supervisor signalled it while it still ran.

Stopping (``stop``), torchrun's way: SIGTERM to every child's process group,
each followed by SIGCONT (a SIGSTOPped or Ctrl-Z'd process keeps SIGTERM
pending until it is continued, and would cost the whole deadline), ONE shared
deadline (``stop_timeout``), then SIGKILL to whatever is left, then a sweep of
each group for stragglers (grandchildren that ignored SIGTERM). ``stop`` may be
called any number of times, from any thread.

Watchdog. With ``cleanup_paths`` (or ``watchdog=True``) a janitor process
(``_janitor.py``) outlives this one: if this process dies before ``stop``
(SIGKILL, or a SIGTERM nobody handles), it sweeps the children's process
groups and removes those paths. ``stop`` releases it.

Lifecycle::

    NEW --start()--> RUNNING --stop() / wait() / run()--> STOPPED
                     (a child that cannot start: the started ones are stopped, LaunchError)
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import importlib
import os
import queue
import signal
import site
import socket
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

# Imported here, not where it is used: stop() also runs at interpreter exit (a master's finalizer),
# and importing a module there that builds a namedtuple (psutil does) evaluates code, which makes
# CPython forget an unhandled KeyboardInterrupt: the script then exits 1 instead of dying of SIGINT.
import psutil

from ranks import _env, _shared_memory
from ranks._log import get_logger

from ._errors import LaunchError, LaunchInterruptedError, LaunchTimeoutError, RankFailedError

from ._failures import RankExit, early_exit, failure_error, format_early_exit, signal_name
from ._output import RankOutput, pump

log = get_logger("launch")

# How long a waiter thread waits for a dead rank's pipes to drain before it
# records the exit without the last lines (a grandchild may hold them open).
_DRAIN_SECONDS = 2.0
# After the first failure, how long the other ranks may take to end on their own
# (at most the stop timeout) before they are stopped.
FAILURE_GRACE = 1.0
JANITOR = Path(__file__).with_name("_janitor.py")


@dataclass(frozen=True)
class ProcessSpec:
    """One child to start: its number in the group, its command line, extra environment variables.

    ``rank``: the child's key (a rank, a worker's index); unique in a group.
    ``env`` is added to this process's environment. ``label`` is the console
    prefix and what reports call the child (default ``"rank N"``).
    ``pass_fds``: file descriptors of this process the child inherits under the
    same numbers (one end of a socketpair, say); the caller closes its copies
    after ``start``.
    """

    rank: int
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    label: str | None = None
    pass_fds: Sequence[int] = ()

    def __post_init__(self):
        if not self.argv:
            raise LaunchError(f"rank {self.rank}: empty command line")
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        object.__setattr__(self, "pass_fds", tuple(int(fd) for fd in self.pass_fds))

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


def python_module(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of a child running ``python -m module args`` on THIS installation.

    The interpreter is ``sys.executable``. When the module's top package was
    imported from a directory that is not one of the interpreter's
    site-packages (a checkout on ``sys.path``), that directory goes first on
    the child's PYTHONPATH, so the child runs the same code as this process.
    The child never imports the caller's ``__main__`` (unlike ``multiprocessing``'s
    spawn), so scripts without a main guard, ``python -c``, stdin and notebooks work.
    """
    package = importlib.import_module(module.split(".")[0])
    root = str(Path(package.__file__).resolve().parent.parent)
    sites = set()
    try:
        sites.update(str(Path(p).resolve()) for p in site.getsitepackages())
        sites.add(str(Path(site.getusersitepackages()).resolve()))
    except (AttributeError, OSError):
        pass
    env = {}
    if root not in sites:
        current = _env.PYTHONPATH.get()
        parts = [root] + [p for p in (current or "").split(os.pathsep) if p and p != root]
        env[_env.PYTHONPATH.name] = os.pathsep.join(parts)
    return [sys.executable, "-m", module, *args], env


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


class _Spawner:
    """One long-lived daemon thread that forks every child with a parent-death signal.

    Linux delivers PR_SET_PDEATHSIG when the thread that forked the child ends,
    not the process: children forked by a short-lived thread (a thread pool's,
    a request handler's) would be killed when it ends. This thread ends only
    with the process.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], object]):
        """Run ``fn`` on the spawner thread and return what it returns (or raise what it raised)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # first use, or in a forked child
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._loop, args=(self._queue,), name="orch-spawner", daemon=True)
                self._thread.start()
            jobs = self._queue
        done = threading.Event()
        box: list = []
        jobs.put((fn, done, box))
        try:
            done.wait()
        except BaseException:
            done.wait()  # Ctrl-C meanwhile: the children are being started; let the caller's stop() see them
            raise
        ok, value = box[0]
        if ok:
            return value
        raise value

    @staticmethod
    def _loop(jobs: queue.SimpleQueue) -> None:
        while True:
            fn, done, box = jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001  handed to the caller
                box.append((False, exc))
            finally:
                done.set()


_SPAWNER = _Spawner()


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


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` from /proc (R, S, T: stopped, Z: zombie, ...), None when gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[0] if fields else None


def is_suspended(pid: int) -> bool:
    """True while ``pid`` is stopped by a signal (SIGSTOP, Ctrl-Z): it acts on nothing until continued."""
    return process_state(pid) in ("T", "t")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``; [] when none.

    (The watchdog, ``_janitor.py``, keeps its own standard-library copy: it runs without our packages.)
    """
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            if os.getpgid(process.pid) == pgid:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


class Supervisor:
    """Child processes started together, watched together and stopped together.

    >>> group = Supervisor([ProcessSpec(0, ["python", "a.py"]), ProcessSpec(1, ["python", "a.py"])])
    >>> exits = group.run(timeout=60)   # raises RankFailedError naming the first failure

    A master that talks to its children keeps them running instead:

    >>> group.start(); ...; error = group.failure()   # None while no child failed
    >>> group.stop()                                    # TERM + CONT, one deadline, KILL, sweep

    ``output``: where lines go (default: the console, prefixed ``[rank N]``).
    ``stop_timeout``: seconds between SIGTERM and SIGKILL (default
    ORCH_STOP_TIMEOUT). ``world_size``: for reports ("rank 1 of 4").
    ``die_with_parent``: give each child a parent-death signal (SIGKILL).
    ``failure_grace``: seconds the other children may take to end on their
    own after the first failure before ``wait`` stops them (default
    ``FAILURE_GRACE``, at most ``stop_timeout``). ``cleanup_paths``: files or
    directories a watchdog removes if this process dies before ``stop``;
    ``watchdog``: start that watchdog even without paths (it also sweeps the
    children's process groups).
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
        cleanup_paths: Sequence[str | os.PathLike] = (),
        watchdog: bool = False,
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
        self._killed: set[int] = set()  # ranks that outlived the stop deadline and got SIGKILL
        self._stop_seconds = 0.0  # how long the last stop waited for the ranks to end after SIGTERM
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop_started: float | None = None
        self._stop_done = threading.Event()
        self._stop_lock = threading.Lock()
        self._interrupted: str | None = None
        self._external_error: BaseException | None = None
        self._hurry = False
        self._exited = threading.Condition(self._lock)
        self._started = False
        self._cleanup_paths = [os.fspath(p) for p in cleanup_paths]
        self._watchdog = watchdog or bool(self._cleanup_paths)
        self._janitor: subprocess.Popen | None = None

    # --- starting ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start every child. Raises ``LaunchError`` (after stopping those already started) when one cannot start."""
        if self._started:
            raise LaunchError("this process group was already started")
        self._started = True
        try:
            self.output.open([s.rank for s in self.specs])
        except OSError as exc:
            raise LaunchError(f"cannot write the ranks' logs: {exc}") from exc
        if self._watchdog:
            self._start_janitor()
        # Every child is forked before any reader or waiter thread of this group exists,
        # and (for the parent-death signal) by the spawner thread.
        failed = _SPAWNER.call(self._spawn_all) if self._die_with_parent else self._spawn_all()
        self._start_threads()
        if failed is not None:
            spec, exc = failed
            self.stop()
            raise LaunchError(f"cannot start {spec.name}: {spec.argv[0]!r}: {exc.strerror or exc}") from exc

    def _spawn_all(self):
        """Fork every child; (spec, OSError) of the first that could not start, or None."""
        hook = _parent_death_hook() if self._die_with_parent else None
        for spec in self.specs:
            try:
                proc = subprocess.Popen(
                    list(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=child_environment(spec.env),
                    cwd=spec.cwd,
                    start_new_session=True,
                    pass_fds=spec.pass_fds,
                    preexec_fn=hook,
                )
            except OSError as exc:
                return spec, exc
            self._procs[spec.rank] = proc
            log.info("started %s (pid %d): %s", spec.name, proc.pid, " ".join(map(str, spec.argv)))
            self._tell_janitor(f"group {proc.pid}")
        return None

    def _start_janitor(self) -> None:
        try:
            self._janitor = subprocess.Popen(
                [sys.executable, "-I", "-S", str(JANITOR), "--parent", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start the supervisor's watchdog {JANITOR}: {exc.strerror or exc}") from exc
        for path in self._cleanup_paths:
            self._tell_janitor(f"path {path}")

    def _tell_janitor(self, line: str) -> None:
        if self._janitor is None:
            return
        try:
            self._janitor.stdin.write(line.encode("utf-8", "surrogateescape") + b"\n")
            self._janitor.stdin.flush()
        except (OSError, ValueError):
            pass

    def _release_janitor(self) -> None:
        janitor, self._janitor = self._janitor, None
        if janitor is None:
            return
        try:
            janitor.stdin.write(b"release\n")
            janitor.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            janitor.wait(2.0)
        except subprocess.TimeoutExpired:
            janitor.kill()
            janitor.wait()

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
            label=spec.label,
        )
        with self._lock:
            self._exits[spec.rank] = record
            self._exited.notify_all()
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
        """The children started and not yet ended, by key."""
        with self._lock:
            return [r for r in self._procs if r not in self._exits]

    def exit_of(self, rank: int, timeout: float = 0.0) -> RankExit | None:
        """How child ``rank`` ended, waiting up to ``timeout`` seconds for it to end; None while it runs."""
        deadline = time.monotonic() + timeout
        with self._exited:
            while rank not in self._exits:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or rank not in self._procs:
                    return None
                self._exited.wait(remaining)
            return self._exits[rank]

    def join(self, timeout: float, *, skip_suspended: bool = False) -> bool:
        """Wait up to ``timeout`` seconds for every child to end on its own; True when all have.

        ``skip_suspended``: stop waiting as soon as a child still running is
        suspended (SIGSTOP, Ctrl-Z): it cannot act on anything until continued,
        and peers that wait for it (an MPI finalize, a collective) cannot end either.
        """
        deadline = time.monotonic() + timeout
        while True:
            running = self.running()
            if not running:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (skip_suspended and self.suspended()):
                return False
            with self._exited:
                self._exited.wait(min(remaining, 0.05))

    def suspended(self) -> list[int]:
        """Children that are stopped by a signal right now (process state T), by key (Linux; [] elsewhere)."""
        return [rank for rank in self.running() if is_suspended(self._procs[rank].pid)]

    def failure(self, *, every_exit_fails: bool = False) -> RankFailedError | None:
        """The first-failure report of the children ended so far, or None when none failed on its own.

        Does not stop anything. ``every_exit_fails``: a child that exited with
        code 0 fails too (for a master whose children must run until told to stop).
        """
        exits = self.exits()
        error = failure_error(exits, self.world_size)
        if error is not None or not every_exit_fails:
            return error
        early = early_exit(exits, self.running())
        if early is None:
            return None
        first, still_running = early
        stopped = [e for e in exits if e.stopped and e.failed]
        return RankFailedError(format_early_exit(first, still_running, stopped, self.world_size), [first], stopped)

    def _names(self, ranks) -> str:
        names = {s.rank: s.name for s in self.specs}
        return ", ".join(names[r] for r in ranks)

    def _names_with_pids(self, ranks) -> str:
        """``rank 0 (pid 4242), rank 1 (pid 4243) on host h``: who a report is about, as failure reports say it."""
        names = {s.rank: s.name for s in self.specs}
        return ", ".join(f"{names[r]} (pid {self._procs[r].pid})" for r in ranks) + f" on host {socket.gethostname()}"

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
                running = self._names_with_pids(self.running())
                self.stop()
                raise LaunchTimeoutError(
                    f"{running} still running after {now - started:.1f} s (the launcher's time limit "
                    f"is {timeout:g} s); stopped them: {self._how_stopped()}"
                )
            if failure_seen is not None:
                wait_for = 0.05
            else:
                wait_for = 0.2 if deadline is None else max(0.0, min(0.2, deadline - now))
            self._changed.wait(wait_for)
            self._changed.clear()

    def _how_stopped(self) -> str:
        """What ``stop`` took: SIGTERM alone, or SIGKILL for the ranks that outlived its deadline."""
        if self._killed:
            return (f"SIGTERM, then SIGKILL for {self._names(sorted(self._killed))}, which did not end within "
                    f"{self.stop_timeout:g} s")
        return f"SIGTERM (they ended within {self._stop_seconds:.1f} s)"

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
            self._stop_seconds = time.monotonic() - deadline + self.stop_timeout
            for rank in self.running():
                log.warning("%s did not end within %.1f s of SIGTERM; sending SIGKILL", self._names([rank]), self.stop_timeout)
                self._killed.add(rank)
                self._signal_group(self._procs[rank].pid, signal.SIGKILL)
            # A SIGKILLed process is reaped at once; the waiters record it.
            for waiter in self._waiters:
                waiter.join(_DRAIN_SECONDS + 5.0)
            self._sweep(signal.SIGKILL)
            # Named segments of ranks that died owning them (SIGKILL cannot be caught); memfd ones free themselves.
            _shared_memory.remove_stale()
            self.output.close()
            self._release_janitor()
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

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


# The launchers' name for it since before it supervised more than ranks.
ProcessGroup = Supervisor

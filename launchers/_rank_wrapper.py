"""What mpirun starts on every rank: runs the user's program and reports how it ended.

    mpirun -n N python .../launchers/_rank_wrapper.py [--stop-timeout S] -- PROGRAM ARGS...

Run by file path, not ``-m``, so that it imports nothing but the standard
library (starting a rank must not pay for importing the runtime). The same
path must exist on every host, as the Python interpreter must.

For its rank (from the MPI launcher's environment) it

- prefixes every line of the program's stdout/stderr with ``[rank N]`` and
  writes it to its own stdout/stderr, which mpirun forwards to the launcher;
- writes one ``start`` and one ``exit`` record to stderr, each a single line
  ``MARKER + JSON`` (the format is defined here and nowhere else; the
  launcher reads it with ``parse_record``);
- on SIGTERM/SIGINT/SIGHUP (mpirun tearing the job down) passes SIGTERM (then
  SIGCONT, for a stopped program) to the program's process group, SIGKILLs it
  after ``--stop-timeout`` seconds,
  and marks the exit record ``stopped`` (when the program was still running);
  except for a program that said it is aborting the MPI job (``ranks._comm_mpi``'s
  line): MPI_Abort is what made mpirun stop the job, so that program gets
  ``ABORT_GRACE`` s to end by itself and its failure stays its own;
- dies with its parent (Linux parent-death signal), so the program never
  outlives mpirun's daemon, and gives the program the same guarantee.

It exits with the program's exit code, or 128 + the signal number.

``launchers/run_ranks.sh`` runs each rank under it too (the script cannot
trap its own SIGKILL; the wrapper's parent-death signal outlives it):

    python .../_rank_wrapper.py --rank R --parent SCRIPT_PID --report-as run_ranks.sh -- PROGRAM ARGS...

``--rank`` replaces the MPI variables, ``--parent`` makes it refuse to start
when that process is already gone, and ``--report-as NAME`` writes no
records: when the program fails on its own it writes the one line
``NAME: rank R on host H (pid P) failed: exit code C`` (or ``signal SIGX (N)``) instead.
The script reports the first watcher that ends, so the watcher of a rank that failed because it lost
a peer (a ``PeerLostError``) waits up to ``PEER_LOST_GRACE`` s before it ends: the peer's is seen first.
The watcher of a rank that exits with code 0 while the other watchers of its parent still run stays until
they end; when one of their ranks fails meanwhile (it may have lost this one: ``os._exit(0)`` while its
peers needed it, say), it writes
``NAME: rank R on host H (pid P) exited with exit code 0 while rank Q was still running``.
Ranks that simply finish at different times write nothing.

``launchers/run_mpi.sh`` runs each MPI rank under it with ``--report-as run_mpi.sh`` (mpirun itself
only knows the watcher's pid), and mpirun with ``--exec``: the wrapper then only gives mpirun a
parent-death signal (SIGTERM, which makes mpirun stop the job) and execs it.

Record fields (version 1)::

    start: {"v": 1, "event": "start", "rank", "host", "pid" (program), "wrapper_pid", "time"}
    exit:  {"v": 1, "event": "exit",  "rank", "host", "pid", "exitcode" | null, "signal" (name) | null,
            "time", "tail" (last lines of stderr, else stdout), "stopped", "last_output" (time) | null}

("last_output", the time of the program's last line, was added within version 1:
readers take a missing one as null.)
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

MARKER = "@@orchestrate-rank "
VERSION = 1
# A record must reach the launcher in one piece: one write() of at most PIPE_BUF
# bytes is atomic, so mpirun's forwarding cannot interleave another rank's bytes into it.
RECORD_BYTES = 4000
TAIL_LINE_CHARS = 400
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_EXITED_0 = "rank-exited-0"  # a watcher's process name once its rank exited with code 0 (at most 15 bytes)
# --report-as: how long the watcher of a rank that failed because it lost a peer (its last line is a
# PeerLostError) waits before it exits, so that the script sees the watcher of the rank that failed
# first end first (the launchers order such failures after the others: launchers/_failures.py).
PEER_LOST_GRACE = 1.0
# --report-as: the watcher of a rank that exited with code 0 while other ranks of its host still run stays
# until they end, looking this often for one whose rank failed (its watcher renames itself _FAILED at once);
# then it names its rank as one that left while they ran. Far shorter than PEER_LOST_GRACE, so that its line
# comes before that of the peer which lost it. Ranks that merely finish at different times print nothing.
EARLY_EXIT_POLL = 0.1
_FAILED = "rank-failed"  # a watcher's process name once its rank failed (at most 15 bytes)
# What ranks._comm_mpi writes when it aborts the MPI job (uncaught exception, timeout): the rank failed on
# its own, even when mpirun's stop of the whole job reaches its watcher before it has exited.
_ABORTING = "aborting the MPI job"
ABORT_GRACE = 1.0
_PEER_LOST = "PeerLostError"


def parse_record(line: str) -> dict | None:
    """The record in ``line`` (a line the wrapper wrote), or None when it is an ordinary line."""
    position = line.find(MARKER)
    if position < 0:
        return None
    try:
        record = json.loads(line[position + len(MARKER) :])
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("v") == VERSION else None


def rank_from_environment(environ=os.environ) -> int:
    for name in RANK_VARIABLES:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    raise SystemExit(
        f"_rank_wrapper.py: none of {', '.join(RANK_VARIABLES)} is set; it is meant to be started by mpirun"
    )


def _prctl_deathsig(signum: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        except (OSError, AttributeError):
            pass


class _Wrapper:
    def __init__(self, program: list[str], stop_timeout: float, tail_lines: int, *, rank: int | None = None,
                 parent: int | None = None, report_as: str | None = None):
        self.program = program
        self.stop_timeout = stop_timeout
        self.rank = rank_from_environment() if rank is None else rank
        self.parent = parent
        self.report_as = report_as
        self.host = socket.gethostname()
        self.prefix = f"[rank {self.rank}] "
        self.lock = threading.Lock()
        self.err_tail: collections.deque = collections.deque(maxlen=max(tail_lines, 1))
        self.out_tail: collections.deque = collections.deque(maxlen=max(tail_lines, 1))
        self.tail_lines = tail_lines
        self.stop_requested: float | None = None
        self.stopped = False  # signalled while the program still ran: not a failure of its own
        self.aborting = False  # the program said it is aborting the MPI job: its failure, whoever's signal ends it
        self.deferred = False  # a stop that came while it aborted, passed on only after ABORT_GRACE
        self.last_output: float | None = None
        self.proc: subprocess.Popen | None = None

    def record(self, **fields) -> None:
        if self.report_as is not None:
            return
        tail = [text if len(text) <= TAIL_LINE_CHARS else text[:TAIL_LINE_CHARS] + "..." for text in fields.pop("tail", ())]
        while True:
            body = {"v": VERSION, "rank": self.rank, "host": self.host, **fields}
            if fields.get("event") == "exit":
                body["tail"] = tail
            line = MARKER + json.dumps(body)
            if len(line.encode("utf-8")) <= RECORD_BYTES or not tail:
                break
            tail.pop(0)  # keep the last lines: that is where the error is
        with self.lock:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def pump(self, pipe, out, tail) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if _ABORTING in text:
                    self.aborting = True  # before the line goes out: mpirun's stop may follow it at once
                with self.lock:
                    self.last_output = time.time()
                    tail.append(text)
                    try:
                        out.write(self.prefix + text + "\n")
                        out.flush()
                    except (OSError, ValueError):
                        pass
        except (OSError, ValueError):
            pass

    def on_signal(self, signum, _frame) -> None:
        # No locks and no threads here: only a flag and a kill, safe in a handler.
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()
        if self.proc is not None:
            if self.aborting and not self.deferred:
                # MPI_Abort makes mpirun stop every rank, this one too, while it is still aborting:
                # it gets ABORT_GRACE to end by itself, and its failure stays its own.
                self.deferred = True
                return
            self._pass_stop()

    def _pass_stop(self) -> None:
        if not _has_exited(self.proc.pid) and not self.aborting:
            self.stopped = True
        # SIGCONT after SIGTERM: a stopped program acts on the SIGTERM only once continued
        for signum in (signal.SIGTERM, signal.SIGCONT):
            try:
                os.killpg(self.proc.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def run(self) -> int:
        parent = os.getppid() if self.parent is None else self.parent
        _prctl_deathsig(signal.SIGTERM)
        if os.getppid() != parent:
            return 1  # our parent (mpirun's daemon, the script) died before we could ask to die with it
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_signal)

        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PYTHONFAULTHANDLER", "1")
        try:
            self.proc = subprocess.Popen(
                self.program,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                preexec_fn=lambda: _prctl_deathsig(signal.SIGKILL),
            )
        except OSError as exc:
            message = f"cannot start {self.program[0]!r}: {exc.strerror or exc}"
            self.err_tail.append(message)
            sys.stderr.write(self.prefix + message + "\n")
            self.record(event="exit", pid=os.getpid(), exitcode=127, signal=None, time=time.time(),
                        tail=list(self.err_tail), stopped=False)
            return 127
        if self.stop_requested is not None:  # a signal came before the program existed
            self.on_signal(signal.SIGTERM, None)
        self.record(event="start", pid=self.proc.pid, wrapper_pid=os.getpid(), time=time.time())
        readers = [
            threading.Thread(target=self.pump, args=(self.proc.stdout, sys.stdout, self.out_tail), daemon=True),
            threading.Thread(target=self.pump, args=(self.proc.stderr, sys.stderr, self.err_tail), daemon=True),
        ]
        for reader in readers:
            reader.start()

        killed = passed = False
        while True:
            try:
                code = self.proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.deferred and not passed and time.monotonic() - self.stop_requested >= ABORT_GRACE:
                passed = True
                self._pass_stop()  # it did not end by itself: pass the stop on now
            if self.stop_requested is not None and not killed:
                if time.monotonic() - self.stop_requested >= self.stop_timeout:
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    killed = True
        ended = time.time()
        if code == 0 and self.report_as is not None:
            _set_process_name(_EXITED_0)  # its siblings must not count this watcher as a rank still running
        elif self.report_as is not None:
            _set_process_name(_FAILED)  # a sibling whose rank left with code 0 learns the job is failing
        stopped = self.stopped
        drained = time.monotonic() + 2.0  # one deadline: a grandchild may hold both pipes open
        for reader in readers:
            reader.join(max(0.0, drained - time.monotonic()))
        if self.report_as is not None and code != 0 and not stopped and self._lost_a_peer():
            grace = time.monotonic() + PEER_LOST_GRACE
            while self.stop_requested is None and time.monotonic() < grace:
                time.sleep(0.02)
            stopped = self.stop_requested is not None  # the script stopped the job: not the failure to report
        if self.report_as is not None and code != 0 and not stopped:
            how = f"exit code {code}" if code >= 0 else f"signal {_signal_name(-code)} ({-code})"
            with self.lock:
                sys.stderr.write(f"{self.report_as}: rank {self.rank} on host {self.host} (pid {self.proc.pid}) failed: {how}\n")
                sys.stderr.flush()
        # Whatever the program left in its group goes with it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.report_as is not None and code == 0 and self.stop_requested is None:
            still = self._running_when_a_sibling_failed()
            if still:
                # Nobody else can name it: its peers fail with a lost peer (or mpirun names this watcher's pid).
                ranks = f"rank {still[0]} was" if len(still) == 1 else f"ranks {', '.join(map(str, still))} were"
                with self.lock:
                    sys.stderr.write(f"{self.report_as}: rank {self.rank} on host {self.host} (pid {self.proc.pid}) exited "
                                     f"with exit code 0 while {ranks} still running\n")
                    sys.stderr.flush()
        with self.lock:
            tail = list(self.err_tail) or list(self.out_tail)
        self.record(
            event="exit",
            pid=self.proc.pid,
            exitcode=code if code >= 0 else None,
            signal=_signal_name(-code) if code < 0 else None,
            time=ended,
            tail=tail[-self.tail_lines :] if self.tail_lines > 0 else [],
            stopped=stopped,
            last_output=self.last_output,
        )
        sys.stdout.flush()
        return code if code >= 0 else 128 - code


    def _running_when_a_sibling_failed(self) -> list[int]:
        """After this rank exited with code 0: wait while the other ranks' watchers of this job on this host
        (same parent) run; the ranks still running when one of them is seen to have failed, or [] when they all
        ended without a failure (ranks finish at different times) or the job is being stopped."""
        parent = self.parent if self.parent is not None else os.getppid()
        while self.stop_requested is None:
            running, failed = _siblings(parent)
            if failed:
                return sorted(running)
            if not running:
                return []
            time.sleep(EARLY_EXIT_POLL)
        return []

    def _lost_a_peer(self) -> bool:
        with self.lock:
            last = (list(self.err_tail) or list(self.out_tail) or [""])[-1]
        return _PEER_LOST in last


def _set_process_name(name: str) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        return []


def _siblings(parent: int) -> tuple[set[int], bool]:
    """(ranks of the other rank watchers of ``parent`` still running, whether one of them has seen its rank
    fail), in one pass over /proc (standard library only). Running: their program runs, or failed and they
    report it; watchers whose rank exited with code 0 (named ``_EXITED_0``) do not count. Failed: a watcher
    renamed ``_FAILED``."""
    ranks, failed = set(), False
    for pid in _children(parent):
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            failed = failed or comm == _FAILED
            if comm == _EXITED_0 and not _children(pid):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode("utf-8", "replace").split("\0")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            if not any(arg.endswith("_rank_wrapper.py") for arg in argv):
                continue
            if "--rank" in argv:
                ranks.add(int(argv[argv.index("--rank") + 1]))
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split("=", 1) for item in f.read().decode("utf-8", "replace").split("\0") if "=" in item)
            ranks.add(rank_from_environment(environ))
        except (OSError, ValueError, IndexError, SystemExit):
            continue
    return ranks, failed


def _has_exited(pid: int) -> bool:
    """True when child ``pid`` has ended, without reaping it (as ``_supervisor.has_exited``)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
    except OSError:
        return False


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def main(argv: list[str] | None = None) -> int:
    usage = ("usage: [--stop-timeout S] [--tail-lines N] [--rank R] [--parent PID] [--report-as NAME] "
             "[--shm-dir DIR] [--exec] -- PROGRAM ARGS...")
    args = list(sys.argv[1:] if argv is None else argv)
    stop_timeout, tail_lines = 10.0, 20
    shm_dir = None
    options: dict = {}
    while args and args[0] != "--":
        option = args.pop(0)
        if option == "--stop-timeout" and args:
            stop_timeout = float(args.pop(0))
        elif option == "--tail-lines" and args:
            tail_lines = int(args.pop(0))
        elif option in ("--rank", "--parent") and args:
            options[option[2:]] = int(args.pop(0))
        elif option == "--report-as" and args:
            options["report_as"] = args.pop(0)
        elif option == "--shm-dir" and args:
            shm_dir = args.pop(0)
        elif option == "--exec":
            options["exec"] = True
        else:
            raise SystemExit(f"_rank_wrapper.py: unknown option {option!r}; {usage}")
    if not args or len(args) < 2:
        raise SystemExit(f"_rank_wrapper.py: {usage}")
    if options.pop("exec", False):
        return _exec_with_parent(args[1:], options.get("parent"))
    try:
        return _Wrapper(args[1:], stop_timeout, tail_lines, **options).run()
    finally:
        if shm_dir:
            _remove_if_orphaned(shm_dir)


def _exec_with_parent(program: list[str], parent: int | None) -> int:
    """``--exec``: become ``program`` (no watching, no prefix), which gets SIGTERM when ``parent`` dies.

    run_mpi.sh runs mpirun so: a SIGKILLed script cannot pass anything on, and mpirun would
    otherwise run on with its ranks; SIGTERM makes mpirun stop them. (The death signal survives exec.)
    """
    _prctl_deathsig(signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        return 1  # the parent is already gone
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        sys.stderr.write(f"cannot start {program[0]!r}: {exc.strerror or exc}\n")
        return 127


def _remove_if_orphaned(shm_dir: str) -> None:
    """The launcher's directory of Open MPI's shared-memory files, when the launcher died without removing it.

    A SIGKILLed launcher takes mpirun with it, and this wrapper, told by its parent's
    death, is the last of the job to run code on this host.
    """
    from ranks import _shared_memory

    if _shared_memory.owner_state(os.path.basename(shm_dir)) == "dead":
        _shared_memory.remove_directory(shm_dir)


if __name__ == "__main__":
    sys.exit(main())

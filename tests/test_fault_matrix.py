"""The fault matrix: every way in crossed with every fault (the issue on the house and its faults).

Run alone with ``.venv/bin/python -m pytest tests/test_fault_matrix.py -rxXf -s`` (about 2 minutes on 2
cores; ``-s`` prints a row per cell and the table at the end). Every cell passes today; a cell that
fails because of a known bug goes in ``FAILING_TODAY`` with the bug (an ``xfail(strict=True)``).

Ways in (``WAYS``): ``orchestrate launch mpi``, ``orchestrate launch rank-table``, two ranks started
by hand as a shell script starts them (no launcher), ``launchers/run_mpi.sh``, ``launchers/run_ranks.sh``,
``ShardedModel`` over mpi and over zmq, ``ParallelPredictor``, ``ModelParallelRunner`` with process workers. The rank-program ways run
``tests/programs/fault_rank.py`` (a user's program: ``create_communicator()``, no error caught);
``ShardedModel`` and ``ParallelPredictor`` run in ``tests/programs/fault_caller.py``, and their
ranks and workers fail through ``tests/programs/fault_hooks/sitecustomize.py`` inside a request.

Faults (``FAULTS``): an exception; an exception inside ``with create_communicator() as comm:``;
``os._exit(0)`` while the peers wait; SIGKILL; SIGSEGV; SIGSTOP (a hang); a peer that never joins;
SIGKILL, SIGTERM, SIGINT of the launcher or caller (for two hand-started ranks, which have no
launcher: SIGTERM and SIGINT of one rank, as ``kill PID`` or a terminal's Ctrl-C sends them); and,
for ShardedModel and ParallelPredictor, ``close()`` while a rank or worker is SIGSTOPped.

For every cell of ``MATRIX`` the test asserts:

1. Time. The error surfaces within ``DEATH_BOUND`` (1 s + ``LOAD_SLACK`` for this 2-core machine
   shared with other jobs) of a death, within ``HANG_BOUND`` (the timeout ``TIMEOUT`` + 1 s +
   ``LOAD_SLACK``) of a hang; after a signal to the launcher or caller every process of the job
   is gone, and ``close()`` with a stopped rank or worker returns, within ``DEATH_BOUND``. Measured from the faulty rank's own clock (it prints the time, or
   the fault hook writes it) to the moment the report appears (the launcher's headline, the
   surviving rank's error line, the caller's exception); the real times are printed per cell.
2. The report names the FIRST failure: the rank or worker number, its host and pid, and its signal
   name or exit code, on one line; for the launchers that line is the report's headline (not a
   victim: a peer that lost its partner). For a hang the rank that timed out is the first to
   fail, so the report must name the stuck rank's number and pid and say that it was waited for.
   Two hand-started ranks have no report but the surviving rank's own error, which must name the
   peer (its number and its pid or address). The scripts' reports are their own lines (each rank's
   watcher names its rank's pid; mpirun's words name the watcher's), then the console. Exit codes as the README gives them: the failed rank's own code,
   128 + N for a signal, 130/143 after SIGINT/SIGTERM (hand-started ranks: the survivor's, 1).
   ``ShardedModel`` and ``ParallelPredictor`` raise in the caller: the exception's type is checked,
   and what the next ``predict`` does (the predictor serves on after an exception in the model,
   refuses after a death or a hang).
3. Nothing is left: no process (found by a marker in the command line or the environment), no new
   ``/dev/shm`` entry of this job's processes (attributed by the owner pid in ``orch_*`` names and by
   what the job's processes mapped; entries of other live owners are ignored), nothing in the job's
   private ``TMPDIR`` (no ``orch_*``, nor Open MPI's session directory; onnxruntime's ``.ses`` id
   file aside). The job runs with ``ORCH_SHM_MODE=named``: memfd segments cannot outlive their
   processes, named ones can, so named is where a leak would show.

A cell gives up on an error ``GIVE_UP`` s after the fault (just past ``HANG_BOUND``: later is a
failure anyway) and kills the job; ``FAULT_MATRIX_GIVE_UP=20`` waits longer, to measure how late.

Not applicable (``NOT_APPLICABLE`` holds the same list; a test keeps the two in step):

- raise_in_with x sharded-mpi, sharded-zmq, parallel, pool: the ranks and workers run the project's code, not
  a user's ``with`` block; their exception cell is ``raise``.
- caller_kill x shell-ranks: with no launcher, a SIGKILL reaches a rank: that is the ``sigkill`` cell.
- stop_close x launch-mpi, launch-rank-table, shell-ranks, run_mpi.sh, run_ranks.sh: there is no
  ``close()``; the launchers stop a stopped rank in the ``sigstop`` cell (SIGTERM, then SIGCONT).

Cells that fail today because of a real bug are listed in ``FAILING_TODAY`` with the bug, and run
as ``xfail(strict=True)``: a fix makes them pass, and then the entry must go (``RACES``: a cell
whose bug shows only when one of two equal timeouts wins is not strict).

Each cell prints one row (run with ``-s``), and the whole table is written to
``<pytest basetemp>/fault_matrix.md`` and printed at the end of the module:
cell, time to error, time until every process was gone, exit code or exception, what the report
named (its headline), leftovers.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT, orchestrate_command, project_env
from launch_helpers import kill_all, new_marker, processes_with
from ranks import free_base_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.cli]

TIMEOUT = 3.0  # ORCH_TIMEOUT, and the ShardedModel/ParallelPredictor timeouts
STOP_TIMEOUT = 3  # --stop-timeout, STOP_TIMEOUT, ORCH_STOP_TIMEOUT
LOAD_SLACK = 2.0  # the machine has 2 cores shared with other jobs: a busy core delays any process by this much
DEATH_BOUND = 1.0 + LOAD_SLACK
HANG_BOUND = TIMEOUT + 1.0 + LOAD_SLACK
# How long after the fault a cell waits for the error before it calls it missing (and kills the job).
# Past HANG_BOUND the cell has failed anyway; FAULT_MATRIX_GIVE_UP=20 shows how late the late ones are
# (ShardedModel raises only after close(), which can take 10 s more).
GIVE_UP = float(os.environ.get("FAULT_MATRIX_GIVE_UP") or HANG_BOUND + 1.0)
LEFTOVER_WAIT = 5.0  # how long processes may take to go after the job ended before they count as left
SHM_MODE = "named"
# Cells run this many at a time (FAULT_MATRIX_JOBS=1: one at a time, to time one cell alone).
CONCURRENT_CELLS = int(os.environ.get("FAULT_MATRIX_JOBS") or 2)

FAULT_RANK = str(ROOT / "tests" / "programs" / "fault_rank.py")
FAULT_CALLER = str(ROOT / "tests" / "programs" / "fault_caller.py")
FAULT_HOOKS = str(ROOT / "tests" / "programs" / "fault_hooks")
RUN_MPI = str(ROOT / "launchers" / "run_mpi.sh")
RUN_RANKS = str(ROOT / "launchers" / "run_ranks.sh")
TABLE = str(ROOT / "rank_tables" / "local_2p.json")
HOST = socket.gethostname()
MARKER_VARIABLE = "FAULT_MATRIX_MARKER"  # not ORCH_: the project's variables are declared in ranks/_env.py

WAYS = {
    "launch-mpi": "orchestrate launch mpi -n 2 -- python fault_rank.py",
    "launch-rank-table": "orchestrate launch rank-table local_2p.json --config_file INI -- python fault_rank.py",
    "shell-ranks": "python fault_rank.py --rank_id=R --config_file=INI, twice, by hand (no launcher)",
    "run_mpi.sh": "bash launchers/run_mpi.sh 2 python fault_rank.py",
    "run_ranks.sh": "bash launchers/run_ranks.sh local_2p.json INI python fault_rank.py",
    "sharded-mpi": "ShardedModel(shards, backend='mpi').predict",
    "sharded-zmq": "ShardedModel(shards, backend='zmq').predict",
    "parallel": "ParallelPredictor(model, device_ids=[0, 1]).predict",
    "pool": "ModelParallelRunner with 2 process workers: two predicts at once, one per worker",
}
FAULTS = {
    "raise": "rank 1 / worker 1 raises",
    "raise_in_with": "rank 1 raises inside `with create_communicator() as comm:`",
    "exit0": "rank 1 / worker 1 leaves with os._exit(0) while the others wait",
    "sigkill": "rank 1 / worker 1 is SIGKILLed",
    "sigsegv": "rank 1 / worker 1 gets SIGSEGV",
    "sigstop": "rank 1 / worker 1 is SIGSTOPped (a hang)",
    "absent": "rank 1 / a worker never joins (not started, or stopped before it could)",
    "caller_kill": "the launcher / caller gets SIGKILL",
    "caller_term": "the launcher / caller gets SIGTERM (shell-ranks: rank 1 does)",
    "caller_int": "the launcher / caller gets SIGINT (shell-ranks: rank 1 does)",
    "stop_close": "rank 1 / worker 1 is SIGSTOPped between requests, then the caller closes",
}
RANK_PROGRAM_WAYS = ("launch-mpi", "launch-rank-table", "shell-ranks", "run_mpi.sh", "run_ranks.sh")


@dataclass(frozen=True)
class Expect:
    """What a cell must show.

    ``code``: the exit status of what the user ran (launcher, script; for hand-started ranks the
    surviving rank 0), or for ShardedModel/ParallelPredictor a regex of the exception type the
    caller gets (for the caller faults: the caller's own status). ``report``: regexes that must
    all match the report (``<pid>``: the faulty rank's or worker's pid, ``<host>``: this host).
    ``bound``: death | hang | caller. ``after``: regex for what the next predict gives.
    """

    code: int | str
    report: tuple[str, ...] = ()
    bound: str = "death"
    after: str | None = None


def first(who: str, how: str) -> str:
    """One line naming ``who`` (a rank or worker), this host, the faulty pid and ``how`` it failed."""
    return rf"(?m)^.*\b{who}\b[^\n]*\bon host <host> \(pid <pid>\)[^\n]*{how}"


def headline(prefix: str, who: str, how: str) -> str:
    """The report's first line names ``who``: ``PREFIX: rank 1 of 2 on host H (pid P) ... HOW``."""
    return rf"\A{re.escape(prefix)}: {who} of 2 on host <host> \(pid <pid>\)[^\n]*{how}"


STUCK = (r"waiting for rank 1\b|rank 1\b[^\n]*(did not answer|no answer|timed out|stuck)", r"\bpid <pid>\b")
# A rank that never joined has told nobody its pid: its address names it too.
ABSENT = (r"waiting for rank 1\b", r"\bpid <pid>\b|rank 1 at tcp://")

def _launcher_cells(prefix: str) -> dict[str, Expect]:
    return {
        "raise": Expect(1, (headline(prefix, "rank 1", "failed[^\n]*: exit code 1"),
                            r"\| RuntimeError: rank 1 broke on purpose \(raise\)")),
        "raise_in_with": Expect(1, (headline(prefix, "rank 1", "failed[^\n]*: exit code 1"),
                                    r"\| RuntimeError: rank 1 broke on purpose \(raise_in_with\)")),
        "exit0": Expect(1, (headline(prefix, "rank 1", "exited with exit code 0 before the job finished"),)),
        "sigkill": Expect(137, (headline(prefix, "rank 1", r"failed[^\n]*: signal SIGKILL \(9\)"),)),
        "sigsegv": Expect(139, (headline(prefix, "rank 1", r"failed[^\n]*: signal SIGSEGV \(11\)"),)),
        "sigstop": Expect(1, STUCK, bound="hang"),
        "absent": Expect(1, ABSENT, bound="hang"),
        "caller_kill": Expect(-9, bound="caller"),
        "caller_term": Expect(143, (rf"\A{re.escape(prefix)}: interrupted by SIGTERM: stopped every rank",), bound="caller"),
        "caller_int": Expect(130, (rf"\A{re.escape(prefix)}: interrupted by SIGINT: stopped every rank",), bound="caller"),
    }


# The survivor's error names its peer: number and pid, or address.
PEER = r"\brank 1 (\(pid <pid>[ ;)]|at tcp://)"
LOST = r"PeerLostError: allreduce #2 on rank 0 of 2"
# run_ranks.sh: its first line names the failed rank.
RUN_RANKS_FAILED = r"\Arun_ranks\.sh: rank 1 on host <host> \(pid <pid>\) failed: "
# run_mpi.sh: its first line names the failed rank (mpirun's own words name the rank's watcher).
RUN_MPI_FAILED = r"\Arun_mpi\.sh: rank 1 on host <host> \(pid <pid>\) failed: "
WORKER = r"worker for device \d"
POOL_WORKER = r"worker 1 of 2"
REFUSES = "WorkerError: this ParallelPredictor no longer accepts requests"

MATRIX: dict[tuple[str, str], Expect] = {
    **{("launch-mpi", fault): expect for fault, expect in _launcher_cells("orchestrate launch mpi").items()},
    **{("launch-rank-table", fault): expect for fault, expect in _launcher_cells("orchestrate launch rank-table").items()},

    ("shell-ranks", "raise"): Expect(1, (LOST, PEER)),
    ("shell-ranks", "raise_in_with"): Expect(1, (LOST, PEER)),
    ("shell-ranks", "exit0"): Expect(1, (LOST, PEER)),
    ("shell-ranks", "sigkill"): Expect(1, (LOST, PEER)),
    ("shell-ranks", "sigsegv"): Expect(1, (LOST, PEER)),
    ("shell-ranks", "sigstop"): Expect(1, (r"CommTimeoutError: allreduce #2 on rank 0 of 2 timed out", PEER), bound="hang"),
    ("shell-ranks", "absent"): Expect(1, (r"CommTimeoutError: joining .* on rank 0 of 2 timed out", PEER), bound="hang"),
    ("shell-ranks", "caller_term"): Expect(1, (LOST, PEER)),
    ("shell-ranks", "caller_int"): Expect(1, (LOST, PEER)),

    ("run_mpi.sh", "raise"): Expect(1, (RUN_MPI_FAILED + "exit code 1",)),
    ("run_mpi.sh", "raise_in_with"): Expect(1, (RUN_MPI_FAILED + "exit code 1",)),
    # The first line names rank 1 as the one that left: rank 0's PeerLostError (it sees rank 1's process gone
    # within half a second), or rank 1's watcher, which writes its line once it sees rank 0 fail.
    ("run_mpi.sh", "exit0"): Expect(1, (r"\A(\[rank 0\] ranks\._errors\.PeerLostError: allreduce #2 on rank 0 of 2: rank 1 "
                                        r"\(pid <pid>\) exited after operation #1 \(allreduce\) without closing its "
                                        r"communicator|run_mpi\.sh: rank 1 on host <host> \(pid <pid>\) exited with exit code 0)",)),
    ("run_mpi.sh", "sigkill"): Expect(137, (RUN_MPI_FAILED + r"signal SIGKILL \(9\)",)),
    ("run_mpi.sh", "sigsegv"): Expect(139, (RUN_MPI_FAILED + r"signal SIGSEGV \(11\)",)),
    ("run_mpi.sh", "sigstop"): Expect(1, STUCK, bound="hang"),
    ("run_mpi.sh", "absent"): Expect(1, ABSENT, bound="hang"),
    ("run_mpi.sh", "caller_kill"): Expect(-9, bound="caller"),
    ("run_mpi.sh", "caller_term"): Expect(143, (r"\Arun_mpi\.sh: interrupted by SIGTERM, stopping every rank",), bound="caller"),
    ("run_mpi.sh", "caller_int"): Expect(130, (r"\Arun_mpi\.sh: interrupted by SIGINT, stopping every rank",), bound="caller"),

    ("run_ranks.sh", "raise"): Expect(1, (RUN_RANKS_FAILED + "exit code 1",)),
    ("run_ranks.sh", "raise_in_with"): Expect(1, (RUN_RANKS_FAILED + "exit code 1",)),
    ("run_ranks.sh", "exit0"): Expect(1, (r"\Arun_ranks\.sh: rank 1 on host <host> \(pid <pid>\) exited with exit code 0",)),
    ("run_ranks.sh", "sigkill"): Expect(137, (RUN_RANKS_FAILED + r"signal SIGKILL \(9\)",)),
    ("run_ranks.sh", "sigsegv"): Expect(139, (RUN_RANKS_FAILED + r"signal SIGSEGV \(11\)",)),
    ("run_ranks.sh", "sigstop"): Expect(1, STUCK, bound="hang"),
    ("run_ranks.sh", "absent"): Expect(1, ABSENT, bound="hang"),
    ("run_ranks.sh", "caller_kill"): Expect(-9, bound="caller"),
    ("run_ranks.sh", "caller_term"): Expect(143, (r"\Arun_ranks\.sh: interrupted by SIGTERM, stopping every rank",), bound="caller"),
    ("run_ranks.sh", "caller_int"): Expect(130, (r"\Arun_ranks\.sh: interrupted by SIGINT, stopping every rank",), bound="caller"),

    **{cell: expect for way in ("sharded-mpi", "sharded-zmq") for cell, expect in {
        (way, "raise"): Expect("RuntimeError", (r"\[rank 1 of 2 on host <host> \(pid <pid>\)\] fault injected",),
                               after="WorkerError"),
        (way, "exit0"): Expect("WorkerError", (first("rank 1", "exit code 0"),), after="WorkerError"),
        (way, "sigkill"): Expect("WorkerError", (first("rank 1", "SIGKILL"),), after="WorkerError"),
        (way, "sigsegv"): Expect("WorkerError", (first("rank 1", "SIGSEGV"),), after="WorkerError"),
        # a stall is WorkerTimeoutError (a WorkerError), as ParallelPredictor's: the rank that never took the
        # request is named, not rank 0 that timed out waiting for it in a collective
        (way, "sigstop"): Expect("WorkerTimeoutError", STUCK, bound="hang", after="WorkerError"),
        (way, "absent"): Expect("WorkerError|CommTimeoutError", ABSENT, bound="hang"),
        (way, "caller_kill"): Expect(-9, bound="caller"),
        (way, "caller_term"): Expect(-15, bound="caller"),
        (way, "caller_int"): Expect(-2, bound="caller"),
    }.items()},

    # a worker's Model turns an ONNX Runtime failure into ModelError
    ("parallel", "raise"): Expect("ModelError", (rf"\[{WORKER} on host <host> \(pid <pid>\)\] [^\n]*fault injected",),
                                  after="OK"),
    ("parallel", "exit0"): Expect("WorkerLostError", (first(WORKER, "code 0"),), after=REFUSES),
    ("parallel", "sigkill"): Expect("WorkerLostError", (first(WORKER, "SIGKILL"),), after=REFUSES),
    ("parallel", "sigsegv"): Expect("WorkerLostError", (first(WORKER, "SIGSEGV"),), after=REFUSES),
    ("parallel", "sigstop"): Expect("WorkerTimeoutError", (first(WORKER, "did not answer"),), bound="hang", after=REFUSES),
    ("parallel", "absent"): Expect("WorkerTimeoutError", (first(WORKER, "BUILD_FINISH"),), bound="hang"),
    ("parallel", "caller_kill"): Expect(-9, bound="caller"),
    ("parallel", "caller_term"): Expect(-15, bound="caller"),
    ("parallel", "caller_int"): Expect(-2, bound="caller"),

    # a process worker's death or hang costs its request; the other worker serves the next ones
    ("pool", "raise"): Expect("ModelError", (rf"\[{POOL_WORKER} on host <host> \(pid <pid>\)\] [^\n]*fault injected",),
                              after="OK"),
    ("pool", "exit0"): Expect("WorkerLostError", (first(POOL_WORKER, "code 0"),), after="OK"),
    ("pool", "sigkill"): Expect("WorkerLostError", (first(POOL_WORKER, "SIGKILL"),), after="OK"),
    ("pool", "sigsegv"): Expect("WorkerLostError", (first(POOL_WORKER, "SIGSEGV"),), after="OK"),
    ("pool", "sigstop"): Expect("WorkerTimeoutError", (first(POOL_WORKER, "ran it"),), bound="hang", after="OK"),
    ("pool", "absent"): Expect("WorkerTimeoutError", (first(r"worker \d of 2", "BUILD_FINISH"),), bound="hang"),
    ("pool", "caller_kill"): Expect(-9, bound="caller"),
    ("pool", "caller_term"): Expect(-15, bound="caller"),
    ("pool", "caller_int"): Expect(-2, bound="caller"),
    ("pool", "stop_close"): Expect(0, bound="close"),

    # close() must not wait out its deadlines for a stopped process (SIGCONT after SIGTERM, as the launchers do)
    ("sharded-mpi", "stop_close"): Expect(0, bound="close"),
    ("sharded-zmq", "stop_close"): Expect(0, bound="close"),
    ("parallel", "stop_close"): Expect(0, bound="close"),
}

# Cells that fail today because of a real bug: xfail(strict=True) with the bug as the reason.
FAILING_TODAY: dict[tuple[str, str], str] = {
}

# Failing cells whose bug shows only when one of two equal timeouts wins: strict would make them flaky.
RACES: set[tuple[str, str]] = set()

NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("sharded-mpi", "raise_in_with"): "the ranks run the project's code, not a user's with block (see raise)",
    ("sharded-zmq", "raise_in_with"): "the ranks run the project's code, not a user's with block (see raise)",
    ("parallel", "raise_in_with"): "the workers run the project's code, not a user's with block (see raise)",
    ("pool", "raise_in_with"): "the workers run the project's code, not a user's with block (see raise)",
    ("shell-ranks", "caller_kill"): "no launcher: a SIGKILL reaches a rank, which is the sigkill cell",
    **{(way, "stop_close"): "no close(): the launchers stop a stopped rank in the sigstop cell (SIGTERM, then SIGCONT)"
       for way in RANK_PROGRAM_WAYS},
}


# --- watching a job --------------------------------------------------------------------------------


class Watched:
    """A process started in the background whose output lines are kept with the time each arrived."""

    def __init__(self, argv: list[str], env: dict, name: str, stdin=subprocess.DEVNULL):
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines: list[tuple[float, str, str]] = []  # (unix time it arrived, "out" | "err", text)
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._read, args=(pipe, stream), daemon=True)
                         for pipe, stream in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe, stream: str) -> None:
        for line in pipe:
            with self._lock:
                self.lines.append((time.time(), stream, line.rstrip("\n")))

    def snapshot(self) -> list[tuple[float, str, str]]:
        with self._lock:
            return list(self.lines)

    def wait_line(self, pattern: str, timeout: float, stream: str | None = None):
        """(arrival time, match) of the first line matching ``pattern``; None after ``timeout`` or at EOF."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for t, s, text in self.snapshot():
                if stream in (None, s):
                    found = regex.search(text)
                    if found:
                        return t, found
            if time.monotonic() > deadline:
                return None
            if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                if not any(regex.search(text) for _, s, text in self.snapshot() if stream in (None, s)):
                    return None
            time.sleep(0.02)

    def finish(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(5)
        return code

    def stacks(self) -> None:
        """Ask a fault_caller.py that did not end for its threads' stacks (they go to its stderr)."""
        if self.proc.poll() is None and "fault_caller.py" in " ".join(self.proc.args):
            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(1.0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def text(self) -> str:
        return "\n".join(f"[{self.name} {s}] {text}" for _, s, text in self.snapshot())


def _read(path: str, binary: bool = False):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if binary else data.decode("utf-8", "replace")


class Tracker:
    """Every process of one job, found by a marker in its environment or command line, sampled in a thread.

    Records each process's command line, when the last of them was seen alive, and which
    ``/dev/shm`` entries they mapped (so that what they leave there can be told from other jobs').
    """

    def __init__(self, marker: str):
        self.marker = marker.encode()
        self.ours: dict[int, str] = {}
        self.roots: set[int] = set()
        self.not_ours: set[int] = set()
        self.shm_touched: set[str] = set()
        self.gone_at: float | None = None  # the first sample that found none of the job's processes alive
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fault-matrix tracker", daemon=True)
        self._thread.start()

    def add_root(self, pid: int) -> None:
        """A process we started (its environment holds the marker only once it has exec'd)."""
        with self._lock:
            self.roots.add(pid)
            self.not_ours.discard(pid)

    def _classify(self, pid: int) -> None:
        if pid in self.ours or pid in self.not_ours:
            return
        cmdline = _read(f"/proc/{pid}/cmdline", binary=True)
        environ = _read(f"/proc/{pid}/environ", binary=True)
        if cmdline is None:
            return
        if pid in self.roots or self.marker in cmdline or (environ is not None and self.marker in environ):
            self.ours[pid] = cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip()
        elif environ is not None:  # a process not yet exec'd by us shows our parent's environment: ask again later
            self.not_ours.add(pid)

    def scan(self) -> list[int]:
        """The pids of the job's processes alive now (and what they map)."""
        with self._lock:
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) != os.getpid():
                    self._classify(int(entry))
            alive = [pid for pid in self.ours if _alive(pid)]
            for pid in alive:
                maps = _read(f"/proc/{pid}/maps")
                if maps and "/dev/shm/" in maps:
                    for found in re.finditer(r"/dev/shm/([^/\s]+)", maps):
                        self.shm_touched.add(found.group(1))
            if alive:
                self.gone_at = None
            elif self.ours and self.gone_at is None:
                self.gone_at = time.time()
            return alive

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.scan()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait_gone(self, timeout: float) -> list[str]:
        """``pid command line`` of the job's processes still alive after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            alive = self.scan()
            if not alive or time.monotonic() > deadline:
                return [f"{pid} {self.ours[pid][:160]}" for pid in alive]
            time.sleep(0.05)

    def kill_all(self) -> None:
        for pid in self.scan():
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass


def _state(pid: int) -> str | None:
    data = _read(f"/proc/{pid}/stat")
    try:
        return data.rsplit(")", 1)[1].split()[0] if data else None
    except IndexError:
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _owner_pid(name: str) -> int | None:
    found = re.match(r"^orch_[a-z]+_(\d+)_", name)
    return int(found.group(1)) if found else None


# --- one cell ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int | str | None = None
    report: str = ""
    t0: float | None = None  # the fault: the faulty rank's own clock, or when the signal was sent
    t_error: float | None = None  # when the report appeared
    t_gone: float | None = None  # when the last process of the job was seen alive
    after: str | None = None
    leftovers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: str = ""
    bad_pid: int | None = None  # the faulty rank's or worker's pid (for the caller faults: the caller's)
    headline: str | None = None  # the line the report starts with, when that is not its first line


class Cell:
    """The state of one (way, fault) run: its marker, environment, private TMPDIR and tracker."""

    def __init__(self, way: str, fault: str, tmp_path: Path):
        self.way, self.fault = way, fault
        self.marker = new_marker()
        self.tmpdir = tmp_path / "tmpdir"
        self.tmpdir.mkdir()
        self.fault_dir = tmp_path / "faults"
        self.fault_dir.mkdir()
        self.tmp_path = tmp_path
        env = project_env()
        env.update({
            MARKER_VARIABLE: self.marker,
            "TMPDIR": str(self.tmpdir),
            "ORCH_TIMEOUT": str(TIMEOUT),
            "ORCH_STOP_TIMEOUT": str(STOP_TIMEOUT),
            "STOP_TIMEOUT": str(STOP_TIMEOUT),
            "ORCH_SHM_MODE": SHM_MODE,
            "PYTHON": sys.executable,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        })
        self.env = env
        self.shm_before = _shm_entries()
        self.tracker = Tracker(self.marker)
        self.watched: list[Watched] = []

    def start(self, argv: list[str], name: str, env: dict | None = None) -> Watched:
        job = Watched(argv, self.env if env is None else env, name)
        self.tracker.add_root(job.proc.pid)
        self.watched.append(job)
        return job

    def zmq_ini(self) -> Path:
        ini = self.tmp_path / "config_file.ini"
        ini.write_text(f"[ascend_context]\nrank_table_file={TABLE}\n[comm]\nbase_port={free_base_port(2)}\n")
        return ini

    def finish(self, outcome: Outcome) -> None:
        """Wait for the job's processes to go, then collect what is left; kill and remove it.

        A job that never reported its failure is still running: it is killed at once (its
        processes are not counted as left behind, the missing report is the failure).
        """
        try:
            if outcome.t_error is None and outcome.t0 is not None and not self.fault.startswith("caller_"):
                outcome.notes.append("no error came: the test killed the job")
                return
            outcome.leftovers += self.tracker.wait_gone(LEFTOVER_WAIT)
            outcome.leftovers += [f"{line[:160]} (marker in command line)" for line in processes_with(self.marker)
                                  if not any(line.split()[0] == left.split()[0] for left in outcome.leftovers)]
            outcome.t_gone = self.tracker.gone_at
            new = _shm_entries() - self.shm_before
            ours = set(self.tracker.ours) | set(self.tracker.roots)
            mine = sorted(n for n in new if n in self.tracker.shm_touched or _owner_pid(n) in ours)
            outcome.leftovers += [f"/dev/shm/{n}" for n in mine if os.path.exists(f"/dev/shm/{n}")]
            foreign = len(new) - len(mine)
            if foreign:
                outcome.notes.append(f"{foreign} new /dev/shm entries of other jobs ignored")
            # .ses: onnxruntime's session id file, which every process that imports it shares
            outcome.leftovers += [f"$TMPDIR/{p.name}" for p in sorted(self.tmpdir.iterdir()) if p.name != ".ses"]
        finally:
            self.cleanup(outcome)

    def cleanup(self, outcome: Outcome) -> None:
        self.tracker.kill_all()
        kill_all(self.marker)
        for job in self.watched:
            job.kill()
        self.tracker.stop()
        outcome.log = "\n".join(job.text() for job in self.watched)
        for name in _shm_entries() - self.shm_before:
            if name in self.tracker.shm_touched or _owner_pid(name) in self.tracker.ours:
                subprocess.run(["rm", "-rf", f"/dev/shm/{name}"], check=False)


# --- the rank programs: orchestrate launch, the scripts, hand-started ranks --------------------------

FAULT_LINE = r"FAULT (\w+) rank (\d+) pid (\d+) at ([\d.]+)"
# What fault_rank.py prints about itself: never part of a report (it would name the faulty pid for the report).
OWN_LINES = re.compile(r"(JOINING|READY|CONNECTED|FAULT \w+|WAITING) rank \d+ pid \d+")
# Where the report begins: the error surfaces when this line arrives.
HEADLINES = {
    "launch-mpi": r"^orchestrate launch mpi: ",
    "launch-rank-table": r"^orchestrate launch rank-table: ",
    "run_ranks.sh": r"^run_ranks\.sh: ",
    "run_mpi.sh": r"^run_mpi\.sh: |^\[rank \d+\] \S*(CommTimeoutError|PeerLostError): ",
    "shell-ranks": r"^\S*(CommTimeoutError|PeerLostError|CommError): ",
}
SIGNALS = {"caller_kill": signal.SIGKILL, "caller_term": signal.SIGTERM, "caller_int": signal.SIGINT}


def run_rank_program(cell: Cell) -> Outcome:
    """Run fault_rank.py the cell's way in; the fault comes from the program itself, or a signal from here."""
    way, fault = cell.way, cell.fault
    outcome = Outcome()
    caller_fault = fault in SIGNALS
    kind = ("wait" if way == "shell-ranks" else "none") if caller_fault else fault
    program = [FAULT_RANK, "--fault", kind, "--bad-rank", "1", "--marker", cell.marker]
    if way == "launch-mpi":
        main = cell.start(orchestrate_command("launch", "mpi", "-n", "2", "--stop-timeout", str(STOP_TIMEOUT), "--",
                                              "python", *program), "launcher")
    elif way == "launch-rank-table":
        main = cell.start(orchestrate_command("launch", "rank-table", TABLE, "--config_file", str(cell.zmq_ini()),
                                              "--stop-timeout", str(STOP_TIMEOUT), "--", "python", *program), "launcher")
    elif way == "run_mpi.sh":
        main = cell.start(["bash", RUN_MPI, "2", "python", *program], "run_mpi.sh")
    elif way == "run_ranks.sh":
        main = cell.start(["bash", RUN_RANKS, TABLE, str(cell.zmq_ini()), sys.executable, *program], "run_ranks.sh")
    else:  # by hand: rank 0 is the one whose error the user reads; an absent rank 1 is never started
        ini = cell.zmq_ini()
        ranks = [0] if fault == "absent" else [0, 1]
        main = [cell.start([sys.executable, *program, f"--rank_id={r}", f"--device_id={r}", f"--config_file={ini}"],
                           f"rank {r}") for r in ranks][0]
    jobs = cell.watched

    def lines():
        return sorted((line for job in jobs for line in job.snapshot()), key=lambda line: line[0])

    def find(pattern: str, timeout: float):
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for t, _, text in lines():
                found = regex.search(text)
                if found:
                    return t, found
            if time.monotonic() > deadline or all(job.proc.poll() is not None for job in jobs):
                return None
            time.sleep(0.02)

    if caller_fault:
        waiting = [r"FAULT wait rank 1"] if way == "shell-ranks" else [r"WAITING rank 0", r"WAITING rank 1"]
        if any(find(pattern, 90) is None for pattern in waiting):
            outcome.notes.append("the ranks never got to wait")
            return outcome
        if way == "shell-ranks":  # no launcher: the signal goes to rank 1, while rank 0 waits for it
            victim = int(find(FAULT_LINE, 5)[1].group(3))
            time.sleep(0.3)
        else:
            victim = main.proc.pid
        outcome.bad_pid = victim
        outcome.t0 = time.time()
        os.kill(victim, SIGNALS[fault])
        if fault == "caller_kill":
            outcome.code = main.finish(30)
            return outcome
    elif fault == "absent" and way == "shell-ranks":
        joined = find(r"JOINING rank 0 pid \d+ at ([\d.]+)", 90)
        outcome.t0 = float(joined[1].group(1)) if joined else None
    else:
        found = find(FAULT_LINE, 90)
        if found is None:
            outcome.notes.append("no FAULT line: the ranks never got to the fault")
            outcome.code = main.finish(5)
            return outcome
        outcome.bad_pid = int(found[1].group(3))
        outcome.t0 = float(found[1].group(4))
        if fault == "absent":  # the hang starts when rank 0 begins to wait for rank 1
            joined = find(r"JOINING rank 0 pid \d+ at ([\d.]+)", 60)
            outcome.t0 = float(joined[1].group(1)) if joined else None

    pattern = HEADLINES[way]
    if way == "shell-ranks":
        found = main.wait_line(pattern, GIVE_UP, stream="err")
    else:
        found = find(pattern, GIVE_UP)
    if found is None:
        outcome.code = main.finish(1)
        return outcome
    outcome.t_error, outcome.headline = found[0], found[1].string
    if way == "shell-ranks" and fault == "sigstop":
        os.kill(outcome.bad_pid, signal.SIGCONT)  # the user continues it (fg): it must then fail on its own
    outcome.code = main.finish(30)
    for job in jobs:
        job.finish(10)
    if way == "shell-ranks":
        outcome.report = "\n".join(text for _, s, text in main.snapshot() if s == "err")
    elif way in ("launch-mpi", "launch-rank-table"):
        own = [text for _, s, text in main.snapshot() if s == "err" and not text.startswith(("[rank ", "[mpirun]"))]
        begin = next((i for i, text in enumerate(own) if re.search(pattern, text)), len(own))
        outcome.report = "\n".join(own[begin:])
    else:
        console = [text for _, _, text in lines() if not OWN_LINES.search(text)]
        if way in ("run_ranks.sh", "run_mpi.sh"):  # its own lines, then the console it leaves the rest of the story to
            own = [text for text in console if re.search(pattern, text)]
            console = own + [text for text in console if text not in own]
        outcome.report = "\n".join(console)
    return outcome


# --- ShardedModel and ParallelPredictor ----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            data = _read(f"/proc/{entry}/stat")
            try:
                if data and int(data.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (IndexError, ValueError):
                pass
    return found


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = _children(frontier.pop())
        found += children
        frontier += children
    return found


def _is_victim(pid: int, way: str) -> bool:
    """Rank 1 of a ShardedModel, or a worker of a ParallelPredictor, by its command line and environment."""
    argv = (_read(f"/proc/{pid}/cmdline") or "").split("\0")
    if way in ("parallel", "pool"):
        return "orchestrator._worker_main" in argv
    if "orchestrator._sharded_worker" not in argv:
        return False
    if any(a.endswith("_rank_wrapper.py") for a in argv):
        return False  # under mpirun: the rank's watcher, whose command line ends with the rank's; the rank is its child
    if "--rank" in argv:
        return argv[argv.index("--rank") + 1] == "1"
    return "OMPI_COMM_WORLD_RANK=1\0" in (_read(f"/proc/{pid}/environ") or "")


def _open_fifo(path: Path, caller: Watched, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.fdopen(os.open(path, os.O_WRONLY | os.O_NONBLOCK), "w", buffering=1)
        except OSError:
            if time.monotonic() > deadline or caller.proc.poll() is not None:
                return None
            time.sleep(0.02)


def run_caller(cell: Cell, models: dict) -> Outcome:
    way, fault = cell.way, cell.fault
    outcome = Outcome()
    fifo = cell.tmp_path / "commands"
    os.mkfifo(fifo)
    env = dict(cell.env)
    env["PYTHONPATH"] = FAULT_HOOKS + os.pathsep + env["PYTHONPATH"]
    env["FAULT_MATRIX_DIR"] = str(cell.fault_dir)
    if way == "parallel":
        argv = [sys.executable, FAULT_CALLER, "parallel", str(models["model"]), "--commands", str(fifo),
                "--timeout", str(TIMEOUT), "--build-timeout", str(TIMEOUT if fault == "absent" else 60)]
    elif way == "pool":
        argv = [sys.executable, FAULT_CALLER, "pool", str(models["model"]), "--commands", str(fifo),
                "--timeout", str(TIMEOUT)]
        if fault != "absent":
            env["ORCH_TIMEOUT"] = "60"  # the build's bound: only the absent cell waits it out
    else:
        argv = [sys.executable, FAULT_CALLER, "sharded", str(models["shards"]), "--commands", str(fifo),
                "--backend", way.split("-")[1], "--timeout", str(TIMEOUT), "--build-timeout", str(GIVE_UP)]
    caller = cell.start(argv, "caller", env=env)

    if fault == "absent":
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline and caller.proc.poll() is None:
            victim = next((p for p in _descendants(caller.proc.pid) if _is_victim(p, way)), None)
            if victim is None:
                time.sleep(0.01)
        if victim is None:
            outcome.notes.append("never saw the process to stop")
            return outcome
        os.kill(victim, signal.SIGSTOP)
        outcome.t0 = time.time()
        outcome.bad_pid = victim
        found = caller.wait_line(r"^BUILD ([\d.]+) (\w+)", GIVE_UP, stream="out")
        if found is None:
            caller.finish(1)
            return outcome
        outcome.t_error = float(found[1].group(1))
        outcome.code = found[1].group(2)
        outcome.report = _error_text(caller, "BUILD")
        caller.finish(30)
        return outcome

    ready = caller.wait_line(r"^PIDS (.*)$", 120, stream="out")
    if ready is None or caller.wait_line(r"^READY$", 10, stream="out") is None:
        outcome.notes.append("the caller never got ready")
        outcome.code = "never ready"
        return outcome
    pids = json.loads(ready[1].group(1))
    commands = _open_fifo(fifo, caller)
    if commands is None:
        outcome.notes.append("could not open the command pipe")
        return outcome
    try:
        if fault in SIGNALS:
            outcome.t0 = time.time()
            os.kill(caller.proc.pid, SIGNALS[fault])
            outcome.bad_pid = caller.proc.pid
            outcome.code = caller.finish(30)
            if outcome.code is None:
                caller.stacks()
            return outcome
        victim = pids[1]
        outcome.bad_pid = victim
        if fault == "stop_close":
            os.kill(victim, signal.SIGSTOP)
            while _state(victim) not in ("T", None):
                time.sleep(0.01)
            outcome.t0 = time.time()
            commands.write("close\n")
            closed = caller.wait_line(r"^CLOSED ([\d.]+)", GIVE_UP, stream="out")
            if closed is not None:
                outcome.t_error = closed[0]
                outcome.headline = f"close() returned after {float(closed[1].group(1)):.2f} s"
            outcome.code = caller.finish(30 if closed else 1)
            return outcome
        (cell.fault_dir / f"fault.{victim}").write_text(fault)
        commands.write("predict\n")
        found = caller.wait_line(r"^ERROR ([\d.]+) (\w+)", GIVE_UP, stream="out")
        fired = _read(str(cell.fault_dir / f"fired.{victim}"))
        if fired:
            outcome.t0 = float(fired.split()[1])
        if found is None:
            if caller.wait_line(r"^OK ", 0.1, stream="out"):
                outcome.code = "no error"
            return outcome
        outcome.t_error = float(found[1].group(1))
        outcome.code = found[1].group(2)
        outcome.report = _error_text(caller, "ERROR")
        after = caller.wait_line(r"^AFTER (.*)$", 30, stream="out")
        outcome.after = after[1].group(1) if after else None
        commands.write("close\n")
        closed = caller.wait_line(r"^CLOSED ([\d.]+)", 30, stream="out")
        if closed is not None and float(closed[1].group(1)) > DEATH_BOUND:
            outcome.notes.append(f"close() took {float(closed[1].group(1)):.1f} s")
        caller.finish(30)
        return outcome
    finally:
        try:
            commands.close()
        except OSError:
            pass


def _error_text(caller: Watched, word: str) -> str:
    out = [text for _, s, text in caller.snapshot() if s == "out"]
    start = next(i for i, text in enumerate(out) if text.startswith(word + " "))
    body = []
    for text in out[start + 1:]:
        if text == "END":
            break
        body.append(text[2:] if text.startswith("| ") else text[1:])
    return "\n".join(body)


# --- checks and the table ---------------------------------------------------------------------------------

ROWS: list[dict] = []


def _render(rows: list[dict]) -> str:
    header = ["cell", "result", "to error", "all gone", "code", "report named", "leftovers"]
    table = [header, ["---"] * len(header)]
    for row in rows:
        table.append([row[k] for k in ("cell", "result", "to_error", "gone", "code", "named", "leftovers")])
    return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in table)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    yield ROWS
    if ROWS:
        path = tmp_path_factory.getbasetemp() / "fault_matrix.md"
        text = (f"Fault matrix: TIMEOUT {TIMEOUT:g} s, death bound {DEATH_BOUND:g} s, hang bound {HANG_BOUND:g} s "
                f"(1 s + {LOAD_SLACK:g} s load slack), ORCH_SHM_MODE={SHM_MODE}\n\n" + _render(ROWS) + "\n")
        notes = [f"- {row['cell']}: {row['notes']}" for row in ROWS if row["notes"]]
        if notes:
            text += "\nNotes:\n" + "\n".join(notes) + "\n"
        path.write_text(text)
        print(f"\n{text}\n(written to {path})")


@pytest.fixture(scope="module")
def models(sample, tmp_path_factory):
    from orchestrator import shard_model

    model = sample("mlp")
    shards = shard_model(model, 2, tmp_path_factory.mktemp("matrix_shards"), progress=False)
    return {"model": model, "shards": shards.model_path}


def _check(cell: Cell, expect: Expect, outcome: Outcome) -> list[str]:
    problems = []
    pid = outcome.bad_pid
    if isinstance(expect.code, int):
        if outcome.code != expect.code:
            problems.append(f"exit status {outcome.code}, expected {expect.code}")
    elif outcome.code is None or not re.fullmatch(expect.code, str(outcome.code)):
        problems.append(f"the caller got {outcome.code}, expected {expect.code}")
    for pattern in expect.report:
        regex = pattern.replace("<host>", re.escape(HOST)).replace("<pid>", str(pid))
        if not re.search(regex, outcome.report):
            problems.append(f"the report does not match {regex!r}")
    if expect.after is not None and not (outcome.after and re.search(expect.after, outcome.after)):
        problems.append(f"the next predict gave {outcome.after!r}, expected {expect.after!r}")
    if outcome.t0 is None:
        problems.append("no time for the fault")
    elif expect.bound in ("death", "hang", "close"):
        bound = HANG_BOUND if expect.bound == "hang" else DEATH_BOUND
        if outcome.t_error is None:
            problems.append("no error surfaced" if expect.bound != "close" else f"close() did not return within {GIVE_UP:g} s")
        elif outcome.t_error - outcome.t0 > bound:
            problems.append(f"the error came {outcome.t_error - outcome.t0:.2f} s after the fault (bound {bound:g} s)")
    else:
        if outcome.t_gone is not None and outcome.t_gone - outcome.t0 > DEATH_BOUND:
            problems.append(f"the job's processes took {outcome.t_gone - outcome.t0:.2f} s to go (bound {DEATH_BOUND:g} s)")
        if outcome.t_error is not None and outcome.t_error - outcome.t0 > DEATH_BOUND:
            problems.append(f"the report came {outcome.t_error - outcome.t0:.2f} s after the signal")
    if outcome.leftovers:
        problems.append("left behind: " + "; ".join(outcome.leftovers))
    return problems


def _named(way: str, outcome: Outcome) -> str:
    lines = outcome.report.splitlines()
    text = outcome.headline or (lines or [""])[0]
    if way in ("sharded-mpi", "sharded-zmq") and text.startswith(("predict request", "starting")) and len(lines) > 1:
        text += " / " + lines[1]
    if way == "run_mpi.sh" and text in lines and "prterun" in text:  # mpirun wraps its sentence
        text += " " + lines[lines.index(text) + 1] if lines.index(text) + 1 < len(lines) else ""
    text = re.sub(r"\s+", " ", text).strip()
    return (text[:150] + "...") if len(text) > 150 else text or "-"


def _params():
    for way in WAYS:
        for fault in FAULTS:
            expect = MATRIX.get((way, fault))
            if expect is None:
                continue
            bug = FAILING_TODAY.get((way, fault))
            marks = [pytest.mark.xfail(strict=(way, fault) not in RACES, reason=bug)] if bug else []
            yield pytest.param(way, fault, id=f"{way}-{fault}", marks=marks)


def _run_cell(way: str, fault: str, tmp_path: Path, models: dict) -> tuple[Cell, Outcome]:
    cell = Cell(way, fault, tmp_path)
    outcome = Outcome()
    try:
        outcome = run_rank_program(cell) if way in RANK_PROGRAM_WAYS else run_caller(cell, models)
    except Exception as exc:  # noqa: BLE001 - the cell's own check reports it
        outcome.notes.append(f"the cell's driver raised {exc!r}")
    finally:
        cell.finish(outcome)
    return cell, outcome


@pytest.fixture(scope="module")
def cells(request, models, tmp_path_factory):
    """Every selected cell, started in test order on a pool of ``CONCURRENT_CELLS`` threads; {(way, fault): future}.

    A cell mostly waits (for a timeout, a death, processes to go), so two at a time halve the matrix's
    time on 2 cores; the bounds' load slack covers the other cell's load. Cells share nothing: each has
    its own marker, TMPDIR, fault directory and free ports, and counts only its own processes and
    /dev/shm entries (another cell's are "of other jobs"). Each test waits for its own cell.
    """
    selected = [tuple(item.callspec.params[k] for k in ("way", "fault")) for item in request.session.items
                if item.module is request.module and getattr(item, "originalname", "") == "test_cell"]
    pool = concurrent.futures.ThreadPoolExecutor(CONCURRENT_CELLS, thread_name_prefix="fault-matrix cell")
    futures = {key: pool.submit(_run_cell, *key, tmp_path_factory.mktemp(f"{key[0]}-{key[1]}"), models)
               for key in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("way, fault", list(_params()))
def test_cell(way, fault, table, cells):
    expect = MATRIX[way, fault]
    cell, outcome = cells[way, fault].result(timeout=170)
    problems = _check(cell, expect, outcome)
    to_error = f"{outcome.t_error - outcome.t0:.2f} s" if outcome.t_error and outcome.t0 else "-"
    gone = f"{outcome.t_gone - outcome.t0:.2f} s" if outcome.t_gone and outcome.t0 else "-"
    result = "ok" if not problems else ("XFAIL" if (way, fault) in FAILING_TODAY else "FAIL")
    row = {"cell": f"{way} x {fault}", "result": result, "to_error": to_error, "gone": gone, "code": outcome.code,
           "named": _named(way, outcome), "leftovers": "; ".join(outcome.leftovers) or "none",
           "notes": "; ".join(outcome.notes + problems)}
    table.append(row)
    print(f"\n{row}")
    assert not problems, "\n".join(problems) + f"\n--- report:\n{outcome.report}\n--- output:\n{outcome.log[-6000:]}"


def test_the_matrix_covers_every_cell_once():
    every = {(w, f) for w in WAYS for f in FAULTS}
    assert set(MATRIX) | set(NOT_APPLICABLE) == every
    assert not set(MATRIX) & set(NOT_APPLICABLE)
    assert set(FAILING_TODAY) <= set(MATRIX)
    listed = __doc__.split("Not applicable")[1].split("Cells that fail")[0]
    bullets = [b.replace("\n", " ") for b in listed.split("\n- ")[1:]]
    for (way, fault), reason in NOT_APPLICABLE.items():
        assert reason and any(b.startswith(f"{fault} x ") and way in b.split(":")[0] for b in bullets), (way, fault)

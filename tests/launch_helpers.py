"""Helpers for the launcher tests: unique markers, leftover checks, a launcher run in the background."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

from conftest import ROOT, project_env

PROGRAM = str(ROOT / "tests" / "programs" / "rank_program.py")
MPI_PROGRAM = str(ROOT / "tests" / "programs" / "mpi_rank.py")
ZMQ_PROGRAM = str(ROOT / "tests" / "programs" / "zmq_rank.py")


def new_marker() -> str:
    return f"orchtest{uuid.uuid4().hex[:12]}"


def processes_with(marker: str) -> list[str]:
    """``pid command line`` of every live process whose command line holds ``marker`` (like pgrep -af)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if marker in cmdline and alive(int(entry)):
            found.append(f"{entry} {cmdline}")
    return found


def shm_segments_of(pids) -> list[str]:
    """/dev/shm segments created by any of ``pids`` (the communicators put the creator's pid in the name)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith("orch_") and any(f"_{pid}_" in n for pid in pids))


def private_tmp(monkeypatch, tmp_path) -> Path:
    """A TMPDIR of the test's own for the processes it starts, so what they leave there is theirs."""
    path = tmp_path / "tmpdir"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    return path


def orch_dirs(tmpdir: Path) -> list[str]:
    """``orch_*`` files or directories in ``tmpdir``."""
    return sorted(p.name for p in tmpdir.glob("orch_*"))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return [p for p in found if alive(p)]


def kill_all(marker: str) -> None:
    """SIGKILL whatever a failed test left running (processes whose command line holds ``marker``)."""
    for line in processes_with(marker):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def leftovers(marker: str, wait: float = 5.0) -> list[str]:
    """Processes whose command line holds ``marker`` (waits up to ``wait`` s for dying ones to go)."""
    deadline = time.monotonic() + wait
    while True:
        found = processes_with(marker)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, T for stopped, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z", "X")


def wait_stopped(pids, wait: float = 30.0) -> None:
    """Wait until every pid is stopped (SIGSTOP, state T)."""
    deadline = time.monotonic() + wait
    while not all(state(pid) == "T" for pid in pids):
        assert time.monotonic() < deadline, f"not all stopped: {[(pid, state(pid)) for pid in pids]}"
        time.sleep(0.05)


def pids_in(lines, text: str = "hello from rank") -> list[int]:
    """The pids the test programs print ("... pid 123 ...") on the lines holding ``text``."""
    return [int(line.split(" pid ")[1].split()[0]) for line in lines if text in line and " pid " in line]


def wait_gone(pids, wait: float = 5.0) -> list[int]:
    deadline = time.monotonic() + wait
    while True:
        left = [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


class Background:
    """A command started in the background whose output lines are collected as they come."""

    def __init__(self, argv: list[str], cwd=ROOT, env=None):
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=project_env() if env is None else env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(pipe, into):
        for line in pipe:
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.out + self.err) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None and not self._threads[0].is_alive():
                raise AssertionError(
                    f"{text!r} did not appear {count} time(s):\nstdout:\n" + "\n".join(self.out)
                    + "\nstderr:\n" + "\n".join(self.err)
                )
            time.sleep(0.05)

    def interrupt(self, signum=signal.SIGINT) -> None:
        os.kill(self.proc.pid, signum)

    def finish(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for t in self._threads:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

"""Helpers for the multi-process communicator tests: free ports, mpirun, rank processes, leftovers."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ranks import free_base_port  # noqa: F401  re-exported for the comm tests

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def env_with_marker() -> tuple[dict[str, str], str]:
    """The project importable, plus a marker that finds our processes again."""
    marker = secrets.token_hex(8)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["ORCH_TEST_MARKER"] = marker
    env.pop("ORCH_COMM_BACKEND", None)
    for name in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env, marker


def processes_with_marker(marker: str) -> list[int]:
    found = []
    needle = f"ORCH_TEST_MARKER={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] == "Z":
                            continue
                    found.append(int(entry))
        except OSError:
            continue
    return found


def assert_none_left(marker: str, grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    while True:
        left = processes_with_marker(marker)
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            raise AssertionError(f"processes left running: {left}")
        time.sleep(0.1)


def orch_segments() -> set[str]:
    """Communicator segments in /dev/shm whose owner (the pid in the name) is gone: leftovers.

    Segments of owners still running (another job on this machine) are not counted.
    """
    try:
        names = [n for n in os.listdir("/dev/shm") if n.startswith(("orch_zmq_", "orch_mpi_"))]
    except OSError:
        return set()
    return {n for n in names if not _running(n.split("_")[2])}


def _running(pid: str) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def mpirun_command(n: int, *args: str) -> list[str]:
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun) if mpirun.exists() else (shutil.which("mpirun") or "mpirun"), "-n", str(n)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if n > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    return cmd + [sys.executable, *args]


def have_mpirun() -> bool:
    return (Path(sys.executable).parent / "mpirun").exists() or shutil.which("mpirun") is not None


def run_mpi(n: int, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, float, str]:
    env, marker = env_with_marker()
    start = time.monotonic()
    proc = subprocess.Popen(
        mpirun_command(n, *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"mpirun did not finish within {timeout} s:\n{out}")
    finally:
        assert_none_left(marker)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), time.monotonic() - start, marker


def run_ranks(commands: list[list[str] | None], *, timeout: float, prefix: list[list[str]] | None = None,
              wait_for: list[int] | None = None):
    """Start one process per command (None: that rank is not started); wait for all, bounded.

    ``wait_for``: only wait for these ranks, then kill the others (a rank that hangs on purpose).
    Returns ([(returncode, output)], seconds). Kills everything left at the end.
    """
    env, marker = env_with_marker()
    procs = []
    start = time.monotonic()
    for i, cmd in enumerate(commands):
        if cmd is None:
            procs.append(None)
            continue
        full = (prefix[i] if prefix else []) + [sys.executable, *cmd]
        procs.append(subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    results = []
    try:
        if wait_for is not None:
            for i in wait_for:
                try:
                    procs[i].wait(timeout=max(0.1, timeout - (time.monotonic() - start)))
                except subprocess.TimeoutExpired:
                    pass
            for i, proc in enumerate(procs):
                if i not in wait_for and proc is not None and proc.poll() is None:
                    proc.kill()
        for proc in procs:
            if proc is None:
                results.append((None, ""))
                continue
            remaining = max(0.1, timeout - (time.monotonic() - start))
            try:
                out, _ = proc.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                out += f"\n[test: killed after {timeout} s]"
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        assert_none_left(marker)
    return results, time.monotonic() - start


def write_local_table(path: Path, n: int) -> Path:
    from ranks import generate_rank_table

    generate_rank_table([("127.0.0.1", list(range(n)))]).dump(path)
    return path

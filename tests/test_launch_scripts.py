"""The shell entry points: launchers/run_ranks.sh and launchers/run_mpi.sh, run as a user would."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, project_env, run_command
from launch_helpers import (
    MPI_PROGRAM, PROGRAM, ZMQ_PROGRAM, Background, descendants, kill_all, leftovers, new_marker, orch_dirs, pids_in,
    private_tmp, processes_with, shm_segments_of, wait_gone,
)
from ranks import free_base_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.cli]

RUN_RANKS = str(ROOT / "launchers" / "run_ranks.sh")
RUN_MPI = str(ROOT / "launchers" / "run_mpi.sh")
TABLE = str(ROOT / "rank_tables" / "local_2p.json")


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "config_file.ini"
    path.write_text(f"[ascend_context]\nrank_table_file={TABLE}\n")
    return path


@pytest.fixture(autouse=True)
def venv_first(monkeypatch):
    # the scripts find python3 and mpirun on PATH: put this interpreter's directory first
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("PYTHON", sys.executable)


@pytest.mark.timeout(60)
def test_run_ranks_starts_each_rank_with_its_flags(ini):
    result = run_command(["bash", RUN_RANKS, TABLE, str(ini), sys.executable, PROGRAM])
    assert result.returncode == 0, result.stderr
    for r in range(2):
        assert any(l.startswith(f"[rank {r}] hello from rank {r} of 2 pid ") and l.endswith(f"device {r} config {ini} local_rank {r}")
                   for l in result.stdout.splitlines()), result.stdout
        assert f"[rank {r}] rank {r} done" in result.stdout
    assert "run_ranks.sh" not in result.stderr, result.stderr  # ranks that end together are no early exit


@pytest.mark.timeout(60)
def test_run_ranks_fails_with_the_failed_rank_status_and_stops_the_rest(ini):
    marker = new_marker()
    result = run_command(["bash", RUN_RANKS, TABLE, str(ini), sys.executable, PROGRAM,
                          "--bad-rank", "1", "--bad", "exit3", "--others", "hang", "--delay", "0.5", "--marker", marker])
    assert result.returncode == 3, result.stderr
    assert re.search(r"^run_ranks.sh: rank 1 on host \S+ \(pid \d+\) failed: exit code 3$", result.stderr, re.M), result.stderr
    assert "run_ranks.sh: rank 1 ended with status 3; stopping the other ranks" in result.stderr
    # the pid named is the program's own (it prints it), not its watcher's
    [pid] = pids_in(result.stdout.splitlines(), "hello from rank 1")
    assert f"(pid {pid}) failed" in result.stderr
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_run_ranks_reports_a_signal(ini):
    marker = new_marker()
    result = run_command(["bash", RUN_RANKS, TABLE, str(ini), sys.executable, PROGRAM,
                          "--bad-rank", "0", "--bad", "sigkill", "--others", "hang", "--delay", "0.5", "--marker", marker])
    assert result.returncode == 137, result.stderr
    assert "failed: signal SIGKILL" in result.stderr
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_run_ranks_ctrl_c_stops_every_rank(ini):
    marker = new_marker()
    script = Background(["bash", RUN_RANKS, TABLE, str(ini), sys.executable, PROGRAM,
                         "--others", "hang", "--grandchild", "--marker", marker])
    try:
        script.wait_for("waits forever", count=2)
        script.interrupt(signal.SIGINT)
        assert script.finish(30) == 130, script.stderr
    finally:
        script.kill()
    assert "run_ranks.sh: interrupted by SIGINT, stopping every rank" in script.stderr
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_run_ranks_sigkilled_takes_its_ranks_with_it(tmp_path, monkeypatch):
    # the script cannot trap SIGKILL: each rank runs under a watcher that goes, with its rank, when the script goes
    import time

    ini = tmp_path / "zmq.ini"
    ini.write_text(f"[ascend_context]\nrank_table_file={TABLE}\n[comm]\nbase_port={free_base_port(2)}\ntimeout=60\n")
    tmpdir = private_tmp(monkeypatch, tmp_path)
    marker = new_marker()
    # rank 1 waits forever, rank 0 waits for it in a collective (through shared memory)
    script = Background(["bash", RUN_RANKS, TABLE, str(ini), sys.executable, ZMQ_PROGRAM,
                         "--bad-rank", "1", "--bad", "hang", "--marker", marker])
    try:
        script.wait_for("waits forever", count=2)
        below = descendants(script.proc.pid)  # the ranks and whatever helps the script run them
        ranks = pids_in(script.out, "connected")
        assert len(ranks) == 2 and set(ranks) <= set(below), (ranks, below)
        script.interrupt(signal.SIGKILL)
        assert script.finish(30) == -signal.SIGKILL
        started = time.monotonic()
        left = wait_gone(below, wait=10)
        took = time.monotonic() - started
        assert not left, "\n".join(line for line in processes_with("") if int(line.split()[0]) in left)
    finally:
        script.kill()
        kill_all(marker)
    assert took < 5, took
    assert not leftovers(marker, wait=1)
    assert not shm_segments_of(ranks)
    assert not orch_dirs(tmpdir)


def test_run_ranks_rejects_a_bad_table(tmp_path, ini):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "2.0"}')
    result = run_command(["bash", RUN_RANKS, str(bad), str(ini), "true"])
    assert result.returncode == 2 and "run_ranks.sh: rank table" in result.stderr
    result = run_command(["bash", RUN_RANKS, TABLE])
    assert result.returncode == 2 and "usage:" in result.stderr


def test_run_ranks_checks_the_ini_before_starting_a_rank(tmp_path):
    bad = tmp_path / "config_file.ini"
    bad.write_text("[ascend_context]\nrank_table_file = nowhere.json\n")
    marker = new_marker()
    result = run_command(["bash", RUN_RANKS, TABLE, str(bad), sys.executable, PROGRAM, "--others", "hang", "--marker", marker],
                         timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"run_ranks.sh: {bad}: rank_table_file {tmp_path / 'nowhere.json'} does not exist"]
    assert not leftovers(marker)


@pytest.mark.timeout(120)
def test_run_mpi_three_ranks_tagged_and_oversubscribed():
    result = run_command(["bash", RUN_MPI, "3", "python", MPI_PROGRAM])
    assert result.returncode == 0, result.stderr
    assert sorted(l for l in result.stdout.splitlines() if "allreduce" in l) == [
        f"[rank {r}] rank {r} allreduce sum 3" for r in range(3)
    ]
    assert "run_mpi.sh" not in result.stderr, result.stderr  # ranks that end together are no early exit


@pytest.mark.timeout(120)
def test_run_mpi_fails_when_a_rank_fails():
    marker = new_marker()
    result = run_command(["bash", RUN_MPI, "2", "python", "-m", "mpi4py", MPI_PROGRAM, "--bad-rank", "1", "--marker", marker])
    assert result.returncode != 0
    assert "RuntimeError: mpi rank 1 broke on purpose" in result.stdout + result.stderr
    assert not leftovers(marker)


# --- the fault matrix's faults, as regular tests (tests/test_fault_matrix.py crosses them all) ----------
FAULT_RANK = str(ROOT / "tests" / "programs" / "fault_rank.py")
HOST = socket.gethostname()


def _fault_env(tmp_path) -> dict[str, str]:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return {**project_env(), "ORCH_TIMEOUT": "10", "STOP_TIMEOUT": "3", "TMPDIR": str(tmpdir)}


def _fault_pid(text: str) -> int:
    [pid] = re.findall(r"^\[rank 1\] FAULT \w+ rank 1 pid (\d+) at", text, re.M)
    return int(pid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["raise", "raise_in_with"])
def test_run_mpi_names_a_rank_that_aborted_the_job_by_its_own_pid(tmp_path, fault):
    # mpirun's report named it "rank 1 with PID 0" (MPI_Abort), and the abort left a NUL byte in the output
    marker = new_marker()
    result = subprocess.run(["bash", RUN_MPI, "2", "python", FAULT_RANK, "--fault", fault, "--marker", marker],
                            env=_fault_env(tmp_path), capture_output=True, text=True, timeout=100)
    assert result.returncode == 1, result.stderr
    own = [line for line in result.stderr.splitlines() if line.startswith("run_mpi.sh: ")]
    assert own == [f"run_mpi.sh: rank 1 on host {HOST} (pid {_fault_pid(result.stdout)}) failed: exit code 1"], result.stderr
    assert "\0" not in result.stderr
    assert not leftovers(marker)
    assert not [p.name for p in (tmp_path / "tmpdir").iterdir() if p.name != ".ses"]  # onnxruntime's id file aside


@pytest.mark.timeout(120)
def test_run_mpi_names_a_rank_that_left_with_exit_code_0(tmp_path):
    # mpirun named the rank's watcher's pid ("exiting improperly")
    marker = new_marker()
    result = subprocess.run(["bash", RUN_MPI, "2", "python", FAULT_RANK, "--fault", "exit0", "--marker", marker],
                            env=_fault_env(tmp_path), capture_output=True, text=True, timeout=100)
    assert result.returncode == 1, result.stderr
    own = [line for line in result.stderr.splitlines() if line.startswith("run_mpi.sh: ")]
    assert own == [f"run_mpi.sh: rank 1 on host {HOST} (pid {_fault_pid(result.stdout)}) exited with exit code 0 "
                   f"while rank 0 was still running"], result.stderr
    assert not leftovers(marker)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_run_mpi_stops_every_rank_on_sigterm_and_sigint_with_the_shells_status(tmp_path, signum, code):
    # it exec'd mpirun, which stopped the job but exited 1
    marker = new_marker()
    script = Background(["bash", RUN_MPI, "2", "python", FAULT_RANK, "--fault", "none", "--marker", marker],
                        env=_fault_env(tmp_path))
    try:
        script.wait_for("WAITING rank", count=2)
        script.interrupt(signum)
        assert script.finish(30) == code, script.stderr
    finally:
        script.kill()
    name = signal.Signals(signum).name
    assert script.stderr.splitlines()[0] == f"run_mpi.sh: interrupted by {name}, stopping every rank", script.stderr
    assert not leftovers(marker)


@pytest.mark.timeout(120)
def test_run_mpi_sigkilled_takes_mpirun_and_its_ranks_with_it(tmp_path):
    # mpirun (exec'd by the script) left its ranks running when SIGKILLed; now mpirun dies with the script
    marker = new_marker()
    script = Background(["bash", RUN_MPI, "2", "python", FAULT_RANK, "--fault", "none", "--marker", marker],
                        env=_fault_env(tmp_path))
    try:
        script.wait_for("WAITING rank", count=2)
        below = descendants(script.proc.pid)
        ranks = pids_in(script.out, "WAITING rank")
        assert len(ranks) == 2 and set(ranks) <= set(below), (ranks, below)
        script.interrupt(signal.SIGKILL)
        assert script.finish(30) == -signal.SIGKILL
        left = wait_gone(below, wait=10)
        assert not left, "\n".join(line for line in processes_with("") if int(line.split()[0]) in left)
    finally:
        script.kill()
        kill_all(marker)
    assert not leftovers(marker, wait=1)
    assert not [p.name for p in (tmp_path / "tmpdir").iterdir() if p.name != ".ses"]  # onnxruntime's id file aside


@pytest.mark.timeout(120)
def test_run_ranks_names_a_rank_that_left_with_exit_code_0_not_its_victim(tmp_path):
    # run_ranks.sh named rank 0, which lost its peer, as the failed rank
    marker = new_marker()
    ini = tmp_path / "zmq.ini"
    ini.write_text(f"[ascend_context]\nrank_table_file={TABLE}\n[comm]\nbase_port={free_base_port(2)}\n")
    result = subprocess.run(["bash", RUN_RANKS, TABLE, str(ini), sys.executable, FAULT_RANK, "--fault", "exit0",
                             "--marker", marker], env=_fault_env(tmp_path), capture_output=True, text=True, timeout=100)
    assert result.returncode == 1, result.stderr
    own = [line for line in result.stderr.splitlines() if line.startswith("run_ranks.sh: ")]
    assert own[0] == (f"run_ranks.sh: rank 1 on host {HOST} (pid {_fault_pid(result.stdout)}) exited with exit code 0 "
                      f"while rank 0 was still running"), result.stderr
    assert not leftovers(marker)

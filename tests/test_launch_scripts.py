"""The shell entry points: launchers/run_ranks.sh and launchers/run_mpi.sh, run as a user would.

How they fail (a rank that raises, exits 0 early, is killed or stopped; the script interrupted or killed)
is the fault matrix's (``test_fault_matrix.py``, ways run_mpi.sh and run_ranks.sh): it checks each report's
line, exit code, time and leftovers."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_command
from launch_helpers import MPI_PROGRAM, PROGRAM, leftovers, new_marker, pids_in

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

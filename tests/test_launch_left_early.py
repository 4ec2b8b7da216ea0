"""The launchers' report when a rank leaves with exit code 0 while its peers wait for it.

Under ``orchestrate launch rank-table`` the peers fail with a PeerLostError that names it; the rank
that left is the root cause, not the first of its victims (found by the fault matrix, in its cell
"launch rank-table x exit(0)").
"""

from __future__ import annotations

from launchers._failures import RankExit, failure_error, left_early, split_failures


def _lost(rank: int, peer: int, at: float) -> RankExit:
    line = f"ranks._errors.PeerLostError: allreduce #2 on rank {rank} of 3: rank {peer} (pid 1{peer} on host h) exited"
    return RankExit(rank, "h", 10 + rank, 1, None, at, ("Traceback (most recent call last):", line), last_output=at - 0.01)


def test_a_rank_that_left_with_code_0_is_the_root_cause_of_the_peer_losses_that_name_it():
    left = RankExit(1, "h", 11, 0, None, 1.0, ("FAULT exit0",), last_output=0.9)
    exits = [_lost(0, 1, 1.2), left, _lost(2, 1, 1.3)]
    error = failure_error(exits, 3)
    assert error.first is left and [e.rank for e in error.failures] == [1, 0, 2]
    lines = str(error).splitlines()
    assert lines[0] == ("rank 1 of 3 on host h (pid 11) exited with exit code 0 before the job finished, "
                        "while ranks 0, 2 were still running")
    assert "what followed (the other ranks that failed; those that lost a peer come last):" in lines
    assert lines[-2].startswith("  rank 0 on host h (pid 10) failed: exit code 1 at ")
    assert lines[-1].endswith("rank 1 (pid 11 on host h) exited")
    assert (error.first.shell_code or 1) == 1  # what orchestrate launch exits with


def test_a_rank_that_finished_is_not_blamed_for_other_failures():
    done = RankExit(2, "h", 12, 0, None, 1.0, ("done",))
    # a real failure of its own: the usual report
    crash = RankExit(1, "h", 11, None, "SIGKILL", 1.1, ())
    assert failure_error([done, crash, _lost(0, 1, 1.2)], 3).first is crash
    # a peer loss that names another rank
    assert left_early([done, _lost(0, 1, 1.2)], split_failures([done, _lost(0, 1, 1.2)])[0]) is None
    # a rank that ended after the failure
    late = RankExit(1, "h", 11, 0, None, 2.0, ("done",))
    assert left_early([late, _lost(0, 1, 1.2)], [_lost(0, 1, 1.2)]) is None


def test_under_mpi_the_peer_lost_line_is_read_before_the_abort_line_that_follows_it():
    # The MPI door's peer writes its PeerLostError, then "uncaught PeerLostError; aborting the MPI job": the rank
    # it lost is named in the first of the two.
    left = RankExit(1, "h", 11, 0, None, 1.0, ("FAULT exit0",), last_output=0.9)
    lost = RankExit(0, "h", 10, 1, None, 1.6, (
        "ranks._errors.PeerLostError: allreduce #2 on rank 0 of 2: rank 1 (pid 11) exited after operation #1 "
        "(allreduce) without closing its communicator and will make no more calls",
        "rank 0 of 2: uncaught PeerLostError; aborting the MPI job so the other ranks do not wait",
    ), last_output=1.5)
    error = failure_error([lost, left], 2)
    assert error.first is left
    assert str(error).splitlines()[0] == ("rank 1 of 2 on host h (pid 11) exited with exit code 0 before the job "
                                          "finished, while rank 0 was still running")


def test_ranks_that_only_lost_a_peer_on_another_host_name_that_peer_first():
    # Host a's launcher saw ranks 0 and 1 fail, each losing rank 3, which ran on host b: rank 3 is the root
    # cause, so it heads host a's report (host b's report says how it ended).
    def lost(rank: int, at: float) -> RankExit:
        line = (f"ranks._errors.PeerLostError: allreduce #2 on rank {rank} of 4: lost rank 3 (pid 3500 on host hostb) "
                f"at tcp://10.0.0.2:29503 (its connection closed: the process exited or died; waited 0.6 s)")
        return RankExit(rank, "hosta", 10 + rank, 1, None, at, ("Traceback (most recent call last):", line),
                        last_output=at - 0.01)

    error = failure_error([lost(1, 1.0), lost(0, 1.1)], 4)
    lines = str(error).splitlines()
    assert lines[0] == ("rank 3 (pid 3500 on host hostb), on another host, was lost first: the 2 ranks here failed "
                        "because of it (see that host's report for how it ended)")
    assert lines[1].startswith("rank 1 of 4 on host hosta (pid 11) failed (first of 2 failed ranks): exit code 1")
    # A peer on this host, or one that does not say where it ran, keeps the usual report.
    same = RankExit(0, "hostb", 10, 1, None, 1.0, ("PeerLostError: allreduce #2 on rank 0 of 4: lost rank 3 (pid 3500 on host hostb)",))
    assert str(failure_error([same], 4)).startswith("rank 0 of 4 on host hostb (pid 10) failed: exit code 1")
    mpi = RankExit(0, "hosta", 10, 1, None, 1.0, ("PeerLostError: allreduce #2 on rank 0 of 2: rank 1 (pid 11) exited",))
    assert str(failure_error([mpi], 2)).startswith("rank 0 of 2 on host hosta (pid 10) failed: exit code 1")

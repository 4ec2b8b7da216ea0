"""The process group core: real child processes that succeed, raise, get killed, segfault or hang."""

from __future__ import annotations

import io
import re
import sys
import time

import pytest

from launch_helpers import PROGRAM, alive, leftovers, new_marker, pids_in, wait_gone, wait_stopped
from launchers import ProcessGroup, ProcessSpec, RankOutput
from launchers._failures import RankExit, format_report, split_failures
from launchers import LaunchError, LaunchTimeoutError, RankFailedError

pytestmark = pytest.mark.multiprocess


def wait_output(stream: io.StringIO, text: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while stream.getvalue().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} did not appear {count} times in:\n{stream.getvalue()}"
        time.sleep(0.05)


def make_group(n, *args, stop_timeout=5.0, log_dir=None, marker=None):
    marker = marker or new_marker()
    out, err = io.StringIO(), io.StringIO()
    specs = [
        ProcessSpec(r, [sys.executable, PROGRAM, "--marker", marker, *args], env={"RANK": str(r), "WORLD_SIZE": str(n)})
        for r in range(n)
    ]
    group = ProcessGroup(
        specs, output=RankOutput(log_dir, stdout=out, stderr=err, tail_lines=20),
        stop_timeout=stop_timeout, world_size=n,
    )
    return group, out, err, marker


@pytest.mark.timeout(60)
def test_all_ranks_succeed_with_prefixed_lines_and_logs(tmp_path):
    group, out, err, marker = make_group(3, log_dir=tmp_path / "logs")
    exits = group.run(timeout=60)
    assert [(e.rank, e.exitcode, e.signal, e.failed) for e in exits] == [(r, 0, None, False) for r in range(3)]
    for r in range(3):
        assert f"[rank {r}] hello from rank {r} of 3" in out.getvalue()
        assert f"[rank {r}] rank {r} says hi on stderr" in err.getvalue()
        log = (tmp_path / "logs" / f"rank_{r}.log").read_text()
        assert f"hello from rank {r} of 3" in log and f"rank {r} done" in log
        assert "[rank" not in log  # logs hold the lines as the rank wrote them
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_a_rank_that_raises_is_the_first_failure_and_the_others_are_stopped():
    group, out, err, marker = make_group(3, "--bad-rank", "1", "--bad", "raise", "--others", "hang", "--delay", "0.3")
    with pytest.raises(RankFailedError) as info:
        group.run(timeout=60)
    error = info.value
    first = error.first
    assert (first.rank, first.exitcode, first.signal, first.stopped) == (1, 1, None, False)
    assert first.pid == group.pids[1] and first.host
    assert first.tail[-1] == "RuntimeError: rank 1 broke on purpose"
    assert any("Traceback (most recent call last):" in line for line in first.tail)
    assert len(error.failures) == 1
    assert sorted((e.rank, e.signal) for e in error.stopped) == [(0, "SIGTERM"), (2, "SIGTERM")]
    message = str(error)
    assert message.startswith(f"rank 1 of 3 on host {first.host} (pid {group.pids[1]}) failed: exit code 1\n  at ")
    assert "    | RuntimeError: rank 1 broke on purpose" in message
    assert "ranks stopped afterwards: 0 (pid" in message
    assert not wait_gone(group.pids.values())
    assert not leftovers(marker)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "bad, signal_name, last_words",
    [("sigkill", "SIGKILL", "rank 1 says hi on stderr"), ("segfault", "SIGSEGV", "Segmentation fault")],
)
def test_a_rank_killed_by_a_signal_is_reported_by_signal_name(bad, signal_name, last_words):
    group, out, err, marker = make_group(2, "--bad-rank", "1", "--bad", bad, "--others", "hang", "--delay", "0.3")
    with pytest.raises(RankFailedError) as info:
        group.run(timeout=60)
    first = info.value.first
    assert (first.rank, first.exitcode, first.signal) == (1, None, signal_name)
    assert first.shell_code == 128 + {"SIGKILL": 9, "SIGSEGV": 11}[signal_name]
    assert any(last_words in line for line in first.tail)
    assert f"rank 1 of 2 on host {first.host} (pid {first.pid}) failed: signal {signal_name}" in str(info.value)
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_the_earliest_failure_is_first_not_the_lowest_rank():
    # rank 2 fails at once, rank 0 three seconds later (by then it is being stopped)
    group, *_ = make_group(3, "--bad-rank", "2,0", "--bad", "exit3", "--stagger", "3.0", "--others", "hang")
    with pytest.raises(RankFailedError) as info:
        group.run(timeout=60)
    assert info.value.first.rank == 2 and info.value.first.exitcode == 3


@pytest.mark.timeout(60)
def test_ranks_ignoring_sigterm_are_killed_after_the_shared_deadline():
    group, out, err, marker = make_group(3, "--others", "ignore-term", stop_timeout=1.0)
    group.start()
    wait_output(out, "waits forever", 3)
    started = time.monotonic()
    exits = group.stop()
    took = time.monotonic() - started
    assert [(e.rank, e.signal, e.stopped) for e in exits] == [(r, "SIGKILL", True) for r in range(3)]
    assert 1.0 <= took < 10, took  # one deadline shared by all ranks, not one each
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_stopped_ranks_are_continued_so_sigterm_ends_them_at_once():
    # a SIGSTOPped process keeps SIGTERM pending until SIGCONT: without it, the stop waits out the deadline
    group, out, err, marker = make_group(2, "--others", "stop", stop_timeout=20.0)
    group.start()
    wait_output(out, "stops itself", 2)
    wait_stopped(pids_in(out.getvalue().splitlines()))
    started = time.monotonic()
    exits = group.stop()
    took = time.monotonic() - started
    assert [(e.rank, e.signal, e.stopped) for e in exits] == [(r, "SIGTERM", True) for r in range(2)]
    assert took < 5, took
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_grandchildren_go_with_their_rank():
    group, out, err, marker = make_group(2, "--grandchild", "--others", "hang")
    group.start()
    wait_output(out, "waits forever", 2)
    grandchildren = [int(line.rsplit(" ", 1)[1]) for line in out.getvalue().splitlines() if "grandchild pid" in line]
    assert len(grandchildren) == 2 and all(alive(pid) for pid in grandchildren)
    group.stop()
    assert not wait_gone(grandchildren)
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_grandchildren_are_swept_after_success_too():
    group, out, err, marker = make_group(1, "--grandchild")
    group.run(timeout=60)
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_time_limit_stops_every_rank():
    group, out, err, marker = make_group(2, "--others", "hang")
    with pytest.raises(LaunchTimeoutError) as info:
        group.run(timeout=1.5)
    assert re.search(r"rank 0 \(pid \d+\), rank 1 \(pid \d+\) on host \S+ still running after", str(info.value))
    assert "time limit is 1.5 s" in str(info.value)
    assert "stopped them: SIGTERM (they ended within" in str(info.value)  # what it took, not what it could have
    assert isinstance(info.value, TimeoutError)
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_time_limit_says_which_ranks_needed_sigkill():
    group, out, err, marker = make_group(2, "--others", "ignore-term", stop_timeout=1.0)  # both ignore SIGTERM
    with pytest.raises(LaunchTimeoutError, match=r"stopped them: SIGTERM, then SIGKILL for rank 0, rank 1, which did not "
                                                 r"end within 1 s"):
        group.run(timeout=1.5)
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_a_program_that_cannot_start_stops_the_ones_started():
    marker = new_marker()
    specs = [
        ProcessSpec(0, [sys.executable, PROGRAM, "--marker", marker, "--others", "hang"]),
        ProcessSpec(1, ["/nonexistent/program-" + marker]),
    ]
    group = ProcessGroup(specs, output=RankOutput(stdout=io.StringIO(), stderr=io.StringIO()), stop_timeout=5)
    with pytest.raises(LaunchError, match=r"cannot start rank 1: '/nonexistent/program-\w+': No such file"):
        group.run(timeout=30)
    assert not wait_gone(group.pids.values())
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_stop_twice_is_harmless():
    group, out, err, marker = make_group(2, "--others", "hang")
    group.start()
    first = group.stop()
    second = group.stop()
    assert first == second and sorted(e.rank for e in first) == [0, 1]
    assert all(e.stopped and e.signal == "SIGTERM" for e in first)
    assert not any(alive(pid) for pid in group.pids.values())


def test_bad_specs_are_refused():
    with pytest.raises(LaunchError, match="empty"):
        ProcessGroup([])
    with pytest.raises(LaunchError, match=r"each rank must appear once, got ranks \[0, 0\]"):
        ProcessGroup([ProcessSpec(0, ["true"]), ProcessSpec(0, ["true"])])
    with pytest.raises(LaunchError, match="rank 3: empty command line"):
        ProcessSpec(3, [])


def test_report_lists_first_failure_then_the_rest():
    exits = [
        RankExit(0, "h", 10, None, "SIGTERM", 5.0, ("x",), stopped=True),
        RankExit(1, "h", 11, 2, None, 3.0, ("Traceback", "ValueError: late")),
        RankExit(2, "h", 12, None, "SIGSEGV", 2.0, ("Fatal Python error: Segmentation fault",)),
        RankExit(3, "h", 13, 0, None, 1.0, ()),
    ]
    failures, stopped = split_failures(exits)
    assert [e.rank for e in failures] == [2, 1] and [e.rank for e in stopped] == [0]
    text = format_report(failures, stopped, 4)
    assert text.splitlines()[0] == "rank 2 of 4 on host h (pid 12) failed (first of 2 failed ranks): signal SIGSEGV (11)"
    assert text.splitlines()[1].endswith("; last line of its output:")
    assert "what followed (the other ranks that failed; those that lost a peer come last):\n  rank 1 on host h (pid 11) failed: exit code 2 at" in text
    assert text.endswith("ValueError: late\nranks stopped afterwards: 0 (pid 10, signal SIGTERM (15))")
    assert RankExit.from_dict(exits[1].to_dict()) == exits[1]


def test_the_root_cause_is_who_failed_first_not_who_exited_first():
    # rank 1 printed its error, aborted, and took 0.5 s to exit; rank 0 lost it and exited at once
    victim = RankExit(0, "h", 10, 1, None, 2.0, ("error: PeerLostError: allreduce #2 on rank 0 of 2: rank 1 closed "
                                                 "its communicator",), last_output=1.99)
    cause = RankExit(1, "h", 11, 1, None, 2.5, ("error: ShardError: wrong shard",), last_output=2.0)
    assert [e.rank for e in split_failures([victim, cause])[0]] == [1, 0]
    # a peer loss comes after the other failures even when its line was read first
    early_victim = RankExit(0, "h", 10, 1, None, 2.0, ("ranks._errors.PeerLostError: rank 1 vanished",), last_output=1.9)
    assert [e.rank for e in split_failures([early_victim, cause])[0]] == [1, 0]
    # without a peer loss, the error lines' times decide
    a = RankExit(0, "h", 10, 1, None, 2.0, ("ValueError: b",), last_output=1.99)
    b = RankExit(1, "h", 11, 1, None, 2.5, ("ValueError: a",), last_output=1.5)
    assert [e.rank for e in split_failures([a, b])[0]] == [1, 0]
    # a line long before the exit does not date it, nor does one before a death by signal
    assert RankExit(2, "h", 12, 1, None, 10.0, ("hello",), last_output=1.0).failed_at == 10.0
    assert RankExit(3, "h", 13, None, "SIGKILL", 3.0, ("hello",), last_output=2.9).failed_at == 3.0
    text = format_report(*split_failures([victim, cause]), 2)
    assert text.splitlines()[1].endswith("(exited 0.5 s later); last line of its output:")
    assert "what followed (the other ranks that failed; those that lost a peer come last):\n  rank 0 on host h (pid 10) failed: exit code 1 at " in text


def test_a_clean_exit_while_others_ran_is_named_when_nothing_else_failed():
    from launchers._failures import early_exit, format_early_exit

    exits = [
        RankExit(0, "h", 10, None, "SIGTERM", 5.0, ("x",), stopped=True),
        RankExit(1, "h", 11, 0, None, 3.0, ("leaving",)),
        RankExit(2, "h", 12, 0, None, 4.0, ()),
    ]
    first, still_running = early_exit(exits, not_reported=[3])
    assert first.rank == 1 and still_running == [0, 2, 3]
    text = format_early_exit(first, still_running, [exits[0]], 4)
    assert text.splitlines()[0] == (
        "rank 1 of 4 on host h (pid 11) exited with exit code 0 before the job finished, while ranks 0, 2, 3 were still running"
    )
    assert text.endswith("    | leaving\nranks stopped afterwards: 0 (pid 10, signal SIGTERM (15))")
    # every rank ended on its own, cleanly: nobody to blame
    assert early_exit([RankExit(0, "h", 10, 0, None, 1.0), RankExit(1, "h", 11, 0, None, 1.0)]) is None


def test_launchers_exports():
    import launchers

    assert {
        "ProcessGroup", "ProcessSpec", "RankOutput", "RankExit", "format_report", "failure_error",
        "Supervisor", "python_module",
        "MpiLaunchConfig", "MpiLauncher", "build_mpirun_command", "find_mpirun", "mpi_flavor",
        "RankTableLaunchConfig", "RankTableLauncher",
        "LaunchError", "LaunchInterruptedError", "LaunchTimeoutError", "RankFailedError",
    } <= set(dir(launchers))
    assert issubclass(launchers.RankFailedError, launchers.LaunchError)
    assert issubclass(launchers.LaunchTimeoutError, TimeoutError)

"""The supervisor as the masters use it: start from any thread, ask without blocking, inherit fds, a watchdog."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from launch_helpers import PROGRAM, alive, leftovers, new_marker, pids_in, wait_gone, wait_stopped
from launchers import ProcessGroup, ProcessSpec, RankOutput, Supervisor, python_module
from launchers import RankFailedError

pytestmark = pytest.mark.multiprocess


def _quiet(**kwargs) -> RankOutput:
    return RankOutput(stdout=io.StringIO(), stderr=io.StringIO(), **kwargs)


def _specs(n, marker, *args, label=None):
    return [ProcessSpec(r, [sys.executable, PROGRAM, "--marker", marker, *args], env={"RANK": str(r)},
                        label=None if label is None else f"{label} {r}") for r in range(n)]


def test_process_group_is_the_supervisor():
    assert ProcessGroup is Supervisor


@pytest.mark.timeout(60)
def test_children_outlive_the_thread_that_started_them():
    # Linux sends the parent-death signal when the forking THREAD ends: a master built in a
    # short-lived thread (a thread pool's) must not lose its children with that thread.
    marker = new_marker()
    group = Supervisor(_specs(1, marker, "--others", "hang"), output=_quiet(), stop_timeout=5)
    starter = threading.Thread(target=group.start)
    starter.start()
    starter.join()
    try:
        time.sleep(0.5)
        assert group.running() == [0] and alive(group.pids[0])
    finally:
        group.stop()
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_a_master_asks_without_blocking_and_gets_the_first_failure():
    marker = new_marker()
    group = Supervisor(_specs(2, marker, "--bad-rank", "1", "--bad", "sigkill", "--others", "hang", "--delay", "0.3",
                              label="worker"), output=_quiet(tail_lines=5), stop_timeout=5)
    group.start()
    try:
        assert group.failure() is None
        ended = group.exit_of(1, timeout=30)
        seen = time.time()
        assert ended is not None and ended.signal == "SIGKILL" and ended.label == "worker 1"
        assert seen - ended.time < 1.0  # recorded the moment it happened
        error = group.failure()
        assert isinstance(error, RankFailedError) and error.first.rank == 1
        assert str(error).startswith(f"worker 1 on host {ended.host} (pid {ended.pid}) failed: signal SIGKILL")
        assert "rank 1 says hi on stderr" in str(error)  # its last lines
        assert group.running() == [0] and group.exit_of(0) is None
    finally:
        exits = group.stop()
    assert [e.rank for e in exits if e.stopped] == [0]
    assert "stopped afterwards: worker 0 (pid" in str(group.failure())
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_a_clean_exit_fails_for_a_master_that_needs_its_children():
    marker = new_marker()
    group = Supervisor(_specs(2, marker, "--bad-rank", "1", "--bad", "exit0", "--others", "hang"), output=_quiet(),
                       stop_timeout=5, world_size=2)
    group.start()
    try:
        assert group.exit_of(1, timeout=30).exitcode == 0
        assert group.failure() is None
        error = group.failure(every_exit_fails=True)
        assert error is not None and "rank 1 of 2" in str(error) and "exited with exit code 0 before" in str(error)
    finally:
        group.stop()
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_join_does_not_wait_for_a_suspended_child_and_stop_continues_it():
    marker = new_marker()
    out = io.StringIO()
    group = Supervisor(_specs(2, marker, "--bad-rank", "0", "--bad", "exit3", "--others", "stop"),
                       output=RankOutput(stdout=out, stderr=io.StringIO()), stop_timeout=20)
    group.start()
    deadline = time.monotonic() + 30
    while "stops itself" not in out.getvalue():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wait_stopped(pids_in(out.getvalue().splitlines(), "hello from rank 1"))
    started = time.monotonic()
    assert group.join(20, skip_suspended=True) is False
    assert group.suspended() == [1]
    exits = group.stop()
    assert time.monotonic() - started < 2.0, "a suspended child cost the deadline"
    assert [(e.rank, e.exitcode, e.signal) for e in exits] == [(0, 3, None), (1, None, "SIGTERM")]
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_a_child_inherits_a_socket_and_runs_a_module_of_this_installation():
    ours, theirs = socket.socketpair()
    argv, env = python_module("launchers._janitor")  # any module of ours; only its argv matters here
    assert argv[:3] == [sys.executable, "-m", "launchers._janitor"]
    code = "import os, socket, sys; s = socket.socket(fileno=int(sys.argv[1])); s.sendall(b'hello ' + str(os.getppid()).encode())"
    group = Supervisor([ProcessSpec(0, [sys.executable, "-c", code, str(theirs.fileno())], env=env,
                                    pass_fds=(theirs.fileno(),))], output=_quiet(), stop_timeout=5)
    group.start()
    theirs.close()
    try:
        ours.settimeout(30)
        assert ours.recv(100) == f"hello {os.getpid()}".encode()
        assert group.exit_of(0, timeout=30).exitcode == 0
    finally:
        group.stop()
        ours.close()


PARENT = textwrap.dedent("""
    import io, json, sys, tempfile, time
    from launchers import ProcessSpec, RankOutput, Supervisor
    program, marker, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
    work = tempfile.mkdtemp(prefix="orch_sup_test_", dir=tmp)
    specs = [ProcessSpec(r, [sys.executable, program, "--marker", marker, "--grandchild", "--others", "hang"])
             for r in range(2)]
    group = Supervisor(specs, output=RankOutput(console=False), cleanup_paths=[work])
    group.start()
    time.sleep(1.0)
    print(json.dumps({"pids": list(group.pids.values()), "dir": work, "janitor": group._janitor.pid}), flush=True)
    time.sleep(600)
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_watchdog_cleans_up_after_a_killed_parent(tmp_path, how):
    marker = new_marker()
    from conftest import project_env

    parent = subprocess.Popen([sys.executable, "-c", PARENT, PROGRAM, marker, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=project_env())
    try:
        line = parent.stdout.readline()
        assert line, parent.stderr.read()
        info = json.loads(line)
        children = [line for line in leftovers(marker, wait=0) if not line.startswith(f"{parent.pid} ")]
        assert os.path.isdir(info["dir"]) and len(children) == 4  # 2 ranks + 2 grandchildren
        os.kill(parent.pid, how)
        parent.wait(10)
        # the ranks die with the parent (parent-death signal); their grandchildren and the
        # directory are the watchdog's
        assert not leftovers(marker, wait=10)
        deadline = time.monotonic() + 10
        while os.path.exists(info["dir"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(info["dir"])
        assert not wait_gone([info["janitor"]], 10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        parent.stderr.close()
        from launch_helpers import kill_all

        kill_all(marker)


@pytest.mark.timeout(60)
def test_a_stopped_group_releases_its_watchdog_and_keeps_the_paths(tmp_path):
    marker = new_marker()
    keep = tmp_path / "keep"
    keep.mkdir()
    group = Supervisor(_specs(1, marker, "--others", "hang"), output=_quiet(), stop_timeout=5, cleanup_paths=[keep])
    group.start()
    janitor = group._janitor.pid
    group.stop()
    group.stop()  # twice is harmless
    assert not wait_gone([janitor], 5)
    assert keep.is_dir()  # the owner removes its own paths; the watchdog only acts when the owner died
    assert not leftovers(marker)


@pytest.mark.timeout(60)
def test_stop_from_two_threads_at_once():
    marker = new_marker()
    group = Supervisor(_specs(2, marker, "--others", "ignore-term"), output=_quiet(), stop_timeout=1.0)
    group.start()
    time.sleep(0.5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(group.stop())) for _ in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert time.monotonic() - started < 10  # one shared deadline, not one per caller
    assert len(results) == 2 and results[0] == results[1]
    assert [(e.rank, e.stopped) for e in results[0]] == [(0, True), (1, True)]
    assert not leftovers(marker)

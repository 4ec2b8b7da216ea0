"""ModelParallelRunner with process workers (``worker_type="process"``): what only processes can do wrong.

A worker that dies or stops, a caller that is killed, a script without a main guard,
the weights shared between processes. What both backends share (queue, timeouts,
errors, closing) is tested for both in test_model_parallel_runner_failures.py.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import psutil
import pytest

import orchestrator as mslite
from conftest import ROOT, project_env
from orchestrator import ConfigError, ModelParallelRunner, PoolClosedError, WorkerLostError, WorkerTimeoutError
from tests._batch_split_helpers import process_alive
from tests._pool_helpers import reference, run_clients, slow_feeds, slow_model, wait_until
from tests.test_model_parallel_runner_failures import FOREVER, busy, in_background

HOST = socket.gethostname()
pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    return slow_model(tmp_path_factory.mktemp("pool") / "slow.onnx")


def process_runner(path, workers: int, **options) -> ModelParallelRunner:
    context = mslite.Context()
    context.cpu.thread_num = 1
    context.parallel.workers_num = workers
    runner = ModelParallelRunner()
    runner.build_from_file(path, context, worker_type="process", **options)
    return runner


def worker_pids(runner) -> list[int]:
    return [child.pid for child in psutil.Process().children() if "orchestrator._worker_main" in " ".join(child.cmdline())]


def running_on(runner, worker: int) -> bool:
    """Whether ``worker``'s process has read a request: one is armed on it and nothing is left unread in its
    socket. A worker killed before it read the PREDICT never ran it, so the pool rightly gives the request to
    another worker; a test that means to kill a worker mid-request must wait for this."""
    request = runner._queue._running.get(worker)
    if request is None or request.cancel is None:
        return False
    channel = runner._backend.engines[worker].channel
    try:
        unread = struct.unpack("i", fcntl.ioctl(channel.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return False
    return unread == 0


def our_segments() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"orch_pp_{os.getpid()}_")]


@pytest.mark.timeout(60)
def test_a_killed_worker_fails_its_request_at_once_naming_it_and_the_others_serve_on(slow):
    with process_runner(slow, workers=2) as runner:
        pids = runner.worker_pids
        assert sorted(pids) == sorted(worker_pids(runner)) and len(pids) == 2
        doomed = in_background(runner.predict, slow_feeds(FOREVER, seed=1))
        wait_until(lambda: busy(runner) == 1 and any(running_on(runner, w) for w in (0, 1)), what="a worker busy")
        worker = next(w for w in (0, 1) if running_on(runner, w))
        killed = time.monotonic()
        os.kill(pids[worker], signal.SIGKILL)
        error = doomed.exception(timeout=10)
        took = time.monotonic() - killed
        assert isinstance(error, WorkerLostError), error
        assert took < 2.0, took  # seen at once: its socket reached EOF
        assert re.match(rf"worker {worker} of 2 on host {re.escape(HOST)} \(pid {pids[worker]}\) was killed by SIGKILL "
                        rf"while running request 1; it left the pool", str(error)), str(error)
        # The other worker serves every later request.
        for seed in range(4):
            feeds = slow_feeds(5, seed=seed)
            np.testing.assert_array_equal(runner.predict(feeds)[0].get_data_to_numpy(), reference(slow, feeds)[0])
        # When the last one dies, the runner closes and says why.
        os.kill(pids[1 - worker], signal.SIGKILL)
        with pytest.raises((WorkerLostError, PoolClosedError)):
            runner.predict(slow_feeds(FOREVER), timeout=10)
        wait_until(lambda: runner._queue.closed, timeout=10, what="the runner closing itself")
        with pytest.raises(PoolClosedError, match=rf"is closed \(every worker is gone: worker {worker} of 2 on host .* "
                                                  rf"was killed by SIGKILL while running request 1, then worker "
                                                  rf"{1 - worker} of 2 on host .* was killed by SIGKILL"):
            runner.predict(slow_feeds(1))
    assert not worker_pids(runner) and not our_segments()


def context_runner(path, workers: int) -> ModelParallelRunner:
    """Process workers as the README configures them: a Context whose config_info holds the [pool] options."""
    context = mslite.Context()
    context.cpu.thread_num = 1
    context.parallel.workers_num = workers
    context.parallel.config_info = {"pool": {"worker_type": "process", "timeout": "30"}}
    runner = ModelParallelRunner()
    runner.build_from_file(path, context)
    return runner


def assert_serves(runner, path, seeds) -> None:
    for seed in seeds:
        feeds = slow_feeds(3, seed=seed)
        np.testing.assert_array_equal(runner.predict(feeds)[0].get_data_to_numpy(), reference(path, feeds)[0])


def idle(pid: int) -> str:
    return rf"on host {re.escape(HOST)} \(pid {pid}\) was killed by SIGKILL while it was idle"


@pytest.mark.timeout(60)
def test_an_idle_worker_killed_leaves_the_pool_at_once_and_every_request_after_succeeds(slow):
    with context_runner(slow, workers=2) as runner:
        assert runner.options.worker_type == "process"
        assert_serves(runner, slow, range(2))
        pids = runner.worker_pids
        os.kill(pids[1], signal.SIGKILL)
        # Noticed without a request routed to it: its socket hung up.
        wait_until(lambda: runner.worker_pids == [pids[0]], timeout=5, what="the dead worker leaving worker_pids")
        assert worker_pids(runner) == [pids[0]]
        assert_serves(runner, slow, range(2, 8))
        errors = run_clients(4, lambda c: assert_serves(runner, slow, range(10 * c, 10 * c + 3)))
        assert not errors, errors
        # The last one: every later call hears why each worker left, the first first.
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: runner.worker_pids == [], timeout=5, what="the last worker leaving worker_pids")
        with pytest.raises(PoolClosedError, match=rf"is closed \(every worker is gone: worker 1 of 2 {idle(pids[1])}, "
                                                  rf"then worker 0 of 2 {idle(pids[0])}\): it accepts no more"):
            runner.predict(slow_feeds(1))
    assert not worker_pids(runner) and not our_segments()


@pytest.mark.timeout(60)
def test_a_request_for_a_worker_that_just_died_goes_to_a_survivor(slow):
    # One worker is busy (until its request times out), so only the other can take the next request, and that
    # one is dead by then (its sockets closed) though maybe not yet seen to be: whether its dispatcher takes the
    # request and finds the socket hung up, or the watcher saw the hang-up first, the request never reached it,
    # so the busy worker runs it once free, and its caller never hears of the death.
    with process_runner(slow, workers=2) as runner:
        assert_serves(runner, slow, range(2))
        pids = runner.worker_pids
        held = in_background(runner.predict, slow_feeds(FOREVER, seed=1), timeout=1.0)
        wait_until(lambda: running_on(runner, 0) or running_on(runner, 1), what="a worker busy")
        free = 0 if running_on(runner, 1) else 1
        os.kill(pids[free], signal.SIGKILL)
        wait_until(lambda: not process_alive(pids[free]), timeout=5, what="the worker dead")
        feeds = slow_feeds(3, seed=7)
        np.testing.assert_array_equal(runner.predict(feeds, timeout=30)[0].get_data_to_numpy(), reference(slow, feeds)[0])
        assert isinstance(held.exception(timeout=10), WorkerTimeoutError)
        assert runner.worker_pids == [pids[1 - free]]
        assert_serves(runner, slow, range(3))
    assert not worker_pids(runner) and not our_segments()


@pytest.mark.timeout(60)
def test_the_only_worker_killed_idle_closes_the_runner_naming_why(slow):
    with context_runner(slow, workers=1) as runner:
        assert_serves(runner, slow, range(1))
        [pid] = runner.worker_pids
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: runner.worker_pids == [], timeout=5, what="the dead worker leaving worker_pids")
        with pytest.raises(PoolClosedError, match=rf"is closed \(every worker is gone: worker 0 of 1 {idle(pid)}\)"):
            runner.predict(slow_feeds(1))
    assert not worker_pids(runner) and not our_segments()
    # Called as soon as it is dead (before or after its death is seen): the request never reached it, so it
    # is not a WorkerLostError of a request that may have killed it, but the runner closed under it.
    with context_runner(slow, workers=1) as runner:
        [pid] = runner.worker_pids
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not process_alive(pid), timeout=5, what="the worker dead")
        with pytest.raises(PoolClosedError, match=rf"every worker is gone: worker 0 of 1 {idle(pid)}\)"):
            runner.predict(slow_feeds(1))
    assert not worker_pids(runner) and not our_segments()


@pytest.mark.timeout(60)
def test_a_stopped_worker_times_its_request_out_then_is_killed_and_the_other_serves(slow):
    with process_runner(slow, workers=2) as runner:
        pids = runner.worker_pids
        stuck = in_background(runner.predict, slow_feeds(FOREVER, seed=1), timeout=1.0)
        wait_until(lambda: any(running_on(runner, w) for w in (0, 1)), what="a worker busy")
        worker = next(w for w in (0, 1) if running_on(runner, w))
        os.kill(pids[worker], signal.SIGSTOP)
        error = stuck.exception(timeout=10)
        name = f"worker {worker} of 2 on host {HOST} (pid {pids[worker]})"
        assert isinstance(error, WorkerTimeoutError) and f"while {name} ran it" in str(error)
        # The cancel cannot reach a stopped process: it is killed after the grace and leaves the pool, and the
        # caller's error comes once that is decided and says so (never that the worker serves on).
        assert (f"the run was cancelled, but {name}, stopped (SIGSTOP), did not answer the cancel of request 1 "
                f"(timeout or close) within 2 s, so it was killed; it left the pool (1 of 2 workers serve on)"
                in str(error)), str(error)
        assert "serves the next request" not in str(error)
        assert runner.worker_pids == [pids[1 - worker]]  # already out of the pool when the caller heard
        wait_until(lambda: not process_alive(pids[worker]),
                   timeout=10, what="the stopped worker killed")
        for seed in range(3):
            feeds = slow_feeds(5, seed=seed)
            np.testing.assert_array_equal(runner.predict(feeds)[0].get_data_to_numpy(), reference(slow, feeds)[0])
    assert not worker_pids(runner) and not our_segments()


@pytest.mark.timeout(60)
def test_a_build_error_in_a_worker_keeps_its_type_names_the_worker_and_leaves_nothing(slow):
    context = mslite.Context()
    context.parallel.workers_num = 2
    context.parallel.config_info = {"cpu_context": {"input_shape": "nope:1,2"}}
    # both workers fail alike; the first error to arrive is raised
    with pytest.raises(ConfigError, match=rf"\[worker [01] of 2 on host {re.escape(HOST)} \(pid \d+\)\] .*input_shape names 'nope'"):
        ModelParallelRunner().build_from_file(slow, context, worker_type="process")
    assert not worker_pids(None) and not our_segments()


@pytest.mark.timeout(60)
def test_a_model_error_keeps_its_type_and_the_worker_serves_on(slow):
    with process_runner(slow, workers=1) as runner:
        with pytest.raises(mslite.ModelError, match=rf"^\[worker 0 of 1 on host {re.escape(HOST)} \(pid \d+\)\] running "
                                                    r"slow.onnx failed: .*idx=70"):
            runner.predict(slow_feeds(3, index=70))
        feeds = slow_feeds(3, seed=9)
        np.testing.assert_array_equal(runner.predict(feeds)[0].get_data_to_numpy(), reference(slow, feeds)[0])


SCRIPT = """
import sys
import numpy as np
import orchestrator as mslite
context = mslite.Context()
context.parallel.workers_num = 2
context.cpu.thread_num = 1
runner = mslite.ModelParallelRunner()
runner.build_from_file(sys.argv[1], context, worker_type="process")
x = np.ones((1, 64), np.float32)
out = runner.predict({"x": x, "trip": np.array(3, np.int64), "index": np.array([2], np.int64)})
print("pids", *runner.worker_pids, flush=True)
print("value", float(out[0].get_data_to_numpy()[0, 0]), flush=True)
if len(sys.argv) > 2:
    import time
    print("waiting", flush=True)
    time.sleep(600)
"""


@pytest.mark.timeout(90)
def test_a_script_without_a_main_guard_from_stdin_runs_once_and_leaves_nothing(slow):
    # Workers start as `python -m orchestrator._worker_main`: the caller's script (here: stdin, no guard)
    # is never run again, so it prints its lines once. It never closes the runner: the exit hook does.
    result = subprocess.run([sys.executable, "-", slow], input=SCRIPT, capture_output=True, text=True, timeout=60,
                            env={**project_env(), "ORCH_SHM_MODE": "named"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["pids", "value"], lines
    expected = reference(slow, {"x": np.ones((1, 64), np.float32), "trip": np.array(3, np.int64),
                                "index": np.array([2], np.int64)})[0][0, 0]
    assert float(lines[1].split()[1]) == pytest.approx(float(expected), rel=1e-6)
    pids = [int(p) for p in lines[0].split()[1:]]
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), timeout=10, what="the workers gone")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_caller_takes_its_workers_and_segments_with_it(slow, signum):
    caller = subprocess.Popen([sys.executable, "-c", SCRIPT, slow, "wait"], stdout=subprocess.PIPE, text=True,
                              env={**project_env(), "ORCH_SHM_MODE": "named"}, cwd=ROOT)
    try:
        lines = [caller.stdout.readline() for _ in range(3)]
        assert lines[2].strip() == "waiting", lines
        pids = [int(p) for p in lines[0].split()[1:]]
        assert [n for n in os.listdir("/dev/shm") if n.startswith(f"orch_pp_{caller.pid}_")]  # named: a leak would show
        caller.send_signal(signum)
        caller.wait(10)
    finally:
        caller.kill()
        caller.wait()
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), timeout=10, what="the workers gone")
    wait_until(lambda: not [n for n in os.listdir("/dev/shm") if n.startswith(f"orch_pp_{caller.pid}_")], timeout=10,
               what="the caller's segments removed")


@pytest.mark.timeout(120)
def test_process_workers_share_one_copy_of_the_weights(sample):
    # 16 MiB of weights: with sharing, worker 1 maps worker 0's copy, so its private memory (USS) holds
    # a small part of the weights; without, each holds its own.
    path = sample("mlp", width=512, hidden=2048, layers=2)
    weight_bytes = 2 * 2 * 512 * 2048 * 4
    x = np.random.default_rng(2).standard_normal((1, 512)).astype(np.float32)
    expected = reference(path, {"x": x})[0]

    def worker_uss(share: bool) -> list[int]:
        context = mslite.Context()
        context.cpu.thread_num = 1
        context.parallel.workers_num = 2
        with ModelParallelRunner() as runner:
            runner.build_from_file(path, context, worker_type="process", share_weights=share)
            for _ in range(4):
                np.testing.assert_allclose(runner.predict([x])[0].get_data_to_numpy(), expected, rtol=1e-5, atol=1e-6)
            return [psutil.Process(p).memory_full_info().uss for p in runner.worker_pids]

    shared = worker_uss(True)
    private = worker_uss(False)
    assert private[1] - shared[1] >= 0.8 * weight_bytes, (shared, private)  # worker 1 holds no copy of its own

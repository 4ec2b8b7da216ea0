"""ModelParallelRunner when things go wrong: a full queue, timeouts, a failing worker, closing under load.

The slow model (tests/_pool_helpers.py) runs as long as each request asks (``trip``
Loop iterations; 10**9 is "until stopped") and fails inside ONNX Runtime for an
out-of-range ``index``, so every case here is deterministic, not a race.
"""

from __future__ import annotations

import concurrent.futures
import gc
import queue
import re
import threading
import time

import numpy as np
import pytest

import orchestrator as mslite
from orchestrator import ModelError, ModelParallelRunner, PoolClosedError, PoolQueueFullError, WorkerTimeoutError
from orchestrator._pool_threads import ThreadEngine
from tests._pool_helpers import reference, slow_feeds, slow_model, wait_until, worker_threads

FOREVER = 10**9  # Loop iterations: hours, i.e. until the run is stopped


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    return slow_model(tmp_path_factory.mktemp("pool") / "slow.onnx")


@pytest.fixture(params=["thread", "process"])
def worker_type(request):
    """Both backends must behave the same to a caller."""
    return request.param


def runner_on(path, workers: int, **options) -> ModelParallelRunner:
    context = mslite.Context()
    context.cpu.thread_num = 1
    context.parallel.workers_num = workers
    runner = ModelParallelRunner()
    runner.build_from_file(path, context, **options)
    return runner


def in_background(fn, *args, **kwargs):
    """Start fn in a thread; the returned future holds its result or exception."""
    future = concurrent.futures.Future()

    def call():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            future.set_exception(exc)

    threading.Thread(target=call, daemon=True).start()
    return future


def busy(runner) -> int:
    return runner._queue.counts()[1]


def waiting(runner) -> int:
    return runner._queue.counts()[0]


@pytest.mark.timeout(60)
def test_a_full_queue_refuses_at_once_and_says_its_size(slow, worker_type):
    with runner_on(slow, workers=1, queue_size=2, worker_type=worker_type) as runner:
        held = in_background(runner.predict, slow_feeds(FOREVER))
        wait_until(lambda: busy(runner) == 1, what="the worker taking the first request")
        queued = [in_background(runner.predict, slow_feeds(1, seed=i)) for i in range(2)]
        wait_until(lambda: waiting(runner) == 2, what="two requests queued")

        start = time.monotonic()
        with pytest.raises(PoolQueueFullError) as caught:
            runner.predict(slow_feeds(1))
        assert time.monotonic() - start < 1.0  # refused at once, not after a wait
        message = str(caught.value)
        assert "queue is full" in message and "queue_size 2" in message and "2 requests waiting" in message
        assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, queue.Full)

        wait_until(lambda: runner._queue._running[0].cancel is not None, what="the first run under way")
        runner._queue._running[0].cancel()  # let the first request go: the queued two are served
        for future in queued:
            assert future.result(timeout=30)[0].shape == [1, 1]
        assert isinstance(held.exception(timeout=30), ModelError)  # its run was stopped under it


@pytest.mark.timeout(60)
def test_a_request_that_times_out_in_the_queue_names_its_position(slow, worker_type):
    with runner_on(slow, workers=1, timeout=30, worker_type=worker_type) as runner:
        in_background(runner.predict, slow_feeds(FOREVER))
        wait_until(lambda: busy(runner) == 1, what="the worker taking the first request")
        in_background(runner.predict, slow_feeds(FOREVER))  # position 1
        wait_until(lambda: waiting(runner) == 1, what="a request queued")

        with pytest.raises(WorkerTimeoutError) as caught:
            runner.predict(slow_feeds(1), timeout=0.3)
        message = str(caught.value)
        assert "timed out after 0.3 s while it waited in the queue, at position 2 of 2" in message
        assert "never ran" in message and "add workers" in message
        assert isinstance(caught.value, TimeoutError)
        assert waiting(runner) == 1  # taken out of the queue: it will not run later for nobody


@pytest.mark.timeout(60)
def test_a_request_that_times_out_running_names_the_worker_and_the_worker_goes_on(slow, worker_type):
    with runner_on(slow, workers=1, worker_type=worker_type) as runner:
        start = time.monotonic()
        with pytest.raises(WorkerTimeoutError) as caught:
            runner.predict(slow_feeds(FOREVER), timeout=0.5)
        assert 0.5 <= time.monotonic() - start < 5
        message = str(caught.value)
        assert re.search(r"timed out after 0.5 s while worker 0 of 1( on host \S+ \(pid \d+\))? ran it \(for 0\.", message), message
        assert "the run was stopped and the worker serves the next request" in message
        # The run was stopped (ONNX Runtime's terminate flag), so the one worker is free again at once.
        feeds = slow_feeds(10, seed=3)
        out = runner.predict(feeds, timeout=10)
        np.testing.assert_array_equal(out[0].get_data_to_numpy(), reference(slow, feeds)[0])


@pytest.mark.timeout(60)
def test_a_worker_failure_reaches_its_caller_with_its_type_and_the_worker_and_nobody_else(slow, worker_type):
    with runner_on(slow, workers=2, worker_type=worker_type) as runner:
        good = [slow_feeds(2000, index=i % 64, seed=i) for i in range(24)]
        futures = [in_background(runner.predict, feeds) for feeds in good]
        failures = [in_background(runner.predict, slow_feeds(2000, index=99, seed=100 + i)) for i in range(4)]

        for future in failures:
            error = future.exception(timeout=30)
            assert type(error) is ModelError  # what Model.predict raises for this input: not a bare "predict failed!"
            assert re.match(r"\[worker [01] of 2( on host \S+ \(pid \d+\))?\] running slow.onnx failed", str(error)), error
            assert "indices element out of data bounds, idx=99" in str(error)
            assert error.worker in (0, 1)
        for feeds, future in zip(good, futures):
            np.testing.assert_array_equal(future.result(timeout=30)[0].get_data_to_numpy(), reference(slow, feeds)[0])
        assert len(worker_threads(runner)) == 2  # both workers still serve


@pytest.mark.timeout(60)
def test_an_exception_of_another_type_keeps_its_type(slow, monkeypatch):
    class CustomOpError(KeyError):
        pass

    engine_run = ThreadEngine.run

    def run(self, request):
        if int(request.feeds["trip"]) == 7:
            raise CustomOpError("the custom op lost its key")
        return engine_run(self, request)

    monkeypatch.setattr(ThreadEngine, "run", run)
    with runner_on(slow, workers=1) as runner:
        with pytest.raises(CustomOpError, match=r"\[worker 0 of 1\] the custom op lost its key"):
            runner.predict(slow_feeds(7))
        assert runner.predict(slow_feeds(8))[0].shape == [1, 1]


@pytest.mark.timeout(60)
def test_closing_under_load_fails_every_pending_request_clearly_and_nothing_hangs(slow, worker_type):
    runner = runner_on(slow, workers=2, worker_type=worker_type)
    threads_before = worker_threads(runner)
    running = [in_background(runner.predict, slow_feeds(FOREVER, seed=i)) for i in range(2)]
    wait_until(lambda: busy(runner) == 2, what="both workers busy")
    queued = [in_background(runner.predict, slow_feeds(FOREVER, seed=10 + i)) for i in range(5)]
    wait_until(lambda: waiting(runner) == 5, what="five requests queued")

    start = time.monotonic()
    runner.close()
    assert time.monotonic() - start < 5  # the running requests were stopped, not waited for

    for future in running:
        error = future.exception(timeout=10)
        assert isinstance(error, PoolClosedError) and "was closed (close() was called) while worker" in str(error)
    positions = set()
    for future in queued:
        error = future.exception(timeout=10)
        assert isinstance(error, PoolClosedError) and "waited in the queue at position" in str(error)
        assert isinstance(error, concurrent.futures.CancelledError) and isinstance(error, RuntimeError)
        positions.add(str(error).split("position ")[1].split(" of")[0])
    assert positions == {"1", "2", "3", "4", "5"}
    assert not any(t.is_alive() for t in threads_before)

    runner.close()  # twice: harmless
    with pytest.raises(PoolClosedError, match="is closed"):
        runner.predict(slow_feeds(1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failed_first", [False, True])
def test_a_runner_dropped_without_close_stops_its_workers(slow, worker_type, failed_first):
    runner = runner_on(slow, workers=2, worker_type=worker_type)
    threads = worker_threads(runner)
    assert len(threads) == 2
    if failed_first:  # a failed request's error (and its traceback, which holds the caller's frame) must not
        for _ in range(2):  # keep the runner alive from a worker thread
            with pytest.raises(ModelError):
                runner.predict(slow_feeds(5, index=99))
    del runner
    gc.collect()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_rebuilding_closes_the_old_workers(slow, tmp_path, worker_type):
    runner = runner_on(slow, workers=1, worker_type=worker_type)
    old = worker_threads(runner)
    pending = in_background(runner.predict, slow_feeds(FOREVER))
    wait_until(lambda: busy(runner) == 1, what="the worker busy")
    context = mslite.Context()
    context.parallel.workers_num = 1
    runner.build_from_file(slow, context, worker_type=worker_type)
    error = pending.exception(timeout=10)
    assert isinstance(error, PoolClosedError) and "closed (build_from_file() was called again) while worker 0" in str(error)
    assert not any(t.is_alive() for t in old)
    assert runner.predict(slow_feeds(3))[0].shape == [1, 1]
    runner.close()

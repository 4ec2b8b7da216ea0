"""The worker pool's request queue on its own, with fake engines: order, the state machine, late replies, interrupts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from orchestrator import PoolClosedError, WorkerTimeoutError
from orchestrator._pool_queue import Request, RequestQueue, State, serve
from orchestrator._pool_threads import ThreadEngine


class EchoEngine:
    """Answers each request with its own feeds, after the test lets it (one gate per request)."""

    def __init__(self):
        self.seen = []
        self.gate = threading.Semaphore(0)

    def run(self, request):
        request.cancel = lambda: None
        self.gate.acquire()
        self.seen.append(request.feeds["n"])
        if request.feeds["n"] == "boom":
            raise ValueError("the engine broke")
        return [request.feeds["n"]]


def start(queue: RequestQueue, engine, workers: int = 1) -> list[threading.Thread]:
    tag = lambda exc, worker: exc  # noqa: E731
    threads = [threading.Thread(target=serve, args=(queue, engine, k, tag), daemon=True) for k in range(workers)]
    for thread in threads:
        thread.start()
    return threads


def test_one_worker_answers_in_arrival_order_and_survives_a_failure():
    queue, engine = RequestQueue(8, 1, "q"), EchoEngine()
    threads = start(queue, engine)
    requests = [Request({"n": n}, timeout=30) for n in ("a", "boom", "b", "c")]
    for request in requests:
        queue.submit(request)
    for _ in requests:
        engine.gate.release()
    assert queue.wait(requests[0]) == ["a"]
    with pytest.raises(ValueError, match="the engine broke"):
        queue.wait(requests[1])
    assert [queue.wait(r) for r in requests[2:]] == [["b"], ["c"]]
    assert engine.seen == ["a", "boom", "b", "c"]
    assert all(r.state is State.DONE and r.feeds is None for r in requests)  # inputs dropped once run
    queue.close("test over")
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()


def test_a_late_reply_to_an_abandoned_request_is_dropped():
    queue = RequestQueue(8, 1, "q")
    request = Request({"n": 1}, timeout=0.05)
    queue.submit(request)
    taken = queue.take(0)
    assert taken is request and request.state is State.RUNNING
    with pytest.raises(WorkerTimeoutError, match="while worker 0 of 1 ran it"):
        queue.wait(request)
    queue.finish(request, outputs=["too late"])  # the worker's reply after the caller gave up
    assert request.state is State.ABANDONED and request.outputs is None
    assert queue.counts() == (0, 0)  # the worker is free again


def test_an_interrupted_caller_gives_its_request_up(monkeypatch):
    queue = RequestQueue(8, 1, "q")
    first, second = Request({"n": 1}, timeout=30), Request({"n": 2}, timeout=30)
    queue.submit(first)
    queue.submit(second)

    def interrupted(timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(second._done, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        queue.wait(second)
    assert queue.counts() == (1, 0) and second.state is State.ABANDONED
    assert isinstance(second.error, PoolClosedError) and "interrupted while it waited in the queue, at position 2 of 2" in str(second.error)
    assert queue.take(0) is first  # the interrupted request is not run


def test_a_request_abandoned_before_its_run_started_is_not_run():
    class Session:
        def run(self, *args):
            raise AssertionError("an abandoned request must not run")

    request = Request({"x": None}, timeout=1)
    request.state = State.ABANDONED
    assert ThreadEngine(0, Session(), [], "m.onnx").run(request) is None
    assert request.cancel is not None  # armed anyway: a cancel is never lost


def test_close_fails_waiting_requests_in_order_and_refuses_new_ones():
    queue = RequestQueue(8, 2, "the pool")
    requests = [Request({"n": n}, timeout=30) for n in range(3)]
    for request in requests:
        queue.submit(request)
    queue.close("shutting down")
    for position, request in enumerate(requests, 1):
        with pytest.raises(PoolClosedError, match=f"closed \\(shutting down\\) while this request waited in the queue at position {position} of 3"):
            queue.wait(request)
    with pytest.raises(PoolClosedError, match="the pool is closed \\(shutting down\\): it accepts no more requests"):
        queue.submit(Request({"n": 9}, timeout=30))
    assert queue.take(0) is None
    queue.close("again")  # harmless


class Lost(ConnectionError):
    """The engine's worker died while it ran the request."""


class NotDelivered(Lost):
    """The engine's worker died before the request reached it."""


class DyingEngine:
    """Worker 0's process is dead: each request sent to it was never delivered (``undelivered``), or, with
    ``delivered``, it died running it; worker 1 answers with the request's own feeds."""

    def __init__(self, delivered: bool = False):
        self.delivered = delivered
        self.ran = []

    def run(self, request):
        request.cancel = lambda: None
        if threading.current_thread().name == "worker 0":
            raise (Lost if self.delivered else NotDelivered)("worker 0 died")
        self.ran.append(request.feeds["n"])
        return [request.feeds["n"]]


def serve_dying(queue: RequestQueue, engine, worker: int, hung_up: threading.Event | None = None) -> threading.Thread:
    thread = threading.Thread(target=serve, args=(queue, engine, worker, lambda exc, w: exc), name=f"worker {worker}",
                              kwargs={"fatal": (Lost,), "undelivered": (NotDelivered,), "hung_up": hung_up,
                                      "left_idle": lambda: f"worker {worker} was killed while it was idle"}, daemon=True)
    thread.start()
    return thread


def test_requests_that_never_reached_a_dead_worker_go_in_order_to_a_survivor():
    queue, engine = RequestQueue(8, 2, "q"), DyingEngine()
    requests = [Request({"n": n}, timeout=30) for n in range(3)]
    for request in requests:
        queue.submit(request)
    dead = serve_dying(queue, engine, 0)  # takes request 0 first, cannot deliver it
    dead.join(5)
    assert not dead.is_alive() and queue.gone == {0: "worker 0 was killed while it was idle"}
    assert requests[0].state is State.QUEUED and requests[0].feeds == {"n": 0}  # back first, its inputs kept
    survivor = serve_dying(queue, engine, 1)
    assert [queue.wait(r) for r in requests] == [[0], [1], [2]] and engine.ran == [0, 1, 2]
    queue.close("test over")
    survivor.join(5)


def test_a_request_a_worker_died_running_fails_and_the_last_worker_gone_names_each_reason():
    queue, engine = RequestQueue(8, 2, "q"), DyingEngine(delivered=True)
    running, waiting = Request({"n": 0}, timeout=30), Request({"n": 1}, timeout=30)
    queue.submit(running)
    serve_dying(queue, engine, 0).join(5)
    with pytest.raises(Lost, match="worker 0 died"):  # it may be what killed the worker: not run again
        queue.wait(running)
    # Worker 1 dies idle: its dispatcher wakes from take() and the queue closes, naming both, first first.
    hung_up = threading.Event()
    idle = serve_dying(queue, engine, 1, hung_up)
    hung_up.set()
    queue.wake()
    idle.join(5)
    assert not idle.is_alive() and queue.closed
    with pytest.raises(PoolClosedError, match=r"q is closed \(every worker is gone: worker 0 died, then worker 1 was "
                                              r"killed while it was idle\)"):
        queue.submit(waiting)


class CancellableEngine:
    """Runs until cancelled, then ends as ``on_cancel`` says: "stops" (the run fails, the worker serves on),
    "killed" (the worker is lost: ``Lost``), or "hangs" (ends only when the test releases it)."""

    def __init__(self, on_cancel: str):
        self.on_cancel = on_cancel
        self.cancelled = threading.Event()
        self.release = threading.Event()

    def run(self, request):
        request.cancel = self.cancelled.set
        self.cancelled.wait(30)
        if self.on_cancel == "killed":
            raise Lost("worker 0 did not answer the cancel within 2 s, so it was killed")
        if self.on_cancel == "hangs":
            self.release.wait(30)
        raise ValueError("the run was terminated")


@pytest.mark.parametrize("on_cancel, then", [
    ("stops", "; the run was stopped and the worker serves the next request. "),
    ("killed", "; the run was cancelled, but worker 0 did not answer the cancel within 2 s, so it was killed; "
               "it left the pool (1 of 2 workers serve on). "),
    ("hangs", "; the run is in limbo. "),
])
def test_a_run_that_timed_out_is_reported_once_its_worker_answered_the_cancel(on_cancel, then):
    """The caller's error says what became of the worker, never a promise made before the worker answered."""
    queue = RequestQueue(8, 2, "q", cancel_wait=0.5 if on_cancel == "hangs" else 10, cancel_pending="the run is in limbo")
    engine = CancellableEngine(on_cancel)
    thread = threading.Thread(target=serve, args=(queue, engine, 0, lambda exc, w: exc), daemon=True,
                              kwargs={"fatal": (Lost,), "left_idle": lambda: "worker 0 was idle"})
    thread.start()
    request = Request({"n": 1}, timeout=0.2)
    queue.submit(request)
    with pytest.raises(WorkerTimeoutError) as caught:
        queue.wait(request)
    message = str(caught.value)
    assert message.startswith("q: predict timed out after 0.2 s while worker 0 of 2 ran it (for 0.") and then in message
    assert engine.cancelled.is_set()
    if on_cancel == "killed":
        assert queue.gone == {0: "worker 0 did not answer the cancel within 2 s, so it was killed"}
    engine.release.set()
    queue.close("test over")
    thread.join(5)
    assert not thread.is_alive()


def test_a_joined_request_that_times_out_says_its_run_goes_on_for_the_others():
    queue = RequestQueue(8, 1, "q", cancel_wait=10)
    gate = threading.Event()

    class JoinedEngine:
        def run(self, request):
            request.cancel = lambda: None
            gate.wait(30)
            return [request.feeds["x"] * 2]

    first, second = Request({"x": np.ones((1, 2))}, timeout=0.2), Request({"x": np.full((2, 2), 3.0)}, timeout=30)
    queue.submit(first)
    queue.submit(second)
    thread = threading.Thread(target=serve, args=(queue, JoinedEngine(), 0, lambda exc, w: exc, 2), daemon=True)
    thread.start()
    with pytest.raises(WorkerTimeoutError, match=r"while worker 0 of 1 ran it \(for 0\.\d+ s, after 0\.\d+ s in the "
                                                 r"queue\); it runs joined with 1 other request\(s\) \(join_requests\), "
                                                 r"which still want their outputs: worker 0 of 1 finishes that run"):
        queue.wait(first)
    gate.set()
    assert (queue.wait(second)[0] == 6.0).all() and queue.wait(second)[0].shape == (2, 2)
    queue.close("test over")
    thread.join(5)

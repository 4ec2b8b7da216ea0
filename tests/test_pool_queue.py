"""The worker pool's request queue on its own, with fake engines: order, the state machine, late replies, interrupts."""

from __future__ import annotations

import threading

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

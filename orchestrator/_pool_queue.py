"""The request queue of a worker pool: bounded, first come first served, with per-request timeouts.

Any number of caller threads ``submit`` requests and ``wait`` for them; one
thread per worker ``take``s the oldest waiting request, runs it on its engine
and ``finish``es it. Every state change happens under one lock; a caller
sleeps on its own request's event, so a reply wakes exactly one caller.

A request's states:

=========  =====================  ===================================================
state      entered by             meaning
=========  =====================  ===================================================
QUEUED     submit (caller)        waiting; its position is its index in the queue
RUNNING    take (worker k)        worker k runs it; ``cancel`` stops the run
DONE       finish (worker k)      outputs or the worker's exception are set; caller woken
ABANDONED  wait (caller timed     failed with WorkerTimeoutError or PoolClosedError:
           out) or close          taken out of the queue, or its run cancelled; whatever
                                  the worker still reports for it is dropped
=========  =====================  ===================================================

QUEUED -> RUNNING -> DONE is the normal path. QUEUED -> ABANDONED and
RUNNING -> ABANDONED happen on a timeout or on close. A worker's late
``finish`` of an ABANDONED request changes nothing, so a caller never sees
another request's outputs, and none is answered twice.

An engine (what a worker runs requests on) needs one method, ``run(request)
-> outputs``. Before it starts the run it sets ``request.cancel`` to a
callable that stops the run from another thread, then checks that the request
was not abandoned meanwhile (so a cancel is never lost between the two). A
thread engine's cancel flips ONNX Runtime's ``RunOptions.terminate``; a
process engine's would send a message.
"""

from __future__ import annotations

import collections
import enum
import threading
import time

from ._errors import PoolClosedError, PoolQueueFullError, WorkerTimeoutError


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ABANDONED = "abandoned"


class Request:
    """One predict call: its inputs, its deadline, and (once done) its outputs or error."""

    __slots__ = ("feeds", "timeout", "state", "worker", "submitted", "started", "outputs", "error", "cancel", "_done")

    def __init__(self, feeds: dict, timeout: float):
        self.feeds = feeds
        self.timeout = timeout
        self.state = State.QUEUED
        self.worker: int | None = None
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.outputs = None
        self.error: BaseException | None = None
        self.cancel = None  # set by the engine when the run starts: stops it from another thread
        self._done = threading.Event()


class RequestQueue:
    """The bounded queue between callers and ``workers`` worker threads (see the module docstring)."""

    def __init__(self, capacity: int, workers: int, label: str, names: list[str] | None = None):
        self.capacity = capacity
        self.workers = workers
        self.label = label
        # How messages name worker k: "worker k of N", or a process worker's name with its host and pid.
        self.names = list(names) if names else [f"worker {k} of {workers}" for k in range(workers)]
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}
        self._closed: str | None = None  # why, once closed
        self._gone: dict[int, str] = {}  # workers lost for good (process workers), and why

    # -- callers ---------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue ``request``; PoolQueueFullError at once when ``capacity`` requests already wait."""
        with self._cond:
            if self._closed is not None:
                raise PoolClosedError(f"{self.label} is closed ({self._closed}): it accepts no more requests")
            if len(self._waiting) >= self.capacity:
                raise PoolQueueFullError(
                    f"{self.label}: the request queue is full ({len(self._waiting)} requests waiting, queue_size "
                    f"{self.capacity}; {len(self._running)} of {self.workers} workers busy): the request was refused "
                    f"without waiting. Retry later, add workers, or raise queue_size "
                    f"(context.parallel.config_info = {{'pool': {{'queue_size': '...'}}}})"
                )
            self._waiting.append(request)
            self._cond.notify()

    def wait(self, request: Request):
        """The outputs of ``request``, or its error raised; WorkerTimeoutError once its timeout has passed.

        A caller interrupted while waiting (KeyboardInterrupt) gives its request up: it leaves the
        queue, or its run is stopped, so no worker spends time on a reply nobody reads.
        """
        remaining = request.submitted + request.timeout - time.monotonic()
        try:
            done = request._done.wait(max(0.0, remaining))
        except BaseException:
            self._give_up(request, lambda where: PoolClosedError(f"{self.label}: the caller was interrupted {where}"))
            raise
        if not done:
            self._give_up(request, lambda where: WorkerTimeoutError(
                f"{self.label}: predict timed out after {request.timeout:g} s {where}. Raise the timeout "
                f"(predict(..., timeout=S) or [pool] timeout)" + (" or add workers" if request.started is None else
                                                                  " if the model needs longer")
            ))
        if request.error is not None:
            raise request.error
        return request.outputs

    def _give_up(self, request: Request, error) -> None:
        """Abandon a request that is still QUEUED or RUNNING; ``error(where)`` says where it was."""
        with self._cond:
            if request.state is State.QUEUED:
                position = self._waiting.index(request) + 1
                waiting = len(self._waiting)
                self._waiting.remove(request)
                self._abandon(request, error(
                    f"while it waited in the queue, at position {position} of {waiting} ({len(self._running)} of "
                    f"{self.workers} workers busy); it never ran"
                ))
            elif request.state is State.RUNNING:
                ran = time.monotonic() - request.started
                queued = request.started - request.submitted
                self._abandon(request, error(
                    f"while {self.names[request.worker]} ran it (for {ran:.2f} s, after {queued:.2f} s in "
                    f"the queue); the run was stopped and the worker serves the next request"
                ))
                _cancel(request)

    # -- workers -----------------------------------------------------------------
    def take(self, worker: int) -> Request | None:
        """The oldest waiting request, now RUNNING on ``worker``; None once the queue is closed."""
        with self._cond:
            while not self._waiting and self._closed is None:
                self._cond.wait()
            if self._closed is not None:
                return None
            request = self._waiting.popleft()
            request.state = State.RUNNING
            request.worker = worker
            request.started = time.monotonic()
            self._running[worker] = request
            return request

    def finish(self, request: Request, outputs=None, error: BaseException | None = None) -> None:
        """Record the worker's outcome and wake the caller; nothing happens for an ABANDONED request."""
        with self._cond:
            if self._running.get(request.worker) is request:
                del self._running[request.worker]
            if request.state is not State.RUNNING:
                return
            request.state = State.DONE
            request.outputs, request.error = outputs, error
            request._done.set()

    def worker_gone(self, worker: int, reason: str) -> None:
        """Worker ``worker`` serves no more (its process died). The others serve on; when it was the
        last, the queue closes, and every waiting and later request hears why."""
        with self._cond:
            self._gone[worker] = reason
            left = self.workers - len(self._gone)
        if left == 0:
            self.close(f"every worker is gone; the last: {reason}")

    # -- owner -------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Fail every waiting request, stop every running one, and let the workers leave. Harmless twice."""
        with self._cond:
            if self._closed is not None:
                return
            self._closed = reason
            waiting = len(self._waiting)
            for position, request in enumerate(self._waiting, 1):
                self._abandon(request, PoolClosedError(
                    f"{self.label} was closed ({reason}) while this request waited in the queue at position "
                    f"{position} of {waiting}; it never ran"
                ))
            self._waiting.clear()
            for worker, request in self._running.items():
                if request.state is not State.RUNNING:
                    continue  # timed out already; its caller has its error
                self._abandon(request, PoolClosedError(
                    f"{self.label} was closed ({reason}) while {self.names[worker]} ran this request; "
                    f"the run was stopped"
                ))
                _cancel(request)
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def counts(self) -> tuple[int, int]:
        """(waiting, running) right now."""
        with self._cond:
            return len(self._waiting), len(self._running)

    @staticmethod
    def _abandon(request: Request, error: BaseException) -> None:
        request.state = State.ABANDONED
        request.error = error
        request._done.set()


def _cancel(request: Request) -> None:
    if request.cancel is not None:
        request.cancel()


def serve(queue: RequestQueue, engine, worker: int, tag_error) -> None:
    """A worker thread's loop: take, run, finish, until the queue closes.

    ``tag_error(exc, worker)`` gives the exception the caller sees (its type kept,
    the worker named). The loop never dies of a request's failure: only the
    queue closing ends it.
    """
    while True:
        request = queue.take(worker)
        if request is None:
            return
        try:
            outputs = engine.run(request)
        except Exception as exc:
            queue.finish(request, error=tag_error(exc, worker))
        except BaseException as exc:  # SystemExit from a custom op: report it, then let the thread end
            queue.finish(request, error=tag_error(exc, worker))
            raise
        else:
            queue.finish(request, outputs=outputs)
        finally:
            request.feeds = None  # the caller may hold the request; its inputs are no longer needed

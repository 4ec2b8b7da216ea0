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
QUEUED     requeue (worker k)     worker k's process died before the request reached it:
                                  back at the front of the queue for another worker
DONE       finish (worker k)      outputs or the worker's exception are set; caller woken
ABANDONED  wait (caller timed     failed with WorkerTimeoutError or PoolClosedError:
           out) or close          taken out of the queue, or its run cancelled; whatever
                                  the worker still reports for it is dropped
=========  =====================  ===================================================

QUEUED -> RUNNING -> DONE is the normal path. QUEUED -> ABANDONED and
RUNNING -> ABANDONED happen on a timeout or on close. A request's ``ended`` event
is set once its worker is done with it (answered, failed, or lost), in any
state but QUEUED: a caller whose running request timed out waits for it (at most
``cancel_wait`` seconds) so its error says what became of the worker, rather
than promising what the worker has not done yet. RUNNING -> QUEUED happens
only for a request that never reached its (process) worker, so it cannot be the
request that killed it, and a surviving worker runs it instead. A worker's late
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

import numpy as np

from ranks._log import get_logger

from ._errors import PoolClosedError, PoolQueueFullError, WorkerTimeoutError

log = get_logger("pool")


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ABANDONED = "abandoned"


class Request:
    """One predict call: its inputs, its deadline, and (once done) its outputs or error."""

    __slots__ = ("feeds", "timeout", "state", "worker", "submitted", "started", "outputs", "error", "cancel", "_done",
                 "ended")

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
        self.ended = threading.Event()  # set by serve() once the worker is done with it (and gone, if it died)


class RequestQueue:
    """The bounded queue between callers and ``workers`` worker threads (see the module docstring)."""

    def __init__(self, capacity: int, workers: int, label: str, names: list[str] | None = None,
                 cancel_wait: float = 0.0, cancel_pending: str = "the run was cancelled"):
        self.capacity = capacity
        self.workers = workers
        self.label = label
        # A caller whose running request timed out waits up to cancel_wait seconds for the worker to answer the
        # cancel; cancel_pending says what happens next when it has not (the backend knows: stopped, or killed).
        self.cancel_wait = cancel_wait
        self.cancel_pending = cancel_pending
        # How messages name worker k: "worker k of N", or a process worker's name with its host and pid.
        self.names = list(names) if names else [f"worker {k} of {workers}" for k in range(workers)]
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, Request] = {}
        self._closed: str | None = None  # why, once closed
        self._gone: dict[int, str] = {}  # workers lost for good (process workers), and why
        self._joined: dict[int, list[Request]] = {}  # requests a worker runs with its first one (join_requests)

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
        queue, or its run is stopped, so no worker spends time on a reply nobody reads. A request that
        times out while it runs is cancelled, and the error comes once the worker has answered the
        cancel (at most ``cancel_wait`` seconds later), saying whether the worker serves on.
        """
        remaining = request.submitted + request.timeout - time.monotonic()
        try:
            done = request._done.wait(max(0.0, remaining))
        except BaseException:
            where = self._give_up(request)
            if where is not None:
                self._fail(request, PoolClosedError(f"{self.label}: the caller was interrupted {where}"))
            raise
        if not done:
            where = self._give_up(request)
            if where is not None:
                running = request.started is not None
                if running:
                    where += "; " + self._after_cancel(request)
                self._fail(request, WorkerTimeoutError(
                    f"{self.label}: predict timed out after {request.timeout:g} s {where}. Raise the timeout "
                    f"(predict(..., timeout=S) or [pool] timeout)" + (" if the model needs longer" if running
                                                                      else " or add workers")
                ))
        if request.error is not None:
            raise request.error
        return request.outputs

    def _give_up(self, request: Request) -> str | None:
        """Abandon a request that is still QUEUED or RUNNING (a running one's run is cancelled); where it was,
        or None when it was done meanwhile. The caller sets its error (``_fail``)."""
        with self._cond:
            if request.state is State.QUEUED:
                position = self._waiting.index(request) + 1
                waiting = len(self._waiting)
                self._waiting.remove(request)
                request.state = State.ABANDONED
                return (f"while it waited in the queue, at position {position} of {waiting} ({len(self._running)} of "
                        f"{self.workers} workers busy); it never ran")
            if request.state is State.RUNNING:
                ran = time.monotonic() - request.started
                queued = request.started - request.submitted
                request.state = State.ABANDONED
                _cancel(request)
                return (f"while {self.names[request.worker]} ran it (for {ran:.2f} s, after {queued:.2f} s in "
                        f"the queue)")
            return None

    def _after_cancel(self, request: Request) -> str:
        """What became of the run of ``request`` (abandoned while RUNNING, its cancel sent) and of its worker.

        Waits up to ``cancel_wait`` seconds for the worker to be done with it: the worker serves on, or it
        did not stop the run and was killed (it left the pool). A request joined with others that still
        want their outputs is not cancelled, so this does not wait for it.
        """
        worker = request.worker
        with self._cond:
            others = [r for r in self._joined_with(request) if r is not request and r.state is State.RUNNING]
        if others:
            return (f"it runs joined with {len(others)} other request(s) (join_requests), which still want their "
                    f"outputs: {self.names[worker]} finishes that run and serves on; this request's rows are dropped")
        if not request.ended.wait(self.cancel_wait):
            return self.cancel_pending
        with self._cond:
            why = self._gone.get(worker)
            serving = self.workers - len(self._gone)
        if why is None:
            return "the run was stopped and the worker serves the next request"
        return (f"the run was cancelled, but {why}; it left the pool ({serving} of {self.workers} workers "
                f"serve on)")

    def _joined_with(self, request: Request) -> list[Request]:
        """The requests run as one batch with ``request`` (itself included), or [request]. Under the lock."""
        joined = self._joined.get(request.worker)
        if not joined:
            return [request]
        batch = [r for r in [self._running.get(request.worker)] + joined if r is not None]
        return batch if request in batch else [request]

    def _fail(self, request: Request, error: BaseException) -> None:
        request.error = error
        request._done.set()

    # -- workers -----------------------------------------------------------------
    def take(self, worker: int, stop=None) -> Request | None:
        """The oldest waiting request, now RUNNING on ``worker``; None once the queue is closed, or once
        ``stop()`` is true (checked whenever the queue is woken: ``wake``)."""
        with self._cond:
            while not self._waiting and self._closed is None and not (stop is not None and stop()):
                self._cond.wait()
            if self._closed is not None or (stop is not None and stop()):
                return None
            request = self._waiting.popleft()
            request.state = State.RUNNING
            request.worker = worker
            request.started = time.monotonic()
            self._running[worker] = request
            return request

    def take_joinable(self, worker: int, first: Request, limit: int, key) -> list[Request]:
        """``first`` and up to ``limit - 1`` more waiting requests whose ``key(request)`` equals first's, oldest
        first, now RUNNING on ``worker`` beside it (they are run as one batch)."""
        batch = [first]
        if limit <= 1:
            return batch
        wanted = key(first)
        if wanted is None:
            return batch
        with self._cond:
            for request in list(self._waiting):
                if len(batch) >= limit:
                    break
                if key(request) == wanted:
                    self._waiting.remove(request)
                    request.state = State.RUNNING
                    request.worker = worker
                    request.started = time.monotonic()
                    batch.append(request)
            if len(batch) > 1:
                self._joined[worker] = batch[1:]
        return batch

    def finish(self, request: Request, outputs=None, error: BaseException | None = None) -> None:
        """Record the worker's outcome and wake the caller; nothing happens for an ABANDONED request."""
        with self._cond:
            if self._running.get(request.worker) is request:
                del self._running[request.worker]
                self._joined.pop(request.worker, None)
            if request.state is not State.RUNNING:
                return
            request.state = State.DONE
            request.outputs, request.error = outputs, error
            request._done.set()

    def requeue(self, worker: int, requests: list[Request]) -> list[Request]:
        """Put those of ``requests`` that are still RUNNING on ``worker`` back at the front of the queue, in
        order, for another worker: ``worker`` died before they reached it. The requests put back."""
        with self._cond:
            self._running.pop(worker, None)
            self._joined.pop(worker, None)
            back = [r for r in requests if r.state is State.RUNNING and r.worker == worker]
            for request in back:
                request.state = State.QUEUED
                request.worker = None
                request.started = None
                request.cancel = None
            self._waiting.extendleft(reversed(back))
            self._cond.notify_all()
            return back

    def wake(self) -> None:
        """Wake every worker waiting in ``take``, so each checks its ``stop`` (its process hung up)."""
        with self._cond:
            self._cond.notify_all()

    def worker_gone(self, worker: int, reason: str) -> None:
        """Worker ``worker`` serves no more (its process died), because of ``reason`` ("worker 1 of 2 ... was
        killed by SIGKILL while it was idle"). The others serve on; when it was the last, the queue closes,
        and every waiting and later request hears why each worker left, the first first."""
        with self._cond:
            if worker in self._gone:
                return
            self._gone[worker] = reason
            reasons = list(self._gone.values())
        log.warning("%s: %s; it left the pool (%d of %d workers serve on)", self.label, reason,
                    self.workers - len(reasons), self.workers)
        if len(reasons) == self.workers:
            self.close(f"every worker is gone: {', then '.join(reasons)}")

    @property
    def gone(self) -> dict[int, str]:
        """The workers lost for good, in the order they left: {worker: why}."""
        with self._cond:
            return dict(self._gone)

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
            running = [(w, r) for w, r in self._running.items()] + [(w, r) for w, rs in self._joined.items() for r in rs]
            for worker, request in running:
                if request.state is not State.RUNNING:
                    continue  # timed out already; its caller has its error
                self._abandon(request, PoolClosedError(
                    f"{self.label} was closed ({reason}) while {self.names[worker]} ran this request; "
                    f"the run was cancelled"
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


def serve(queue: RequestQueue, engine, worker: int, tag_error, join: int = 1, fatal: tuple = (),
          undelivered: tuple = (), hung_up: threading.Event | None = None, left_idle=None) -> None:
    """A worker's loop: take, run, finish, until the queue closes or the worker is lost.

    ``tag_error(exc, worker)`` gives the exception the caller sees (its type kept,
    the worker named). The loop never dies of a request's failure: only the
    queue closing or the worker's process dying ends it.
    ``join`` > 1: the worker takes up to that many waiting requests of the same
    shapes at once and runs them as one batch (``JoinedRequests``).

    A worker that can die (a process) passes what tells how it died:
    ``fatal``, the errors of a worker that died while it ran a request (the request
    fails with it: it may be what killed the worker); ``undelivered`` (subclasses
    of ``fatal``), those of a worker that died before the request reached it (the
    request goes back to the queue for another worker); ``hung_up``, set (then
    ``queue.wake()``) when its connection hangs up while it may be idle; and
    ``left_idle()``, why it left when no request of its was running.
    """
    stop = hung_up.is_set if hung_up is not None else None
    while True:
        request = queue.take(worker, stop)
        if request is None:
            if stop is not None and stop() and not queue.closed:
                queue.worker_gone(worker, left_idle())
            return
        batch = queue.take_joinable(worker, request, join, join_key) if join > 1 else [request]
        requeued: list[Request] = []
        try:
            if len(batch) == 1:
                _run_one(queue, engine, worker, request, tag_error, fatal)
            else:
                _run_joined(queue, engine, worker, batch, tag_error, fatal)
        except undelivered:
            # Back to the queue first, then wait for the record of how the worker ended.
            requeued = queue.requeue(worker, batch)
            log.info("%s: %s; %d request(s) that never reached it went back to the queue", queue.label,
                     queue.names[worker], len(requeued))
            queue.worker_gone(worker, left_idle())
            return
        except fatal as exc:
            for member in batch:
                queue.finish(member, error=tag_error(exc, worker))
            queue.worker_gone(worker, getattr(exc, "reason", None) or str(exc).splitlines()[0])
            return
        finally:
            for member in batch:
                if member not in requeued:  # another worker may be reading a requeued request's inputs already
                    member.feeds = None  # the caller may hold the request; its inputs are no longer needed
                    member.ended.set()  # after worker_gone: a caller waiting on it learns whether the worker left
        # Not held while waiting for the next one: a failed request's error holds its traceback, which holds the
        # caller's predict frame and so the runner, which could then never be collected (this thread is a root).
        request = batch = member = requeued = None


def _run_one(queue: RequestQueue, engine, worker: int, request: Request, tag_error, fatal: tuple) -> None:
    try:
        outputs = engine.run(request)
    except fatal:
        raise
    except Exception as exc:
        queue.finish(request, error=tag_error(exc, worker))
    except BaseException as exc:  # SystemExit from a custom op: report it, then let the thread end
        queue.finish(request, error=tag_error(exc, worker))
        raise
    else:
        queue.finish(request, outputs=outputs)
    request.ended.set()  # the worker is done with it and serves on (a joined batch's members may still run alone)


def _run_joined(queue: RequestQueue, engine, worker: int, batch: list[Request], tag_error, fatal: tuple) -> None:
    """Run ``batch`` as one; when the joined run fails or its outputs cannot be split by rows, run each alone,
    so that a request whose inputs make the model fail fails alone."""
    joined = JoinedRequests(batch)
    try:
        outputs = engine.run(joined)
    except fatal:
        raise
    except Exception:  # noqa: BLE001 - each request runs again alone and reports its own outcome
        outputs = None
    if outputs is not None:
        parts = joined.split(outputs)
        if parts is not None:
            for member, part in zip(batch, parts):
                queue.finish(member, outputs=part)
            return
    for member in batch:
        if member.state is State.RUNNING:  # not abandoned meanwhile (a timeout, close)
            member.cancel = None
            _run_one(queue, engine, worker, member, tag_error, fatal)


def join_key(request: Request):
    """What requests must share to be joined: each input's name, dtype and shape beyond dimension 0."""
    key = []
    for name, array in request.feeds.items():
        if getattr(array, "ndim", 0) == 0:
            return None
        key.append((name, array.dtype.str, array.shape[1:]))
    return tuple(key)


class JoinedRequests:
    """Several requests of the same shapes run as one, their rows joined along dimension 0.

    To an engine it is a request: ``feeds``, ``state`` and ``cancel``. It counts as
    abandoned only when every member is, and a member's cancel stops the joined
    run only then (the others still want its outputs).
    """

    def __init__(self, members: list[Request]):
        self.members = members
        names = list(members[0].feeds)
        self.feeds = {name: np.concatenate([m.feeds[name] for m in members]) for name in names}
        self.rows = [m.feeds[names[0]].shape[0] for m in members]
        self.cancel = None  # set by the engine: stops the joined run
        for member in members:
            member.cancel = self._member_cancelled

    @property
    def state(self) -> State:
        return State.ABANDONED if all(m.state is State.ABANDONED for m in self.members) else State.RUNNING

    def _member_cancelled(self) -> None:
        if self.state is State.ABANDONED and self.cancel is not None:
            self.cancel()

    def split(self, outputs) -> list[list] | None:
        """Each member's rows of every output, or None when an output does not have the joined rows in dimension 0."""
        total = sum(self.rows)
        if any(np.ndim(output) == 0 or output.shape[0] != total for output in outputs):
            return None
        bounds = np.cumsum([0] + self.rows)
        return [[output[a:b] for output in outputs] for a, b in zip(bounds[:-1], bounds[1:])]

"""Process workers: each worker of a ModelParallelRunner in a child process of its own.

``worker_type = process`` (``[pool]`` option or ``build_from_file(...,
worker_type="process")``). Why: a model whose custom ops hold the GIL, a
crash that must not take the caller with it, or memory that must be returned
to the system when the runner closes. Threads are the default because they
cost nothing per request; a process worker costs one round trip over a
socket per request (inputs and outputs go through shared memory).

Pieces shared with the batch-split master: the worker program
(``python -m orchestrator._worker_main``, started, described and stopped by
``_worker_processes`` on ``launchers.Supervisor``: the caller's script is never imported again), the
protocol (``_protocol``: BUILD, PREDICT/REPLY/COLLECT, ERROR, EXIT, and CANCEL
on a second socket) and the slots (``_worker_memory.Slot``: one shared-memory
segment per worker, inputs then outputs, reused across requests).

One dispatcher thread per worker serves the runner's queue
(``_pool_queue.RequestQueue``), as a thread worker does; its engine's ``run``
writes the inputs into the slot, sends PREDICT and waits for the answer. A
timeout or ``close()`` cancels a running request: CANCEL goes to the worker,
which sets ONNX Runtime's ``terminate`` on that run; a worker that has not
answered ``CANCEL_GRACE_SECONDS`` later (stopped, or stuck in native code) is
killed and counts as lost. The caller whose timeout cancelled the run gets its
error once that is decided (at most ``CANCEL_GRACE_SECONDS`` later), so the
error says whether the worker serves on or was killed.

Failure policy: an exception of the model reaches its caller with its type
and the worker's traceback, and the worker serves on. A worker that dies is
out of the pool at once, busy or idle: one watcher thread polls every worker's
socket for a hang-up (``POLLRDHUP``: EOF, never a reply), so an idle worker's
death is seen without a request being sent to it, and ``worker_pids`` drops it.
The request a worker was running when it died fails with ``WorkerLostError``
naming the worker, its host, pid and signal or exit code (that request may be
what killed it); a request that had not reached it (the worker had hung up
already, its PREDICT could not be written, or the worker died with the PREDICT
unread in its socket, which Linux reports as ECONNRESET instead of EOF) goes
back to the front of the queue and a surviving worker runs it. When none is left the runner closes
itself and every waiting and later call says why each worker left. (No
restart: a worker that died once usually dies again, and a rebuild would take
seconds inside someone's request.)

Shared weights (``share_weights = true``): worker 0 publishes the model's
weights in a sealed memory file and the others map the same pages
(``ranks._shared_weights``, MindSpore Lite's cross-process weight sharing),
so N workers hold one copy.
"""

from __future__ import annotations

import copy
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import numpy as np
import onnx

from launchers import Supervisor
from launchers._supervisor import is_suspended
from ranks._config_file import RankConfig
from ranks._context import Context
from ranks._env import default_timeout
from ranks._log import get_logger
from ranks._tensor import DataType

from . import _protocol as proto
from ._errors import WorkerError, WorkerLostError, WorkerTimeoutError
from ._pool_plan import WorkerPlan
from ._pool_queue import Request, RequestQueue, State, serve
from ._worker_memory import Slot, layout
from ._worker_processes import HangUps, death_text, start_workers, stop_workers

log = get_logger("pool")

CANCEL_GRACE_SECONDS = 2.0  # a cancelled run must end this soon, or its worker is killed
EXIT_GRACE_SECONDS = 5.0  # close(): how long workers get to leave after EXIT before TERM
TERM_GRACE_SECONDS = 1.0  # then how long after TERM + CONT before KILL
_POLL_SECONDS = 0.1  # how often a dispatcher waiting for a reply looks at its request's cancel flag
_WATCH_SECONDS = 1.0  # the hang-up watcher's longest sleep (close() wakes it at once through its pipe)
IDLE = "it was idle"  # what a worker was doing when it died before a request reached it


class RequestNotDelivered(WorkerLostError):
    """The worker died before this request reached it: the request goes back to the queue (never to a caller)."""


class ProcessEngine:
    """The parent's side of one worker process: its sockets, its slot, and ``run(request)``."""

    def __init__(self, index: int, workers: int, channel: proto.StreamChannel, cancel: proto.StreamChannel):
        self.index = index
        self.workers = workers
        self.channel = channel
        self.cancel_channel = cancel
        self.slot = Slot(index)
        self.pid = 0
        self.host = socket.gethostname()
        self.supervisor: Supervisor | None = None
        self.info: dict = {}
        self._out_bytes = 0  # outputs of the largest request so far: the slot's output area is sized for it
        self._next_id = 0
        self.hung_up = threading.Event()  # set by the watcher when the worker's socket hangs up (it died)

    @property
    def name(self) -> str:
        return f"worker {self.index} of {self.workers} on host {self.host} (pid {self.pid})"

    # -- building ------------------------------------------------------------
    def send_build(self, model_path: Path, context: Context, cores: list[int], config: dict, publish: bool) -> None:
        self._send(proto.encode(
            proto.BUILD, 0, model_path=str(model_path), device_id=0, index=self.index, cores=cores,
            parent_pid=os.getpid(), who=f"worker {self.index} of {self.workers}", config=config,
            publish_weights=publish, buffers=[pickle.dumps(context)],
        ), "its BUILD was on its way to it")

    def receive_build(self, model_path: Path) -> None:
        msg = self._receive(f"building {model_path}")
        if msg.kind == proto.ERROR:
            raise proto.unpack_error(msg)
        if msg.kind != proto.BUILD_FINISH:
            raise WorkerError(f"{self.name} sent {msg.kind} while building; expected BUILD_FINISH or ERROR")
        self.info = msg.header

    # -- serving -------------------------------------------------------------
    def run(self, request: Request) -> list[np.ndarray] | None:
        """Run ``request`` in the worker; its outputs (copied out of the slot), or the worker's exception raised."""
        names = list(request.feeds)
        arrays = [np.asarray(request.feeds[n], order="C") for n in names]
        specs, in_end = layout([(n, a.dtype, a.shape) for n, a in zip(names, arrays)], 0)
        self.slot.ensure(in_end, self._out_bytes)
        self.slot.write_inputs(specs, arrays)
        del arrays
        self._next_id += 1
        request_id = self._next_id
        cancelled = threading.Event()

        def cancel() -> None:
            cancelled.set()
            try:
                self.cancel_channel.send(proto.encode(proto.CANCEL, request_id))
            except OSError:
                pass  # the worker is gone: the dispatcher sees EOF on the main socket

        request.cancel = cancel
        if request.state is State.ABANDONED:  # abandoned before cancel was armed: do not run it at all
            return None
        doing = f"request {request_id}"
        # Not delivered, so it cannot be what killed the worker: serve() puts it back in the queue.
        if self.hung_up.is_set():
            raise RequestNotDelivered(f"{self.name} hung up before {doing} was sent to it")
        try:
            self.channel.send(proto.encode(
                proto.PREDICT, request_id, slot=self.slot.handle, inputs=specs, out_offset=self.slot.out_offset,
                out_capacity=self.slot.out_capacity, block=None, placement=None, forget=[],
            ))
        except OSError:
            raise RequestNotDelivered(f"{self.name} hung up while {doing} was on its way to it") from None
        unread_means_undelivered = True  # until the worker answers: it may have died before reading the PREDICT
        while True:
            msg = self._answer(request_id, cancelled, f"running {doing}", unread_means_undelivered)
            unread_means_undelivered = False
            if msg.kind == proto.ERROR:
                raise proto.unpack_error(msg)
            if msg.kind != proto.REPLY:
                raise WorkerError(f"{self.name} sent {msg.kind} during {doing}; expected REPLY or ERROR")
            if msg.status == proto.NEED_SPACE:
                self._out_bytes = max(self._out_bytes, int(msg["needed"]))
                self.slot.ensure(0, self._out_bytes)
                self._send(proto.encode(proto.COLLECT, request_id, slot=self.slot.handle,
                                        out_offset=self.slot.out_offset, out_capacity=self.slot.out_capacity),
                           f"{doing} was on its way to it")
                continue
            return [self.slot.read(spec) for spec in msg["outputs"]]

    def _answer(self, request_id: int, cancelled: threading.Event, doing: str,
                unread_means_undelivered: bool = False) -> proto.Message:
        """The worker's next message about ``request_id``; a worker that ignores a cancel is killed.

        ``unread_means_undelivered``: a worker that died with the last message still unread in its socket
        never started the request (RequestNotDelivered; otherwise WorkerLostError).
        """
        cancel_deadline = None
        while True:
            if proto.wait([self.channel], _POLL_SECONDS):
                msg = self._receive(doing, unread_means_undelivered)
                if msg.id != request_id:
                    raise WorkerError(f"{self.name} answered request {msg.id} while {doing}")
                return msg
            if cancelled.is_set():
                now = time.monotonic()
                if cancel_deadline is None:
                    cancel_deadline = now + CANCEL_GRACE_SECONDS
                elif now >= cancel_deadline:
                    state = ", stopped (SIGSTOP)," if self._suspended() else ""
                    self.kill()
                    # Nobody waits for this request any more (cancelled): this is why the worker left the pool,
                    # for the log, the caller whose timeout cancelled it, and PoolClosedError if it was the last.
                    error = WorkerLostError(
                        f"{self.name}{state} did not answer the cancel of request {request_id} (timeout or close) "
                        f"within {CANCEL_GRACE_SECONDS:g} s, so it was killed"
                    )
                    error.reason = str(error)
                    raise error

    def _suspended(self) -> bool:
        return bool(self.pid) and is_suspended(self.pid)

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass

    def _send(self, frames: list, doing: str) -> None:
        try:
            self.channel.send(frames)
        except OSError:
            raise self._lost(doing) from None

    def _receive(self, doing: str, unread_means_undelivered: bool = False) -> proto.Message:
        try:
            frames = self.channel.recv()
        except ConnectionResetError:
            # Linux reports ECONNRESET (once, then EOF) on a Unix socket whose peer closed with data still unread
            # in its receive queue: the worker died before it read (all of) our last message.
            if unread_means_undelivered:
                raise RequestNotDelivered(f"{self.name} died before it read the request ({doing})") from None
            raise self._lost(doing) from None
        except (EOFError, OSError):
            raise self._lost(doing) from None
        return proto.decode(frames, self.name)

    def _lost(self, doing: str) -> WorkerLostError:
        """``WorkerLostError``: how the worker ended, while ``doing``, with its last lines; ``.reason``: its first line."""
        error = WorkerLostError(f"{self.name} {self._death_text(doing)}")
        error.reason = self.left_because(doing)
        return error

    def _death_text(self, doing: str) -> str:
        return death_text(self.supervisor, self.index, doing, "; it left the pool")

    def left_because(self, doing: str = IDLE) -> str:
        """Why the worker left the pool, in one line: ``worker 1 of 2 on host h (pid 4242) was killed by
        SIGKILL while it was idle`` (waits up to a second for the supervisor's record)."""
        return f"{self.name} {death_text(self.supervisor, self.index, doing, tail=False)}"

    def close(self) -> None:
        self.slot.unlink()
        self.channel.close()
        self.cancel_channel.close()


class ProcessWorkers:
    """The process backend of a ModelParallelRunner: ``plan.workers`` child processes, a dispatcher thread each.

    The same interface as ``_pool_threads.ThreadWorkers``: ``inputs``, ``outputs``,
    ``serve(queue, tag_error, label)``, ``close()``, ``CANCEL_WAIT_SECONDS`` and ``CANCEL_PENDING``.
    """

    # A caller whose running request timed out hears what became of the worker: it answered the cancel (it
    # serves on) or it was killed (it left the pool). Both are known CANCEL_GRACE_SECONDS after the cancel at
    # the latest (plus a dispatcher poll); the margin is for a loaded machine, and only then is the outcome
    # still open when the caller is answered.
    CANCEL_WAIT_SECONDS = CANCEL_GRACE_SECONDS + 1.0
    CANCEL_PENDING = (f"the run was cancelled and the worker had not answered yet: unless it stops the run within "
                      f"{CANCEL_GRACE_SECONDS:g} s of the cancel, it is killed and leaves the pool")

    def __init__(self, path: Path, model: onnx.ModelProto, plan: WorkerPlan, context: Context, config: RankConfig,
                 share_weights: bool):
        del model  # the workers load the file themselves
        self.plan = plan
        self.engines: list[ProcessEngine] = []
        self.supervisor: Supervisor | None = None
        self._closed = False
        self._queue: RequestQueue | None = None  # once serving: which workers are gone
        self._watcher: threading.Thread | None = None
        self._wake_read, self._wake_write = os.pipe()  # close() wakes the watcher through it
        try:
            self._start(plan)
            self._build(path, plan, context, config, share_weights and plan.workers > 1)
        except BaseException:
            self.close(graceful=False)
            raise
        first = self.engines[0].info
        self.inputs = [(name, DataType.from_numpy(np.dtype(dtype)), list(shape)) for name, dtype, shape in first["inputs"]]
        self.outputs = [(name, DataType.from_numpy(np.dtype(dtype)), list(shape)) for name, dtype, shape in first["outputs"]]
        log.info("built %d process workers x %d threads for %s (pids %s, cores %s, shared weights %s)", plan.workers,
                 plan.threads, path, [e.pid for e in self.engines], plan.cores, "on" if share_weights else "off")

    @property
    def pids(self) -> list[int]:
        """The pids of the workers still in the pool, in worker order (a dead worker leaves it at once)."""
        gone = self._queue.gone if self._queue is not None else {}
        return [e.pid for e in self.engines if e.index not in gone]

    @property
    def names(self) -> list[str]:
        """How the queue's messages name each worker: with its host and pid."""
        return [e.name for e in self.engines]

    def _start(self, plan: WorkerPlan) -> None:
        self.supervisor, channels, cancels = start_workers(
            [f"pool worker {k}" for k in range(plan.workers)], cancel_channels=True, stop_timeout=TERM_GRACE_SECONDS,
            world_size=plan.workers,
        )
        self.engines = [ProcessEngine(k, plan.workers, channel, cancel)
                        for k, (channel, cancel) in enumerate(zip(channels, cancels))]
        for engine in self.engines:
            engine.pid = self.supervisor.pids[engine.index]
            engine.supervisor = self.supervisor

    def _build(self, path: Path, plan: WorkerPlan, context: Context, config: RankConfig, share: bool) -> None:
        sections = _worker_sections(config)
        deadline = time.monotonic() + default_timeout()
        contexts = [_worker_context(context, plan.threads) for _ in self.engines]
        if share:
            # Worker 0 publishes the weights to the others' pids; they attach once it has.
            others = ", ".join(str(e.pid) for e in self.engines[1:])
            first = self.engines[0]
            first.send_build(path, contexts[0], plan.cores[0], {**sections, "pids": others}, publish=True)
            self._wait_build([first], path, deadline)
            sections = {**sections, "shared_mem_handle": str(first.info["weights_handle"])}
            rest = self.engines[1:]
        else:
            rest = self.engines
        for engine in rest:
            engine.send_build(path, contexts[engine.index], plan.cores[engine.index], sections, publish=False)
        self._wait_build(rest, path, deadline)

    def _wait_build(self, engines: list[ProcessEngine], path: Path, deadline: float) -> None:
        pending = {e.channel: e for e in engines}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(e.name for e in pending.values())
                raise WorkerTimeoutError(f"building {path}: {names} did not report BUILD_FINISH within "
                                         f"{default_timeout():g} s (ORCH_TIMEOUT)")
            for channel in proto.wait(list(pending), remaining):
                pending.pop(channel).receive_build(path)

    def serve(self, queue: RequestQueue, tag_error, label: str, join: int = 1) -> list[threading.Thread]:
        """One daemon dispatcher thread per worker process, and one watcher thread for their hang-ups."""
        del tag_error  # a worker's errors name it already (who, host and pid travel with them)
        self._queue = queue
        threads = []
        for engine in self.engines:
            thread = threading.Thread(
                target=serve, args=(queue, engine, engine.index, _mark_worker, join),
                kwargs={"fatal": (WorkerLostError,), "undelivered": (RequestNotDelivered,), "hung_up": engine.hung_up,
                        "left_idle": engine.left_because},
                name=f"{label} worker {engine.index}", daemon=True,
            )
            thread.start()
            threads.append(thread)
        self._watcher = threading.Thread(target=self._watch, args=(queue,), name=f"{label} watcher", daemon=True)
        self._watcher.start()
        return threads

    def _watch(self, queue: RequestQueue) -> None:
        """Until close(): flag each worker whose socket hangs up and wake its dispatcher, busy or idle.

        ``_worker_processes.HangUps`` polls for the hang-up only: this never wakes for the dispatchers'
        traffic, and never reads from the sockets. A busy dispatcher sees the EOF itself (its request fails);
        an idle one returns from ``take`` and records why its worker left.
        """
        watch = HangUps({e.index: e.channel for e in self.engines}, wake_fd=self._wake_read)
        while watch.watching:
            gone = watch.poll(_WATCH_SECONDS)
            if self._closed:
                return
            for index in gone:
                engine = self.engines[index]
                log.info("%s hung up", engine.name)
                engine.hung_up.set()
                queue.wake()

    def close(self, graceful: bool = True) -> None:
        """EXIT to every worker (one shared deadline), then TERM + CONT, a deadline, KILL; slots unlinked."""
        if self._closed:
            return
        self._closed = True
        # The watcher polls the sockets: it leaves before they are closed (a closed fd may be reused).
        if self._watcher is not None:
            os.write(self._wake_write, b"x")
            self._watcher.join(2 * _WATCH_SECONDS)
        os.close(self._wake_read)
        os.close(self._wake_write)
        stop_workers(self.supervisor, {e.index: e.channel for e in self.engines}, graceful=graceful,
                     exit_grace=EXIT_GRACE_SECONDS)
        for engine in self.engines:
            engine.close()


def _mark_worker(exc: BaseException, worker: int) -> BaseException:
    """A process worker's error as its caller gets it: already named (``[worker k of N on host H (pid P)]``)."""
    try:
        exc.worker = worker
    except AttributeError:
        pass
    return exc


def _worker_context(context: Context, threads: int) -> Context:
    """A worker's context: the user's, with its share of threads; the worker process pins itself to its cores."""
    mine = copy.deepcopy(context)
    mine.cpu.thread_num = threads
    mine.cpu.thread_affinity_mode = 0
    mine.cpu.thread_affinity_core_list = []
    return mine


def _worker_sections(config: RankConfig) -> dict:
    """The user's config for each worker's Model: without ``[pool]``, with spinning off unless the user chose."""
    sections = {name: dict(values) for name, values in config.sections.items() if name != "pool"}
    sections.setdefault("cpu_context", {}).setdefault("allow_spinning", "false")
    return sections

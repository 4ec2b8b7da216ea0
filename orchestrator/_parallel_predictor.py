"""The batch-split master: one worker process per device, each batch split along dimension 0.

    with ParallelPredictor("model.onnx", device_ids=[0, 1], context=ctx) as predictor:
        outputs = predictor.predict({"x": batch})

Pieces: the messages are in ``_protocol`` (stream framing over one
socketpair per worker), the layout of the shared-memory slots and blocks
in ``_worker_memory`` (their segments, and who unlinks them when, in
``ranks._shared_memory``), the worker's loop in ``_worker_main``, which the
supervisor (``launchers.Supervisor``) starts as ``python -m
orchestrator._worker_main``: the caller's script is never imported again, so
it needs no main guard, and ``python -c``, stdin and notebooks work. This
module plans cores and slices, talks to the workers, and turns every way a
worker can fail into an exception in the caller.

Handshake (before any traffic): start every worker; send each its BUILD; wait
for BUILD_FINISH from EVERY worker before the first PREDICT, so a build error
surfaces in the constructor. Then per request: one PREDICT per worker used,
one REPLY or ERROR back from each (a need_space REPLY asks for a COLLECT);
requests are served one at a time.

Failure policy: an exception raised by the model inside a worker (bad input,
an ONNX Runtime error) reaches the caller with its type and the worker's
traceback, and the predictor keeps serving. A worker that dies or does not
answer within the timeout ends the predictor: every worker is stopped, every
slot unlinked, and each later call raises ``WorkerError`` saying why; build a
new ``ParallelPredictor`` to go on. A worker that died between requests (idle)
is seen before the next request is sent (its socket hung up:
``_worker_processes.HangUps``), and that request fails saying the worker died
idle, not that the request killed it: every batch needs every worker. (A restarted worker would rebuild its
model for seconds inside someone's request, and a worker that died once
usually dies again: the caller decides, with the reason in hand.)
"""

from __future__ import annotations

import collections
import copy
import os
import pickle
import socket
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np

from launchers import Supervisor
from ranks._context import Context
from ranks._env import default_timeout
from ranks._errors import ConfigError, InputError, ModelNotFoundError
from ranks._session import usable_cores
from ranks._tensor import DataType, Tensor, check_shape

from . import _protocol as proto
from ._errors import WorkerError, WorkerLostError, WorkerTimeoutError
from ._protocol import TensorSpec
from ._worker_memory import BlockPool, Slot, aligned, layout, segment_prefix
from ._worker_processes import HangUps, death_text, last_lines, start_workers, stop_workers

EXIT_GRACE_SECONDS = 5.0  # close(): how long workers get to leave after EXIT (not a suspended one) before TERM
TERM_GRACE_SECONDS = 1.0  # then how long after TERM + CONT before KILL
_HOST = socket.gethostname()  # workers run on this host: the supervisor starts them here


def plan_cores(workers: int, threads: int, pool: list[int]) -> tuple[list[list[int]], int, str | None]:
    """Cores for each worker, the threads each runs, and a warning when cores had to be shared.

    ``threads`` 0 gives each worker an equal share of ``pool`` (at least one).
    With at least ``workers * threads`` cores every worker gets its own;
    with fewer, workers take the cores round-robin, so some share a core,
    and the warning says so.
    """
    if not pool:
        raise ConfigError("no CPU cores to run the workers on (the affinity list is empty)")
    if threads == 0:
        threads = max(1, len(pool) // workers)
    need = workers * threads
    if need <= len(pool):
        return [pool[i * threads:(i + 1) * threads] for i in range(workers)], threads, None
    cores = []
    for i in range(workers):
        mine = []
        for j in range(threads):
            core = pool[(i * threads + j) % len(pool)]
            if core not in mine:
                mine.append(core)
        cores.append(mine)
    warning = (
        f"{workers} workers x {threads} threads need {need} cores, but only {len(pool)} ({pool}) are available: "
        f"workers share cores round-robin ({cores}), so they slow each other down; "
        f"use fewer devices or set context.cpu.thread_num lower"
    )
    return cores, threads, warning


def plan_slices(batch: int, fixed: list[int | None]) -> list[int]:
    """Rows of the batch for each worker (0: not used), in worker order.

    ``fixed[i]`` is worker i's fixed batch size, or None when its model takes
    any batch. Dynamic workers share the rows evenly, the first ones taking
    one more (5 over 2 is 3 + 2); a batch smaller than the worker count uses
    fewer workers. Fixed workers take exactly their size or nothing.
    Raises ValueError when no plan fits, naming the batch sizes that would.
    """
    if batch <= 0:
        raise ValueError(f"the batch is empty (dimension 0 is {batch})")
    dynamic = [i for i, k in enumerate(fixed) if k is None]
    if len(dynamic) == len(fixed):
        used = min(batch, len(fixed))
        base, extra = divmod(batch, used)
        return [base + (1 if i < extra else 0) if i < used else 0 for i in range(len(fixed))]
    if not dynamic:
        total = 0
        for i, k in enumerate(fixed):
            total += k
            if total == batch:
                return [k if j <= i else 0 for j, k in enumerate(fixed)]
        fits = list(np.cumsum(fixed).tolist())
        raise ValueError(f"batch sizes that fit are {fits}")
    fixed_total = sum(k for k in fixed if k is not None)
    rest = batch - fixed_total
    if rest < 0:
        raise ValueError(f"the workers with fixed-batch models need {fixed_total} rows together, so the batch must be at least {fixed_total}")
    used = min(rest, len(dynamic))
    plan = [k or 0 for k in fixed]
    if used:
        base, extra = divmod(rest, used)
        for n, i in enumerate(dynamic[:used]):
            plan[i] = base + (1 if n < extra else 0)
    return plan


def _rows_of(spec: TensorSpec, start: int, count: int) -> TensorSpec:
    """The part of joined output ``spec`` that holds rows start:start+count."""
    row_bytes = spec.nbytes // spec.shape[0]
    return TensorSpec(spec.name, spec.dtype, (count,) + tuple(spec.shape[1:]), spec.offset + start * row_bytes, count * row_bytes)


class _Worker:
    def __init__(self, index: int, device_id: int, model_path: str, channel: proto.StreamChannel):
        self.index = index
        self.device_id = device_id
        self.model_path = model_path
        self.channel = channel
        self.pid = 0  # known once started
        self.supervisor: Supervisor | None = None
        self.slot = Slot(index)
        self.info: dict = {}
        self.out_bytes_per_row = 0.0  # learned from replies, to size the output area up front
        self.forget: list[str] = []  # released output blocks this worker still has mapped

    @property
    def name(self) -> str:
        return f"worker for device {self.device_id} on host {_HOST} (pid {self.pid})"

    def death_text(self, doing: str) -> str:
        return death_text(self.supervisor, self.index, doing)


class _Workers:
    """The processes and slots; ``shutdown`` is what close(), errors and the exit hook run."""

    def __init__(self):
        self.workers: list[_Worker] = []
        self.supervisor: Supervisor | None = None
        self.blocks = BlockPool()
        self.lock = threading.Lock()
        self.down = False

    def shutdown(self, graceful: bool = True) -> None:
        with self.lock:
            if self.down:
                return
            self.down = True
        stop_workers(self.supervisor, {w.index: w.channel for w in self.workers}, graceful=graceful,
                     exit_grace=EXIT_GRACE_SECONDS)
        self.blocks.release_all()
        for w in self.workers:
            w.channel.close()
            w.slot.unlink()


class ParallelPredictor:
    """Split each batch along dimension 0 over one worker process per device; join the outputs in order.

    Args:
        model_path: the ONNX model every worker builds (or give ``model_paths``).
        device_ids: one worker per id. On gpu/ascend the id goes into the
            context's ``device_id``; on cpu it names the worker, which is pinned
            to its own ``context.cpu.thread_num`` cores (see ``plan_cores``).
        context: target and threads (``Context()``: cpu, cores shared out evenly).
        model_paths: one model file per device instead of ``model_path``, e.g.
            batch-1 models converted per device; fixed-batch models take slices
            of exactly their batch.
        broadcast_inputs: names of inputs without a batch dimension, sent whole
            to every worker (a diffusion model's timestep, say).
        timeout: seconds a request (and the build) may take; default ORCH_TIMEOUT.

    Raises:
        ConfigError for bad arguments; the first worker's build error (its own
        type, with the worker's traceback) when a model cannot be built;
        WorkerLostError / WorkerTimeoutError when a worker dies or stalls while building.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device_ids=(0, 1),
        context: Context | None = None,
        *,
        model_paths=None,
        broadcast_inputs=(),
        timeout: float | None = None,
    ):
        self._workers = _Workers()
        self._finalizer = weakref.finalize(self, self._workers.shutdown)
        self._broken: str | None = None
        self._closed = False
        self._queue: collections.deque = collections.deque()
        self._busy = False
        self._turn = threading.Condition()
        self._request_id = 0
        self._output_shapes: dict[tuple, list | None] = {}

        device_ids = list(device_ids) if not isinstance(device_ids, int) else [device_ids]
        if not device_ids or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in device_ids):
            raise ConfigError(f"device_ids must be a non-empty list of non-negative integers, got {device_ids!r}")
        if len(set(device_ids)) != len(device_ids):
            raise ConfigError(f"device_ids has repeated devices: {device_ids}")
        if (model_path is None) == (model_paths is None):
            raise ConfigError("give either model_path (one model for every device) or model_paths (one per device)")
        paths = [model_path] * len(device_ids) if model_paths is None else list(model_paths)
        if len(paths) != len(device_ids):
            raise ConfigError(f"model_paths has {len(paths)} files for {len(device_ids)} devices {device_ids}; give one per device")
        paths = [str(Path(p)) for p in paths]
        for path in paths:
            if not Path(path).is_file():
                raise ModelNotFoundError(f"model file {path} does not exist" if not Path(path).exists()
                                         else f"model path {path} is not a file; expected an ONNX file")
        if context is None:
            context = Context()
        if not isinstance(context, Context):
            raise ConfigError(f"context must be a Context, got {type(context).__name__}")
        if isinstance(broadcast_inputs, str):
            broadcast_inputs = [broadcast_inputs]
        self._broadcast = list(broadcast_inputs)
        self._timeout = default_timeout() if timeout is None else float(timeout)
        if self._timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._device_ids = device_ids
        self._target = context.target[0]

        contexts, cores = self._worker_contexts(context, device_ids)
        self._start(paths, contexts, cores)
        self._check_models()
        # Which workers died between requests; looked at (not waited for) before each request is sent.
        self._hang_ups = HangUps({w.index: w.channel for w in self._workers.workers})

    # -- starting ------------------------------------------------------------
    def _worker_contexts(self, context: Context, device_ids: list[int]):
        contexts, cores = [], []
        if self._target == "cpu":
            pool = context.cpu.thread_affinity_core_list or usable_cores()
            plan, threads, warning = plan_cores(len(device_ids), context.cpu.thread_num, pool)
            if warning:
                warnings.warn(warning, RuntimeWarning, stacklevel=3)
        else:
            plan, threads = [None] * len(device_ids), context.cpu.thread_num
        for device_id, mine in zip(device_ids, plan):
            own = copy.deepcopy(context)
            own.cpu.thread_num = threads
            if mine is not None:
                own.cpu.thread_affinity_core_list = []  # the whole process is pinned instead
            own.gpu.device_id = device_id
            own.ascend.device_id = device_id
            contexts.append(own)
            cores.append(mine)
        return contexts, cores

    def _start(self, paths, contexts, cores) -> None:
        try:
            supervisor, channels, _ = start_workers([f"worker for device {d}" for d in self._device_ids],
                                                    cancel_channels=False, stop_timeout=TERM_GRACE_SECONDS)
            self._workers.supervisor = supervisor
            for index, (device_id, path, channel) in enumerate(zip(self._device_ids, paths, channels)):
                self._workers.workers.append(_Worker(index, device_id, path, channel))
            for w in self._workers.workers:
                w.pid = supervisor.pids[w.index]
                w.supervisor = supervisor
                self._send(w, proto.encode(
                    proto.BUILD, 0, model_path=w.model_path, device_id=w.device_id, index=w.index,
                    cores=cores[w.index], parent_pid=os.getpid(), buffers=[pickle.dumps(contexts[w.index])],
                ), "its BUILD was on its way to it")
            # Handshake before traffic: every worker must report BUILD_FINISH
            # before the first PREDICT, so that a build error surfaces here and
            # not inside some later request.
            self._wait_build()
        except BaseException:
            self._workers.shutdown(graceful=False)
            raise

    def _wait_build(self) -> None:
        pending = {w.channel: w for w in self._workers.workers}
        deadline = time.monotonic() + self._timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(w.name for w in pending.values())
                raise WorkerTimeoutError(
                    f"building the model: {names} did not report BUILD_FINISH within {self._timeout:g} s"
                )
            for channel in proto.wait(list(pending), remaining):
                worker = pending[channel]
                msg = self._receive(worker, f"building the model {worker.model_path}")
                if msg.kind == proto.ERROR:
                    raise proto.unpack_error(msg)
                if msg.kind != proto.BUILD_FINISH:
                    raise WorkerError(f"{worker.name} sent {msg.kind} while building; expected BUILD_FINISH or ERROR")
                worker.info = msg.header
                del pending[channel]

    def _receive(self, worker: _Worker, doing: str, unread_request: int | None = None,
                 rows: dict | None = None) -> proto.Message:
        """The worker's next message. ``unread_request``: the id of a PREDICT it has not answered at all yet
        (a worker that died with it unread in its socket died idle, before the request reached it), whose
        ``rows`` are {worker: (first, end)}."""
        try:
            frames = worker.channel.recv()
        except ConnectionResetError:
            # Linux reports ECONNRESET (once, then EOF) on a Unix socket whose peer closed with data still unread:
            # the worker died before it read our last message.
            if unread_request is not None:
                raise self._died_idle([worker], unread_request, rows or {}, unread=True) from None
            raise WorkerLostError(f"{worker.name} {worker.death_text(doing)}") from None
        except (EOFError, OSError):
            raise WorkerLostError(f"{worker.name} {worker.death_text(doing)}") from None
        return proto.decode(frames, worker.name)

    def _died_idle(self, dead: list[_Worker], request_id: int, rows: dict, unread: bool = False) -> WorkerLostError:
        """The error for workers that died between requests (idle), so predict request ``request_id`` never
        reached them (``unread``: it was written to the socket, but never read); ``rows``: {worker: (first, end)}
        of the request's plan. ``.reason`` (what later calls hear) is the first line without the advice."""

        def why(w: _Worker) -> str:
            first, end = rows.get(w.index, (0, 0))
            request = f"predict request {request_id}" + (f" (rows {first}:{end})" if end > first else "")
            then = f": {request} was unread in its socket" if unread else f", before {request} was sent to it"
            return f"{w.name} {death_text(w.supervisor, w.index, 'it was idle', then, tail=False)}"

        whys = [why(w) for w in dead]
        reason = "; ".join(whys)
        count = len(self._workers.workers)
        error = WorkerLostError(
            f"{reason}. Every batch is split over all {count} workers (devices {self._device_ids}), so request "
            f"{request_id} cannot run, and this ParallelPredictor is closed (its other workers are stopped): create "
            f"a new ParallelPredictor to go on" + "".join(last_lines(w.supervisor, w.index) for w in dead[:1])
        )
        error.reason = reason
        return error

    def _check_models(self) -> None:
        first = self._workers.workers[0]
        names = [name for name, _, _ in first.info["inputs"]]
        out_names = [name for name, _, _ in first.info["outputs"]]
        for w in self._workers.workers[1:]:
            theirs = [name for name, _, _ in w.info["inputs"]]
            their_out = [name for name, _, _ in w.info["outputs"]]
            if theirs != names or their_out != out_names:
                self._workers.shutdown()
                raise ConfigError(
                    f"the models differ in their inputs or outputs: {first.model_path} on device {first.device_id} "
                    f"has inputs {names} and outputs {out_names}, {w.model_path} on device {w.device_id} has "
                    f"inputs {theirs} and outputs {their_out}"
                )
        unknown = [b for b in self._broadcast if b not in names]
        if unknown:
            self._workers.shutdown()
            raise ConfigError(f"broadcast_inputs names {unknown}, which are not inputs of the model; its inputs are {names}")
        if all(name in self._broadcast for name in names):
            self._workers.shutdown()
            raise ConfigError(f"every input ({names}) is a broadcast input: there is no batch to split")

    # -- introspection -------------------------------------------------------
    @property
    def device_ids(self) -> list[int]:
        return list(self._device_ids)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers, in device order."""
        return [w.pid for w in self._workers.workers]

    @property
    def cores(self) -> list[list[int]]:
        """The cores each worker runs on, as the worker reported them."""
        return [list(w.info.get("cores", [])) for w in self._workers.workers]

    @property
    def segment_names(self) -> list[str]:
        """The shared-memory segments of this predictor now: the workers' slots and the pooled output blocks."""
        slots = [w.slot.name for w in self._workers.workers if w.slot.name]
        return slots + [b.name for b in self._workers.blocks.blocks]

    @property
    def closed(self) -> bool:
        return self._closed or self._broken is not None

    def get_inputs(self) -> list[Tensor]:
        """The model's inputs (name, dtype, shape with -1 for free dimensions), as the first worker built it."""
        return [Tensor(shape=shape, dtype=DataType.from_numpy(np.dtype(dtype)), name=name)
                for name, dtype, shape in self._workers.workers[0].info["inputs"]]

    def get_outputs(self) -> list[Tensor]:
        return [Tensor(shape=shape, dtype=DataType.from_numpy(np.dtype(dtype)), name=name)
                for name, dtype, shape in self._workers.workers[0].info["outputs"]]

    def split_sizes(self, batch: int) -> list[int]:
        """Rows each worker gets for a batch of ``batch`` rows (0: not used)."""
        return self._plan(batch)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ParallelPredictor devices={self._device_ids} target={self._target} {state}>"

    # -- predicting ----------------------------------------------------------
    def predict(self, inputs, timeout: float | None = None) -> list[Tensor]:
        """Run ``inputs`` split over the workers; outputs joined along dimension 0.

        Args:
            inputs: numpy arrays or Tensors, a list in the model's input order
                or a dict by input name. Every input not named in
                ``broadcast_inputs`` carries the batch in dimension 0.
            timeout: seconds the workers may take on this request (default:
                the predictor's timeout). Waiting behind earlier requests is
                bounded too, by their own timeouts.

        Returns:
            One Tensor per model output, equal to running the whole batch on one device.

        Raises:
            InputError: inputs that do not fit the model or cannot be split.
            the worker's own exception type: the model failed inside a worker
                (its traceback is the ``__cause__``, its device in the message).
            WorkerLostError: a worker died; WorkerTimeoutError: it did not answer in time.
                After either, the predictor is closed.
            WorkerError: the predictor is closed.
        """
        timeout = self._timeout if timeout is None else float(timeout)
        if timeout <= 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._refuse_if_closed()
        arrays = self._normalize(inputs)
        batch = self._batch_size(arrays)
        plan = self._plan(batch)
        self._enter(timeout)
        try:
            self._refuse_if_closed()
            self._request_id += 1
            return self._run(self._request_id, arrays, plan, timeout)
        finally:
            with self._turn:
                self._busy = False
                self._turn.notify_all()

    def _refuse_if_closed(self) -> None:
        if self._broken is not None:
            raise WorkerError(f"this ParallelPredictor no longer accepts requests: {self._broken}; create a new ParallelPredictor")
        if self._closed:
            raise WorkerError("this ParallelPredictor is closed; create a new ParallelPredictor")

    def _enter(self, timeout: float) -> None:
        """Wait for our turn: requests are served one at a time, first come first served."""
        me = object()
        with self._turn:
            ahead = len(self._queue) + (1 if self._busy else 0)
            # Each request ahead is bounded by its timeout (plus stopping workers after a failure).
            limit = (ahead + 1) * (timeout + EXIT_GRACE_SECONDS)
            deadline = time.monotonic() + limit
            self._queue.append(me)
            while self._busy or self._queue[0] is not me:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._queue.remove(me)
                    self._turn.notify_all()
                    raise WorkerTimeoutError(f"predict: waited {limit:g} s for {ahead} earlier request(s) to finish")
                self._turn.wait(remaining)
            self._queue.popleft()
            self._busy = True

    def _normalize(self, inputs) -> list[np.ndarray]:
        specs = self._workers.workers[0].info["inputs"]
        names = [name for name, _, _ in specs]
        if isinstance(inputs, (np.ndarray, Tensor)):
            inputs = [inputs]
        if isinstance(inputs, dict):
            unknown = [k for k in inputs if k not in names]
            missing = [n for n in names if n not in inputs]
            if unknown or missing:
                raise InputError(f"predict: inputs {sorted(inputs)} do not match the model's inputs {names}"
                                 + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else ""))
            values = [inputs[n] for n in names]
        elif isinstance(inputs, (list, tuple)):
            if len(inputs) != len(names):
                raise InputError(f"predict: got {len(inputs)} inputs, the model has {len(names)}: {names}")
            values = list(inputs)
        else:
            raise InputError(f"predict: inputs must be a list of arrays or Tensors, or a dict by name; got {type(inputs).__name__}")
        arrays = []
        for (name, dtype, shape), value in zip(specs, values):
            if isinstance(value, Tensor):
                value = value.get_data_to_numpy()
            if not isinstance(value, np.ndarray):
                raise InputError(f"predict: input {name!r} must be a numpy array or Tensor, got {type(value).__name__}")
            if value.dtype != np.dtype(dtype):
                raise InputError(f"predict: input {name!r} has dtype {value.dtype}, the model expects {np.dtype(dtype)}")
            if value.dtype == object:
                raise InputError(f"predict: input {name!r} holds strings, which cannot be placed in shared memory")
            if name not in self._broadcast and value.ndim == 0:
                raise InputError(f"predict: input {name!r} is a scalar, so it has no batch dimension to split; "
                                 f"name it in broadcast_inputs to send it whole to every worker")
            # Checked here, on the caller's whole array, so the message shows the shape the caller passed
            # (dimension 0 of a batched input is split, and a fixed batch is checked when splitting).
            check_shape(name, list(shape) if name in self._broadcast else [-1] + list(shape[1:]), value.shape)
            arrays.append(value)
        return arrays

    def _batch_size(self, arrays: list[np.ndarray]) -> int:
        names = [name for name, _, _ in self._workers.workers[0].info["inputs"]]
        sizes = {name: a.shape[0] for name, a in zip(names, arrays) if name not in self._broadcast}
        if len(set(sizes.values())) != 1:
            raise InputError(f"predict: the inputs disagree on the batch (dimension 0): {sizes}; "
                             f"inputs without a batch dimension go in broadcast_inputs")
        batch = next(iter(sizes.values()))
        if batch == 0:
            raise InputError(f"predict: the batch is empty (dimension 0 of {list(sizes)} is 0)")
        return batch

    def _fixed_batch(self, worker: _Worker) -> int | None:
        for name, _, shape in worker.info["inputs"]:
            if name not in self._broadcast and shape and shape[0] > 0:
                return shape[0]
        return None

    def _plan(self, batch: int) -> list[int]:
        workers = self._workers.workers
        fixed = [self._fixed_batch(w) for w in workers]
        try:
            return plan_slices(batch, fixed)
        except ValueError as exc:
            which = ", ".join(
                f"{w.model_path} on device {w.device_id}: " + (f"fixed batch {k}" if k else "any batch")
                for w, k in zip(workers, fixed)
            )
            raise InputError(f"predict: a batch of {batch} cannot be split over devices {self._device_ids} "
                             f"({which}): {exc}") from None

    def _run(self, request_id: int, arrays: list[np.ndarray], plan: list[int], timeout: float) -> list[Tensor]:
        workers = self._workers.workers
        ends = np.cumsum(plan).tolist()
        # {worker: (first row, end)} of the workers this request gives rows to
        rows = {w.index: (end - count, end) for w, count, end in zip(workers, plan, ends) if count}
        dead = self._hang_ups.poll(0)
        if dead:  # died between requests: nothing of this request was sent, and it cannot run without them
            error = self._died_idle([workers[i] for i in dead], request_id, rows)
            self._break(error.reason)
            raise error
        names = [name for name, _, _ in workers[0].info["inputs"]]
        batch = sum(plan)
        deadline = time.monotonic() + timeout
        signature = self._signature(names, arrays)
        block, joined = self._take_block(signature, batch)
        forget = self._workers.blocks.take_released()
        if forget:
            for w in workers:
                w.forget.extend(forget)
        try:
            for w, count in zip(workers, plan):
                if count == 0:
                    continue
                start = rows[w.index][0]
                parts = [a if name in self._broadcast else a[start:start + count] for name, a in zip(names, arrays)]
                specs, in_end = layout([(n, p.dtype, p.shape) for n, p in zip(names, parts)], 0)
                w.slot.ensure(in_end, 0 if block else self._expected_output_bytes(w, count))
                w.slot.write_inputs(specs, parts)
                placement = None
                if block is not None:
                    placement = [_rows_of(spec, start, count) for spec in joined]
                forget, w.forget = w.forget, []
                try:
                    w.channel.send(proto.encode(
                        proto.PREDICT, request_id, slot=w.slot.handle, inputs=specs, out_offset=w.slot.out_offset,
                        out_capacity=w.slot.out_capacity, block=block.handle if block else None, placement=placement,
                        forget=forget,
                    ))
                except OSError:  # EPIPE: it had hung up already (died since the look above), idle
                    raise self._died_idle([w], request_id, rows) from None
            replies, errors = self._collect(request_id, rows, deadline, timeout)
        except BaseException as exc:
            # The exchange stopped half way (a worker died or stalled, or we were
            # interrupted): replies may still be on their way, so no later request
            # could trust the pipes. End the predictor.
            self._break(getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
            raise
        if errors:
            # Every worker has answered, so the slots are free again: report the
            # failure of the first device (in device order) and keep serving.
            raise errors[min(errors)]
        if block is not None and all(reply["placed"] for reply in replies.values()):
            # The fast path: the workers wrote the joined outputs in place.
            out_names = [name for name, _, _ in workers[0].info["outputs"]]
            return [Tensor(block.array(spec), name=name) for name, spec in zip(out_names, joined)]
        results = self._join(replies, rows, block)
        self._learn(signature, replies, rows)
        return results

    @staticmethod
    def _signature(names: list[str], arrays: list[np.ndarray]) -> tuple:
        # Everything but the batch size: output shapes learned for one batch hold for any.
        return tuple((name, a.dtype.str, a.shape[1:] if a.ndim else ()) for name, a in zip(names, arrays))

    def _take_block(self, signature: tuple, batch: int):
        """An output block for the request, when the joined output shapes are known from an earlier request
        and a block is free (none is when the caller still holds the outputs of every pooled one)."""
        known = self._output_shapes.get(signature)
        if not known:
            return None, None
        out_names = [name for name, _, _ in self._workers.workers[0].info["outputs"]]
        joined, end = layout([(n, dtype, (batch,) + rest) for n, (dtype, rest) in zip(out_names, known)], 0)
        block = self._workers.blocks.take(end) if end else None
        return (block, joined) if block is not None else (None, None)

    def _learn(self, signature: tuple, replies: dict, rows: dict) -> None:
        """Remember the outputs' shapes beyond the batch for this input signature, if every output has a batch."""
        shapes = None
        for i, reply in replies.items():
            specs = reply["outputs"]
            count = rows[i][1] - rows[i][0]
            mine = [(s.dtype, tuple(s.shape[1:])) for s in specs]
            if any(len(s.shape) == 0 or s.shape[0] != count for s in specs) or (shapes is not None and mine != shapes):
                self._output_shapes[signature] = None
                return
            shapes = mine
        if len(self._output_shapes) >= 256:
            self._output_shapes.clear()
        self._output_shapes[signature] = shapes

    def _expected_output_bytes(self, w: _Worker, count: int) -> int:
        total = 0
        for _, dtype, shape in w.info["outputs"]:
            rest = shape[1:]
            if not shape or any(d < 0 for d in rest):
                return int(w.out_bytes_per_row * count)
            total = aligned(total + count * int(np.prod(rest, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return max(total, int(w.out_bytes_per_row * count))

    def _send(self, w: _Worker, frames: list, doing: str) -> None:
        try:
            w.channel.send(frames)
        except OSError:
            raise WorkerLostError(f"{w.name} {w.death_text(doing)}") from None

    def _collect(self, request_id: int, rows: dict, deadline: float, timeout: float) -> tuple[dict, dict]:
        workers = self._workers.workers
        pending = {workers[i].channel: workers[i] for i in rows}
        replies: dict[int, proto.Message] = {}
        errors: dict[int, BaseException] = {}
        answered: set[int] = set()  # workers that sent something for this request: they read its PREDICT
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(f"{w.name} (rows {rows[w.index][0]}:{rows[w.index][1]})" for w in pending.values())
                raise WorkerTimeoutError(f"predict request {request_id}: {names} did not answer within {timeout:g} s")
            # A worker that dies closes its socket: EOF wakes this select at once.
            for channel in proto.wait(list(pending), remaining):
                w = pending[channel]
                first, last = rows[w.index]
                msg = self._receive(w, f"running rows {first}:{last} of predict request {request_id}",
                                    None if w.index in answered else request_id, rows)
                answered.add(w.index)
                if msg.id != request_id:
                    raise WorkerError(f"{w.name} answered request {msg.id} during request {request_id}")
                if msg.kind == proto.ERROR:
                    errors[w.index] = proto.unpack_error(msg)
                    del pending[channel]
                elif msg.kind == proto.REPLY and msg.status == proto.NEED_SPACE:
                    w.slot.ensure(0, msg["needed"])
                    self._send(w, proto.encode(proto.COLLECT, request_id, slot=w.slot.handle,
                                               out_offset=w.slot.out_offset, out_capacity=w.slot.out_capacity),
                               f"running rows {first}:{last} of predict request {request_id} (its outputs' COLLECT "
                               f"was on its way to it)")
                elif msg.kind == proto.REPLY:
                    replies[w.index] = msg
                    del pending[channel]
                else:
                    raise WorkerError(f"{w.name} sent {msg.kind} during request {request_id}; expected REPLY or ERROR")
        return replies, errors

    def _join(self, replies: dict, rows: dict, block) -> list[Tensor]:
        """Join the outputs with a copy (the slow path: shapes not known in advance, or not as expected)."""
        workers = self._workers.workers
        used = sorted(replies)
        out_names = [name for name, _, _ in workers[0].info["outputs"]]

        def source(i: int, spec):
            return block.array(spec) if replies[i]["placed"] else workers[i].slot.view(spec)

        for i in used:
            count = rows[i][1] - rows[i][0]
            per_row = sum(s.nbytes for s in replies[i]["outputs"]) / count
            workers[i].out_bytes_per_row = max(workers[i].out_bytes_per_row, per_row)
        results = []
        for j, name in enumerate(out_names):
            specs = [replies[i]["outputs"][j] for i in used]
            shapes = [tuple(s.shape) for s in specs]
            if len(used) == 1:
                results.append(Tensor(np.array(source(used[0], specs[0])), name=name))
                continue
            if any(len(s) == 0 for s in shapes) or len({s[1:] for s in shapes}) != 1 or len({s.dtype for s in specs}) != 1:
                raise WorkerError(f"output {name!r}: the workers returned {[list(s) for s in shapes]}, which cannot be "
                                  f"joined along dimension 0")
            joined = np.empty((sum(s[0] for s in shapes),) + shapes[0][1:], dtype=np.dtype(specs[0].dtype))
            at = 0
            for i, spec in zip(used, specs):
                np.copyto(joined[at:at + spec.shape[0]], source(i, spec), casting="no")
                at += spec.shape[0]
            results.append(Tensor(joined, name=name))
        return results

    def _break(self, reason: str) -> None:
        self._broken = reason
        self._workers.shutdown(graceful=False)

    # -- closing ---------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (EXIT, then TERM, then KILL at shared deadlines) and unlink the slots. Idempotent."""
        self._closed = True
        # Let a request in flight finish (it is bounded by its timeout) rather than
        # pull the pipes from under it.
        with self._turn:
            deadline = time.monotonic() + self._timeout + EXIT_GRACE_SECONDS
            while self._busy and time.monotonic() < deadline:
                self._turn.wait(max(0.0, deadline - time.monotonic()))
        self._finalizer()

    def __enter__(self) -> "ParallelPredictor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()


__all__ = ["ParallelPredictor", "plan_cores", "plan_slices", "segment_prefix"]

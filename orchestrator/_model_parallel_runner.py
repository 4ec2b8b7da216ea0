"""ModelParallelRunner: many client threads call ``predict`` at once on a pool of model workers.

    runner = ModelParallelRunner()
    runner.build_from_file("model.onnx", context)  # context.parallel.workers_num workers of context.cpu.thread_num threads
    outputs = runner.predict(inputs)                 # from any number of threads at once
    runner.close()                                   # or: with ModelParallelRunner() as runner: ...

MindSpore Lite's API, with its faults fixed:

==========================================  ============================================================
MindSpore Lite's runner                     this one
==========================================  ============================================================
a failed queued request reports success     the worker's own exception reaches its caller, type kept,
or a bare ``predict failed!``               the worker named; the other callers are not affected
no timeout                                  every request has one (``[pool] timeout``, default
                                            ``ORCH_TIMEOUT``); the error names the time and where the
                                            request was (queue position, or the worker running it)
a full queue refuses without saying why     ``PoolQueueFullError`` (a RuntimeError and ``queue.Full``)
                                            at once, with the queue size
affinity mode 2 and core lists refused      modes 0, 1, 2 and core lists (worker k: slice k)
==========================================  ============================================================

Pieces: ``_pool_plan`` reads the ``[pool]`` options and plans workers, threads
and cores; ``_pool_queue`` is the request queue and its state machine;
``_pool_threads`` builds the thread workers (one ONNX Runtime session each).
``_pool_processes`` the process workers (``worker_type = process``): one
dispatcher thread per child process serving the same queue, with engines
whose ``run(request)`` forwards to the child and whose cancel tells it to stop.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
import weakref
from pathlib import Path

from ranks._context import Context
from ranks._env import check_timeout
from ranks._errors import ConfigError, ConfigTypeError, InputTypeError, ModelError, ModelNotFoundError
from ranks._config_file import load_config
from ranks._log import get_logger
from ranks._mindir import converted_model_file
from ranks._model import ModelType, _load_model_file, is_sharded, validate_feeds
from ranks._shared_weights import HANDLE_KEY, PID_LIST_KEY
from ranks._tensor import DataType, Tensor, TensorMeta, output_tensors

from ._pool_plan import PoolOptions, WorkerPlan, plan_workers, pool_options, worker_config
from ._pool_queue import Request, RequestQueue
from ._pool_processes import ProcessWorkers
from ._pool_threads import ThreadWorkers

log = get_logger("pool")

# worker_type -> backend (both: ``inputs``, ``outputs``, ``serve(queue, tag_error, label)``, ``close()``, and
# ``CANCEL_WAIT_SECONDS`` / ``CANCEL_PENDING``: how long a timed-out caller waits for the worker to answer the
# cancel, and what its error says when it has not)
BACKENDS = {"thread": ThreadWorkers, "process": ProcessWorkers}

CLOSE_JOIN_SECONDS = 10.0  # close(): how long worker threads get to finish their (stopped) runs


class ModelParallelRunner:
    """A pool of model workers that any number of threads may call ``predict`` on at once.

    Workers are numbered from 0. See the module docstring for what differs from
    MindSpore Lite, and ``_pool_plan`` for the ``[pool]`` options.
    """

    def __init__(self):
        self._model_path = ""
        self._queue: RequestQueue | None = None
        self._options: PoolOptions | None = None
        self._plan: WorkerPlan | None = None
        self._backend = None
        self._inputs: list[tuple[str, DataType, list[int]]] = []
        self._outputs: list[TensorMeta] = []
        self._shutdown = None  # weakref.finalize: closes the queue and joins the workers, once
        self._close_reason = ["the runner was garbage-collected or the interpreter exited"]  # what pending requests hear

    # -- building ------------------------------------------------------------------
    def build_from_file(self, model_path, context: Context | None = None, *, queue_size: int | None = None,
                        timeout: float | None = None, share_weights: bool | None = None,
                        worker_type: str | None = None, join_requests: int | None = None) -> None:
        """Build ``context.parallel.workers_num`` workers on ``model_path`` and start serving.

        Args:
            model_path: an ONNX file.
            context: devices, threads per worker (``cpu.thread_num``), affinity, and
                ``parallel`` (``workers_num``, ``config_info``, ``config_path``: every
                worker's model gets that config). None: ``Context()`` (CPU, defaults).
            queue_size, timeout, share_weights, worker_type, join_requests: the ``[pool]`` options
                (see ``_pool_plan``); given here they win over the config.

        Raises:
            ConfigTypeError: an argument of the wrong type.
            ConfigError: a bad ``[pool]`` value, a core list that does not fit.
            ModelNotFoundError, ModelError: the file is missing or cannot be built
                (the error names the worker).
            WorkerError, WorkerLostError, WorkerTimeoutError: a process worker could not
                start, died or stalled while building.
        """
        if not isinstance(model_path, (str, os.PathLike)):
            raise ConfigTypeError(f"model_path must be a str, got {type(model_path).__name__}")
        if context is not None and not isinstance(context, Context):
            raise ConfigTypeError(f"context must be a Context or None, got {type(context).__name__}")
        self._close("build_from_file() was called again")  # requests still pending there fail as on close()
        context = context or Context()
        config = load_config(context.parallel.config_path, context.parallel.config_info,
                             dict_name="context.parallel.config_info")
        options = pool_options(config, queue_size=queue_size, timeout=timeout, share_weights=share_weights,
                               worker_type=worker_type, join_requests=join_requests)
        section = config.sections.get("ascend_context", {})
        if PID_LIST_KEY in section or HANDLE_KEY in section:
            raise ConfigError(
                f"{config.source}: {PID_LIST_KEY} / {HANDLE_KEY} share weights between processes, for Model; a "
                f"ModelParallelRunner's workers share one copy with [pool] share_weights = true"
            )
        if options.share_weights and list(context.target) != ["cpu"]:
            raise ConfigError(f"share_weights runs on the CPU (one copy in host memory); context.target is "
                              f"{list(context.target)}, set it to ['cpu']")
        path = Path(model_path)
        if not path.exists():
            raise ModelNotFoundError(f"model file {path} does not exist")
        if path.is_dir():
            raise ModelError(f"model path {path} is a directory; expected an ONNX file")
        path = converted_model_file(path)  # a MINDIR file: its ONNX conversion, made once (ranks._mindir)
        proto = _load_model_file(path, ModelType.MINDIR)  # ONNX, or the message that explains other files
        if is_sharded(proto):
            raise ModelError(f"{path} is a tensor-parallel shard: its ranks run under a launcher with Model, "
                             f"not in a worker pool")

        plan = plan_workers(context, config)
        if plan.warning:
            warnings.warn(plan.warning, RuntimeWarning, stacklevel=2)
        backend = BACKENDS[options.worker_type](path, proto, plan, context, worker_config(config), options.share_weights)
        del proto
        self._inputs = [(name, dtype, config.input_shapes.get(name, shape)) for name, dtype, shape in backend.inputs]
        self._outputs = [TensorMeta(name, dtype, shape) for name, dtype, shape in backend.outputs]
        label = f"ModelParallelRunner({path.name}, {plan.workers} workers)"
        queue = RequestQueue(options.queue_size, plan.workers, label, getattr(backend, "names", None),
                             backend.CANCEL_WAIT_SECONDS, backend.CANCEL_PENDING)
        join = options.join_requests if all(shape and shape[0] == -1 for _, _, shape in self._inputs) else 1
        if options.join_requests > 1 and join == 1:
            log.warning("%s: join_requests=%d is off: the model's inputs %s do not all have a free dimension 0",
                        path, options.join_requests, [(name, shape) for name, _, shape in self._inputs])
            options = dataclasses.replace(options, join_requests=1)  # ``options`` says what was built
        threads = backend.serve(queue, _tag_error(plan.workers), label, join)
        self._model_path = str(model_path)
        self._queue, self._options, self._plan, self._backend = queue, options, plan, backend
        # Closes the workers on close(), when the runner is collected, or at interpreter exit (the seeds never close).
        self._close_reason = ["the runner was garbage-collected or the interpreter exited"]
        self._shutdown = weakref.finalize(self, _shut_down, queue, threads, backend, self._close_reason)

    # -- introspection -------------------------------------------------------------
    def get_inputs(self) -> list[Tensor]:
        """New input Tensors (name, dtype, shape) on every call: each caller fills its own."""
        self._require_built()
        return [Tensor(shape=shape, dtype=dtype, name=name) for name, dtype, shape in self._inputs]

    def get_outputs(self) -> list[TensorMeta]:
        """The model's outputs (name, dtype, shape with -1 for dimensions known only after predict)."""
        self._require_built()
        return [TensorMeta(t.name, t.dtype, t.shape, t.format) for t in self._outputs]

    @property
    def workers_num(self) -> int:
        self._require_built()
        return self._plan.workers

    @property
    def thread_num(self) -> int:
        """Intra-op threads of each worker."""
        self._require_built()
        return self._plan.threads

    @property
    def cores(self) -> list[list[int]]:
        """Each worker's cores, in order ([] for a worker that is not bound)."""
        self._require_built()
        return [list(c) for c in self._plan.cores]

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the worker processes still in the pool, in worker order (process workers; [] for thread
        workers). A worker that died leaves the list at once, whether it was busy or idle."""
        self._require_built()
        return list(getattr(self._backend, "pids", []))

    @property
    def options(self) -> PoolOptions:
        """The ``[pool]`` options in force (queue_size, timeout, share_weights, worker_type)."""
        self._require_built()
        return self._options

    # -- running -------------------------------------------------------------------
    def predict(self, inputs, outputs: list[Tensor] | None = None, *, timeout: float | None = None) -> list[Tensor]:
        """Run one request on the next free worker; safe to call from many threads at once.

        Args:
            inputs: Tensors or numpy arrays in input order, or a dict {input name: value}.
            outputs: optional Tensors to fill in place (MindSpore Lite style).
            timeout: seconds for this request, queue wait included (default: ``[pool] timeout``).

        Returns:
            One Tensor per model output, in order.

        Raises:
            InputError / InputTypeError: inputs that do not fit (checked here, before queueing).
            PoolQueueFullError: queue_size requests are already waiting (at once, no wait).
            WorkerTimeoutError: the timeout passed (the error says where the request was).
            PoolClosedError: the runner is closed, or was closed while the request was pending.
            WorkerLostError: the process worker running the request died (it names the worker,
                its host, pid and signal or exit code); the other workers serve on. A request that
                had not reached a worker when it died is run by another worker instead; when no
                worker is left, PoolClosedError names why each one left.
            The worker's own exception (e.g. ModelError when ONNX Runtime fails), its message
            starting with ``[worker k of N]`` (a process worker: ``[worker k of N on host H (pid P)]``).
        """
        queue = self._require_built()
        if outputs is not None and (not isinstance(outputs, list) or not all(isinstance(t, Tensor) for t in outputs)):
            raise InputTypeError(f"predict: outputs must be a list of Tensors, got {outputs!r}")
        if timeout is not None:
            timeout = check_timeout(timeout, "predict: timeout")
        feeds = validate_feeds(inputs, self._inputs)
        request = Request(feeds, timeout if timeout is not None else self._options.timeout)
        queue.submit(request)
        results = queue.wait(request)
        return output_tensors([meta.name for meta in self._outputs], results, outputs)

    def close(self) -> None:
        """Stop the workers. Requests still waiting or running fail with PoolClosedError; harmless twice."""
        self._close("close() was called")

    def _close(self, reason: str) -> None:
        if self._shutdown is not None and self._shutdown.alive:
            self._close_reason[0] = reason
            self._shutdown()

    def _require_built(self) -> RequestQueue:
        if self._queue is None:
            raise ModelError("the ModelParallelRunner is not built: call build_from_file() first")
        return self._queue

    def __enter__(self) -> "ModelParallelRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return f"model_path: {self._model_path}."

    def __repr__(self) -> str:
        if self._queue is None:
            return "<ModelParallelRunner (not built)>"
        state = "closed" if self._queue.closed else "serving"
        return (f"<ModelParallelRunner {self._model_path} {self._plan.workers} workers x {self._plan.threads} threads, "
                f"{state}>")


def _tag_error(workers: int):
    """The exception a caller sees for a worker's failure: the same type, the worker named in its message."""

    def tag(exc: BaseException, worker: int) -> BaseException:
        where = f"worker {worker} of {workers}"
        try:
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (f"[{where}] {exc.args[0]}",) + tuple(exc.args[1:])
            elif not exc.args:
                exc.args = (f"[{where}]",)
            exc.worker = worker
        except (AttributeError, TypeError):
            pass
        return exc

    return tag


def _shut_down(queue: RequestQueue, threads, backend, reason: list[str]) -> None:
    queue.close(reason[0])
    deadline = time.monotonic() + CLOSE_JOIN_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        log.warning("%s still running %.0f s after close (a run that ONNX Runtime could not stop); left behind as "
                    "daemon threads", stuck, CLOSE_JOIN_SECONDS)
    backend.close()

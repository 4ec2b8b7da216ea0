"""Thread workers: one ONNX Runtime session per worker, run by one thread of this process.

ONNX Runtime releases the GIL while a session runs, so N worker threads run N
requests at once. Each session has its own intra-op pool of ``threads``
threads (the worker thread itself is one of them), with spinning off: idle
pool threads that spin take the cores from the other workers' (four times
slower measured, see /work/shared/reference/measurements.md).

Cores: a bound worker pins its own thread to its first core
(``sched_setaffinity`` on the calling thread) and ONNX Runtime pins the
session's pool threads to the others (``session.intra_op_thread_affinities``,
set by ``ranks._session.session_options`` from the worker's core list).

Shared weights (``[pool] share_weights = true``): the model's initializers are
read once into numpy arrays, wrapped as OrtValues and handed to every session
with ``SessionOptions.add_initializer``; ONNX Runtime then runs on those
buffers instead of private copies. Two things would make private copies again
and are turned off: prepacking (``session.disable_prepacking``: MLAS packs
MatMul weights into per-session buffers) and the optimizers that rewrite
weights (``ranks._shared_weights.WEIGHT_REWRITING_OPTIMIZERS``, plus
``ConstantFolding`` when the graph computes something from a weight alone).
ONNX Runtime's shared environment allocator (``session.use_env_allocators``)
was measured too: it shares the arena for activations, not the weights (4
sessions of the 134 MB MLP held 514 MB with it, as without it).
"""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ranks._config_file import RankConfig
from ranks._context import Context
from ranks._errors import ModelError, OrchestratorError
from ranks._log import get_logger
from ranks._errors import ort_message
from ranks._session import execution_providers, session_options
from ranks._shared_weights import SharedInitializers, release_freed_heap
from ranks._tensor import data_type_from_ort

from ._pool_plan import WorkerPlan
from ._pool_queue import Request, State, serve

log = get_logger("pool")


class ThreadEngine:
    """One worker: a session and the cores its thread is pinned to ([] when not bound)."""

    def __init__(self, index: int, session: ort.InferenceSession, cores: list[int], model_name: str):
        self.index = index
        self.session = session
        self.cores = cores
        self.model_name = model_name

    def bind_thread(self) -> None:
        """Pin the calling (worker) thread to this worker's first core; ONNX Runtime pins the rest."""
        if self.cores:
            try:
                os.sched_setaffinity(0, {self.cores[0]})  # pid 0: the calling thread only
            except OSError as exc:
                log.warning("worker %d could not pin its thread to core %d (%s); it runs unpinned", self.index, self.cores[0], exc)

    def run(self, request: Request) -> list[np.ndarray] | None:
        options = ort.RunOptions()
        options.log_severity_level = 4  # a stopped run is our doing, not an error to print
        request.cancel = lambda: setattr(options, "terminate", True)
        if request.state is State.ABANDONED:  # abandoned before cancel was armed: do not run it at all
            return None
        try:
            return self.session.run(None, request.feeds, options)
        except OrchestratorError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime"):
                # As Model.predict reports it: a RuntimeError of ours with ONNX Runtime's own words.
                raise ModelError(f"running {self.model_name} failed: {ort_message(exc)}") from None
            raise


class ThreadWorkers:
    """The thread backend of a ModelParallelRunner: ``plan.workers`` sessions in this process, a thread each.

    What the runner needs of a backend: ``inputs`` and ``outputs`` ([(name, DataType,
    shape)]), ``serve(queue, tag_error, label, join)`` starting one thread per worker that
    serves the queue (``_pool_queue.serve``), ``close()`` once those threads ended, and what a caller
    whose running request timed out hears (``CANCEL_WAIT_SECONDS``, ``CANCEL_PENDING``).
    """

    # ONNX Runtime checks the terminate flag between operators (and Loop iterations): a cancelled run usually
    # ends in milliseconds. One operator that never checks it (a long custom op) keeps the thread; it cannot
    # be killed, so the caller is told the truth after this wait.
    CANCEL_WAIT_SECONDS = 2.0
    CANCEL_PENDING = (f"the run was cancelled (ONNX Runtime's terminate flag) but had not stopped "
                      f"{CANCEL_WAIT_SECONDS:g} s later (an operator that does not check the flag); the worker "
                      f"serves the next request once that operator ends")

    def __init__(self, path: Path, proto: onnx.ModelProto, plan: WorkerPlan, context: Context, config: RankConfig,
                 share_weights: bool):
        self.shared = SharedInitializers(proto, str(path.resolve().parent)) if share_weights else None
        self.engines = _build_engines(path, plan, context, config, self.shared)
        session = self.engines[0].session
        self.inputs = [(arg.name, data_type_from_ort(arg.type), _dims(arg.shape)) for arg in session.get_inputs()]
        self.outputs = [(arg.name, data_type_from_ort(arg.type), _dims(arg.shape)) for arg in session.get_outputs()]

    def serve(self, queue, tag_error, label: str, join: int = 1) -> list[threading.Thread]:
        """One daemon thread per worker (daemon: a script that never closes its runner still exits)."""

        def loop(engine: ThreadEngine) -> None:
            engine.bind_thread()
            serve(queue, engine, engine.index, tag_error, join)

        threads = []
        for engine in self.engines:
            thread = threading.Thread(target=loop, args=(engine,), name=f"{label} worker {engine.index}", daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def close(self) -> None:
        self.engines = []
        self.shared = None


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _build_engines(path: Path, plan: WorkerPlan, context: Context, config: RankConfig,
                   shared: SharedInitializers | None) -> list[ThreadEngine]:
    """One session per worker, built one after another (the peak memory of one build at a time).

    Raises ModelError naming the worker whose session failed to build.
    """
    providers = execution_providers(context, config)
    engines = []
    for index in range(plan.workers):
        options = worker_session_options(context, config, plan.threads, plan.cores[index])
        disabled = []
        if shared is not None:
            shared.apply(options)
            disabled = shared.disabled_optimizers
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers, disabled_optimizers=disabled)
        except Exception as exc:
            raise ModelError(
                f"ONNX Runtime could not build worker {index} of {plan.workers} for {path}: {ort_message(exc)}"
            ) from None
        engines.append(ThreadEngine(index, session, plan.cores[index], path.name))
        if shared is not None:
            release_freed_heap()  # the parsed copy of the weights, which the shared ones stand in for
    log.info("built %d thread workers x %d threads for %s (cores %s, shared weights %s)", plan.workers, plan.threads,
             path, plan.cores, "on" if shared is not None else "off")
    return engines


def worker_session_options(context: Context, config: RankConfig, threads: int, cores: list[int]) -> ort.SessionOptions:
    """A worker's session options: the user's context with this worker's threads and cores, spinning off."""
    mine = copy.deepcopy(context)
    mine.cpu.thread_num = threads
    mine.cpu.thread_affinity_mode = 0
    mine.cpu.thread_affinity_core_list = cores
    options = session_options(mine, config, allow_spinning=False)
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options

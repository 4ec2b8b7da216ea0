"""A servable: one version of ``SERVABLES/NAME``, its model on the worker pool, and its methods.

    add/servable_config.py      declares the model file and registers methods
    add/1/tensor_add.onnx       version folders: numbers; the newest serves unless one is named
    add/2/tensor_add.onnx

The model runs on ``ModelParallelRunner`` (concurrent requests over a pool of
workers) or, with several device ids, on ``ParallelPredictor`` (each batch
split over one worker process per device). A ``with_batch_dim=True`` servable
joins instances into batches (``_batching``).

Limits: at most ``queue_size`` instances are in the servable at once (more are
refused at once, ``ServingQueueFullError``); every request has a timeout.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ranks._context import Context
from ranks._env import default_timeout
from ranks._errors import OrchestratorError
from ranks._log import get_logger
from ranks._session import usable_cores

from ._batching import Batcher
from ._threads import ServingExecutor
from ._declarations import Declarations, MethodDef, collecting, running
from ._errors import (MethodError, RequestError, ServableConfigError, ServingError, ServingQueueFullError,
                      ServingTimeoutError)

log = get_logger("serving")

DEFAULT_QUEUE_SIZE = 1024
DEFAULT_MAX_BATCH = 32
DEFAULT_BATCH_DELAY_MS = 1.0


@dataclass(frozen=True)
class ServableOptions:
    """How a servable runs: pool workers and threads, devices, batching, queue and timeout.

    ``device_ids``: one id: a worker pool of ``workers_num`` workers (0: from the
    cores); several: the batch-split master, one worker process per id
    (``with_batch_dim=True`` servables only). ``max_batch``: instances joined
    into one batch (1: no batching); ``batch_delay_ms``: how long a batch waits
    for more instances after its first. ``timeout``: seconds per request.
    """

    device_ids: tuple[int, ...] = (0,)
    workers_num: int = 0
    thread_num: int = 0
    max_batch: int = DEFAULT_MAX_BATCH
    batch_delay_ms: float = DEFAULT_BATCH_DELAY_MS
    queue_size: int = DEFAULT_QUEUE_SIZE
    timeout: float | None = None

    def __post_init__(self):
        ids = (self.device_ids,) if isinstance(self.device_ids, int) else tuple(self.device_ids)
        if not ids or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in ids):
            raise ServableConfigError(f"device ids must be non-negative integers, got {self.device_ids!r}")
        object.__setattr__(self, "device_ids", ids)
        for name, low in (("workers_num", 0), ("thread_num", 0), ("max_batch", 1), ("queue_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ServableConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.batch_delay_ms, (int, float)) or self.batch_delay_ms < 0:
            raise ServableConfigError(f"batch_delay_ms must be a number >= 0, got {self.batch_delay_ms!r}")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ServableConfigError(f"timeout must be a number of seconds > 0, got {self.timeout!r}")


def usable_cores_count() -> int:
    return max(1, len(usable_cores()))


def versions_of(servable_dir: Path, name: str) -> list[int]:
    """The version numbers of ``servable_dir/name``: its folders named by a number > 0, ascending."""
    folder = servable_dir / name
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def resolve_version(servable_dir, name: str, version_number: int = 0) -> tuple[Path, int]:
    """(the servable's folder, the version to load): ``version_number`` 0 is the newest."""
    if not isinstance(servable_dir, (str, os.PathLike)):
        raise ServableConfigError(f"servable_directory must be a path, got {servable_dir!r}")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ServableConfigError(f"servable_name must be a folder name, got {name!r}")
    if isinstance(version_number, bool) or not isinstance(version_number, int) or version_number < 0:
        raise ServableConfigError(f"version_number must be an integer >= 0 (0: the newest), got {version_number!r}")
    root = Path(servable_dir).resolve()
    folder = root / name
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "servable_config.py").is_file()) if root.is_dir() else []
        raise ServableConfigError(f"servable {name!r}: no folder {folder}" +
                                  (f" (servables in {root}: {', '.join(found)})" if found else
                                   f" ({root} does not exist)" if not root.is_dir() else ""))
    if not (folder / "servable_config.py").is_file():
        raise ServableConfigError(f"servable {name!r}: {folder / 'servable_config.py'} does not exist")
    versions = versions_of(root, name)
    if not versions:
        raise ServableConfigError(f"servable {name!r}: {folder} has no version folder (1/, 2/, ... holding the model)")
    if version_number == 0:
        return folder, versions[-1]
    if version_number not in versions:
        raise ServableConfigError(f"servable {name!r} has no version {version_number}; versions in {folder}: {versions}")
    return folder, version_number


def load_declarations(folder: Path) -> Declarations:
    """Run ``folder/servable_config.py`` and return what it declared."""
    source = folder / "servable_config.py"
    module_name = f"_orch_servable_{folder.name}_{abs(hash(str(folder)))}"
    spec = importlib.util.spec_from_file_location(module_name, source)
    module = importlib.util.module_from_spec(spec)
    with collecting(str(source)) as declared:
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ServableConfigError:
            raise
        except Exception as exc:
            raise ServableConfigError(f"{source} failed to load: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.modules.pop(module_name, None)
    if declared.servable is None:
        raise ServableConfigError(f"{source} declares no model: call register.declare_servable(servable_file=..., "
                                  f"model_format='ONNX', with_batch_dim=...)")
    if not declared.methods:
        raise ServableConfigError(f"{source} registers no method: decorate a function with "
                                  f"@register.register_method(output_names=[...])")
    return declared


class Servable:
    """One loaded version of a servable: ``run_method`` runs a request's instances through a method."""

    def __init__(self, servable_dir, name: str, version_number: int = 0, options: ServableOptions | None = None):
        self.options = options or ServableOptions()
        folder, self.version = resolve_version(servable_dir, name, version_number)
        self.name = name
        self.label = f"servable {name} version {self.version}"
        declared = load_declarations(folder)
        self.declaration = declared.servable
        self.methods: dict[str, MethodDef] = declared.methods
        self.model_path = folder / str(self.version) / self.declaration.servable_file
        if not self.model_path.is_file():
            raise ServableConfigError(f"{self.label}: model file {self.model_path} does not exist (declared as "
                                      f"servable_file={self.declaration.servable_file!r} in {declared.source})")
        self.with_batch_dim = self.declaration.with_batch_dim
        self.timeout = self.options.timeout or default_timeout()
        self._slots = threading.BoundedSemaphore(self.options.queue_size)
        self._executor = ServingExecutor(64, f"{name}-v{self.version}")
        self._closed = False
        self._backend, concurrency = self._build()
        self._inputs = [(t.name, t.dtype.to_numpy(), list(t.shape)) for t in self._backend.get_inputs()]
        self._output_specs = [(t.name, _numpy_dtype(t.dtype), list(t.shape)) for t in self._backend.get_outputs()]
        self._outputs = [name for name, _, _ in self._output_specs]
        from ._process import PROCESS

        self._queue_time, self._compute_time, self._batch_size = PROCESS.metrics.servable(name, self.version)
        # A model whose dimension 0 is fixed (an export for batch 4, say) runs batches of exactly that many
        # rows: joined instances are capped there, and a short batch is padded with copies of its last row
        # (their outputs dropped), as MindSpore Serving pads to the model's batch size.
        self._model_batch = self._fixed_batch()
        self._max_batch = min(self.options.max_batch, self._model_batch or self.options.max_batch)
        self._batcher = None
        if self.with_batch_dim and self._max_batch > 1:
            self._batcher = Batcher(self._run_batch, max_batch=self._max_batch,
                                    delay=self.options.batch_delay_ms / 1000.0, runners=concurrency, label=self.label,
                                    shared=self.declaration.without_batch_dim_inputs, on_start=self._queue_time.observe)
        log.info("%s: %s on %s, methods %s", self.label, self.model_path.name, self._describe_backend(),
                 ", ".join(self.methods))

    # -- the model -------------------------------------------------------------------
    def _build(self):
        from .._model_parallel_runner import ModelParallelRunner
        from .._parallel_predictor import ParallelPredictor

        context = Context()
        if self.options.thread_num:
            context.cpu.thread_num = self.options.thread_num
        if len(self.options.device_ids) > 1:
            if not self.with_batch_dim:
                raise ServableConfigError(
                    f"{self.label}: several device ids {list(self.options.device_ids)} split each batch along "
                    f"dimension 0, but the servable declares with_batch_dim=False; give one device id")
            predictor = ParallelPredictor(str(self.model_path), device_ids=list(self.options.device_ids), context=context,
                                          timeout=self.timeout)
            return predictor, 1
        context.parallel.workers_num = self.options.workers_num
        runner = ModelParallelRunner()
        runner.build_from_file(str(self.model_path), context, timeout=self.timeout)
        # Batches that may run at once: the pool's workers (the count it chose when workers_num is 0).
        return runner, getattr(runner, "workers_num", None) or self.options.workers_num or usable_cores_count()

    def _describe_backend(self) -> str:
        if len(self.options.device_ids) > 1:
            return f"a batch-split master over devices {list(self.options.device_ids)}"
        return f"a pool of {getattr(self._backend, 'workers_num', '?')} workers"

    def signature(self):
        """What this servable version offers (its methods, its model's tensors): the KServe metadata's source."""
        from ._dispatch import ServableSignature, TensorSpec

        return ServableSignature(
            self.name, self.version, {m.name: (m.input_names, m.output_names) for m in self.methods.values()},
            self.with_batch_dim, tuple(TensorSpec(n, np.dtype(d), tuple(s)) for n, d, s in self._inputs),
            tuple(TensorSpec(n, d, tuple(s)) for n, d, s in self._output_specs),
            self._max_batch if self.with_batch_dim else 0)

    def _fixed_batch(self) -> int | None:
        """The size of dimension 0 the model's batched inputs fix, or None (free, or with_batch_dim=False)."""
        if not self.with_batch_dim:
            return None
        shared = self.declaration.without_batch_dim_inputs
        firsts = {shape[0] for i, (_, _, shape) in enumerate(self._inputs) if i not in shared and shape}
        fixed = {d for d in firsts if d >= 1}
        if not fixed:
            return None
        if len(firsts) > 1:
            raise ServableConfigError(
                f"{self.label}: with_batch_dim=True, but the model's inputs disagree on dimension 0 "
                f"({[(n, s) for n, _, s in self._inputs]}); export it with one batch dimension, free or fixed")
        return fixed.pop()

    def _predict(self, arrays: list[np.ndarray], deadline: float) -> list[np.ndarray]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServingTimeoutError(f"{self.label}: the request's timeout passed before the model ran")
        started = time.perf_counter()
        outputs = self._backend.predict(arrays, timeout=remaining)
        self._compute_time.observe(time.perf_counter() - started)
        shared = self.declaration.without_batch_dim_inputs
        rows = [a.shape[0] for i, a in enumerate(arrays) if i not in shared and a.ndim]
        self._batch_size.observe(rows[0] if self.with_batch_dim and rows else 1)
        return [t.get_data_to_numpy() for t in outputs]

    def _run_batch(self, arrays: list[np.ndarray], deadline: float) -> list[np.ndarray]:
        """Run joined instances (dimension 0: one row each), padded to a fixed model batch when short."""
        shared = self.declaration.without_batch_dim_inputs
        rows = next((a.shape[0] for i, a in enumerate(arrays) if i not in shared and a.ndim), None)
        if not self._model_batch or rows is None or rows >= self._model_batch:
            return self._predict(arrays, deadline)
        pad = self._model_batch - rows
        padded = [a if i in shared else np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for i, a in enumerate(arrays)]
        return [o[:rows] for o in self._predict(padded, deadline)]

    def infer(self, args, deadline: float) -> list[np.ndarray]:
        """``call_servable``: the model's outputs for one instance's inputs (checked against the model first)."""
        arrays = self._check_model_inputs(args)
        if deadline <= time.monotonic():
            raise ServingTimeoutError(f"{self.label}: the request's timeout passed before the model ran")
        if not self.with_batch_dim:
            self._queue_time.observe(0.0)  # straight to the pool (its own wait for a free worker is compute time)
            return self._predict(arrays, deadline)
        if self._batcher is not None:
            return self._batcher.submit(arrays, deadline)
        self._queue_time.observe(0.0)
        shared = self.declaration.without_batch_dim_inputs
        outputs = self._run_batch([a if i in shared else a[None] for i, a in enumerate(arrays)], deadline)
        return [o[0] for o in outputs]

    def _check_model_inputs(self, args) -> list[np.ndarray]:
        names = [n for n, _, _ in self._inputs]
        if len(args) != len(self._inputs):
            raise RequestError(f"{self.label}: call_servable got {len(args)} inputs, the model takes "
                               f"{len(self._inputs)}: {names}")
        arrays = []
        shared = self.declaration.without_batch_dim_inputs
        for i, (value, (name, dtype, shape)) in enumerate(zip(args, self._inputs)):
            array = np.asarray(value)
            if array.dtype != dtype:
                got = "strings" if array.dtype.kind in "US" else f"dtype {array.dtype}"
                raise RequestError(f"{self.label}: the model's input {i} ({name}) got {got}, the model takes {dtype}")
            want = shape if not self.with_batch_dim or i in shared else shape[1:]
            if len(array.shape) != len(want) or any(w >= 0 and w != s for w, s in zip(want, array.shape)):
                free = [w if w >= 0 else "any" for w in want]
                per = " per instance (with_batch_dim=True: dimension 0 is the batch)" if want is not shape else ""
                raise RequestError(f"{self.label}: the model's input {i} ({name}) got shape {list(array.shape)}; "
                                   f"the model takes shape {free}{per}")
            arrays.append(array)
        return arrays

    # -- methods ---------------------------------------------------------------------
    def method(self, name: str) -> MethodDef:
        method = self.methods.get(name)
        if method is None:
            raise RequestError(f"{self.label} has no method {name!r}; its methods: {', '.join(self.methods)}")
        return method

    def run_method(self, method_name: str, instances: list[dict], timeout: float | None = None) -> list:
        """Each instance's outputs {name: value}, or the exception that instance raised, in order.

        Raises RequestError (unknown method), ServingQueueFullError (queue_size instances already in).
        """
        method = self.method(method_name)
        if self._closed:
            raise ServingError(f"{self.label} is stopped")
        deadline = time.monotonic() + (self.timeout if timeout is None else min(timeout, self.timeout))
        taken = 0
        try:
            for _ in instances:
                if not self._slots.acquire(blocking=False):
                    raise ServingQueueFullError(
                        f"{self.label}: its queue is full ({self.options.queue_size} instances waiting or running); "
                        f"request refused, try again later")
                taken += 1
            if len(instances) == 1:
                return [self._run_instance(method, instances[0], deadline)]
            futures = [self._executor.submit(self._run_instance, method, inst, deadline) for inst in instances]
            results = []
            for future in futures:
                try:
                    results.append(future.result(timeout=max(0.0, deadline - time.monotonic()) + 1.0))
                except concurrent.futures.TimeoutError:
                    results.append(ServingTimeoutError(f"{self.label}: the request's timeout passed"))
            return results
        finally:
            for _ in range(taken):
                self._slots.release()

    def _run_instance(self, method: MethodDef, instance: dict, deadline: float):
        try:
            missing = [n for n in method.input_names if n not in instance]
            extra = [k for k in instance if k not in method.input_names]
            if missing or extra:
                raise RequestError(
                    f"method {method.name} of {self.label} takes inputs {list(method.input_names)}; the instance "
                    + "; ".join(part for part in (f"lacks {missing}" if missing else "",
                                                  f"has unknown {extra}" if extra else "") if part))
            with running(self, deadline):
                args = [instance[n] for n in method.input_names]
                try:
                    result = method.fn(*args)
                except OrchestratorError:
                    raise  # ours (call_servable's checks, timeouts): already says what is wrong
                except Exception as exc:  # the method's own code: say which method, and what it was given
                    given = ", ".join(f"{n} {_kind(a)}" for n, a in zip(method.input_names, args))
                    raise MethodError(f"method {method.name} of {self.label} raised {type(exc).__name__}: {exc} "
                                      f"(its inputs: {given})") from exc
            values = (result,) if len(method.output_names) == 1 else result
            if not isinstance(values, (tuple, list)) or len(values) != len(method.output_names):
                raise ServingError(f"method {method.name} of {self.label} returned {_describe(result)}; it registers "
                                   f"{len(method.output_names)} outputs {list(method.output_names)}")
            return {name: _output_value(value, name, method.name) for name, value in zip(method.output_names, values)}
        except Exception as exc:
            return exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._backend.close()


def _numpy_dtype(dtype):
    try:
        return np.dtype(dtype.to_numpy())
    except Exception:  # noqa: BLE001 - an output type numpy has no name for: shown as not known
        return None


def _kind(value) -> str:
    """What an instance's input is, for a message: ``float32 [2, 2]``, ``str``, ``bytes``, ``list of 3``."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"{len(value)} values"
    return f"one {type(value).__name__}"


def _output_value(value, name: str, method: str):
    if isinstance(value, (str, bytes, np.ndarray)):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, bytes)) for v in value):
        return list(value)
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - the message says what came back
        array = None
    if array is None or array.dtype == object:
        raise ServingError(f"method {method}: output {name!r} is a {type(value).__name__}; return numpy arrays, numbers, "
                           f"str or bytes")
    return array

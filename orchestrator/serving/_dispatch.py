"""One process's table of what it serves, and the path of every request through it.

A request (``PredictRequest``, from gRPC, or made from a REST body) names a
servable, a version (0: the newest served) and a method. The dispatcher picks
a backend serving that version: a servable loaded in this process
(``LocalBackend``) or a cluster worker (``_cluster_master.RemoteBackend``),
the one with the fewest requests in flight, round-robin among equals. A worker
that cannot be reached (it died, left, its network went) is dropped from the
table at once and the request is retried once on another worker of the same
version, when there is one; any other failure is the request's answer.

Replies follow MindSpore Serving: no ``error_msg`` when every instance
succeeded; one when the request failed as a whole (or its only instance
failed); otherwise one per instance, ``error_code`` 0 for those that succeeded.
MindSpore Serving's clients read only 0 or not; the other codes say what kind
of failure it was (``ERROR_CODES``), so a reply forwarded from a cluster
worker still tells the KServe front which HTTP status or gRPC code to answer.

The table also remembers every servable version it ever served with its
methods and model signature (``known``), so a servable whose last worker died
is "known, not ready" (503) rather than "unknown" (404), and its metadata
stays readable while it waits for a worker to rejoin.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np

from ranks._env import default_timeout
from ranks._errors import OrchestratorError
from ranks._log import get_logger

from ._errors import (NotServedError, RequestError, ServingError, ServingQueueFullError, ServingTimeoutError,
                      ServingUnavailableError, ServingWorkerLostError)
from ._proto import ms_service_pb2 as pb
from ._tensors import from_tensor, to_tensor

log = get_logger("serving")


def error_text(exc: BaseException) -> str:
    """What a client reads: our own errors as they are, anything else (a method's own bug) with its type."""
    if isinstance(exc, OrchestratorError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# ErrorMsg.error_code: MindSpore Serving's clients read only 0 (success) or not; REST maps NOT_SERVED to 404,
# the KServe front each code to its HTTP status / gRPC code.
FAILED = 1  # anything else: a method's own error, a worker that failed
NOT_SERVED = 2  # NotServedError
BAD_REQUEST = 3  # RequestError
UNAVAILABLE = 4  # ServingQueueFullError, ServingUnavailableError, ServingWorkerLostError (and no other worker)
TIMED_OUT = 5  # ServingTimeoutError
ERROR_CODES = ((NotServedError, NOT_SERVED), (RequestError, BAD_REQUEST),
               ((ServingQueueFullError, ServingUnavailableError, ServingWorkerLostError), UNAVAILABLE),
               (ServingTimeoutError, TIMED_OUT))


def error_code(exc: BaseException) -> int:
    for kinds, code in ERROR_CODES:
        if isinstance(exc, kinds):
            return code
    return FAILED


def error_reply(spec: pb.ServableSpec, exc: BaseException) -> pb.PredictReply:
    reply = pb.PredictReply()
    reply.servable_spec.CopyFrom(spec)
    reply.error_msg.add(error_code=error_code(exc), error_msg=error_text(exc).encode("utf-8"))
    return reply


def make_reply(spec: pb.ServableSpec, version: int, results: list) -> pb.PredictReply:
    """The reply for per-instance ``results`` ({output name: value} or an exception each)."""
    reply = pb.PredictReply()
    reply.servable_spec.CopyFrom(spec)
    reply.servable_spec.version_number = version
    encoded = []
    for result in results:
        if isinstance(result, BaseException):
            encoded.append(result)
            continue
        instance = pb.Instance()
        try:
            for name, value in result.items():
                to_tensor(value, instance.items[name], name=f"output {name!r}")
            encoded.append(instance)
        except Exception as exc:  # noqa: BLE001 - an output that cannot be sent fails its instance only
            encoded.append(exc)
    failed = [r for r in encoded if isinstance(r, BaseException)]
    if not failed:
        reply.instances.extend(encoded)
    elif len(encoded) == 1:
        reply.error_msg.add(error_code=error_code(failed[0]), error_msg=error_text(failed[0]).encode("utf-8"))
    else:
        for item in encoded:
            if isinstance(item, BaseException):
                reply.instances.add()
                reply.error_msg.add(error_code=error_code(item), error_msg=error_text(item).encode("utf-8"))
            else:
                reply.instances.append(item)
                reply.error_msg.add(error_code=0)
    return reply


class LocalBackend:
    """A servable loaded in this process."""

    def __init__(self, servable):
        self.servable = servable
        self.label = servable.label
        self.inflight = 0

    def predict(self, request: pb.PredictRequest, version: int, timeout: float | None) -> pb.PredictReply:
        instances = []
        for i, instance in enumerate(request.instances):
            try:
                if len(instance.output_buffers):
                    raise RequestError(f"instance {i}: output_buffers (shared-memory outputs) are not supported")
                instances.append({k: from_tensor(t, f"instance {i} input {k!r}") for k, t in instance.items.items()})
            except Exception as exc:  # noqa: BLE001 - fails this instance only
                instances.append(exc)
        good = [inst for inst in instances if not isinstance(inst, BaseException)]
        ran = iter(self.servable.run_method(request.servable_spec.method_name, good, timeout) if good else [])
        results = [inst if isinstance(inst, BaseException) else next(ran) for inst in instances]
        return make_reply(request.servable_spec, version, results)

    def close(self) -> None:
        self.servable.close()


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, numpy dtype (None: not known), shape (-1: any size)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ServableSignature:
    """What one servable version offers: its methods {name: (inputs, outputs)} and its model's tensors."""

    name: str
    version: int
    methods: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    with_batch_dim: bool = False
    model_inputs: tuple[TensorSpec, ...] = ()
    model_outputs: tuple[TensorSpec, ...] = ()
    max_batch: int = 0  # with_batch_dim: the most instances one model run takes (the batcher's limit); else 0


class Dispatcher:
    """What this process serves: {servable name: {version: [backends]}}, each backend's methods, and what it served."""

    def __init__(self):
        self._lock = threading.Lock()
        self._table: dict[str, dict[int, list]] = {}
        self._methods: dict[int, dict[str, tuple]] = {}  # id(backend) -> {method: (inputs, outputs)}
        self._known: dict[str, dict[int, ServableSignature]] = {}  # every servable version ever served here
        self._turn = itertools.count()
        self.metrics = None  # a _metrics.Metrics, when the process keeps them

    def add(self, backend, name: str, version: int, methods: dict[str, tuple], spec: ServableSignature | None = None) -> None:
        with self._lock:
            self._table.setdefault(name, {}).setdefault(version, []).append(backend)
            self._methods[id(backend)] = dict(methods)
            self._known.setdefault(name, {})[version] = spec or ServableSignature(name, version, dict(methods))

    def served_signature(self, name: str, version: int) -> tuple[ServableSignature, list[str]] | None:
        """The signature of servable ``name`` ``version`` and the labels of the backends serving it now, or None."""
        with self._lock:
            backends = self._table.get(name, {}).get(version)
            if not backends:
                return None
            return self._known[name][version], [getattr(b, "label", "this process") for b in backends]

    def known(self) -> dict[str, dict[int, ServableSignature]]:
        """{servable name: {version: ServableSignature}} of every servable version served here since the start."""
        with self._lock:
            return {name: dict(versions) for name, versions in self._known.items()}

    def backend_counts(self) -> dict[tuple[str, int], int]:
        """{(servable, version): backends serving it now} for every known version (0: none left)."""
        with self._lock:
            return {(name, version): len(self._table.get(name, {}).get(version, ()))
                    for name, versions in self._known.items() for version in versions}

    def remove(self, backend) -> bool:
        """Take ``backend`` out of rotation; False when it was not in."""
        with self._lock:
            found = False
            for name, versions in list(self._table.items()):
                for version, backends in list(versions.items()):
                    if backend in backends:
                        backends.remove(backend)
                        found = True
                    if not backends:
                        del versions[version]
                if not versions:
                    del self._table[name]
            self._methods.pop(id(backend), None)
            return found

    def backends(self) -> list:
        with self._lock:
            return [b for versions in self._table.values() for backends in versions.values() for b in backends]

    def served(self) -> dict[str, list[int]]:
        with self._lock:
            return {name: sorted(versions) for name, versions in self._table.items()}

    def _candidates(self, spec: pb.ServableSpec) -> tuple[int, list]:
        with self._lock:
            versions = self._table.get(spec.name)
            if not spec.name:
                raise RequestError("the request names no servable (servable_spec.name is empty)")
            known = self._known.get(spec.name, {})
            if not versions:
                if known and (not spec.version_number or spec.version_number in known):
                    raise ServingUnavailableError(f"servable {spec.name!r}: no worker serves it now (its workers "
                                                  f"left or died); known versions: {sorted(known)}")
                served = ", ".join(sorted(self._table)) or "none yet"
                raise NotServedError(f"servable {spec.name!r} is not served here; servables served: {served}")
            version = spec.version_number or max(versions)
            backends = list(versions.get(version, ()))
            if not backends:
                if version in known:
                    raise ServingUnavailableError(f"servable {spec.name!r} version {version}: no worker serves it "
                                                  f"now (its workers left or died); versions served: {sorted(versions)}")
                raise NotServedError(f"servable {spec.name!r} has no version {version} served; versions served: "
                                     f"{sorted(versions)}")
            methods = self._methods.get(id(backends[0]), {})
            if spec.method_name not in methods:
                raise NotServedError(f"servable {spec.name!r} version {version} has no method {spec.method_name!r}; "
                                     f"its methods: {', '.join(methods)}")
            return version, backends

    def _take(self, backends: list):
        """The backend with the fewest requests in flight (round-robin among equals), counted as taken."""
        with self._lock:
            turn = next(self._turn)
            least = min(b.inflight for b in backends)
            idle = [b for b in backends if b.inflight == least]
            backend = idle[turn % len(idle)]
            backend.inflight += 1
            return backend

    def _release(self, backend) -> None:
        with self._lock:
            backend.inflight -= 1

    def predict(self, request: pb.PredictRequest, timeout: float | None = None) -> pb.PredictReply:
        """The reply to ``request``; never raises (a failure is the reply's ``error_msg``)."""
        started = time.perf_counter()
        reply = self._predict(request, timeout)
        if self.metrics is not None:
            self.metrics.request_done(self, request.servable_spec, reply, time.perf_counter() - started)
        return reply

    def _predict(self, request: pb.PredictRequest, timeout: float | None) -> pb.PredictReply:
        spec = request.servable_spec
        if timeout is None:
            timeout = default_timeout()  # MindSpore Serving's client sets no deadline; we never wait without one
        try:
            version, backends = self._candidates(spec)
            if not request.instances:
                raise RequestError("the request has no instances")
            tried = []
            while True:
                backend = self._take([b for b in backends if b not in tried])
                tried.append(backend)
                try:
                    return backend.predict(request, version, timeout)
                except ServingWorkerLostError as exc:
                    if self.remove(backend):
                        log.warning("%s: out of rotation (%s)", backend.label, exc)
                    try:
                        others = [b for b in self._candidates(spec)[1] if b not in tried] if len(tried) < 2 else []
                    except (RequestError, ServingError):  # none left ("no worker serves it now"): not the news
                        others = []
                    if not others:
                        raise  # the lost worker's error, naming it, its host and pid
                    log.warning("retrying a request of %s once on %s (%s was lost)", spec.name, others[0].label,
                                backend.label)
                    backends = others
                finally:
                    self._release(backend)
        except RequestError as exc:
            return error_reply(spec, exc)
        except Exception as exc:  # noqa: BLE001 - the client hears every failure
            if not isinstance(exc, ServingError):
                log.warning("request to %s failed: %s", spec.name, error_text(exc))
            return error_reply(spec, exc)

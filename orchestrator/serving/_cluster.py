"""The serving cluster: workers in other processes (or hosts) register with the master and keep a heartbeat.

Protocol (``_proto/serving_cluster.proto``, gRPC, version ``PROTOCOL_VERSION``)::

    worker                                   master
    Register(address, host, pid, servables) ->       the worker is in rotation for its servables
                                            <- worker_id, heartbeat_interval
    Heartbeat(worker_id)  every interval    ->
                                            <- known (false: dropped; the worker registers again)
    Leave(worker_id)      when stopping     ->       out of rotation at once

Requests go from the master to a worker's own ``MSService.Predict`` (the
worker serves it on its address), forwarded unchanged. A worker is out of
rotation as soon as it leaves, as soon as a request to it finds it
unreachable (that request is retried once on another worker of the same
servable version: see ``_dispatch``), or when no heartbeat came for
``HEARTBEAT_MISSES`` intervals (``HEARTBEAT_INTERVAL`` x 4 = 0.8 s); then its
requests in flight fail at once and are retried the same way (a worker that
leaves finishes its own).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time

import grpc

from ranks._log import get_logger

from ._errors import ServingError, ServingTimeoutError, ServingWorkerError, ServingWorkerLostError
from ._grpc_service import message_options
from ._proto import ms_service_pb2_grpc as service_grpc
from ._proto import serving_cluster_pb2 as cpb
from ._proto import serving_cluster_pb2_grpc as cluster_grpc

log = get_logger("serving")

PROTOCOL_VERSION = 1
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_MISSES = 4
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


def signature_of(info: cpb.ServableInfo):
    """A registered servable's ServableSignature (what the master's KServe metadata shows)."""
    import numpy as np

    from ._dispatch import ServableSignature, TensorSpec

    def tensors(items):
        return tuple(TensorSpec(t.name, np.dtype(t.dtype) if t.dtype else None, tuple(t.shape)) for t in items)

    methods = {m.name: (tuple(m.input_names), tuple(m.output_names)) for m in info.methods}
    return ServableSignature(info.name, info.version_number, methods, info.with_batch_dim,
                             tensors(info.model_inputs), tensors(info.model_outputs), info.max_batch)


def _brief(value) -> str:
    """A signature part in a message: tensors as name dtype shape."""
    if isinstance(value, tuple) and value and hasattr(value[0], "shape"):
        return "[" + ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in value) + "]"
    return repr(value)


class RemoteBackend:
    """A cluster worker as the dispatcher sees it: requests forwarded to its MSService."""

    def __init__(self, worker_id: str, address: str, host: str, pid: int, max_bytes: int):
        self.worker_id, self.address, self.host, self.pid = worker_id, address, host, pid
        self.label = f"worker {worker_id} at {address} (host {host}, pid {pid})"
        self.inflight = 0
        self.last_seen = time.monotonic()
        self._channel = grpc.insecure_channel(address, options=message_options(max_bytes))
        self._stub = service_grpc.MSServiceStub(self._channel)
        self._calls: set = set()
        self._calls_lock = threading.Lock()
        self._dropped: str | None = None

    def predict(self, request, version: int, timeout: float | None):
        call = self._stub.Predict.future(request, timeout=timeout)
        with self._calls_lock:
            self._calls.add(call)
            dropped = self._dropped
        if dropped is not None:
            call.cancel()
        try:
            return call.result()
        except grpc.FutureCancelledError:
            raise ServingWorkerLostError(f"{self.label} was taken out of rotation during the request: "
                                         f"{self._dropped}") from None
        except grpc.RpcError as exc:
            code = exc.code()
            if code in _UNREACHABLE:
                raise ServingWorkerLostError(f"{self.label} could not be reached or died during the request: "
                                             f"{exc.details()}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServingTimeoutError(f"{self.label} did not answer within {timeout:.1f} s") from None
            raise ServingWorkerError(f"{self.label} failed the request: {code.name}: {exc.details()}") from None
        finally:
            with self._calls_lock:
                self._calls.discard(call)

    def abandon(self, reason: str) -> None:
        """Fail the requests in flight on this worker now (it stopped answering): each is retried elsewhere once."""
        with self._calls_lock:
            self._dropped = reason
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def close(self) -> None:
        self._channel.close()


class ClusterMaster(cluster_grpc.ServingMasterServicer):
    """The master's side: the workers registered, and the watch that drops silent ones."""

    def __init__(self, dispatcher, max_bytes: int, interval: float = HEARTBEAT_INTERVAL):
        self._dispatcher = dispatcher
        self._max_bytes = max_bytes
        self.interval = interval
        self._workers: dict[str, RemoteBackend] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, name="serving heartbeat watch", daemon=True)
        self._watch.start()

    def workers(self) -> list[RemoteBackend]:
        with self._lock:
            return list(self._workers.values())

    def Register(self, request, context):  # noqa: N802
        if request.protocol_version != PROTOCOL_VERSION:
            return cpb.RegisterReply(error_msg=f"protocol version {request.protocol_version}; this master speaks "
                                               f"{PROTOCOL_VERSION}: run the same orchestrator version on both")
        if not request.servables:
            return cpb.RegisterReply(error_msg="the worker serves no servable")
        address = request.address
        host, _, port = address.rpartition(":")
        if host in ("0.0.0.0", "", "[::]"):
            # The worker listens on every address: reach it at the one it came from.
            peer = context.peer()  # "ipv4:10.1.2.3:45678"
            if peer.startswith("ipv4:"):
                address = f"{peer[5:].rpartition(':')[0]}:{port}"
        worker_id = f"{next(self._ids)}"
        backend = RemoteBackend(worker_id, address, request.host, request.pid, self._max_bytes)
        with self._lock:
            # The same address again: a worker that restarted (or re-registers after being dropped).
            for old in [w for w in self._workers.values() if w.address == address]:
                self._drop(old, "it registered again")
            conflict = self._conflict(request.servables)
            if conflict:
                log.warning("refused %s: %s", backend.label, conflict)
                return cpb.RegisterReply(error_msg=conflict)
            self._workers[worker_id] = backend
        for servable in request.servables:
            methods = {m.name: (tuple(m.input_names), tuple(m.output_names)) for m in servable.methods}
            self._dispatcher.add(backend, servable.name, servable.version_number, methods, signature_of(servable))
        log.info("%s joined: %s", backend.label,
                 ", ".join(f"{s.name} version {s.version_number}" for s in request.servables))
        return cpb.RegisterReply(worker_id=worker_id, heartbeat_interval=self.interval)

    def _conflict(self, servables) -> str:
        """Why these servables cannot join the ones served now ("" when they can): a servable version already
        served with other methods or another model would answer alike-named requests two ways at random."""
        for servable in servables:
            served = self._dispatcher.served_signature(servable.name, servable.version_number)
            if served is None:
                continue
            signature, labels = served
            mine = signature_of(servable)
            for what, theirs, ours in (("methods {name: (inputs, outputs)}", signature.methods, mine.methods),
                                       ("with_batch_dim", signature.with_batch_dim, mine.with_batch_dim),
                                       ("model inputs", signature.model_inputs, mine.model_inputs),
                                       ("model outputs", signature.model_outputs, mine.model_outputs)):
                if theirs != ours:
                    return (f"servable {servable.name} version {servable.version_number} is served here by "
                            f"{', '.join(labels)} with other {what}: {_brief(theirs)}; this worker's: {_brief(ours)}. "
                            f"Give every worker the same servable_config.py and model, or serve this one as "
                            f"another version")
        return ""

    def Heartbeat(self, request, context):  # noqa: N802
        with self._lock:
            backend = self._workers.get(request.worker_id)
            if backend is not None:
                backend.last_seen = time.monotonic()
        return cpb.HeartbeatReply(known=backend is not None)

    def Leave(self, request, context):  # noqa: N802
        with self._lock:
            backend = self._workers.get(request.worker_id)
            if backend is not None:
                self._drop(backend, "it left")
        return cpb.LeaveReply()

    def _drop(self, backend: RemoteBackend, why: str, warn: bool = False) -> None:
        """Out of rotation (call with the lock held); ``warn``: said at WARNING (it did not leave on its own)."""
        self._workers.pop(backend.worker_id, None)
        self._dispatcher.remove(backend)
        (log.warning if warn else log.info)("%s is out of rotation: %s", backend.label, why)
        # Requests in flight on it still finish or fail on their own channel; close it after they had their time.
        if backend.inflight:
            timer = threading.Timer(60.0, backend.close)
            timer.daemon = True  # never what keeps a stopping process alive
            timer.start()
        else:
            backend.close()

    def drop_unreachable(self) -> None:
        """Forget workers the dispatcher already took out (a request found them unreachable)."""
        served = set(map(id, self._dispatcher.backends()))
        with self._lock:
            for backend in [w for w in self._workers.values() if id(w) not in served]:
                self._workers.pop(backend.worker_id, None)

    def _watch_loop(self) -> None:
        limit = self.interval * HEARTBEAT_MISSES
        while not self._stop.wait(self.interval / 2):
            now = time.monotonic()
            with self._lock:
                for backend in [w for w in self._workers.values() if now - w.last_seen > limit]:
                    why = f"no heartbeat for {now - backend.last_seen:.1f} s (stopped, overloaded or cut off?)"
                    self._drop(backend, why, warn=True)
                    backend.abandon(why)  # a worker that left finishes its requests; a silent one may never
            self.drop_unreachable()

    def close(self) -> None:
        self._stop.set()
        self._watch.join(5.0)
        with self._lock:
            for backend in list(self._workers.values()):
                self._drop(backend, "the master is stopping")


class WorkerAgent:
    """The worker's side: register with the master, keep the heartbeat, register again when dropped, leave."""

    def __init__(self, master_address: str, address: str, servables: list, timeout: float):
        self.master_address = master_address
        self.address = address
        self._servables = servables
        self._channel = grpc.insecure_channel(master_address)
        self._stub = cluster_grpc.ServingMasterStub(self._channel)
        self.worker_id = ""
        self.interval = HEARTBEAT_INTERVAL
        self._stop = threading.Event()
        self._register(timeout)
        self._thread = threading.Thread(target=self._heartbeat_loop, name="serving heartbeat", daemon=True)
        self._thread.start()

    def _request(self) -> cpb.RegisterRequest:
        request = cpb.RegisterRequest(protocol_version=PROTOCOL_VERSION, address=self.address,
                                      host=socket.gethostname(), pid=os.getpid())
        for servable in self._servables:
            info = request.servables.add(name=servable.name, version_number=servable.version,
                                         with_batch_dim=servable.with_batch_dim)
            for method in servable.methods.values():
                info.methods.add(name=method.name, input_names=method.input_names, output_names=method.output_names)
            signature = servable.signature()
            info.max_batch = signature.max_batch
            for field, tensors in (("model_inputs", signature.model_inputs), ("model_outputs", signature.model_outputs)):
                for tensor in tensors:
                    getattr(info, field).add(name=tensor.name, dtype=tensor.dtype.name if tensor.dtype else "",
                                             shape=list(tensor.shape))
        return request

    def _register(self, timeout: float) -> None:
        """Register, retrying while the master is not up yet, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = ""
        said = False
        while True:
            try:
                reply = self._stub.Register(self._request(), timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                if not said:  # not a silent wait: the master may simply not be up yet
                    said = True
                    log.warning("no master answers at %s yet (%s); trying for up to %g s", self.master_address,
                                exc.code().name, timeout)
            else:
                if reply.error_msg:
                    raise ServingError(f"the master at {self.master_address} refused this worker: {reply.error_msg}")
                self.worker_id, self.interval = reply.worker_id, reply.heartbeat_interval or HEARTBEAT_INTERVAL
                return
            if time.monotonic() >= deadline or self._stop.is_set():
                raise ServingWorkerError(f"worker {self.address} (pid {os.getpid()}): no master answered at "
                                         f"{self.master_address} within {timeout:g} s ({last})")
            self._stop.wait(0.2)

    def _heartbeat_loop(self) -> None:
        warned = False
        while not self._stop.wait(self.interval):
            try:
                reply = self._stub.Heartbeat(cpb.HeartbeatRequest(worker_id=self.worker_id), timeout=self.interval * 2)
                if not reply.known:
                    log.warning("the master at %s dropped this worker; registering again", self.master_address)
                    self._register(self.interval * 5)
                warned = False
            except (grpc.RpcError, ServingError) as exc:
                if not warned:
                    log.warning("no answer from the master at %s (%s); retrying", self.master_address,
                                exc.code().name if isinstance(exc, grpc.RpcError) else exc)
                    warned = True

    def leave(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        if self.worker_id:
            try:
                self._stub.Leave(cpb.LeaveRequest(worker_id=self.worker_id), timeout=2.0)
            except grpc.RpcError:
                pass  # the master is gone already: nothing to tell
        self._channel.close()

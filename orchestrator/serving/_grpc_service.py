"""The gRPC servers: MindSpore Serving's ``MSService.Predict`` over a dispatcher, and how servers are started."""

from __future__ import annotations

import grpc

from ._errors import ServingError
from ._listen import check_can_listen
from ._threads import ServingExecutor
from ._proto import ms_service_pb2_grpc as pb_grpc

MAX_WORKER_THREADS = 64


class MSServiceServicer(pb_grpc.MSServiceServicer):
    def __init__(self, dispatcher, timeout: float | None = None):
        self._dispatcher = dispatcher
        self._timeout = timeout

    def Predict(self, request, context):  # noqa: N802 - the protocol's name
        timeout = self._timeout
        remaining = context.time_remaining()
        # A call without a deadline reports ~2**63 ns remaining: no deadline, not one to pass on to a worker.
        if remaining is not None and remaining < 1e9 and (timeout is None or remaining < timeout):
            timeout = remaining
        return self._dispatcher.predict(request, timeout)


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


def start_server(ip: str, port: int, what: str, add_servicers, max_bytes: int) -> tuple[grpc.Server, int]:
    """A started gRPC server on ip:port (``add_servicers(server)`` adds the services); (server, bound port)."""
    check_can_listen(what, ip, port)  # first: a port in use gets its reason, and no log line of gRPC's
    server = grpc.server(ServingExecutor(MAX_WORKER_THREADS, what.replace(" ", "-")),
                         options=message_options(max_bytes) + [("grpc.so_reuseport", 0)])
    add_servicers(server)
    target = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as exc:
        bound = 0
        reason = str(exc)
    else:
        reason = ""
    if not bound:  # taken since the check (or refused for a reason the check did not see)
        server.stop(None)
        raise ServingError(f"{what}: cannot listen on {ip}:{port} (in use, or not an address of this host)"
                           + (f": {reason}" if reason else ""))
    server.start()
    return server, bound

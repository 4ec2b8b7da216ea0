"""MindSpore Serving's ``master``: the gRPC and RESTful fronts, and the cluster master that workers join.

    from orchestrator.serving import master, worker
    worker.start_servable_in_master(servable_dir, "add", device_id=0)   # lightweight: the model in this process
    master.start_grpc_server("127.0.0.1", 5500)       # MSService and KServe v2 gRPC on one port
    master.start_restful_server("127.0.0.1", 1500)    # also KServe v2 HTTP (/v2/...) and /metrics

    master.start_grpc_server("127.0.0.1", 5500)                          # cluster: workers join from elsewhere
    master.start_master_server("127.0.0.1", 6500)

Each call returns at once; the process serves until SIGINT (Ctrl-C) or
SIGTERM, or until ``stop()``, also after the script returns, but not after
it ended by an uncaught exception or with no server started (``_process``).
Servers bind only the address given (MindSpore Serving's examples use
127.0.0.1; 0.0.0.0 is every address); one that cannot says why (``_listen``).
"""

from __future__ import annotations

import threading
import time

from ranks._log import get_logger

from ._errors import ServingError
from ._listen import check_address, listen_error
from ._process import DEFAULT_MAX_MB, PROCESS, max_bytes

log = get_logger("serving")

__all__ = ["start_grpc_server", "start_restful_server", "start_http_server", "start_master_server", "stop", "wait"]


def start_grpc_server(ip: str = "127.0.0.1", grpc_port: int = 5500, max_msg_mb_size: int = DEFAULT_MAX_MB) -> int:
    """Serve gRPC on ip:grpc_port; returns the port (0: a free one).

    Two services on the one port: MindSpore Serving's ``MSService.Predict`` and KServe v2's
    ``inference.GRPCInferenceService`` (what ``tritonclient.grpc`` calls).
    """
    from ._grpc_service import MSServiceServicer, start_server
    from ._kserve_grpc import KServeServicer
    from ._proto import grpc_predict_v2_pb2_grpc, ms_service_pb2_grpc

    def add_services(server):
        ms_service_pb2_grpc.add_MSServiceServicer_to_server(MSServiceServicer(PROCESS.dispatcher), server)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(PROCESS.dispatcher), server)

    limit = max_bytes(max_msg_mb_size)
    PROCESS.serving()
    server, port = start_server(ip, grpc_port, "serving gRPC server", add_services, limit)
    PROCESS.grpc_servers.append(("grpc", server))
    print(f"Serving gRPC start success, listening on {ip}:{port}", flush=True)
    return port


def start_restful_server(ip: str = "127.0.0.1", restful_port: int = 1500, max_msg_mb_size: int = DEFAULT_MAX_MB) -> int:
    """Serve HTTP on ip:restful_port; returns the port (0: a free one).

    On the one port: MindSpore Serving's RESTful API (``POST /model/NAME[/version/N]:METHOD``),
    KServe v2's HTTP protocol (``/v2/...``, what ``tritonclient.http`` calls) and ``GET /metrics``.
    """
    import socket

    import uvicorn

    from ._http import make_app

    limit = max_bytes(max_msg_mb_size)
    check_address("RESTful server", ip, restful_port)
    PROCESS.serving()
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP, and
    # with Nagle on, a reply written as headers then body waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted connections inherit it (Linux)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, restful_port))
    except OSError as exc:
        sock.close()
        raise listen_error("RESTful server", ip, restful_port, exc) from None
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(PROCESS.dispatcher, limit, PROCESS.metrics), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="serving RESTful server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30.0
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise ServingError(f"RESTful server on {ip}:{port} did not start within 30 s")
    PROCESS.rest_servers.append((server, thread))
    print(f"Serving RESTful server start success, listening on {ip}:{port}", flush=True)
    return port


start_http_server = start_restful_server  # the same server: its KServe name


def start_master_server(ip: str = "127.0.0.1", master_port: int = 6100, max_msg_mb_size: int = DEFAULT_MAX_MB) -> int:
    """Accept cluster workers (``worker.start_servable``) on ip:master_port; requests are spread over them."""
    from ._cluster import ClusterMaster
    from ._grpc_service import start_server
    from ._proto import serving_cluster_pb2_grpc

    limit = max_bytes(max_msg_mb_size)
    PROCESS.serving()
    if PROCESS.cluster_master is not None:
        raise ServingError("the master server is already started in this process")
    cluster = ClusterMaster(PROCESS.dispatcher, limit)
    try:
        server, port = start_server(ip, master_port, "serving master server",
                                    lambda s: serving_cluster_pb2_grpc.add_ServingMasterServicer_to_server(cluster, s), limit)
    except BaseException:
        cluster.close()
        raise
    PROCESS.cluster_master = cluster
    PROCESS.grpc_servers.append(("master", server))
    print(f"Serving master server start success, listening on {ip}:{port}", flush=True)
    return port


def stop() -> None:
    """Stop every server and model of this process (what Ctrl-C does)."""
    PROCESS.stop()


def wait(timeout: float | None = None) -> bool:
    """Block until this process's serving stops (a signal or ``stop()``); True when it has."""
    keeper = PROCESS._keeper
    if keeper is None:
        return PROCESS.stopped
    main = threading.current_thread() is threading.main_thread()
    if main:
        PROCESS.main_waits = True
    try:
        keeper.join(timeout)
    finally:
        if main:
            PROCESS.main_waits = False
    return not keeper.is_alive()

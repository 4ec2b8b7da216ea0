"""MindSpore Serving's ``worker``: load a servable in this process, for this process's master or another's.

    worker.start_servable_in_master(servable_dir, "add", device_id=0)          # lightweight deployment
    worker.start_servable(servable_dir, "add", device_id=0,                      # cluster deployment
                          master_ip="127.0.0.1", master_port=6500, worker_ip="127.0.0.1", worker_port=6600)

Beyond MindSpore Serving's arguments, both take ``device_ids`` (several: the
batch-split master), ``workers_num`` and ``thread_num`` (the worker pool),
``max_batch`` and ``batch_delay_ms`` (request batching), ``queue_size`` and
``timeout`` (see ``ServableOptions``).
"""

from __future__ import annotations

import socket

from .. import register  # noqa: F401  (``from orchestrator.serving.worker import register``)
from .._errors import ServingError
from .._process import DEFAULT_MAX_MB, PROCESS, max_bytes
from .._servable import Servable, ServableOptions

__all__ = ["start_servable", "start_servable_in_master", "stop", "register"]

REGISTER_TIMEOUT = 30.0  # seconds a cluster worker waits for its master to answer


def _options(device_id, device_ids, kwargs) -> ServableOptions:
    ids = device_ids if device_ids is not None else (device_id,)
    return ServableOptions(device_ids=tuple([ids] if isinstance(ids, int) else ids), **kwargs)


def start_servable_in_master(servable_directory, servable_name, version_number=0, device_type=None, device_id=0, *,
                             device_ids=None, **options):
    """Load ``servable_directory/servable_name`` (the newest version, or ``version_number``) into this process.

    Requests reach it through this process's ``master.start_grpc_server`` / ``start_restful_server``.
    Raises ``ServableConfigError`` for a servable that cannot be loaded (the file and reason named).
    """
    servable = Servable(servable_directory, servable_name, version_number, _options(device_id, device_ids, options))
    PROCESS.serving()
    PROCESS.add_local(servable)
    return servable.version


def start_servable(servable_directory, servable_name, version_number=0, device_type=None, device_id=0,
                   master_ip="127.0.0.1", master_port=6100, worker_ip="127.0.0.1", worker_port=6200, *,
                   device_ids=None, max_msg_mb_size=DEFAULT_MAX_MB, register_timeout=REGISTER_TIMEOUT, **options):
    """Load a servable here, serve it on worker_ip:worker_port and join the master at master_ip:master_port.

    Returns once registered; the process then serves until SIGINT/SIGTERM (it leaves its master
    first) or ``stop()``. Raises ``ServingWorkerError`` when no master answers within ``register_timeout`` s.
    """
    from .._cluster import WorkerAgent
    from .._grpc_service import MSServiceServicer, start_server
    from .._proto import ms_service_pb2_grpc

    limit = max_bytes(max_msg_mb_size)
    servable = Servable(servable_directory, servable_name, version_number, _options(device_id, device_ids, options))
    try:
        PROCESS.serving()
        PROCESS.add_local(servable)
    except BaseException:
        servable.close()
        raise
    server, port = start_server(worker_ip, worker_port, "serving worker", lambda s: ms_service_pb2_grpc.add_MSServiceServicer_to_server(
        MSServiceServicer(PROCESS.dispatcher), s), limit)
    PROCESS.grpc_servers.append(("worker", server))
    address = f"{worker_ip}:{port}"
    try:
        agent = WorkerAgent(f"{master_ip}:{master_port}", address, [servable], register_timeout)
    except BaseException:
        PROCESS.stop(announce=False)  # the start failed: its error says so, not "Serving stopped"
        raise
    PROCESS.worker_agents.append(agent)
    print(f"Serving worker start success, listening on {address}, servable {servable.name} version "
          f"{servable.version}, registered with the master at {master_ip}:{master_port} (host {socket.gethostname()})",
          flush=True)
    return port


def stop() -> None:
    """Stop this process's servers and models (a cluster worker leaves its master first)."""
    PROCESS.stop()

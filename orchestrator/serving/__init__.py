"""Serving with MindSpore Serving's protocols and KServe v2's: servables, a master and workers, gRPC and HTTP.

    from orchestrator.serving import master, worker            # the servers (``mindspore_serving`` -> ``orchestrator.serving``)
    from orchestrator.serving.worker import register           # in servable_config.py (also ``orchestrator.serving.register``)
    from orchestrator.serving.client import Client             # the Python client

Pieces: ``_servable`` loads a servable directory and runs its methods on the
worker pool (``_batching`` joins instances into batches); ``_dispatch`` routes
each request to a servable here or to a cluster worker (``_cluster``);
``_grpc_service`` and ``_rest`` are MindSpore Serving's fronts, ``_kserve_grpc``
and ``_kserve_http`` KServe v2's (over ``_kserve_models``: model names,
metadata, readiness, tensors), ``_http`` the one HTTP app holding both REST
dialects and ``/metrics`` (``_metrics``); ``_process`` keeps the process
serving and stops it, ``_listen`` checks a server's address and port; ``_proto`` holds the protocols' .proto files and the
modules generated from them.
"""

from . import _grpc_setup  # noqa: F401  (first: before any module here imports grpc)
from . import client, master, register, worker
from ._errors import (
    MethodError,
    NotServedError,
    RequestError,
    ServableConfigError,
    ServingError,
    ServingQueueFullError,
    ServingTimeoutError,
    ServingUnavailableError,
    ServingWorkerError,
    ServingWorkerLostError,
)

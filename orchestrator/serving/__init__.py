"""Serving with MindSpore Serving's protocols: servables, a master and workers, gRPC and REST.

    from orchestrator.serving import master, worker            # the servers (``mindspore_serving`` -> ``orchestrator.serving``)
    from orchestrator.serving.worker import register           # in servable_config.py (also ``orchestrator.serving.register``)
    from orchestrator.serving.client import Client             # the Python client

Pieces: ``_servable`` loads a servable directory and runs its methods on the
worker pool (``_batching`` joins instances into batches); ``_dispatch`` routes
each request to a servable here or to a cluster worker (``_cluster``);
``_grpc_service`` and ``_rest`` are the two fronts; ``_process`` keeps the
process serving and stops it; ``_proto`` holds the protocols' .proto files
and the modules generated from them.
"""

from . import _grpc_setup  # noqa: F401  (first: before any module here imports grpc)
from . import client, master, register, worker
from ._errors import (
    NotServedError,
    RequestError,
    ServableConfigError,
    ServingError,
    ServingQueueFullError,
    ServingTimeoutError,
    ServingWorkerError,
    ServingWorkerLostError,
)

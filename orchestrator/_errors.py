"""Errors of the master side: workers that die, stall or refuse, and worker pools (under ``ranks.OrchestratorError``)."""

from __future__ import annotations

import concurrent.futures
import queue

from ranks._errors import OrchestratorError


class WorkerError(OrchestratorError, RuntimeError):
    """A worker process that died, stalled or refused a request."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """A worker process that did not answer within the timeout."""


class WorkerLostError(WorkerError, ConnectionError):
    """A worker process that died (exited or was killed) before answering."""


class PoolQueueFullError(WorkerError, queue.Full):
    """A ModelParallelRunner whose request queue is full refused a request at once (also ``queue.Full``)."""


class PoolClosedError(WorkerError, concurrent.futures.CancelledError):
    """A request to a closed ModelParallelRunner, or one still pending when it was closed
    (also ``concurrent.futures.CancelledError``)."""

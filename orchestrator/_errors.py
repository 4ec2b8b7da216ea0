"""Errors of the master side: worker processes that die, stall or refuse (under ``ranks.OrchestratorError``)."""

from __future__ import annotations

from ranks._errors import OrchestratorError


class WorkerError(OrchestratorError, RuntimeError):
    """A worker process that died, stalled or refused a request."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """A worker process that did not answer within the timeout."""


class WorkerLostError(WorkerError, ConnectionError):
    """A worker process that died (exited or was killed) before answering."""

"""Errors of the serving front (under ``ranks.OrchestratorError``, like every error of the project).

==========================  ===============================================================
``ServingError``            the base: a servable, method or server that cannot do its job
``ServableConfigError``     a servable directory or ``servable_config.py`` that does not fit
                            (also ``ConfigError``: ValueError and RuntimeError)
``RequestError``            a request that does not fit (unknown servable/method/version,
                            wrong instance keys, dtype or shape; also ``InputError``)
``NotServedError``          a request for a servable not served here (a ``RequestError``)
``ServingQueueFullError``   a servable's queue is full: refused at once (also ``queue.Full``)
``ServingUnavailableError`` a servable served here before, with no worker serving it now
``ServingTimeoutError``     a request that did not finish within its timeout
``ServingWorkerError``      a cluster worker that died, left or did not answer; names the
                            worker, its host and pid
==========================  ===============================================================
"""

from __future__ import annotations

import queue

from ranks._errors import ConfigError, InputError, OrchestratorError

from .._errors import WorkerError, WorkerLostError


class ServingError(OrchestratorError, RuntimeError):
    """A servable, method or server that cannot do its job."""


class ServableConfigError(ServingError, ConfigError):
    """A servable directory, version folder or ``servable_config.py`` that does not fit."""


class RequestError(ServingError, InputError):
    """A request that names something not served or carries inputs that do not fit."""


class NotServedError(RequestError):
    """A request for a servable (name) that is not served here."""


class MethodError(ServingError):
    """A method of a servable_config.py raised an exception of its own (its type and text are in the message)."""


class ServingQueueFullError(ServingError, queue.Full):
    """A servable whose queue is full refused a request at once."""


class ServingUnavailableError(ServingError):
    """A servable this process served before, with no worker that can serve it now (its workers left or died)."""


class ServingTimeoutError(ServingError, TimeoutError):
    """A request that did not finish within its timeout."""


class ServingWorkerError(ServingError, WorkerError):
    """A cluster worker that failed a request: died, left, or did not answer."""


class ServingWorkerLostError(ServingWorkerError, WorkerLostError):
    """A cluster worker that could not be reached (dead, gone, or its network down)."""

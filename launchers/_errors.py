"""Errors of launching many rank processes (under the project's one base, ``ranks.OrchestratorError``)."""

from __future__ import annotations

from ranks._errors import OrchestratorError


class LaunchError(OrchestratorError, RuntimeError):
    """A launcher that could not start its ranks (no mpirun, bad host list, bad program)."""


class RankFailedError(LaunchError):
    """One or more ranks exited with a non-zero code or were killed by a signal.

    ``failures`` holds one record per failed rank, earliest first (the
    launchers' ``RankExit`` records); ``first`` is the root cause a user should
    read; ``stopped`` holds the ranks the launcher itself stopped afterwards.
    """

    def __init__(self, message: str, failures: list, stopped: list | None = None):
        super().__init__(message)
        self.failures = list(failures)
        self.stopped = list(stopped or [])

    @property
    def first(self):
        return self.failures[0] if self.failures else None

    def __reduce__(self):
        return (type(self), (self.args[0], self.failures, self.stopped))


class LaunchTimeoutError(LaunchError, TimeoutError):
    """Ranks that were still running when the launcher's time limit ran out."""


class LaunchInterruptedError(LaunchError):
    """The launcher received SIGINT (Ctrl-C) or SIGTERM and stopped every rank."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name

    def __reduce__(self):
        return (type(self), (self.args[0], self.signal_name))

"""The project's loggers: one tree under ``orchestrator``, its level from ``ORCH_LOG_LEVEL``.

Library code logs through ``get_logger(name)`` and never prints. Warnings (a
config key without effect here, cores shared by workers) reach stderr through
Python's last-resort handler as one line each, as for any library. Setting
``ORCH_LOG_LEVEL=INFO`` or ``DEBUG`` also shows what the project does (models
built, communicators joined, processes started and stopped); then, unless the
application configured logging itself, one handler writes them to stderr with
the process and host, so lines from several ranks can be told apart.
"""

from __future__ import annotations

import logging
import os
import socket

from . import _env

ROOT = "orchestrator"
_configured = False


def get_logger(name: str) -> logging.Logger:
    """The logger ``orchestrator.<name>``."""
    _configure()
    return logging.getLogger(f"{ROOT}.{name}")


def _configure() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger(ROOT)
    wanted = (_env.LOG_LEVEL.get() or "WARNING").strip().upper()
    level = logging.getLevelName(wanted)
    if not isinstance(level, int):
        root.setLevel(logging.WARNING)
        root.warning("%s=%r is not a logging level (DEBUG, INFO, WARNING, ERROR); using WARNING", _env.LOG_LEVEL.name, wanted)
        return
    root.setLevel(level)
    if level < logging.WARNING and not logging.getLogger().handlers and not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            f"[%(name)s pid {os.getpid()} on {socket.gethostname()}] %(levelname)s: %(message)s"
        ))
        root.addHandler(handler)

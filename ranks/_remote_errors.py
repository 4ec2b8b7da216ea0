"""Carrying an exception from one process to another without losing it.

The sending side calls ``pack_exception`` inside its ``except`` block and
sends the resulting dict (plain strings and bytes, always picklable). The
receiving side calls ``unpack_exception`` and raises what it returns: the
original exception type when it can be rebuilt, with the remote traceback
attached as ``__cause__`` under a header that names the rank, host and pid.
When the exception cannot be pickled or unpickled, its type name and text
still arrive, as a ``RemoteError``.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

from ._errors import OrchestratorError


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in another process."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class RemoteError(OrchestratorError, RuntimeError):
    """An exception from another process whose type could not be rebuilt here."""

    def __init__(self, type_name: str, message: str, where: str = ""):
        super().__init__(f"{where}{type_name}: {message}" if where else f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message
        self.where = where


def where_header(role: str) -> str:
    """``role`` (e.g. "rank 1 of 2", "worker for device 0") plus host and pid."""
    return f"{role} on host {socket.gethostname()} (pid {os.getpid()})"


def pack_exception(exc: BaseException, where: str) -> dict:
    """Turn ``exc`` into a dict that can cross a pipe or socket."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        payload = pickle.dumps(exc)
        pickle.loads(payload)  # some exceptions pickle but fail to unpickle
    except Exception:
        payload = b""
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": text,
        "where": where,
        "pickled": payload,
    }


def unpack_exception(packed: dict) -> BaseException:
    """Rebuild the exception described by ``pack_exception``'s dict."""
    where = packed.get("where", "")
    cause = RemoteTraceback(f"\n### {where}\n{packed.get('traceback', '')}")
    exc: BaseException | None = None
    if packed.get("pickled"):
        try:
            exc = pickle.loads(packed["pickled"])
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(packed.get("type", "Exception"), packed.get("message", ""), f"{where}: " if where else "")
    else:
        # Say where it came from in the message itself: a user reading only
        # the last line of a traceback must still see the rank or device.
        try:
            if where and exc.args and isinstance(exc.args[0], str) and where not in exc.args[0]:
                exc.args = (f"[{where}] {exc.args[0]}",) + tuple(exc.args[1:])
            elif where and not exc.args:
                exc.args = (f"[{where}]",)
        except (AttributeError, TypeError):
            pass
    exc.__cause__ = cause
    return exc

"""Whether a server can listen on an address and port, and the one error line saying why it cannot.

gRPC's ``add_insecure_port`` reports a failed bind only as "port 0" (no reason), and its C core
logs the failure on stderr itself (``E1130 ... add_port.cc:83] ...``) before it returns. So the
gRPC servers bind the address here first: a port in use then fails with the reason (errno) and
without gRPC's log line. The check binds with the options gRPC's listener uses (SO_REUSEADDR, no
SO_REUSEPORT), so it refuses exactly what gRPC would refuse; a port taken by another program
between the check and gRPC's own bind still fails, with gRPC's log line, as a last resort.
``orchestrate serve`` runs the same check on every port before it loads the servables.
"""

from __future__ import annotations

import errno
import socket

from ._errors import ServingError


def check_address(what: str, ip, port) -> None:
    """``ServingError`` unless ``ip`` is a non-empty str and ``port`` an int in [0, 65535] (0: a free one)."""
    if not isinstance(ip, str) or not ip:
        raise ServingError(f"{what}: the address must be an IP or host name (str), got {ip!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ServingError(f"{what}: port must be an integer in 1-65535 (0: a free one), got {port!r}")


def listen_error(what: str, ip: str, port: int, exc: OSError) -> ServingError:
    """The error for a bind of ip:port that failed with ``exc``: the address, the port and the reason in words."""
    if isinstance(exc, socket.gaierror):
        reason = f"{ip} is not a known host name or address ({exc.strerror})"
    elif exc.errno == errno.EADDRINUSE:
        reason = "the port is already in use (another server or program listens on it)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = f"{ip} is not an address of this host"
    elif exc.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need privileges)"
    else:
        reason = exc.strerror or str(exc)
    return ServingError(f"{what}: cannot listen on {ip}:{port}: {reason}")


def check_can_listen(what: str, ip, port) -> None:
    """Raise ``listen_error`` unless a server could listen on ip:port now (every address the name resolves
    to is tried, as gRPC binds each: one that binds is enough)."""
    check_address(what, ip, port)
    try:
        addresses = socket.getaddrinfo(ip, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise listen_error(what, ip, port, exc) from None
    first = None
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                first = first or exc
                continue
        return
    raise listen_error(what, ip, port, first or OSError(errno.EADDRNOTAVAIL, "no address to listen on")) from None

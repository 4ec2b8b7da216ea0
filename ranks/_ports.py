"""Finding free TCP ports for the zmq communicator, whose rank r listens on base_port + r."""

from __future__ import annotations

import socket

from ._errors import CommError


def free_base_port(count: int = 1, host: str = "127.0.0.1", attempts: int = 100) -> int:
    """A port ``base`` such that ``base .. base + count - 1`` are all free on ``host`` right now.

    The ports are released before returning, so another process may still take
    one before the ranks bind it; the ranks then fail with a clear bind error.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((host, 0))  # the kernel picks a free ephemeral port
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise CommError(f"found no {count} consecutive free TCP ports on {host} in {attempts} attempts")

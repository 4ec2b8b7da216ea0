"""The links between a ``ShardedModel`` master and its ranks: one Unix stream socket per rank.

The master listens on ``DIR/master.sock`` in the job's own temporary directory (every rank runs on
this host); each rank connects once and sends its BUILD_FINISH (or ERROR) first, which says which
rank the connection belongs to. Messages are the protocol's stream framing (``StreamChannel``).

Why plain sockets and not ZeroMQ: a ZeroMQ message passes through an I/O thread on each side, two
more thread wake-ups per direction. On a 2-core machine a round trip to two ranks took 73 us through
ZeroMQ's ipc transport and 11 us over Unix sockets; a batch-1 call of a sharded model is mostly such
round trips beyond the ranks' own time. A plain socket also tells each side at once that the other
closed it (EOF): the rank whose master died, the master whose rank died.
"""

from __future__ import annotations

import select
import socket
import threading
import time

from . import _protocol as proto

_BACKLOG = 128


class MasterLinks:
    """The master's end: the listening socket and the accepted connections (``peers``: rank -> channel)."""

    def __init__(self, path: str):
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(_BACKLOG)
        self._channels: list[proto.StreamChannel] = []  # accepted and still open, in order
        self.peers: dict[int, proto.StreamChannel] = {}
        # One poll set kept up to date (not one built per wait: a batch-1 call waits once or twice)
        self._poller = select.poll()
        self._by_fd: dict[int, object] = {}
        self._watch(self._listener)

    def _watch(self, item) -> None:
        self._by_fd[item.fileno()] = item
        self._poller.register(item.fileno(), select.POLLIN | select.POLLPRI)

    def receive(self, timeout: float, deadline: float):
        """``(message, channel)``: the next message within ``timeout`` seconds; None when none came or a rank
        closed its end (it exited: the launcher reports how). ``socket.timeout`` when a message began but did
        not come whole by ``deadline`` (its sender stopped half-way)."""
        events = self._poller.poll(max(0, int(timeout * 1000 + 0.999)))
        ready = [self._by_fd[fd] for fd, _ in events if fd in self._by_fd]
        if self._listener in ready:
            conn, _ = self._listener.accept()
            self._channels.append(proto.StreamChannel(conn))
            self._watch(self._channels[-1])
        for channel in ready:
            if channel is self._listener:
                continue
            try:
                frames = channel.recv(timeout=max(deadline - time.monotonic(), 0.0))
            except (EOFError, ConnectionError):
                self._drop(channel)
                return None
            return proto.decode(frames, "a rank"), channel
        return None

    def send(self, rank: int, packed: list, deadline: float) -> bool:
        """Write a message (``proto.pack_stream``'s buffers) to ``rank``; False if its end is closed (it exited);
        ``TimeoutError`` if it has not taken the message by ``deadline`` (a large message to a stopped rank)."""
        channel = self.peers.get(rank)
        if channel is None:
            return False
        try:
            channel.send_packed(packed, timeout=max(deadline - time.monotonic(), 0.0))
        except ConnectionError:
            self._drop(channel)
            return False
        return True

    def tell_everyone(self, frames: list, timeout: float = 0.1) -> None:
        """Best effort (EXIT at close): a rank that is gone or does not read is left to the supervisor."""
        for channel in list(self.peers.values()):
            try:
                channel.send(frames, timeout=timeout)
            except OSError:
                pass

    def forget_peers(self) -> None:
        """Close every rank's connection (the ranks are being stopped or started again)."""
        for channel in list(self._channels):
            self._drop(channel)
        self.peers.clear()

    def _drop(self, channel: proto.StreamChannel) -> None:
        fd = channel.fileno()
        if self._by_fd.pop(fd, None) is not None:
            self._poller.unregister(fd)
        channel.close()
        if channel in self._channels:
            self._channels.remove(channel)
        for rank, other in list(self.peers.items()):
            if other is channel:
                del self.peers[rank]

    def close(self) -> None:
        self.forget_peers()
        self._listener.close()


class RankLink:
    """A rank's end: its one connection to the master, written by the main thread and the progress helper."""

    def __init__(self, path: str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self._channel = proto.StreamChannel(sock)
        self._lock = threading.Lock()  # a message is written whole before another begins

    def send(self, frames: list) -> None:
        with self._lock:
            self._channel.send(frames)

    def poll(self, timeout: float) -> bool:
        return self._channel.poll(timeout)

    def recv(self) -> proto.Message:
        """The master's next message; ``EOFError`` when the master closed its end (it is gone)."""
        return proto.decode(self._channel.recv(), "the master")

    def close(self) -> None:
        self._channel.close()

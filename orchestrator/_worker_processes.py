"""The worker processes of this package's masters: start them, see one die, say how it ended, stop them.

Both masters that run ``python -m orchestrator._worker_main`` children use these:
the batch-split master (``_parallel_predictor``) and the worker pool's process
backend (``_pool_processes``). Each worker talks to its master over a
socketpair (``_protocol``'s stream framing); a pool worker has a second one for
CANCEL. The supervisor (``launchers.Supervisor``) starts and watches them, with
its watchdog, which removes the master's named segments if the master is
SIGKILLed.
"""

from __future__ import annotations

import select
import socket

from launchers import LaunchError, ProcessSpec, RankOutput, Supervisor, python_module

from . import _protocol as proto
from ._errors import WorkerError

WORKER_MODULE = "orchestrator._worker_main"


def start_workers(labels: list[str], *, cancel_channels: bool, stop_timeout: float,
                  world_size: int | None = None) -> tuple[Supervisor, list[proto.StreamChannel], list[proto.StreamChannel | None]]:
    """Start one worker per label (worker k is key k of the supervisor); its channel and, when asked, its cancel channel.

    Raises WorkerError when a worker cannot be started (the others are stopped first).
    """
    specs, channels, cancels, theirs = [], [], [], []
    try:
        for index, label in enumerate(labels):
            ours, their_end = socket.socketpair()
            theirs.append(their_end)
            channels.append(proto.StreamChannel(ours))
            args = ["--fd", str(their_end.fileno())]
            fds = [their_end.fileno()]
            if cancel_channels:
                cancel_ours, cancel_theirs = socket.socketpair()
                theirs.append(cancel_theirs)
                cancels.append(proto.StreamChannel(cancel_ours))
                args += ["--cancel-fd", str(cancel_theirs.fileno())]
                fds.append(cancel_theirs.fileno())
            else:
                cancels.append(None)
            argv, env = python_module(WORKER_MODULE, *args)
            specs.append(ProcessSpec(index, argv, env=env, label=label, pass_fds=tuple(fds)))
        supervisor = Supervisor(specs, output=RankOutput(tail_lines=20), stop_timeout=stop_timeout,
                                world_size=world_size, watchdog=True)
        try:
            supervisor.start()
        except LaunchError as exc:
            raise WorkerError(f"cannot start the worker processes: {exc}") from exc
    except BaseException:
        for channel in channels + [c for c in cancels if c is not None]:
            channel.close()
        raise
    finally:
        # Our copies of the workers' ends must go, or a dead worker's socket never reaches EOF.
        for end in theirs:
            end.close()
    return supervisor, channels, cancels


class HangUps:
    """Which workers' sockets have hung up (the worker died), seen without reading from them or sending to them.

    Polled for ``POLLRDHUP`` only (``POLLHUP`` and ``POLLERR`` come regardless): a reply makes a socket
    readable, not hung up, so a pending reply never counts, and nothing is consumed. The pool's watcher
    thread blocks in ``poll`` (woken early through ``wake_fd``); the batch-split master polls with timeout 0
    before each request, so a worker that died while idle is named as such.
    """

    def __init__(self, channels: dict, wake_fd: int | None = None):
        self._poller = select.poll()
        self._by_fd = {}
        for key, channel in channels.items():
            self._by_fd[channel.fileno()] = key
            self._poller.register(channel.fileno(), select.POLLRDHUP)
        self._wake_fd = wake_fd
        if wake_fd is not None:
            self._poller.register(wake_fd, select.POLLIN)

    @property
    def watching(self) -> bool:
        """Whether any socket is still watched (one that hung up is reported once, then no longer watched)."""
        return bool(self._by_fd)

    def poll(self, timeout: float) -> list:
        """The keys whose sockets hung up since the last call, in key order; waits up to ``timeout`` seconds
        for the first (0: just look), returning early, maybe with none, when ``wake_fd`` is readable."""
        gone = []
        for fd, _ in self._poller.poll(int(timeout * 1000)):
            key = self._by_fd.pop(fd, None)
            if key is None:
                continue  # the wake fd: its owner drains or closes it
            self._poller.unregister(fd)  # it stays hung up: watched again, it would wake every poll
            gone.append(key)
        return sorted(gone)


def death_text(supervisor: Supervisor | None, key: int, doing: str, then: str = "", tail: bool = True) -> str:
    """``was killed by SIGKILL while <doing><then>`` (or ``exited with code 1 ...``), waiting up to a second
    for the supervisor's record; then (``tail``) its last lines of output, when it wrote any."""
    ended = supervisor.exit_of(key, timeout=1.0) if supervisor is not None else None
    if ended is None:
        return f"closed its connection while {doing}{then}"
    how = f"was killed by {ended.signal}" if ended.signal else f"exited with code {ended.exitcode}"
    return f"{how} while {doing}{then}" + (last_lines(supervisor, key) if tail else "")


def last_lines(supervisor: Supervisor | None, key: int) -> str:
    """``; its last lines of output:`` and up to five of them, indented, or "" (no record, or it wrote none)."""
    ended = supervisor.exit_of(key, timeout=1.0) if supervisor is not None else None
    if ended is None or not ended.tail:
        return ""
    return "; its last lines of output:\n" + "\n".join(f"    | {line}" for line in ended.tail[-5:])


def stop_workers(supervisor: Supervisor | None, channels: dict[int, proto.StreamChannel], *, graceful: bool,
                 exit_grace: float) -> None:
    """EXIT to every running worker, one shared deadline for them to leave (a suspended worker cannot read
    it: not waited for); then the supervisor's stop: TERM + CONT, another deadline, KILL."""
    if supervisor is None:
        return
    if graceful:
        running = set(supervisor.running())
        for key, channel in channels.items():
            if key in running:
                try:
                    channel.send(proto.encode(proto.EXIT))
                except OSError:
                    pass
        supervisor.join(exit_grace, skip_suspended=True)
    supervisor.stop()

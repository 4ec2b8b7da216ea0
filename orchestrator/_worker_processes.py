"""The worker processes of this package's masters: start them, say how one ended, stop them.

Both masters that run ``python -m orchestrator._worker_main`` children use these:
the batch-split master (``_parallel_predictor``) and the worker pool's process
backend (``_pool_processes``). Each worker talks to its master over a
socketpair (``_protocol``'s stream framing); a pool worker has a second one for
CANCEL. The supervisor (``launchers.Supervisor``) starts and watches them, with
its watchdog, which removes the master's named segments if the master is
SIGKILLed.
"""

from __future__ import annotations

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


def death_text(supervisor: Supervisor | None, key: int, doing: str, then: str = "", tail: bool = True) -> str:
    """``was killed by SIGKILL while <doing><then>`` (or ``exited with code 1 ...``), waiting up to a second
    for the supervisor's record; then (``tail``) its last lines of output, when it wrote any."""
    ended = supervisor.exit_of(key, timeout=1.0) if supervisor is not None else None
    if ended is None:
        return f"closed its connection while {doing}{then}"
    how = f"was killed by {ended.signal}" if ended.signal else f"exited with code {ended.exitcode}"
    text = f"{how} while {doing}{then}"
    if tail and ended.tail:
        text += "; its last lines of output:\n" + "\n".join(f"    | {line}" for line in ended.tail[-5:])
    return text


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

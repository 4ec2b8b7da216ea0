"""This process as a server: what it serves, its servers, and how it keeps running and stops.

MindSpore Serving's start functions return at once and the script's process
goes on serving after the script ends. Here the first start makes a keeper
thread (not a daemon, so the interpreter waits for it) and, when called from
the main thread, handlers for SIGINT and SIGTERM. A signal only writes a byte
to a pipe (safe in a handler: no lock is taken); the keeper reads it and stops
everything: servers stop taking requests (in-flight ones get ``STOP_GRACE``
seconds), a cluster worker leaves its master, models close (their worker
threads or processes end), then the keeper ends and so does the process.

    NEW --first start_*--> SERVING --SIGINT / SIGTERM / stop()--------------------------> STOPPED
                                   --the script ended by an uncaught exception----------> STOPPED (exit 1)
                                   --the script ended with no server started------------> STOPPED (one line on stderr)
                                   --the script returned with a server listening--------> (serves on)

The keeper watches the main thread: once the script has ended (the
interpreter waits for the keeper), serving goes on only if the script
returned and something listens. A traceback printed and then a process that
never ends, or servables loaded that no server offers, would otherwise leave a
process up for ever that serves nothing. "Serving stopped" is printed when
serving that had a server listening stops, not when a start failed.

A script whose main thread still runs its own code when the signal comes (a
``while True: sleep`` after the start calls) gets the signal's usual effect
once everything is stopped: KeyboardInterrupt for SIGINT, the default action
for SIGTERM; a main thread in ``master.wait()`` (as ``orchestrate serve``)
just returns.
"""

from __future__ import annotations

import _thread
import os
import select
import signal
import sys
import threading

from ranks._log import get_logger

from ._dispatch import Dispatcher, LocalBackend
from ._metrics import Metrics
from ._errors import ServingError

log = get_logger("serving")

STOP_GRACE = 2.0  # seconds in-flight requests get when the servers stop
KEEPER_POLL = 0.5  # seconds between the keeper's looks at the main thread (has the script ended?)
NOTHING_LISTENS = ("serving: the script ended and no server was started (master.start_grpc_server, "
                   "master.start_restful_server), so nothing serves; its servables are stopped")
DEFAULT_MAX_MB = 100  # request and reply size limit (gRPC messages, REST bodies), in MB


class ServingProcess:
    def __init__(self):
        self.dispatcher = Dispatcher()
        self.metrics = Metrics(self.dispatcher)  # what GET /metrics shows; servables record into it
        self.dispatcher.metrics = self.metrics
        self.local: list = []  # Servables loaded here
        self.grpc_servers: list = []  # (what, grpc.Server)
        self.rest_servers: list = []  # (uvicorn.Server, thread)
        self.cluster_master = None
        self.worker_agents: list = []
        # Run first when serving stops, while the servers still answer: a master's local worker processes go
        # then, so that they leave it cleanly instead of finding it gone and retrying.
        self.before_stop: list = []
        self._lock = threading.RLock()
        self._keeper: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stopped = threading.Event()
        self._previous_handlers: dict = {}
        self.main_waits = False  # the main thread is in master.wait(): a signal ends that wait, nothing more
        self._redeliver = False
        self._announce = True  # print "Serving stopped" (if a server listened); stop(announce=False): a failed start

    # -- keeping the process up ----------------------------------------------------------
    def serving(self) -> None:
        """Start the keeper (and the signal handlers) on the first start of anything."""
        with self._lock:
            if self._stopped.is_set():
                raise ServingError("this process's serving was stopped; start a new process to serve again")
            if self._keeper is not None:
                return
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            self._keeper = threading.Thread(target=self._keep, name="serving keeper", daemon=False)
            self._keeper.start()

    def _on_signal(self, signum, frame) -> None:
        if self._redeliver:
            # Everything is stopped; the main thread still runs the script's code: the signal's usual effect.
            self._redeliver = False
            self._restore_handlers()
            previous = signal.getsignal(signum)
            if callable(previous):
                previous(signum, frame)  # SIGINT: KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            return
        try:
            os.write(self._wake_w, bytes([signum]))
        except OSError:
            pass

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, TypeError):
                pass  # not the main thread: the handlers go with the process
        self._previous_handlers = {}

    def _keep(self) -> None:
        signum = 0
        while True:
            ready, _, _ = select.select([self._wake_r], [], [], KEEPER_POLL)
            if ready:
                data = os.read(self._wake_r, 16)
                signum = data[0] if data else 0
                if signum:
                    log.info("serving: %s received, stopping", signal.Signals(signum).name)
                break
            if self._stopped.is_set() or self._script_ended_without_serving():
                break
        self._shutdown()
        # After the script ended, the main thread is no longer alive (the interpreter waits for this thread).
        if signum and threading.main_thread().is_alive() and not self.main_waits and self._previous_handlers:
            self._redeliver = True
            _thread.interrupt_main(signum)  # runs _on_signal in the main thread, which may change handlers

    def _script_ended_without_serving(self) -> bool:
        """True once the main thread has ended by an uncaught exception, or with no server listening."""
        if threading.main_thread().is_alive():
            return False
        # The interpreter records an uncaught exception in sys.last_value (3.12: also last_exc) before it
        # prints the traceback, so it is there by the time the main thread counts as ended; a script's own
        # sys.excepthook does not change that. The exit status is then 1, the interpreter's own.
        if getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None:
            log.info("serving: the script ended by an uncaught exception, stopping")
            return True
        if not self.listening:
            print(NOTHING_LISTENS, file=sys.stderr, flush=True)
            return True
        return False

    @property
    def listening(self) -> bool:
        """Whether a server (gRPC, RESTful, master or cluster worker) of this process was started."""
        return bool(self.grpc_servers or self.rest_servers)

    def stop(self, announce: bool = True) -> None:
        """Stop every server and model of this process (idempotent); returns once they are stopped.

        ``announce=False``: a start that failed (``orchestrate serve`` reports the error alone).
        """
        with self._lock:
            if not announce:
                self._announce = False
            keeper = self._keeper
            if keeper is None:
                self._stopped.set()
                self._shutdown()
                return
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        if keeper is not threading.current_thread():
            keeper.join(60.0)
        if threading.current_thread() is threading.main_thread():
            self._restore_handlers()  # Ctrl-C acts as usual again

    def _shutdown(self) -> None:
        with self._lock:
            if getattr(self, "_shut", False):
                return
            self._shut = True
            self._stopped.set()
            for hook in self.before_stop:
                try:
                    hook()
                except Exception as exc:  # noqa: BLE001 - the servers still stop
                    log.warning("serving: stopping %s failed: %s", getattr(hook, "__qualname__", hook), exc)
            for agent in self.worker_agents:
                agent.leave()
            stops = [server.stop(STOP_GRACE) for _, server in self.grpc_servers]
            for server, _ in self.rest_servers:
                server.should_exit = True
            for event in stops:
                event.wait(STOP_GRACE + 1.0)
            for _, thread in self.rest_servers:
                thread.join(STOP_GRACE + 3.0)
            if self.cluster_master is not None:
                self.cluster_master.close()
            for servable in self.local:
                try:
                    servable.close()
                except Exception as exc:  # noqa: BLE001 - the others still close
                    log.warning("%s did not close cleanly: %s", servable.label, exc)
            if threading.current_thread() is threading.main_thread():
                self._restore_handlers()
            if self._announce and self.listening:
                print("Serving stopped", flush=True)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    # -- what is served --------------------------------------------------------------------
    def add_local(self, servable) -> None:
        with self._lock:
            for other in self.local:
                if other.name == servable.name and other.version == servable.version:
                    servable.close()
                    raise ServingError(f"{servable.label} is already served by this process")
            self.local.append(servable)
            methods = {m.name: (m.input_names, m.output_names) for m in servable.methods.values()}
            self.dispatcher.add(LocalBackend(servable), servable.name, servable.version, methods, servable.signature())


PROCESS = ServingProcess()


def max_bytes(max_msg_mb_size) -> int:
    if isinstance(max_msg_mb_size, bool) or not isinstance(max_msg_mb_size, int) or not 1 <= max_msg_mb_size <= 512:
        raise ServingError(f"max_msg_mb_size must be an integer in [1, 512] (MB), got {max_msg_mb_size!r}")
    return max_msg_mb_size * 2**20

"""Processes that publish, attach to, or load a model without sharing, driven over a pipe (tests/test_shared_weights.py),
and checks that nothing is left behind (also tests/seeds/test_seed001_weight_sharing.py).

Each ``Peer`` is a real process (spawn) running ``_serve``: it answers one
request at a time and sends back ("ok", value) or ("error", type name, message),
so a test can assert on the exact error another process saw.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import re
import time

import numpy as np

WAIT = 120.0  # seconds any one request may take before the test fails naming the peer and the request


class PeerError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class Peer:
    """A child process holding at most one Model; ``call(op, *args)`` runs ``op`` there."""

    def __init__(self, name: str, threads: int = 1):
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, threads), name=name, daemon=True)
        self.process.start()
        child.close()
        self.pid = int(self.call("current_pid"))

    def call(self, op: str, *args, timeout: float = WAIT):
        self._conn.send((op, args))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"peer {self.name} (pid {self.process.pid}) did not answer {op!r} within {timeout:.0f} s")
        reply = self._conn.recv()
        if reply[0] == "error":
            raise PeerError(reply[1], reply[2])
        return reply[1]

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the process to exit; TERM, then KILL if it does not (calling twice is harmless)."""
        if self.process.is_alive():
            try:
                self._conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


def _serve(conn, threads: int) -> None:
    import orchestrator as mslite

    context = mslite.Context()
    context.cpu.thread_num = threads
    state = {"model": None, "base_uss": None}

    def build(path, config_dict):
        model = mslite.Model()
        model.build_from_file(path, mslite.ModelType.ONNX, context, config_dict=config_dict)
        state["model"] = model

    def predict(inputs):
        return [t.get_data_to_numpy() for t in state["model"].predict(inputs)]

    def close():
        state["model"].close()
        state["model"] = None
        gc.collect()

    def warm_up(path):
        """Page in ONNX Runtime's code and pools with a small model, so USS deltas count the big model only."""
        model = mslite.Model()
        model.build_from_file(path, mslite.ModelType.ONNX, context)
        inputs = [np.zeros([max(d, 1) for d in t.shape], t.dtype.to_numpy()) for t in model.get_inputs()]
        model.predict(inputs)
        model.close()
        del model
        state["base_uss"] = uss()

    def extra_uss():
        return uss() - state["base_uss"]

    ops = {
        "current_pid": lambda: mslite.Model().get_model_info("current_pid"),
        "build": build,
        "handle": lambda: state["model"].get_model_info("shareable_weight_mem_handle"),
        "predict": predict,
        "close": close,
        "warm_up": warm_up,
        "extra_uss": extra_uss,
        "maps_shared_weights": lambda: maps_shared_weights(os.getpid()),
    }
    while True:
        try:
            op, args = conn.recv()
        except EOFError:
            return
        if op == "exit":
            return
        try:
            conn.send(("ok", ops[op](*args)))
        except Exception as exc:  # the test asserts on the type and text
            conn.send(("error", type(exc).__name__, str(exc)))


def uss() -> int:
    """This process's unique set size after a GC and a heap trim (so freed memory does not count)."""
    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_full_info().uss


def maps_shared_weights(pid: int) -> bool:
    """True while process ``pid`` maps or holds open any published weights (memfd "orch_weights")."""
    try:
        with open(f"/proc/{pid}/maps") as handle:
            if "/memfd:orch_weights" in handle.read():
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:orch_weights"):
                    return True
            except OSError:
                pass
    except (FileNotFoundError, ProcessLookupError, PermissionError):  # gone, or not a process we may inspect
        return False
    return False


def processes_holding_shared_weights() -> list[int]:
    """Every process on the machine that still maps or holds published weights."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and maps_shared_weights(int(p))]


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def new_shm_entries(before: set[str], pids) -> list[str]:
    """/dev/shm names that appeared since ``before`` and belong to one of ``pids`` (other suites may run alongside)."""
    tokens = {str(p) for p in pids}
    return sorted(
        name for name in shm_entries() - before
        if tokens & set(re.findall(r"\d+", name)) or name.startswith("orch_weights")
    )


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """The pids still alive after ``timeout`` (zombies count as gone)."""
    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if running(p)]
        if alive:
            time.sleep(0.05)
    return alive

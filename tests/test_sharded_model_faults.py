"""ShardedModel's faults beyond the fault matrix: a port taken, a version, the races of the root-cause rule.

A rank that raises, exits 0, is killed or segfaults mid-request, a stopped or stuck rank, a rank that never
joins, a killed caller and close() with a stopped rank are cells of tests/test_fault_matrix.py (ways
sharded-mpi and sharded-zmq), which checks the error, the time it took and that nothing is left.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from launch_helpers import descendants, wait_gone
from orchestrator import ShardedModel, shard_model
from orchestrator import WorkerError, WorkerTimeoutError
from orchestrator import _protocol as proto
from ranks import CommError, PeerLostError
from tests.conftest import ROOT, project_env

pytestmark = [pytest.mark.multiprocess]
BACKENDS = ["zmq", "mpi"]
# Fault injection inside a rank's request (tests/programs/fault_hooks/sitecustomize.py, as the fault matrix uses it)
FAULT_HOOKS = str(ROOT / "tests" / "programs" / "fault_hooks")


@pytest.fixture(scope="module")
def mlp_shards(sample, tmp_path_factory):
    return shard_model(sample("mlp"), 2, tmp_path_factory.mktemp("mlp_tp2"), progress=False).model_path


def _new_processes(before: set[int]) -> list[int]:
    """Processes below us that were not there ``before``: the job's ranks, mpirun and its wrappers, the watchdog
    (not what else the test session keeps, such as multiprocessing's resource tracker)."""
    return [pid for pid in descendants(os.getpid()) if pid not in before]


# How rank 1's failure must read, on the first line of the caller's exception (HOST and PID filled in).
MID_REQUEST = {
    "raise": (RuntimeError, "[rank 1 of 2 on host HOST (pid PID)] fault injected in pid PID (raise)"),
    "exit0": (WorkerError, "predict request 2: rank 1 of 2 on host HOST (pid PID) exited with exit code 0 before the "
                           "job finished, while rank 0 was still running"),
    "sigkill": (WorkerError, "predict request 2: rank 1 of 2 on host HOST (pid PID) failed: signal SIGKILL (9)"),
    "sigsegv": (WorkerError, "predict request 2: rank 1 of 2 on host HOST (pid PID) failed: signal SIGSEGV (11)"),
}


@pytest.mark.timeout(120)
def test_a_rank_that_left_early_is_named_after_its_victim_exited_too(mlp_shards, monkeypatch, tmp_path):
    """zmq: rank 1 leaves with os._exit(0) mid-request; rank 0 sends its PeerLostError and exits 1 BEFORE the
    master weighs that ERROR (a busy machine). The report still names rank 1's early exit (was: rank 1
    "ended ... how it ended was not reported", as rank 0's exit code 1 hid rank 1's exit 0)."""
    import orchestrator._sharded_model as sharded

    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("FAULT_MATRIX_DIR", str(faults))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (FAULT_HOOKS, os.environ.get("PYTHONPATH")) if p))
    weigh = sharded.ShardedModel._error_from

    def late(self, msg, exchange):
        assert self._job.launcher.exit_of(0, timeout=20) is not None, "rank 0 did not exit after its ERROR"
        return weigh(self, msg, exchange)

    monkeypatch.setattr(sharded.ShardedModel, "_error_from", late)
    with ShardedModel(mlp_shards, backend="zmq", timeout=30) as model:
        x = np.ones((2, 64), np.float32)
        model.predict([x])
        victim = model.pids[1]
        (faults / f"fault.{victim}").write_text("exit0")
        with pytest.raises(WorkerError) as info:
            model.predict([x])
    assert str(info.value).startswith(f"predict request 2: rank 1 of 2 on host {socket.gethostname()} (pid {victim}) "
                                      f"exited with exit code 0 before the job finished, while rank 0 was still running")
    assert "PeerLostError" in str(info.value)  # what followed: rank 0 lost its peer


CALLER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from orchestrator import ShardedModel
    model = ShardedModel(sys.argv[1], backend=sys.argv[2], timeout=60)   # no `with`, no close()
    model.predict([np.ones((2, 64), np.float32)])
    print(json.dumps({"ranks": list(model.pids.values()), "tmp": model._job.tmp, "scratch": model._job.scratch}), flush=True)
    time.sleep(600)
""")


@pytest.mark.timeout(120)
def test_a_port_taken_under_the_ranks_is_retried(mlp_shards, monkeypatch):
    """zmq ranks listen on ports the master probed free: one taken in between is retried on other ports."""
    import orchestrator._sharded_model as sharded
    from ranks import free_base_port

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    probes = []

    def probe(count, *args, **kwargs):
        probes.append(count)
        return held.getsockname()[1] if len(probes) == 1 else free_base_port(count, *args, **kwargs)

    monkeypatch.setattr(sharded, "free_base_port", probe)
    before = set(descendants(os.getpid()))
    try:
        with ShardedModel(mlp_shards, backend="zmq", timeout=60) as model:
            out = model.predict([np.ones((2, 64), np.float32)])["y"]
            processes = _new_processes(before)
        assert out.shape == (2, 64) and len(probes) == 2
        assert not wait_gone(processes, 10)
    finally:
        held.close()


@pytest.mark.timeout(120)
def test_ports_taken_every_time_is_a_clear_error(mlp_shards, monkeypatch):
    import orchestrator._sharded_model as sharded

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    monkeypatch.setattr(sharded, "free_base_port", lambda count, *a, **k: held.getsockname()[1])
    before = set(descendants(os.getpid()))
    try:
        with pytest.raises(CommError, match=r"starting the zmq ranks of .*: 3 times, another process took a port "
                                            r"between the master's probe and the rank's bind \(last: .*cannot listen on"):
            ShardedModel(mlp_shards, backend="zmq", timeout=60)
    finally:
        held.close()
    assert not wait_gone(set(descendants(os.getpid())) - before, 10)


@pytest.mark.timeout(60)
def test_a_worker_of_another_protocol_version_says_so(tmp_path):
    """The worker refuses a master of another version with an ERROR that names both versions, and leaves."""
    import json as json_module


    ours, theirs = socket.socketpair()
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator._worker_main", "--fd", str(theirs.fileno())],
                              pass_fds=(theirs.fileno(),), env=project_env(), stderr=subprocess.PIPE)
    theirs.close()
    channel = proto.StreamChannel(ours)
    try:
        channel.send([b"BUILD", json_module.dumps({"v": 99, "kind": "BUILD", "id": 0}).encode()])
        assert channel.poll(30)
        reply = proto.decode(channel.recv(), "the worker")
        assert reply.kind == proto.ERROR and reply.status == proto.FAILED
        error = proto.unpack_error(reply)
        assert isinstance(error, proto.ProtocolError)
        assert "the master speaks worker protocol version 99, this side speaks 2" in str(error)
        assert worker.wait(30) == 1
    finally:
        channel.close()
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        worker.stderr.close()


def test_the_root_cause_of_a_stall_is_the_rank_that_never_took_the_request():
    """In-process: rank 0 took request 7 and died of waiting in a collective (its communicator aborts the
    process); rank 1 never said it took the request and was seen stopped. Rank 1 is named, rank 0's death
    is the cause. A death with no silent rank stays a death."""
    from launchers import RankExit
    from orchestrator._sharded_model import _death, _Exchange
    from launchers import RankFailedError

    class Launcher:
        def suspended(self):
            return []  # already torn down by the time the report is written

    model = ShardedModel.__new__(ShardedModel)
    model.tp, model.timeout = 2, 3.0
    model._ranks = {0: {"pid": 100, "host": "h"}, 1: {"pid": 101, "host": "h"}}
    model._job = type("Job", (), {"launcher": Launcher()})()
    exchange = _Exchange("predict request 7", {0, 1}, {0})
    exchange.since -= 3.0
    exchange.suspended.add(1)
    died = RankExit(0, "h", 100, 1, None, time.time(), ("rank 0 of 2: exiting after a failed collective",))
    report = RankFailedError("rank 0 of 2 on host h (pid 100) failed: exit code 1", [died])
    error = model._root_cause(exchange, _death(exchange.doing, report), report)
    assert isinstance(error, WorkerTimeoutError)
    assert str(error) == ("predict request 7: rank 1 of 2 on host h (pid 101) did not answer within 3 s: it never "
                          "reported taking the request, and its process is stopped (SIGSTOP or Ctrl-Z); rank 0 of 2 on "
                          "host h (pid 100) took it, waited for the rank(s) above and failed: exit code 1")
    assert "exit code 1" in str(error.__cause__)
    # every pending rank took the request: the death is the answer
    exchange.started.add(1)
    death = _death(exchange.doing, report)
    assert model._root_cause(exchange, death, report) is death
    # a fresh request (younger than SILENT_AFTER): a rank that has not said so yet may still take it
    young = _Exchange("predict request 8", {0, 1}, {0})
    death = _death(young.doing, report)
    assert model._root_cause(young, death, report) is death


class _FakeLinks:
    """The master's links to its ranks, holding the messages that arrive after the first one (each as a rank sent it)."""

    def __init__(self, messages=()):
        self.queue = list(messages)

    def receive(self, timeout, deadline):
        if not self.queue:
            time.sleep(timeout)
            return None
        return proto.decode(self.queue.pop(0), "a rank"), None


class _QuietLauncher:
    """A launcher that has recorded no failure (yet)."""

    pids: dict[int, int] = {}

    def failure(self, every_exit_fails=False):
        return None

    def suspended(self):
        return []


def _model_with(pids: dict[int, int], messages=()) -> ShardedModel:
    model = ShardedModel.__new__(ShardedModel)
    model.tp, model.timeout = 2, 30.0
    model._ranks = {rank: {"pid": pid, "host": "h"} for rank, pid in pids.items()}
    model._job = type("Job", (), {"launcher": _QuietLauncher(), "links": _FakeLinks(messages)})()
    return model


def _error_message(exc: BaseException, rank: int, request: int = 7):
    """The ERROR rank ``rank`` sends for ``exc``, as the master decodes it."""

    return proto.decode(proto.error_frames(request, exc, f"rank {rank} of 2", rank=rank), "a rank")


def _a_dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_a_peer_seen_dead_is_named_even_before_its_exit_is_recorded():
    """In-process: rank 0's PeerLostError arrives first, rank 1's process is gone, but no launcher has recorded
    how it ended (mpirun's forwarding of its wrapper's record is slow under load). Rank 1 is named, not rank 0."""
    from orchestrator._sharded_model import DEAD_PEER_GRACE, _Exchange

    dead = _a_dead_pid()
    model = _model_with({0: os.getpid(), 1: dead})
    exchange = _Exchange("predict request 7", {0, 1}, {0, 1})
    lost = PeerLostError("allreduce #5 on rank 0 of 2: rank 1 exited")
    started = time.monotonic()
    error = model._error_from(_error_message(lost, 0), exchange)
    assert type(error) is WorkerError, repr(error)
    assert str(error).startswith(f"predict request 7: rank 1 of 2 on host h (pid {dead}) ended while its peers "
                                 f"waited for it (its process is gone; how it ended was not reported within ")
    assert isinstance(error.__cause__, PeerLostError)
    assert time.monotonic() - started < DEAD_PEER_GRACE + 1.0
    # both alive: the peer's word stands (nothing better is known)
    model = _model_with({0: os.getpid(), 1: os.getpid()})
    error = model._error_from(_error_message(lost, 0), _Exchange("predict request 7", {0, 1}, {0, 1}))
    assert type(error) is PeerLostError, repr(error)


def test_the_failed_rank_s_own_error_wins_over_its_peer_s_word_that_came_first():
    """In-process: rank 0's PeerLostError arrives just before rank 1's own ERROR (its RuntimeError): the caller
    gets rank 1's RuntimeError with its header, not the victim's PeerLostError nor a bare exit code."""
    from orchestrator._sharded_model import _Exchange


    own = proto.error_frames(7, RuntimeError("the model broke"), "rank 1 of 2", rank=1)
    model = _model_with({0: os.getpid(), 1: os.getpid()}, [own])
    lost = PeerLostError("allreduce #5 on rank 0 of 2: rank 1 exited")
    error = model._error_from(_error_message(lost, 0), _Exchange("predict request 7", {0, 1}, {0, 1}))
    assert type(error) is RuntimeError, repr(error)
    assert str(error).startswith(f"[rank 1 of 2 on host {socket.gethostname()} (pid {os.getpid()})] the model broke")


def test_a_stall_reported_first_by_the_waiting_rank_still_names_both():
    """In-process: rank 1 is stopped; rank 0's own collective timeout (CommTimeoutError) reaches the master just
    before the master's deadline of the same length. The caller gets the stall naming rank 1 (stopped, never took
    the request) and rank 0 (took it, waited, gave up), as when the master's deadline comes first; not rank 0's
    CommTimeoutError, and without the 1 s grace for a failure that a stopped rank cannot have."""
    from orchestrator._sharded_model import FAILURE_GRACE, _Exchange
    from ranks import CommTimeoutError

    class StoppedOne(_QuietLauncher):
        def suspended(self):
            return [1]

    model = _model_with({0: 100, 1: 101})
    model.timeout = 3.0
    model._job.launcher = StoppedOne()
    exchange = _Exchange("predict request 7", {0, 1}, {0})
    exchange.since -= 3.0
    timed_out = CommTimeoutError("allreduce #5 on rank 0 of 2 timed out after 3.0 s waiting for rank 1")
    started = time.monotonic()
    error = model._error_from(_error_message(timed_out, 0), exchange)
    assert time.monotonic() - started < FAILURE_GRACE
    assert type(error) is WorkerTimeoutError, repr(error)
    assert str(error) == ("predict request 7: rank 1 of 2 on host h (pid 101) did not answer within 3 s: it never "
                          "reported taking the request, and its process is stopped (SIGSTOP or Ctrl-Z); rank 0 of 2 "
                          "on host h (pid 100) took it, waited for the rank(s) above and gave up (CommTimeoutError)")
    assert isinstance(error.__cause__, CommTimeoutError)


def test_a_whole_model_or_a_missing_path_is_named_before_any_rank_starts(tmp_path):
    from orchestrator import ModelNotFoundError, run_sharded, write_sample_model

    whole = write_sample_model("add", tmp_path / "add.onnx")
    with pytest.raises(ModelNotFoundError, match=rf"{whole} is a whole model, not shards: there is no shard manifest "
                                                 rf"add.manifest.json beside it; slice it first \(orchestrate shard"):
        run_sharded(whole, [np.zeros((1, 4), np.float32)])
    with pytest.raises(ModelNotFoundError, match=r"nope/m.onnx does not exist; expected DIR/MODEL.onnx"):
        ShardedModel(tmp_path / "nope" / "m.onnx")

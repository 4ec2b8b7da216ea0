"""How the batch-split master fails: a worker that raises, dies, hangs; a build error; the master itself killed.

The policy under test: an exception inside a worker comes back with its type
and the worker's traceback and the predictor keeps serving; a worker that
dies or stalls ends the predictor (every later call says why), and nothing is
left behind: no process, no /dev/shm segment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from orchestrator import (
    ModelError,
    ParallelPredictor,
    ProviderError,
    RemoteTraceback,
    WorkerError,
    WorkerLostError,
    WorkerTimeoutError,
)
from tests._batch_split_helpers import (
    one_thread,
    our_segments,
    process_alive,
    reference,
    wait_until,
    worker_pids,
    write_reshape_model,
)
from tests.conftest import project_env

pytestmark = pytest.mark.multiprocess


def _gone(pids) -> bool:
    return not any(process_alive(pid) for pid in pids)


def test_worker_exception_keeps_type_traceback_and_device(tmp_path):
    path = write_reshape_model(tmp_path / "reshape.onnx")
    with ParallelPredictor(path, device_ids=[0, 1], context=one_thread()) as predictor:
        x = np.arange(3 * 6, dtype=np.float32).reshape(3, 6)  # rows 2 + 1: 6 values do not reshape to [-1, 4]
        with pytest.raises(ModelError) as info:
            predictor.predict([x])
        message = str(info.value)
        assert f"worker for device 1 on host {socket.gethostname()} (pid {predictor.pids[1]})" in message
        assert "device 0" not in message
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "Traceback" in str(info.value.__cause__) and "_worker_main.py" in str(info.value.__cause__)
        # the workers are healthy: the predictor goes on serving
        x = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
        np.testing.assert_array_equal(predictor.predict([x])[0].get_data_to_numpy(), reference(path, [x])[0])
        names = predictor.segment_names
    assert not set(names) & set(our_segments())


def test_build_error_stops_the_other_workers_and_reports_the_first(sample):
    context = one_thread()
    context.target = ["gpu"]
    pids_before = worker_pids()
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        ParallelPredictor(sample("mlp"), device_ids=[3, 4], context=context)
    assert time.monotonic() - started < 60
    assert "worker for device 3" in str(info.value) or "worker for device 4" in str(info.value)
    assert "CUDAExecutionProvider" in str(info.value)
    assert "Traceback" in str(info.value.__cause__)
    assert wait_until(lambda: worker_pids() <= pids_before, 10)


@pytest.mark.timeout(120)
def test_sigkill_mid_request_is_an_error_within_one_second(sample):
    predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread())
    pids = predictor.pids
    x = np.ones((4, 64), np.float32)
    predictor.predict([x])
    names = predictor.segment_names
    # Stop worker 1 so the request is surely in flight when it dies.
    os.kill(pids[1], signal.SIGSTOP)
    outcome = {}

    def call():
        try:
            predictor.predict([x], timeout=60)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"], outcome["at"] = exc, time.monotonic()

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    caller.join(30)
    assert not caller.is_alive()
    error = outcome["error"]
    assert isinstance(error, WorkerLostError), repr(error)
    assert outcome["at"] - killed_at < 1.0, f"error came {outcome['at'] - killed_at:.2f} s after the kill"
    assert "worker for device 1" in str(error) and "SIGKILL" in str(error) and "rows 2:4" in str(error)
    # Stopped before the request was sent, it never read it: the error says so, not that the request killed it.
    assert "while it was idle: predict request 2 (rows 2:4) was unread in its socket" in str(error), str(error)
    # the policy: the predictor refuses further calls, saying why, and left nothing behind
    with pytest.raises(WorkerError, match="no longer accepts requests: .*device 1.*SIGKILL"):
        predictor.predict([x])
    assert wait_until(lambda: _gone(pids), 10)
    assert not set(names) & set(our_segments())
    predictor.close()  # harmless after a failure


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rows", [4, 1])
def test_a_worker_killed_while_idle_is_named_idle_at_the_next_call(sample, rows):
    """Killed between requests: the next call says it died idle (not that the request killed it), and that
    the predictor is closed because every batch needs every worker, even one it would give no rows."""
    predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread())
    pids = predictor.pids
    x = np.ones((4, 64), np.float32)
    predictor.predict([x])
    names = predictor.segment_names
    os.kill(pids[1], signal.SIGKILL)
    # Reaped, not just a zombie: a killed leader is a zombie while its other threads still hold the socket.
    assert wait_until(lambda: not os.path.exists(f"/proc/{pids[1]}"), 10)
    try:
        with pytest.raises(WorkerLostError) as info:
            predictor.predict([x[:rows]])
    finally:
        predictor.close()
    message = str(info.value)
    share = " (rows 2:4)" if rows == 4 else ""
    assert message.startswith(
        f"worker for device 1 on host {socket.gethostname()} (pid {pids[1]}) was killed by SIGKILL while it was "
        f"idle, before predict request 2{share} was sent to it. Every batch is split over all 2 workers (devices "
        f"[0, 1]), so request 2 cannot run, and this ParallelPredictor is closed (its other workers are stopped): "
        f"create a new ParallelPredictor to go on"), message
    assert "on its way" not in message and "device 0" not in message
    with pytest.raises(WorkerError) as later:
        predictor.predict([x])
    assert str(later.value) == (
        f"this ParallelPredictor no longer accepts requests: worker for device 1 on host {socket.gethostname()} "
        f"(pid {pids[1]}) was killed by SIGKILL while it was idle, before predict request 2{share} was sent to it; "
        f"create a new ParallelPredictor")
    assert wait_until(lambda: _gone(pids), 10)
    assert not set(names) & set(our_segments())


@pytest.mark.timeout(120)
def test_hanging_worker_is_an_error_at_the_timeout(sample):
    predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread())
    pids = predictor.pids
    x = np.ones((4, 64), np.float32)
    predictor.predict([x])
    names = predictor.segment_names
    os.kill(pids[0], signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(WorkerTimeoutError) as info:
        predictor.predict([x], timeout=1.5)
    waited = time.monotonic() - started
    assert 1.5 <= waited < 6, waited
    assert "worker for device 0" in str(info.value) and "did not answer within 1.5 s" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    with pytest.raises(WorkerError, match="no longer accepts requests"):
        predictor.predict([x])
    assert wait_until(lambda: _gone(pids), 10)
    assert not set(names) & set(our_segments())


@pytest.mark.timeout(60)
def test_close_with_a_stopped_worker_is_quick(sample):
    """A SIGSTOPped worker cannot read EXIT and keeps SIGTERM pending: close() continues it (TERM + CONT)."""
    predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread())
    pids = predictor.pids
    predictor.predict([np.ones((4, 64), np.float32)])
    names = predictor.segment_names
    os.kill(pids[1], signal.SIGSTOP)
    started = time.monotonic()
    predictor.close()
    took = time.monotonic() - started
    assert took < 2.0, f"close() took {took:.2f} s"  # was 6 s: 5 s for EXIT, then TERM without CONT
    assert wait_until(lambda: _gone(pids), 5)
    assert not set(names) & set(our_segments())


MASTER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from orchestrator import Context, ParallelPredictor
    from orchestrator._worker_memory import Slot

    if __name__ == "__main__":
        context = Context()
        context.cpu.thread_num = 1
        predictor = ParallelPredictor(sys.argv[1], device_ids=[0, 1], context=context)
        x = np.ones((4, 64), np.float32)
        keep = predictor.predict([x])
        predictor.predict([x])  # the second request uses an output block as well
        unmapped = Slot(9)  # a segment of the master's that no worker has mapped
        unmapped.ensure(1 << 16, 0)
        print(json.dumps({"pids": predictor.pids, "segments": predictor.segment_names + [unmapped.name]}), flush=True)
        time.sleep(600)
""")


def _env(mode: str) -> dict[str, str]:
    return {**project_env(), "ORCH_SHM_MODE": mode}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["memfd", "named"])
def test_killed_master_leaves_no_worker_and_no_segment(sample, tmp_path, mode):
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    master = subprocess.Popen([sys.executable, str(script), str(sample("mlp"))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(mode))
    try:
        line = master.stdout.readline()
        assert line, master.stderr.read()
        info = json.loads(line)
        assert len(info["segments"]) >= 3
        assert set(info["segments"]) <= set(our_segments(master.pid))
        os.kill(master.pid, signal.SIGKILL)
        master.wait(10)
        assert wait_until(lambda: _gone(info["pids"]), 10), "workers outlived their master"
        # named: each worker removed what it had mapped and swept the rest of its dead master's (the unmapped slot)
        assert wait_until(lambda: our_segments(master.pid) == [], 10), our_segments(master.pid)
        assert not set(info["segments"]) & set(os.listdir("/dev/shm"))
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
        master.stdout.close()
        master.stderr.close()


FORGETFUL = textwrap.dedent("""
    import json, sys
    import numpy as np
    from orchestrator import Context, ParallelPredictor

    if __name__ == "__main__":
        context = Context()
        context.cpu.thread_num = 1
        predictor = ParallelPredictor(sys.argv[1], device_ids=[0, 1], context=context)
        predictor.predict([np.ones((4, 64), np.float32)])
        predictor.predict([np.ones((4, 64), np.float32)])
        print(json.dumps({"pids": predictor.pids, "segments": predictor.segment_names}), flush=True)
        if sys.argv[2] == "raise":
            raise SystemExit("leaving without close()")
""")


@pytest.mark.parametrize("mode", ["memfd", "named"])
@pytest.mark.parametrize("how", ["return", "raise"])
def test_exit_without_close_cleans_up(sample, tmp_path, how, mode):
    script = tmp_path / "forgetful.py"
    script.write_text(FORGETFUL)
    result = subprocess.run([sys.executable, str(script), str(sample("mlp")), how], capture_output=True, text=True,
                            timeout=90, env=_env(mode))
    info = json.loads(result.stdout.splitlines()[0])
    assert wait_until(lambda: _gone(info["pids"]), 10)
    assert not set(info["segments"]) & set(os.listdir("/dev/shm"))
    assert "leaked" not in result.stderr  # no resource tracker is involved at all


UNMAPPED = textwrap.dedent("""
    import json, os, signal
    from orchestrator._worker_memory import BlockPool, Slot

    if __name__ == "__main__":
        slot = Slot(0)
        slot.ensure(1 << 20, 1 << 20)
        block = BlockPool().take(1 << 20)
        print(json.dumps([slot.name, block.name]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no worker ever mapped them
""")

NEXT_START = "from ranks import _shared_memory; _shared_memory.create('pp', 4096).close()"


@pytest.mark.parametrize("mode", ["memfd", "named"])
def test_segments_nobody_mapped_are_gone_after_a_sigkill(tmp_path, mode):
    """memfd: the kernel freed them with the process. named: the next process on this host that makes a segment sweeps them."""
    script = tmp_path / "unmapped.py"
    script.write_text(UNMAPPED)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=_env(mode))
    assert result.returncode == -signal.SIGKILL
    names = json.loads(result.stdout.splitlines()[0])
    assert all(name.startswith("orch_pp_") for name in names)
    if mode == "named":
        assert set(names) <= set(os.listdir("/dev/shm"))  # SIGKILL cannot be caught: the names outlive the owner
        subprocess.run([sys.executable, "-c", NEXT_START], check=True, timeout=60, env=_env("named"))
    assert not set(names) & set(os.listdir("/dev/shm")), names

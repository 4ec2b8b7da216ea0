"""Seed 004's cluster deployment: ``master.py`` in one process, ``worker.py`` in others, the seed's client.

The seed's scripts run as written (imports changed, ports made free ones); a second worker is the
same script with another worker_port. A method added to the copied servable_config (``whoami``)
returns the serving worker's pid, so the tests see where each request ran. Then the failures: a
worker killed under load, one that stops answering heartbeats (SIGSTOP), one that leaves (SIGTERM),
and a worker that comes back.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from _serving_helpers import Servers, children_of, example_copy, free_port
from conftest import project_env

pytestmark = [pytest.mark.multiprocess]

WHOAMI = '''

import os


@register.register_method(output_names=["y", "pid"])
def whoami(x1, x2):
    y = register.call_servable(x1, x2)
    return y, np.array([os.getpid()])
'''
ONES = np.ones((2, 2), np.float32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    grpc_port, master_port, worker_ports = free_port(), free_port(), [free_port(), free_port()]
    folder = example_copy(tmp, {5500: grpc_port, 6500: master_port, 6600: worker_ports[0]})
    (folder / "worker2.py").write_text((folder / "worker.py").read_text().replace(str(worker_ports[0]), str(worker_ports[1])))
    config = folder / "add" / "servable_config.py"
    config.write_text(config.read_text() + WHOAMI)
    servers = Servers(tmp / "logs")
    try:
        servers.start("master", [sys.executable, "master.py"], folder, ready="Serving master server start success")
        for name in ("worker", "worker2"):
            servers.start(name, [sys.executable, f"{name}.py"], folder, ready="")
        for name in ("worker", "worker2"):
            servers.wait_for(name, "Serving worker start success")
        yield servers, folder, grpc_port
    finally:
        servers.stop_all()


def whoami(port, timeout=10.0):
    from orchestrator.serving.client import Client

    return Client("localhost", port, "add", "whoami", timeout=timeout).infer({"x1": ONES, "x2": ONES})


def served_by(port, requests=30) -> list:
    pids = []
    for _ in range(requests):
        reply = whoami(port)
        assert isinstance(reply, list), reply
        np.testing.assert_array_equal(reply[0]["y"], ONES * 2)
        pids.append(int(reply[0]["pid"]))
    return pids


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_the_seeds_client_gets_the_seeds_results_through_master_and_workers(cluster):
    _, folder, _ = cluster
    result = subprocess.run([sys.executable, "client.py"], cwd=folder, env=project_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    values = [float(v) for v in re.findall(r"(\d+)\.", result.stdout)]
    assert values == [2.0] * 4 + [4.0] * 4 + [6.0] * 4 + [2.0] * 4, result.stdout
    assert "error" not in result.stdout


def test_requests_are_spread_over_the_workers(cluster):
    servers, _, port = cluster
    pids = served_by(port)
    assert set(pids) == {servers.pid("worker"), servers.pid("worker2")}
    assert min(pids.count(p) for p in set(pids)) >= 10  # round-robin among idle workers


def test_a_worker_that_stops_answering_heartbeats_is_out_of_rotation_and_rejoins(cluster):
    servers, _, port = cluster
    frozen = servers.pid("worker2")
    import os

    os.kill(frozen, signal.SIGSTOP)
    try:
        # Requests sent now go to both workers; those on the frozen one fail when it is dropped (0.8 s
        # without a heartbeat) and are retried once on the other: none waits for its own timeout.
        replies = [None] * 4
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, whoami(port, timeout=20))) for i in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(25)
        assert time.monotonic() - started < 5.0
        assert all(isinstance(r, list) and int(r[0]["pid"]) == servers.pid("worker") for r in replies), replies
        assert set(served_by(port, 10)) == {servers.pid("worker")}
        # The master says so at its default log level: a worker it stopped hearing from is news.
        assert re.search(rf"worker \d+ at \S+ \(host \S+, pid {frozen}\) is out of rotation: no heartbeat for "
                         rf"\d+\.\d s", servers.log("master")), servers.log("master")
    finally:
        os.kill(frozen, signal.SIGCONT)
    # Its next heartbeat hears it was dropped: it registers again.
    wait_until(lambda: frozen in served_by(port, 6), 5.0, "the continued worker back in rotation")


def test_a_worker_killed_under_load_no_request_hangs_and_the_master_serves_on(cluster):
    servers, folder, port = cluster
    killed, survivor = servers.pid("worker"), servers.pid("worker2")
    stop = threading.Event()
    results, durations = [], []
    lock = threading.Lock()

    def load():
        while not stop.is_set():
            t0 = time.monotonic()
            reply = whoami(port, timeout=10.0)
            with lock:
                durations.append(time.monotonic() - t0)
                results.append((t0, reply))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.7)
    killed_at = time.monotonic()
    servers.signal("worker", signal.SIGKILL)
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(15)
    assert not any(thread.is_alive() for thread in threads), "a request hangs"
    assert max(durations) < 5.0
    errors = [reply for _, reply in results if not isinstance(reply, list)]
    # A request the dead worker held is retried once on the other worker, so none should fail; one that
    # does names the worker, its host and pid.
    for error in errors:
        assert re.search(rf"worker \d+ at 127\.0\.0\.1:\d+ \(host \S+, pid {killed}\)", error["error"]), error
    assert len(errors) <= 1, errors
    ok = [(t0, int(reply[0]["pid"])) for t0, reply in results if isinstance(reply, list)]
    assert {pid for t0, pid in ok if t0 < killed_at} == {killed, survivor}
    assert {pid for t0, pid in ok if t0 > killed_at + 1.0} == {survivor}
    assert len([1 for t0, _ in ok if t0 > killed_at + 0.2]) > 10

    # The same worker started again joins again.
    servers.start("worker", [sys.executable, "worker.py"], folder, ready="Serving worker start success")
    assert set(served_by(port, 10)) == {servers.pid("worker"), survivor}


def test_sigterm_stops_workers_and_master_cleanly_a_leaving_worker_is_out_at_once(cluster):
    servers, _, port = cluster
    leaving, staying = servers.pid("worker2"), servers.pid("worker")
    exit_ = servers.signal("worker2", signal.SIGTERM)
    assert exit_.exitcode == 0 and "Serving stopped" in servers.log("worker2")
    assert set(served_by(port, 6)) == {staying}  # no request went to the worker that left
    master = servers.pid("master")
    for name in ("worker", "master"):
        exit_ = servers.signal(name, signal.SIGTERM)
        assert exit_.exitcode == 0 and exit_.signal is None, servers.log(name)
        assert "Traceback" not in servers.log(name)
    assert children_of(master) == [] and leaving not in children_of(master)

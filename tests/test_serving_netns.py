"""Seed 004's cluster across two hosts: the master on one network namespace, the worker on another.

The hosts are network namespaces joined by a veth pair, each with a private address and its own
hostname (``netns_helpers``), created by the test and deleted after it. ``master.py`` runs on host a
(its master server on a's address, its gRPC server on a's loopback), ``worker.py`` on host b
(master_ip: a's address, worker_ip: b's); the seed's ``client.py`` runs on host a. Both servers are
started by the project's supervisor. Needs root and ``ip``; skipped with the reason otherwise.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from _serving_helpers import Servers, example_copy, free_port
from conftest import project_env
from netns_helpers import namespaces, skip_reason, veth_hosts, wait_until_empty

pytestmark = [pytest.mark.multiprocess]

WHERE = '''

import socket


@register.register_method(output_names=["y", "host"])
def where(x1, x2):
    return register.call_servable(x1, x2), socket.gethostname()
'''

WHERE_CLIENT = '''
import numpy as np
from orchestrator.serving.client import Client

result = Client("localhost", PORT, "add", "where").infer({"x1": np.ones((2, 2), np.float32), "x2": np.ones((2, 2), np.float32)})
print("served on", result[0]["host"], "y =", result[0]["y"].tolist())
'''


@pytest.mark.timeout(120)
def test_a_worker_on_another_host_serves_the_seeds_client(tmp_path):
    reason = skip_reason(hostnames=True)
    if reason:
        pytest.skip(reason)
    grpc_port, master_port, worker_port = free_port(), free_port(), free_port()
    folder = example_copy(tmp_path, {5500: grpc_port, 6500: master_port, 6600: worker_port})
    config = folder / "add" / "servable_config.py"
    config.write_text(config.read_text() + WHERE)
    (folder / "where_client.py").write_text(WHERE_CLIENT.replace("PORT", str(grpc_port)))
    with veth_hosts() as hosts:
        a, b = hosts
        master = folder / "master.py"
        master.write_text(master.read_text().replace(f'start_master_server("127.0.0.1"', f'start_master_server("{a.address}"'))
        worker = folder / "worker.py"
        worker.write_text(worker.read_text().replace('master_ip="127.0.0.1"', f'master_ip="{a.address}"')
                          .replace('worker_ip="127.0.0.1"', f'worker_ip="{b.address}"'))
        servers = Servers(tmp_path / "logs")
        try:
            servers.start("master", a.command([sys.executable, "master.py"]), folder,
                          ready="Serving master server start success")
            servers.start("worker", b.command([sys.executable, "worker.py"]), folder, ready="Serving worker start success")
            assert f"registered with the master at {a.address}:{master_port} (host {b.hostname})" in servers.log("worker")

            def on_a(script):
                result = subprocess.run(a.command([sys.executable, script]), cwd=folder, env=project_env(),
                                        capture_output=True, text=True, timeout=60)
                assert result.returncode == 0, result.stdout + result.stderr
                return result.stdout

            seed = on_a("client.py")
            assert [float(v) for v in re.findall(r"(\d+)\.", seed)] == [2.0] * 4 + [4.0] * 4 + [6.0] * 4 + [2.0] * 4, seed
            assert f"served on {b.hostname} y = [[2.0, 2.0], [2.0, 2.0]]" in on_a("where_client.py")

            for name in ("worker", "master"):
                exit_ = servers.signal(name, signal.SIGTERM)
                assert exit_.exitcode == 0 and exit_.signal is None, servers.log(name)
        finally:
            servers.stop_all()
        assert not wait_until_empty(hosts)
    assert not {host.namespace for host in hosts} & namespaces()

"""``orchestrate serve`` as typed in a shell: the lightweight form, the cluster forms, and usage errors."""

from __future__ import annotations

import json
import signal
import sys
import urllib.request

import numpy as np
import pytest

from _serving_helpers import Servers, children_of, example_copy, free_port
from conftest import orchestrate_command

pytestmark = [pytest.mark.cli]

WHOAMI = '''

import os


@register.register_method(output_names=["y", "pid"])
def whoami(x1, x2):
    return register.call_servable(x1, x2), np.array([os.getpid()])
'''
ONES = np.ones((2, 2), np.float32)


@pytest.fixture(scope="module")
def servables(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    folder = example_copy(tmp)
    config = folder / "add" / "servable_config.py"
    config.write_text(config.read_text() + WHOAMI)
    return folder


def infer(port, method="add_common"):
    from orchestrator.serving.client import Client

    return Client("127.0.0.1", port, "add", method, timeout=20).infer({"x1": ONES, "x2": ONES})


@pytest.mark.multiprocess
def test_serve_a_directory_in_one_process_over_grpc_and_rest(servables, tmp_path):
    grpc_port, rest_port = free_port(), free_port()
    servers = Servers(tmp_path)
    try:
        servers.start("serve", orchestrate_command("serve", str(servables), "--grpc-port", str(grpc_port),
                                                   "--rest-port", str(rest_port), "--workers", "2"), tmp_path,
                      ready="Serving RESTful server start success")
        np.testing.assert_array_equal(infer(grpc_port)[0]["y"], ONES * 2)
        body = json.dumps({"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1, 1], [1, 1]]}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{rest_port}/model/add:add_cast", data=body),
                                    timeout=20) as response:
            assert json.loads(response.read()) == {"instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]}
        pid = servers.pid("serve")
        exit_ = servers.signal("serve", signal.SIGINT)  # Ctrl-C
        assert exit_.exitcode == 0 and exit_.signal is None, servers.log("serve")
        assert children_of(pid) == []
    finally:
        servers.stop_all()


@pytest.mark.multiprocess
def test_serve_a_master_with_local_workers_and_a_worker_that_joins_from_another_shell(servables, tmp_path):
    grpc_port, master_port = free_port(), free_port()
    servers = Servers(tmp_path)
    try:
        servers.start("master", orchestrate_command("serve", "--master", str(servables), "--local-workers", "2",
                                                    "--workers", "1", "--grpc-port", str(grpc_port),
                                                    "--master-port", str(master_port)), tmp_path,
                      ready="Serving master server start success")
        master = servers.pid("master")
        local = set()

        def local_workers_serving():  # until both joined, a reply may be {"error": "... not served here ..."}
            replies = [infer(grpc_port, "whoami") for _ in range(8)]
            local.update(int(r[0]["pid"]) for r in replies if isinstance(r, list))
            return len(local) == 2

        import time

        deadline = time.monotonic() + 30
        while not local_workers_serving():
            assert time.monotonic() < deadline, f"the local workers did not both serve: {local}\n{servers.log('master')}"
            time.sleep(0.2)
        assert local <= set(children_of(master))  # started (and watched) by the master's supervisor
        servers.start("worker", orchestrate_command("serve", "--worker", str(servables), "--master-address",
                                                    f"127.0.0.1:{master_port}", "--worker-port", "0"), tmp_path,
                      ready="Serving worker start success")
        pids = {int(infer(grpc_port, "whoami")[0]["pid"]) for _ in range(12)}
        assert pids == local | {servers.pid("worker")}
        exit_ = servers.signal("master", signal.SIGTERM)
        assert exit_.exitcode == 0, servers.log("master")
        assert children_of(master) == [] and not any(_alive(p) for p in local)
        assert servers.signal("worker", signal.SIGTERM).exitcode == 0
    finally:
        servers.stop_all()


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("argv, message", [
    (["serve"], "give SERVABLES (the servable directory), or --master / --worker for a cluster"),
    (["serve", "DIR", "--worker"], "--worker needs --master-address HOST:PORT"),
    (["serve", "--master", "DIR"], "--master serves through its workers"),
    (["serve", "/nonexistent/servables"], "SERVABLES /nonexistent/servables is not a directory"),
    (["serve", "DIR", "--servable", "mul"], "--servable mul: not in"),
    (["serve", "DIR", "--device-ids", "0,x"], "--device-ids must be comma-separated integers"),
])
def test_usage_errors_name_what_is_wrong(servables, capsys, argv, message):
    from orchestrator._cli import main

    code = main([str(servables) if a == "DIR" else a for a in argv])
    assert code == 2
    assert message in capsys.readouterr().err


LOOPING_SCRIPT = '''
import os, sys, time
from orchestrator.serving import master, worker

worker.start_servable_in_master(sys.argv[1], "add", device_id=0)
master.start_grpc_server("127.0.0.1", int(sys.argv[2]))
print("looping", flush=True)
while True:          # a script that keeps its main thread busy after starting
    time.sleep(0.1)
'''


@pytest.mark.multiprocess
@pytest.mark.parametrize("signum, ends_with", [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, None)])
def test_a_script_still_running_its_own_loop_stops_serving_then_gets_the_signals_usual_effect(servables, tmp_path,
                                                                                               signum, ends_with):
    script = tmp_path / "looping.py"
    script.write_text(LOOPING_SCRIPT)
    servers = Servers(tmp_path)
    try:
        servers.start("loop", [sys.executable, str(script), str(servables), str(free_port())], tmp_path, ready="looping")
        exit_ = servers.signal("loop", signum, timeout=20)
        log = servers.log("loop")
        assert "Serving stopped" in log
        assert exit_.failed  # the script did not finish on its own: KeyboardInterrupt, or killed by SIGTERM
        if ends_with:
            assert log.rstrip().endswith(ends_with), log
        else:
            assert exit_.signal == "SIGTERM", exit_
    finally:
        servers.stop_all()

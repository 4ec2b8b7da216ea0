"""``orchestrate serve`` as typed in a shell: the lightweight form, the cluster forms, and usage errors."""

from __future__ import annotations

import json
import re
import signal
import sys
import urllib.request

import numpy as np
import pytest

from _serving_helpers import Servers, children_of, example_copy, free_port, write_servable
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
        # Its local workers stopped while it still answered: they left it, none found it gone and retried.
        assert "no answer from the master" not in servers.log("master"), servers.log("master")
        assert servers.signal("worker", signal.SIGTERM).exitcode == 0
    finally:
        servers.stop_all()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone, maybe between being found and being asked
        return False


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


@pytest.mark.parametrize("argv, message", [
    (["serve", "DIR", "--grpc-port", "99999"], "argument --grpc-port: must be a port number in 1-65535 (0: a free one), got 99999"),
    (["serve", "DIR", "--rest-port", "-1"], "argument --rest-port/--http-port: must be a port number in 1-65535"),
    (["serve", "--master", "--master-port", "65536"], "argument --master-port: must be a port number in 1-65535"),
    (["serve", "DIR", "--worker", "--master-address", "127.0.0.1:6100", "--worker-port", "x"],
     "argument --worker-port: must be a port number, got 'x'"),
])
def test_a_port_out_of_range_is_a_usage_error_before_anything_loads(servables, capsys, argv, message):
    from orchestrator._cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse's own exit: nothing was loaded or started
        main([str(servables) if a == "DIR" else a for a in argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_master_address_port_out_of_range_is_a_usage_error(servables, capsys):
    from orchestrator._cli import main

    assert main(["serve", str(servables), "--worker", "--master-address", "127.0.0.1:99999"]) == 2
    assert "--master-address must be HOST:PORT with PORT in 1-65535, got '127.0.0.1:99999'" in capsys.readouterr().err


@pytest.mark.multiprocess
@pytest.mark.parametrize("flags", [["--grpc-port", "BUSY"], ["--grpc-port", "0", "--rest-port", "BUSY"],
                                   ["--master", "--grpc-port", "0", "--master-port", "BUSY"]])
def test_a_port_in_use_is_one_error_line_naming_it_and_nothing_else(servables, flags):
    import socket

    from conftest import run_command

    with socket.socket() as busy:  # a port some other program listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve"] + ([] if "--master" in flags else [str(servables)]) + [str(port) if f == "BUSY" else f for f in flags]
        result = run_command(orchestrate_command(*argv), timeout=60)
    what = {"--grpc-port": "serving gRPC server", "--rest-port": "RESTful server", "--master-port": "serving master server"}
    flag = flags[flags.index("BUSY") - 1]
    assert result.returncode == 1, result
    assert result.stderr == (f"orchestrate serve: error: ServingError: {what[flag]}: cannot listen on 127.0.0.1:{port}: "
                             "the port is already in use (another server or program listens on it)\n")
    assert result.stdout == ""  # no "Serving stopped": nothing started (and no server printed "start success")


FAILING_SCRIPT = '''
import os, sys
import psutil
from orchestrator.serving import master, worker

worker.start_servable_in_master(sys.argv[1], "mlp", device_ids=[0, 1], workers_num=1)   # worker processes
print("pids", os.getpid(), *[p.pid for p in psutil.Process().children(recursive=True)], flush=True)
busy = int(sys.argv[2])
'''
MLP_CONFIG = '''
from orchestrator.serving import register

register.declare_servable(servable_file="mlp.onnx", model_format="ONNX", with_batch_dim=True)


@register.register_method(output_names=["y"])
def predict(x):
    return register.call_servable(x)
'''


@pytest.fixture(scope="module")
def split_servables(sample, tmp_path_factory):
    """A with_batch_dim servable that, on device_ids [0, 1], runs in worker processes with shared memory."""
    return write_servable(tmp_path_factory.mktemp("split"), "mlp", MLP_CONFIG, sample("mlp"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("case, tail, code", [
    ("a bad port", 'master.start_grpc_server("127.0.0.1", 99999)', 1),
    ("a port in use", 'master.start_grpc_server("127.0.0.1", 0)\nmaster.start_restful_server("127.0.0.1", busy)', 1),
    ("no server started", "", 0),
])
def test_a_script_that_fails_or_starts_no_server_stops_its_servables_and_exits(split_servables, tmp_path, case, tail,
                                                                               code):
    import socket

    from _shared_weights_helpers import new_shm_entries, shm_entries, wait_gone
    from conftest import run_command
    from orchestrator.serving._process import NOTHING_LISTENS

    script = tmp_path / "script.py"
    script.write_text(FAILING_SCRIPT + tail + "\n")
    before = shm_entries()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_command([sys.executable, str(script), str(split_servables), str(port)], timeout=30)  # no hang
    assert result.returncode == code, result
    pids = [int(p) for p in result.stdout.split("pids", 1)[1].split("\n", 1)[0].split()]
    assert len(pids) >= 3, result.stdout  # the script and its two batch-split workers: something to leave behind
    assert wait_gone(pids[1:]) == [] and new_shm_entries(before, pids) == []
    if case == "a bad port":
        assert result.stderr.rstrip().endswith("ServingError: serving gRPC server: port must be an integer in 1-65535 "
                                               "(0: a free one), got 99999"), result.stderr
    elif case == "a port in use":
        assert (f"ServingError: RESTful server: cannot listen on 127.0.0.1:{port}: the port is already in use"
                in result.stderr), result.stderr
        assert result.stdout.rstrip().endswith("Serving stopped")  # the gRPC server had started
    else:
        assert result.stderr == NOTHING_LISTENS + "\n"
        assert "Serving stopped" not in result.stdout


def start_master_with_a_local_worker(servers, folder, tmp_path) -> tuple[int, int]:
    """``orchestrate serve --master FOLDER --local-workers 1`` as "master", on free ports: (gRPC port, master port)."""
    grpc_port, master_port = free_port(), free_port()
    servers.start("master", orchestrate_command("serve", "--master", str(folder), "--local-workers", "1",
                                                "--grpc-port", str(grpc_port), "--master-port", str(master_port)),
                  tmp_path, ready="Serving master server start success")
    return grpc_port, master_port


SLOW = '''

import time


@register.register_method(output_names=["y"])
def slow(x1, x2):
    y = register.call_servable(x1, x2)
    return register.call_postprocess(lambda v: (time.sleep(2.0), v)[1], y)
'''


@pytest.mark.multiprocess
def test_requests_on_the_last_local_worker_when_it_dies_name_it_and_its_end_is_said(tmp_path):
    import threading
    import time

    from orchestrator.serving.client import Client

    folder = example_copy(tmp_path)
    config = folder / "add" / "servable_config.py"
    config.write_text(config.read_text() + SLOW)
    servers = Servers(tmp_path / "logs")
    try:
        grpc_port, _ = start_master_with_a_local_worker(servers, folder, tmp_path)
        master = servers.pid("master")
        deadline = time.monotonic() + 30
        while not isinstance(Client("127.0.0.1", grpc_port, "add", "add_common", timeout=10).infer({"x1": ONES, "x2": ONES}), list):
            assert time.monotonic() < deadline, servers.log("master")
            time.sleep(0.2)
        [worker] = children_of(master)
        replies = []
        calls = [threading.Thread(target=lambda: replies.append(
            Client("127.0.0.1", grpc_port, "add", "slow", timeout=20).infer({"x1": ONES, "x2": ONES}))) for _ in range(2)]
        for call in calls:
            call.start()
        time.sleep(1.0)  # both are running on the worker
        os_kill(worker)
        for call in calls:
            call.join(30)
        # The worker that died, its host and pid: not "no worker serves it now".
        for reply in replies:
            assert isinstance(reply, dict) and re.search(rf"worker \d+ at 127\.0\.0\.1:\d+ \(host \S+, pid {worker}\)",
                                                         reply["error"]), reply
        servers.wait_for("master", f"serving worker 0 (pid {worker} on ", timeout=10)
        assert "no local worker is left" in servers.log("master"), servers.log("master")
    finally:
        servers.stop_all()


def os_kill(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGKILL)


@pytest.mark.multiprocess
def test_a_worker_with_another_definition_of_a_served_version_is_refused(servables, tmp_path):
    """Two definitions of add version 1 would answer alike-named requests two ways at random: the second worker
    is refused, says why and exits; the master serves on with the first."""
    other = example_copy(tmp_path / "other")
    config = other / "add" / "servable_config.py"
    config.write_text(config.read_text().replace('output_names=["y"]', 'output_names=["z"]'))
    assert 'output_names=["z"]' in config.read_text()
    servers = Servers(tmp_path / "logs")
    try:
        grpc_port, master_port = start_master_with_a_local_worker(servers, servables, tmp_path)
        servers.wait_for("master", "Serving worker start success")
        servers.start("other", orchestrate_command("serve", "--worker", str(other), "--master-address",
                                                   f"127.0.0.1:{master_port}", "--worker-port", "0"), tmp_path, ready="")
        exit_ = servers.groups["other"].exit_of(0, 60)
        assert exit_ is not None and exit_.exitcode != 0, servers.log("other")
        log = servers.log("other")
        assert re.search(r"refused this worker: servable add version 1 is served here by worker \d+ at 127\.0\.0\.1:\d+ "
                         r"\(host \S+, pid \d+\) with other methods \{name: \(inputs, outputs\)\}: .*'add_common': "
                         r"\(\('x1', 'x2'\), \('y',\)\).*; this worker's: .*'add_common': \(\('x1', 'x2'\), \('z',\)\)", log), log
        assert isinstance(infer(grpc_port), list)  # the master serves on, with the first definition
    finally:
        servers.stop_all()


@pytest.mark.multiprocess
def test_a_worker_without_a_master_says_it_waits_and_gives_up_after_register_timeout(servables):
    import time

    from conftest import run_command

    started = time.monotonic()
    result = run_command(orchestrate_command("serve", "--worker", str(servables), "--master-address",
                                             f"127.0.0.1:{free_port()}", "--worker-port", "0", "--register-timeout", "2"),
                         timeout=60)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 30
    assert re.search(r"no master answers at 127\.0\.0\.1:\d+ yet \(UNAVAILABLE\); trying for up to 2 s", result.stderr), result.stderr
    assert re.search(r"no master answered at 127\.0\.0\.1:\d+ within 2 s", result.stderr), result.stderr

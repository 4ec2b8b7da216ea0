"""Helpers of the serving tests: the seed's example copied and built in a temp dir, servers in child processes.

Servers run as a user runs them (``python master_with_worker.py`` in the example's folder),
started and watched by the project's one supervisor (``launchers.Supervisor``), with their
output in log files the tests read. The example's fixed ports (5500, 6500, 6600) become free
ones by editing the copied scripts' text.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from conftest import ROOT, project_env
from launchers import ProcessSpec, RankOutput, Supervisor

EXAMPLE = ROOT / "examples" / "serving_add"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_copy(tmp_path: Path, ports: dict[int, int] | None = None, versions: int = 1) -> Path:
    """The seed's example in ``tmp_path/serving_add`` with its model exported, ports replaced (old -> new).

    ``versions`` > 1: also ``add/2/`` ..., each holding the same model (enough to tell versions apart by what
    the reply's spec says).
    """
    target = tmp_path / "serving_add"
    shutil.copytree(EXAMPLE, target)
    result = subprocess.run([sys.executable, "add_model.py"], cwd=target / "export_model", env=project_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for v in range(2, versions + 1):
        shutil.copytree(target / "add" / "1", target / "add" / str(v))
    for script in target.glob("*.py"):
        text = script.read_text()
        for old, new in (ports or {}).items():
            text = text.replace(str(old), str(new))
        script.write_text(text)
    return target


class Servers:
    """Child processes (each ``python SCRIPT`` or any argv) under one Supervisor; logs in ``log_dir``."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.groups: dict[str, Supervisor] = {}

    def start(self, name: str, argv: list[str], cwd: Path, ready: str = "start success", timeout: float = 60.0,
              env: dict | None = None) -> Supervisor:
        spec = ProcessSpec(0, argv, env={**_pythonpath(), **(env or {})}, cwd=str(cwd), label=name)
        group = Supervisor([spec], output=RankOutput(self.log_dir / name, console=False), stop_timeout=10.0)
        group.start()
        self.groups[name] = group
        if ready:
            self.wait_for(name, ready, timeout)
        return group

    def log(self, name: str) -> str:
        path = self.log_dir / name / "rank_0.log"
        return path.read_text() if path.exists() else ""

    def wait_for(self, name: str, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            exit_ = self.groups[name].exit_of(0)
            if exit_ is not None:
                raise AssertionError(f"{name} ended (code {exit_.exitcode}, signal {exit_.signal}) before printing {text!r}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not print {text!r} within {timeout} s:\n{self.log(name)}")
            time.sleep(0.05)

    def pid(self, name: str) -> int:
        return self.groups[name].pids[0]

    def signal(self, name: str, signum: int = signal.SIGTERM, timeout: float = 20.0):
        """Send ``signum`` to the server and wait for it to end; its RankExit."""
        os.kill(self.pid(name), signum)
        exit_ = self.groups[name].exit_of(0, timeout)
        assert exit_ is not None, f"{name} still runs {timeout} s after {signal.Signals(signum).name}:\n{self.log(name)}"
        return exit_

    def stop_all(self) -> None:
        for group in self.groups.values():
            group.stop()


def _pythonpath() -> dict[str, str]:
    return {"PYTHONPATH": project_env()["PYTHONPATH"]}


def children_of(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def write_servable(root: Path, name: str, config: str, model: Path) -> Path:
    """``root/name/servable_config.py`` with ``config`` and a copy of ``model`` as version 1; the servables' folder."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "servable_config.py").write_text(config)
    (root / name / "1" / model.name).write_bytes(model.read_bytes())
    return root


def write_sub_model(path: Path) -> None:
    """A version 2 of ``add`` for the tests: x - y, so a reply shows which version ran it."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "y", "z")]
    graph = helper.make_graph([helper.make_node("Sub", ["x", "y"], ["z"])], "tensor_sub", io[:2], io[2:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


SERVE_TWO_VERSIONS = textwrap.dedent("""
    import os, sys
    from orchestrator.serving import master, worker

    servable_dir = os.path.abspath(".")
    worker.start_servable_in_master(servable_dir, "add", version_number=1, device_id=0)
    worker.start_servable_in_master(servable_dir, "add", version_number=2, device_id=0)
    master.start_grpc_server("127.0.0.1", int(sys.argv[1]))
    master.start_restful_server("127.0.0.1", int(sys.argv[2]), max_msg_mb_size=1)
""")


def serve_two_versions(servers: Servers, folder: Path, name: str = "two_versions") -> tuple[int, int]:
    """Serve ``folder``'s add with versions 1 and 2 loaded, over gRPC and REST (bodies up to 1 MB): the ports."""
    (folder / "serve_two_versions.py").write_text(SERVE_TWO_VERSIONS)
    for attempt in range(3):
        grpc_port, rest_port = free_port(), free_port()
        try:
            servers.start(name, [sys.executable, "serve_two_versions.py", str(grpc_port), str(rest_port)], folder,
                          ready="Serving RESTful server start success")
            return grpc_port, rest_port
        except AssertionError:
            # A free port can be taken by another program before the server binds it: new ports, once more.
            if "cannot listen" not in servers.log(name) or attempt == 2:
                raise
            servers.groups.pop(name).stop()
    raise AssertionError("not reached")

"""Seed 004's serving `add` example from a MINDIR file: the seed's own add_model.py exports tensor_add.mindir with
MindSpore, its servable_config.py declares ``model_format="MindIR"``, and the example's master_with_worker.py
serves it (lightweight deployment); the seed's client.py and our Client check the replies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from _mindir_helpers import cache_files, require_mindspore
from _serving_helpers import EXAMPLE, Servers, free_port
from conftest import ROOT, project_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.cli]

SEED = ROOT / "tests" / "seeds" / "scripts" / "seed004_mindir"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_mindspore()
    tmp = tmp_path_factory.mktemp("seed004_mindir")
    folder = tmp / "serving_add"
    shutil.copytree(EXAMPLE, folder)
    shutil.copy(SEED / "add_model.py", folder / "export_model" / "add_model.py")
    shutil.copy(SEED / "servable_config.py", folder / "add" / "servable_config.py")
    export = subprocess.run([sys.executable, "add_model.py"], cwd=folder / "export_model",
                            env={**project_env(), "GLOG_v": "3"}, capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stdout + export.stderr
    assert "copy tensor_add.mindir to ../add/1 success" in export.stdout
    port = free_port()
    for script in folder.glob("*.py"):
        script.write_text(script.read_text().replace("5500", str(port)))
    servers = Servers(tmp / "logs")
    try:
        servers.start("master_with_worker", [sys.executable, "master_with_worker.py"], folder, timeout=120)
        yield folder, port
    finally:
        servers.stop_all()


def test_the_seed_files_differ_only_in_the_marked_lines():
    changed = [line for path in sorted(SEED.iterdir()) for line in path.read_text().splitlines()
               if "# changed:" in line and not line.startswith("#")]
    assert changed == [
        'context.set_context(mode=context.GRAPH_MODE, device_target="CPU")  # changed: was "Ascend" (no Ascend card here)',
        "from orchestrator.serving.worker import register  # changed: was `from mindspore_serving.worker import register`",
    ]
    assert 'register.declare_servable(servable_file="tensor_add.mindir", model_format="MindIR", with_batch_dim=False)' \
        in (SEED / "servable_config.py").read_text()


def test_the_seeds_client_gets_the_sums_from_the_mindir_model(served):
    folder, port = served
    result = subprocess.run([sys.executable, "client.py"], cwd=folder, env=project_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    numbers = re.findall(r"array\(\[\[([^\]]*)\],\s*\[([^\]]*)\]\], dtype=float32\)", result.stdout)
    # add_common on 1+1, 2+2, 3+3, then add_cast on int32 ones
    assert [float(" ".join(pair).replace(",", " ").split()[0]) for pair in numbers] == [2.0, 4.0, 6.0, 2.0], result.stdout
    assert "error" not in result.stdout
    assert len(cache_files(folder / "add" / "1" / "tensor_add.mindir")) == 1  # served from its ONNX conversion


def test_random_instances_equal_numpy(served):
    from orchestrator.serving.client import Client

    _, port = served
    rng = np.random.default_rng(0)
    instances = [{"x1": rng.standard_normal((2, 2), dtype=np.float32), "x2": rng.standard_normal((2, 2), dtype=np.float32)}
                 for _ in range(4)]
    for instance, reply in zip(instances, Client("localhost", port, "add", "add_common").infer(instances)):
        np.testing.assert_array_equal(reply["y"], instance["x1"] + instance["x2"])

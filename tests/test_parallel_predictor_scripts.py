"""The batch-split master from every kind of main module: workers never import the caller's script.

Workers are ``python -m orchestrator._worker_main`` children of the supervisor
(not ``multiprocessing`` spawn children, which run the main module again), so
a script without ``if __name__ == "__main__":``, ``python -c``, a script on
stdin and code exec'd from a string (as a notebook or a REPL runs a cell) all work.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests._batch_split_helpers import process_alive, reference, wait_until
from tests.conftest import project_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.cli]

# No main guard, and no indented block, so a REPL can take it line by line too.
SOURCE = """\
import json, sys
import numpy as np
from orchestrator import Context, ParallelPredictor
print("the main module ran", flush=True)
context = Context()
context.cpu.thread_num = 1
predictor = ParallelPredictor(MODEL, device_ids=[0, 1], context=context, timeout=60)
y = predictor.predict([np.ones((3, 64), np.float32)])[0].get_data_to_numpy()
pids = predictor.pids
predictor.close()
print(json.dumps({"shape": list(y.shape), "y": y.tolist(), "pids": pids}), flush=True)
"""

DRIVER = """\
import code, sys
cell = sys.stdin.read()
console = code.InteractiveConsole({"__name__": "__main__"})
for line in cell.splitlines():
    console.push(line)
console.push("")
"""


def _run(argv, stdin=None):
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, env=project_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.timeout(150)
@pytest.mark.parametrize("way", ["script without a guard", "python -c", "stdin", "exec from a string"])
def test_a_master_without_a_main_guard(sample, tmp_path, way):
    model = str(sample("mlp"))
    source = SOURCE.replace("MODEL", repr(model))
    if way == "script without a guard":
        script = tmp_path / "unguarded.py"
        script.write_text(source)
        result = _run([sys.executable, str(script)])
    elif way == "python -c":
        result = _run([sys.executable, "-c", source])
    elif way == "stdin":
        result = _run([sys.executable, "-"], stdin=source)
    else:
        result = _run([sys.executable, "-c", DRIVER], stdin=source)
    lines = result.stdout.splitlines()
    assert lines.count("the main module ran") == 1, result.stdout  # the workers did not run it again
    info = json.loads(lines[-1])
    expected = reference(model, [np.ones((3, 64), np.float32)])[0]
    np.testing.assert_allclose(np.array(info["y"], np.float32), expected, rtol=0, atol=1e-5)
    assert wait_until(lambda: not any(process_alive(pid) for pid in info["pids"]), 10)

"""Seed 000's concurrent inference (ModelParallelRunner), run as its document runs it: `python script.py`
in a folder with ./model/, five client threads of two requests each on three workers."""

from __future__ import annotations

import re
import sys

import numpy as np
import onnxruntime as ort
import pytest

from _seed_run import check_parallel_runner_values, copy_script, run
from conftest import ROOT
from orchestrator import write_sample_model
from ranks._cpu_limits import cpu_budget

pytestmark = pytest.mark.cli

HEADER = "tensor name is:probs tensor size is:4000 tensor elements num is:1000"  # one print call: never split
TASK = re.compile(r"^parallel id:  (\d+)  \| task index:  (\d+)  \| run once time:  [0-9.e-]+  s$")


def _model_folder(tmp_path):
    # MindSpore Lite's converted MobileNetV2 takes one NHWC image; the seed fills it from a flat input.bin.
    model = write_sample_model("image", tmp_path / "model" / "mobilenetv2.onnx", batch=1, layout="NHWC")
    x = np.random.default_rng(1).random((1, 224, 224, 3), dtype=np.float32)
    x.tofile(tmp_path / "model" / "input.bin")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the reference: one plain single-threaded run
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].reshape(-1)[:5]


def check_printed(stdout: str, expected: np.ndarray) -> None:
    """Ten tasks, each with the seed's header and the reference's first five values, then the total.

    The seed's client threads print with several write() calls per line, so lines of two threads can
    interleave (MindSpore Lite's own output does too): counts are taken over the whole text, values
    and task ids from the lines that came out whole (most of them).
    """
    assert stdout.count("parallel id: ") == 10, stdout
    assert stdout.count(" | run once time: ") == 10, stdout
    assert stdout.count(HEADER) == 10, stdout
    assert stdout.count("output data is:") == 10, stdout
    lines = stdout.splitlines()
    assert re.fullmatch(r"total run time:  [0-9.e-]+  s", lines[-1]), lines[-1]
    tasks = [TASK.match(line).groups() for line in lines if TASK.match(line)]
    assert len(tasks) == len(set(tasks)) and set(tasks) <= {(str(i), str(k)) for i in range(5) for k in (1, 2)}
    check_parallel_runner_values(stdout, expected)


def test_seed_script_runs_verbatim_and_prints_the_single_threaded_values(tmp_path):
    expected = _model_folder(tmp_path)
    script = copy_script("seed000_parallel_runner.py", tmp_path)

    result = run([sys.executable, script.name], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    check_printed(result.stdout, expected)
    if cpu_budget().usable < 3:
        # 3 workers x 1 thread on fewer cores: said once, with the numbers, not a silent slowdown.
        assert "3 workers x 1 threads = 3 threads, but this process has" in result.stderr


def test_only_the_marked_lines_differ_from_the_seed():
    script = (ROOT / "tests" / "seeds" / "scripts" / "seed000_parallel_runner.py").read_text().splitlines()
    changed = [line for line in script if "# changed:" in line and not line.startswith("#")]
    assert changed == [
        "import orchestrator as mslite  # changed: was `import mindspore_lite as mslite`",
        'model_parallel_runner.build_from_file(model_path="./model/mobilenetv2.onnx", context=context)  '
        '# changed: was "./model/mobilenetv2.mindir"',
    ]
    assert "if __name__" not in "\n".join(script)  # the seed has no main guard, and needs none here


def test_the_example_runs_the_same_script(tmp_path):
    expected = _model_folder(tmp_path)  # the example keeps an existing model folder
    result = run([sys.executable, str(ROOT / "examples" / "parallel_runner.py"), "--workdir", str(tmp_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    check_printed(result.stdout, expected)

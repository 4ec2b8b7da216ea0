"""Models and runners for the command-line tests: models that fail at build or at run, commands with extra environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import project_env


def write_failing_model(path: Path) -> Path:
    """Builds fine, fails in every run: a constant [2, 4] reshaped to [3, 3]. Input x: float32 [2, 4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Reshape", ["c", "s"], ["r"])],
        "fails_at_run", [x], [y, r],
        [numpy_helper.from_array(np.ones((2, 4), np.float32), "c"), numpy_helper.from_array(np.array([3, 3], np.int64), "s")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def write_unbuildable_model(path: Path) -> Path:
    """A well-formed ONNX file that ONNX Runtime refuses to build: an operator nobody registered."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "unbuildable", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run_with_env(args: list[str], env: dict[str, str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    """run_command with extra environment variables (RANK, WORLD_SIZE, ...)."""
    return subprocess.run(args, env={**project_env(), **env}, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]

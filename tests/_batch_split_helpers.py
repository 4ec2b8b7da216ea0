"""Models and checks shared by the batch-split tests (tests/test_parallel_predictor*.py)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from orchestrator import Context, Model, ModelType, save_model
from orchestrator._worker_memory import KIND
from ranks import _shared_memory


def one_thread() -> Context:
    context = Context()
    context.cpu.thread_num = 1
    return context


def reference(path, inputs) -> list[np.ndarray]:
    """The whole batch on one device, in this process."""
    model = Model()
    model.build_from_file(path, ModelType.ONNX, one_thread())
    try:
        return [t.get_data_to_numpy() for t in model.predict(inputs)]
    finally:
        model.close()


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    save_model(model, path)
    return path


def write_timestep_model(path: Path, width: int = 8) -> Path:
    """y = x * t + t, with x [batch, width] and a timestep t [] that carries no batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "t"], ["xt"]), helper.make_node("Add", ["xt", "t"], ["y"])],
        "timestep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
    )
    return _save(graph, path)


def write_reshape_model(path: Path) -> Path:
    """y = reshape(x, [-1, 4]) for x [batch, 6]: fails inside ONNX Runtime when batch * 6 is not a multiple of 4."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])],
        [shape],
    )
    return _save(graph, path)


def write_fixed_batch(source: Path, path: Path, batch: int) -> Path:
    """``source`` with its batch dimension fixed to ``batch`` (as the seeds convert a batch-1 model per device)."""
    model = onnx.load(str(source))
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch
    save_model(model, path)
    return path


def our_segments(master_pid: int | None = None) -> list[str]:
    """The names of the master's segments a worker could still attach: in /dev/shm, or memfds the master holds."""
    pid = os.getpid() if master_pid is None else master_pid
    return sorted(info.name for info in _shared_memory.segments(pid) if info.kind == KIND)


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, seconds: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def worker_pids(parent: int | None = None) -> set[int]:
    """Live batch-split workers (``python -m orchestrator._worker_main``) whose parent is ``parent`` (default: us)."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] not in ("Z", "X") and b"orchestrator._worker_main" in cmdline:
            found.add(int(entry))
    return found


def no_children_left() -> bool:
    return not multiprocessing.active_children() and not worker_pids()


def write_three_outputs_model(path: Path) -> Path:
    """x [batch, 4] float32 -> y = x + 1 [batch, 4], z = concat(x, x) * 2 [batch, 8], n = int64(x) [batch, 4]."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "one"], ["y"]),
            helper.make_node("Concat", ["x", "x"], ["xx"], axis=1),
            helper.make_node("Mul", ["xx", "two"], ["z"]),
            helper.make_node("Cast", ["x"], ["n"], to=TensorProto.INT64),
        ],
        "three_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["batch", 4])],
        [one, two],
    )
    return _save(graph, path)

"""Models and helpers for the ModelParallelRunner tests.

``slow_model`` is a model whose run time and failure the caller chooses per request:
``trip`` iterations of ``s = tanh(s @ W)`` (a Loop, so ONNX Runtime's terminate flag
stops it between iterations), then ``Gather`` at ``index``, which fails inside ONNX
Runtime when the index is out of range although the inputs pass every check before.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

WIDTH = 64


def _model(graph) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def slow_model(path) -> str:
    """x: float32 [1, 64], trip: int64 [] (iterations), index: int64 [1] -> y: float32 [1, 1]."""
    weight = numpy_helper.from_array((np.random.default_rng(0).standard_normal((WIDTH, WIDTH)) / 8).astype(np.float32), "W")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["mm"]), helper.make_node("Tanh", ["mm"], ["s_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, WIDTH])],
    )
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["go"], value=numpy_helper.from_array(np.array(True))),
         helper.make_node("Loop", ["trip", "go", "x"], ["s"], body=body),
         helper.make_node("Gather", ["s", "index"], ["y"], axis=1)],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH]),
         helper.make_tensor_value_info("trip", TensorProto.INT64, []),
         helper.make_tensor_value_info("index", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [weight],
    )
    onnx.save(_model(graph), str(path))
    return str(path)


def slow_feeds(trip: int = 1, index: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((1, WIDTH)).astype(np.float32)
    return {"x": x, "trip": np.array(trip, np.int64), "index": np.array([index], np.int64)}


def two_in_two_out_model(path) -> str:
    """Fixed batch 1: a: float32 [1, 16], b: int64 [1, 4] -> y: float32 [1, 8] = tanh(a @ W) + sum(b), n: int64 [1, 4] = b * 3."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(3, np.int64), "three"),
    ]
    nodes = [
        helper.make_node("MatMul", ["a", "W"], ["aw"]),
        helper.make_node("Tanh", ["aw"], ["t"]),
        helper.make_node("ReduceSum", ["b"], ["bs"], keepdims=1),
        helper.make_node("Cast", ["bs"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["t", "bf"], ["y"]),
        helper.make_node("Mul", ["b", "three"], ["n"]),
    ]
    graph = helper.make_graph(
        nodes, "two_in_two_out",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 16]),
         helper.make_tensor_value_info("b", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [1, 4])],
        inits,
    )
    onnx.save(_model(graph), str(path))
    return str(path)


def reference(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One plain single-threaded ONNX Runtime run: what every worker's reply must equal."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.005)


def worker_threads(runner) -> list[threading.Thread]:
    """The runner's live worker threads (named after its queue's label)."""
    return [t for t in threading.enumerate() if t.name.startswith(runner._queue.label + " worker") and t.is_alive()]


def uss() -> int:
    import psutil

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap is not memory this process holds
    return psutil.Process().memory_full_info().uss


def run_clients(clients: int, client, timeout: float = 100) -> list[BaseException]:
    """``client(c)`` for every c in range(clients), each on its own thread, all released at once; the
    exceptions they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def run(c: int) -> None:
        try:
            barrier.wait()
            client(c)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors

"""Helpers for the shard tests: a communicator over threads, and small hand-built models."""

from __future__ import annotations

import queue
import threading

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ranks import Communicator
from ranks._comm_base import REDUCE_OPS


class ThreadGroup:
    """``size`` communicators in one process, one per thread: the in-process tier of the tests."""

    def __init__(self, size: int, timeout: float = 60.0):
        self.size = size
        self.timeout = timeout
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list = [None] * size
        self._mail = {(s, d): queue.Queue() for s in range(size) for d in range(size)}

    def comms(self) -> list["ThreadComm"]:
        return [ThreadComm(self, r) for r in range(self.size)]

    def run(self, fn):
        """Call fn(comm) on one thread per rank; return the results in rank order, re-raising the first error."""
        results: list = [None] * self.size
        errors: list = [None] * self.size

        def body(comm):
            try:
                results[comm.rank] = fn(comm)
            except BaseException as exc:  # noqa: BLE001 - handed back to the test
                errors[comm.rank] = exc
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(c,)) for c in self.comms()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout * 2)
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results


class ThreadComm(Communicator):
    backend = "threads"

    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__(rank, group.size, group.timeout)
        self.group = group

    def _exchange(self, array):
        g = self.group
        g._slots[self.rank] = None if array is None else np.array(array, copy=True)
        g._barrier.wait()
        parts = list(g._slots)
        g._barrier.wait()
        return parts

    def allreduce(self, array, op="sum"):
        if op not in REDUCE_OPS:
            raise ValueError(op)
        parts = self._exchange(array)
        fn = {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}[op]
        out = parts[0].copy()
        for p in parts[1:]:
            out = fn(out, p)
        return out

    def allgather(self, array, axis=0):
        return np.concatenate(self._exchange(array), axis=axis)

    def broadcast(self, array, root=0):
        return self._exchange(array)[root].copy()

    def barrier(self):
        self.group._barrier.wait()

    def send(self, array, dest, tag=0):
        self.group._mail[(self.rank, dest)].put((tag, np.array(array, copy=True)))

    def recv(self, source, tag=0):
        got_tag, array = self.group._mail[(source, self.rank)].get(timeout=self.timeout)
        assert got_tag == tag
        return array

    def close(self):
        pass


def make_model(nodes, inputs, outputs, initializers: dict, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test", inputs, outputs,
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def weights(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in shapes]


def run_ranks_from_a_table(tmp_path, argv_of_rank, size: int = 2, timeout: float = 200) -> None:
    """Start ``size`` local ranks as a shell does, one command each (``argv_of_rank(rank, ini)``), with a
    generated rank table and a zmq ``config_file.ini`` in ``tmp_path``; wait, and assert they all exit 0."""
    import subprocess

    from conftest import project_env
    from ranks import free_base_port, generate_rank_table

    generate_rank_table([("127.0.0.1", list(range(size)))]).dump(tmp_path / "rank_table.json")
    ini = tmp_path / "config_file.ini"
    ini.write_text(f"[ascend_context]\nrank_table_file=rank_table.json\n[comm]\nbackend=zmq\n"
                   f"base_port={free_base_port(size)}\ntimeout=60\n")
    procs = [subprocess.Popen(argv_of_rank(rank, ini), env=project_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(size)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * size, logs


def fixture_arrays(name: str) -> dict:
    """The arrays of a committed fixture's npz file, by its name (``gpt2_cache_dynamo``): an export's inputs, torch's outputs or tokens."""
    from pathlib import Path

    with np.load(Path(__file__).resolve().parent / "fixtures" / f"{name}.npz") as saved:
        return {k: saved[k] for k in saved.files}

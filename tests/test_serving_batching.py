"""Request batching of ``with_batch_dim=True`` servables, the queue bound and the request timeout (in process).

The servable (a small MLP, inputs [batch, 64]) is loaded in this process and its methods run the
way the gRPC and REST fronts run them (``Servable.run_method``); every output row is compared with
ONNX Runtime running that row alone.
"""

from __future__ import annotations

import textwrap
import threading

import numpy as np
import onnxruntime as ort
import pytest

from _serving_helpers import write_servable
from orchestrator.serving import RequestError, ServingQueueFullError, ServingTimeoutError
from orchestrator.serving._servable import Servable, ServableOptions

CONFIG = textwrap.dedent("""
    import time
    from orchestrator.serving import register

    register.declare_servable(servable_file="mlp.onnx", model_format="ONNX", with_batch_dim=True)

    @register.register_method(output_names=["y"])
    def predict(x):
        return register.call_servable(x)

    @register.register_method(output_names=["y"])
    def slow(x):
        x = register.call_preprocess(lambda v: (time.sleep(0.3), v)[1], x)
        return register.call_servable(x)
""")


@pytest.fixture(scope="module")
def servables(sample, tmp_path_factory):
    return write_servable(tmp_path_factory.mktemp("servables"), "mlp", CONFIG, sample("mlp"))


@pytest.fixture(scope="module")
def reference(sample):
    session = ort.InferenceSession(str(sample("mlp")), providers=["CPUExecutionProvider"])
    return lambda row: session.run(None, {"x": row[None]})[0][0]


def rows(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 64), dtype=np.float32)


def all_at_once(servable, xs: list) -> list:
    """Each of ``xs`` sent by its own caller, all released at once: each caller's one result."""
    results = [None] * len(xs)
    start = threading.Barrier(len(xs))

    def one(i):
        start.wait()
        results[i] = servable.run_method("predict", [{"x": xs[i]}])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def served(servables, **options) -> Servable:
    return Servable(servables, "mlp", 0, ServableOptions(workers_num=2, thread_num=1, **options))


def test_concurrent_requests_are_joined_into_batches_and_split_exactly(servables, reference):
    servable = served(servables, max_batch=8, batch_delay_ms=50)
    try:
        x = rows(16)
        results = all_at_once(servable, list(x))
        for i, result in enumerate(results):
            np.testing.assert_allclose(result["y"], reference(x[i]), rtol=1e-5, atol=1e-5)
        batcher = servable._batcher
        assert batcher.instances_run == 16
        assert batcher.batches_run <= 8, f"16 concurrent requests ran as {batcher.batches_run} batches"

        # One request of 5 instances: one batch of 5, each instance its own row back.
        before = batcher.batches_run
        many = servable.run_method("predict", [{"x": row} for row in rows(5, seed=1)])
        assert batcher.batches_run == before + 1
        for row, result in zip(rows(5, seed=1), many):
            np.testing.assert_allclose(result["y"], reference(row), rtol=1e-5, atol=1e-5)
    finally:
        servable.close()


def test_without_batching_the_results_are_the_same(servables, reference):
    servable = served(servables, max_batch=1)
    try:
        assert servable._batcher is None
        x = rows(3, seed=2)
        for row, result in zip(x, servable.run_method("predict", [{"x": row} for row in x])):
            np.testing.assert_allclose(result["y"], reference(row), rtol=1e-5, atol=1e-5)
        bad = servable.run_method("predict", [{"x": np.ones((2, 64), np.float32)}])[0]
        assert isinstance(bad, RequestError)
        assert "shape [2, 64]; the model takes shape [64] per instance (with_batch_dim=True" in str(bad)
    finally:
        servable.close()


def test_a_full_queue_refuses_at_once_and_a_slow_request_times_out(servables):
    servable = served(servables, queue_size=2, timeout=0.1)
    try:
        with pytest.raises(ServingQueueFullError, match=r"its queue is full \(2 instances waiting or running\)"):
            servable.run_method("predict", [{"x": row} for row in rows(3)])
        result = servable.run_method("slow", [{"x": rows(1)[0]}])[0]
        assert isinstance(result, ServingTimeoutError)
        assert "servable mlp version 1: the request's timeout passed before the model ran" in str(result)
        assert "y" in servable.run_method("predict", [{"x": rows(1)[0]}])[0]  # still serving
    finally:
        servable.close()


@pytest.mark.multiprocess
def test_several_device_ids_split_each_batch_over_worker_processes(servables, reference):
    servable = served(servables, device_ids=(0, 1), max_batch=8, batch_delay_ms=20)
    try:
        pids = servable._backend.pids
        assert len(pids) == 2
        x = rows(6, seed=3)
        for row, result in zip(x, servable.run_method("predict", [{"x": row} for row in x])):
            np.testing.assert_allclose(result["y"], reference(row), rtol=1e-5, atol=1e-5)
    finally:
        servable.close()


def test_the_seeds_imports_work_and_the_serving_errors_are_the_projects():
    import orchestrator.serving.worker.register as worker_register
    from orchestrator import OrchestratorError, WorkerError
    from orchestrator.serving import master, register, worker  # noqa: F401
    from orchestrator.serving import ServableConfigError, ServingWorkerError, ServingWorkerLostError
    from orchestrator.serving.client import Client  # noqa: F401
    from orchestrator.serving.worker import register as seed_register

    for name in register.__all__:
        assert getattr(seed_register, name) is getattr(register, name) is getattr(worker_register, name)
    assert {"start_grpc_server", "start_restful_server", "start_master_server", "stop"} <= set(dir(master))
    assert {"start_servable", "start_servable_in_master", "stop"} <= set(dir(worker))
    assert issubclass(ServingWorkerLostError, ServingWorkerError) and issubclass(ServingWorkerError, WorkerError)
    assert issubclass(ServableConfigError, OrchestratorError) and issubclass(ServableConfigError, ValueError)
    with pytest.raises(ServableConfigError, match="belongs in a servable_config.py"):
        register.declare_servable(servable_file="m.onnx", model_format="ONNX")


@pytest.mark.parametrize("config, message", [
    ("", "declares no model: call register.declare_servable"),
    ("register.declare_servable(servable_file='mlp.onnx', model_format='OM')", "model_format must be 'ONNX' or 'MindIR', got 'OM'"),
    ("register.declare_servable(servable_file='other.onnx', model_format='ONNX')\n"
     "@register.register_method(output_names=['y'])\ndef f(x):\n    return register.call_servable(x)",
     "model file .*other.onnx does not exist"),
    ("register.declare_servable(servable_file='mlp.onnx', model_format='ONNX')", "registers no method"),
    ("raise KeyError('oops')", r"servable_config.py failed to load: KeyError: 'oops'"),
])
def test_a_servable_that_cannot_load_says_why(servables, tmp_path, config, message):
    from orchestrator.serving import ServableConfigError

    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "mlp.onnx").write_bytes((servables / "mlp" / "1" / "mlp.onnx").read_bytes())
    (tmp_path / "bad" / "servable_config.py").write_text("from orchestrator.serving import register\n" + config + "\n")
    with pytest.raises(ServableConfigError, match=message):
        Servable(tmp_path, "bad")
    with pytest.raises(ServableConfigError, match=r"servable 'bad' has no version 3; versions in .*: \[1\]"):
        Servable(tmp_path, "bad", 3)
    with pytest.raises(ServableConfigError, match=r"servable 'nope': no folder"):
        Servable(tmp_path, "nope")


def test_a_port_in_use_is_a_clear_error_and_grpc_logs_nothing(capfd):
    import socket

    from orchestrator.serving import ServingError
    from orchestrator.serving._grpc_service import start_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServingError) as error:
            start_server("127.0.0.1", port, "serving gRPC server", lambda server: None, 1 << 20)
    assert str(error.value) == (f"serving gRPC server: cannot listen on 127.0.0.1:{port}: the port is already in use "
                                "(another server or program listens on it)")
    assert capfd.readouterr().err == ""  # no "E1130 ... add_port.cc:83] ..." of gRPC's C core


def test_an_address_not_of_this_host_is_a_clear_error():
    from orchestrator.serving import ServingError
    from orchestrator.serving._grpc_service import start_server

    with pytest.raises(ServingError) as error:  # 192.0.2.1: TEST-NET-1, never an address of this host
        start_server("192.0.2.1", 0, "serving gRPC server", lambda server: None, 1 << 20)
    assert str(error.value) == "serving gRPC server: cannot listen on 192.0.2.1:0: 192.0.2.1 is not an address of this host"


def test_a_model_with_a_fixed_batch_runs_full_batches_padded_from_the_last_row(sample, tmp_path, reference):
    """An export for batch 3: joined instances are capped at 3, a short batch is padded with copies of its last
    row and their outputs dropped, so 1, 2, 3 or 5 instances, alone or from concurrent callers, all come back
    right (they used to fail or not depending on what other callers sent)."""
    import onnx

    fixed = onnx.load(str(sample("mlp")))
    for value in [*fixed.graph.input, *fixed.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 3
    (tmp_path / "m").mkdir()
    onnx.save(fixed, str(tmp_path / "m" / "mlp.onnx"))
    folder = write_servable(tmp_path / "servables", "mlp", CONFIG, tmp_path / "m" / "mlp.onnx")
    servable = Servable(folder, "mlp", 0, ServableOptions(workers_num=2, thread_num=1, max_batch=8, batch_delay_ms=20))
    try:
        assert servable.signature().max_batch == 3
        x = rows(5, seed=3)
        for n in (1, 2, 3, 5):
            results = servable.run_method("predict", [{"x": row} for row in x[:n]])
            for i, result in enumerate(results):
                np.testing.assert_allclose(result["y"], reference(x[i]), rtol=1e-5, atol=1e-5)
        results = all_at_once(servable, [x[i % 5] for i in range(7)])
        for i, result in enumerate(results):
            np.testing.assert_allclose(result["y"], reference(x[i % 5]), rtol=1e-5, atol=1e-5)
    finally:
        servable.close()

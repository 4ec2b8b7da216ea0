"""Health and metrics that tell the truth on a cluster: workers killed, readiness turns, metrics show it, no request hangs.

``orchestrate serve --master --grpc-port G --http-port H`` and two ``orchestrate serve --worker``
processes serving the seed's ``add``, as a user starts them. tritonclient (HTTP and gRPC) and raw
HTTP against the master while the workers are killed one by one (SIGKILL) and one comes back.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from _serving_helpers import Servers, example_copy, free_port

pytestmark = [pytest.mark.multiprocess]

X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kserve_cluster")
    folder = example_copy(tmp)
    grpc_port, http_port, master_port = free_port(), free_port(), free_port()
    servers = Servers(tmp / "logs")
    cli = [sys.executable, "-m", "orchestrator._cli", "serve"]
    worker = cli + [str(folder), "--worker", "--master-address", f"127.0.0.1:{master_port}", "--worker-port", "0",
                    "--workers", "1"]
    try:
        servers.start("master", cli + ["--master", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                                       "--master-port", str(master_port)], folder,
                      ready="Serving master server start success")
        for name in ("worker1", "worker2"):
            servers.start(name, worker, folder, ready="")
        for name in ("worker1", "worker2"):
            servers.wait_for(name, "Serving worker start success")
        yield {"servers": servers, "worker": worker, "folder": folder, "http": f"127.0.0.1:{http_port}",
               "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        servers.stop_all()


def get(cluster, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{cluster['http']}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    return status, (json.loads(text) if text.startswith("{") else text)


def metric(cluster, name: str, **labels) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(cluster, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


INFER = {"inputs": [{"name": n, "datatype": "FP32", "shape": [2, 2], "data": X.ravel().tolist()} for n in ("x1", "x2")]}


def infer_http(cluster):
    return get(cluster, "/v2/models/add.add_common/infer", INFER)


def test_workers_die_readiness_turns_metrics_show_it_and_a_worker_rejoins(cluster):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    servers = cluster["servers"]
    http = httpclient.InferenceServerClient(cluster["http"], network_timeout=20)
    grpc_ = grpcclient.InferenceServerClient(cluster["grpc"])
    alive = {"name": "orchestrator_serving_workers_alive", "servable": "add", "version": "1"}

    def workers():
        return metric(cluster, alive["name"], servable="add", version="1")

    wait_until(lambda: workers() == 2, 10, "both workers registered")
    assert http.is_server_ready() and grpc_.is_server_ready() and http.is_model_ready("add.add_cast")
    status, reply = infer_http(cluster)
    assert status == 200 and reply["outputs"][0]["data"] == (X + X).ravel().tolist()
    # Model metadata on the master comes from what the workers registered (the master has no model file).
    assert http.get_model_metadata("add.add_common")["inputs"][0] == {"name": "x1", "datatype": "FP32", "shape": [2, 2]}

    # Load while the workers die: every request ends (answer or error), none waits for its timeout.
    stop, durations, statuses = threading.Event(), [], []

    def load():
        while not stop.is_set():
            t0 = time.monotonic()
            status, _ = infer_http(cluster)
            durations.append(time.monotonic() - t0)
            statuses.append(status)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        servers.signal("worker1", signal.SIGKILL)
        wait_until(lambda: workers() == 1, 5, "the killed worker out of the metrics")
        assert http.is_server_ready() and http.is_model_ready("add.add_common")  # the other still serves
        servers.signal("worker2", signal.SIGKILL)
        wait_until(lambda: workers() == 0, 5, "the second killed worker out of the metrics")
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(25)
    assert not any(thread.is_alive() for thread in threads), "a request hangs"
    assert max(durations) < 5.0, max(durations)
    assert set(statuses) <= {200, 503}, statuses

    # No worker: readiness says so (Triton would still answer 200), requests get 503 at once.
    assert not http.is_server_ready() and not grpc_.is_server_ready()
    assert not http.is_model_ready("add.add_common") and not grpc_.is_model_ready("add.add_common")
    status, reply = get(cluster, "/v2/health/ready")
    assert status == 503 and reply["error"] == "no worker serves add now"
    status, reply = get(cluster, "/v2/models/add.add_common/ready")
    assert status == 503 and reply["ready"] is False
    started = time.monotonic()
    status, reply = infer_http(cluster)
    assert status == 503 and "servable 'add': no worker serves it now" in reply["error"]
    assert time.monotonic() - started < 2.0
    inputs = [grpcclient.InferInput(n, [2, 2], "FP32") for n in ("x1", "x2")]
    for tensor in inputs:
        tensor.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException, match="no worker serves it now") as info:
        grpc_.infer("add.add_common", inputs)
    assert "UNAVAILABLE" in info.value.status()
    assert metric(cluster, "orchestrator_serving_model_ready", model="add.add_common", version="1") == 0
    # The repository index says why; the model configuration stays readable (the workers registered it).
    unavailable = {"version": "1", "state": "UNAVAILABLE", "reason": "no worker serves it now (its workers left or died)"}
    assert http.get_model_repository_index() == [{"name": n, **unavailable} for n in ("add.add_cast", "add.add_common")]
    assert grpc_.get_model_repository_index(as_json=True)["models"][1] == {"name": "add.add_common", **unavailable}
    assert get(cluster, "/v2/repository/index", {"ready": True}) == (200, "[]")
    assert http.get_model_config("add.add_common")["input"][0] == {"name": "x1", "data_type": "TYPE_FP32",
                                                                   "dims": [2, 2]}
    assert metric(cluster, "orchestrator_serving_request_failures_total", model="add.add_common", version="1",
                  reason="unavailable") >= 2

    # A worker comes back (with an HTTP port of its own): ready again, and it serves.
    worker_http = free_port()
    servers.start("worker3", cluster["worker"] + ["--http-port", str(worker_http)], cluster["folder"],
                  ready="RESTful server start success")
    wait_until(lambda: http.is_server_ready(), 5, "ready again after a worker rejoined")
    assert http.is_model_ready("add.add_common") and workers() == 1
    np.testing.assert_array_equal(grpc_.infer("add.add_common", inputs).as_numpy("y"), X + X)
    # The model ran in the worker: its own /metrics counts the run, the master's has no model runs.
    on_worker = {**cluster, "http": f"127.0.0.1:{worker_http}"}
    assert metric(on_worker, "orchestrator_serving_compute_seconds_count", servable="add", version="1") == 1
    assert metric(cluster, "orchestrator_serving_compute_seconds_count", servable="add", version="1") is None

"""Seed 004 (MindSpore Serving's add example), lightweight deployment: its scripts as written but for the import.

One server for the module: ``python master_with_worker.py`` in a copy of examples/serving_add (its port
made a free one), started by the project's supervisor. The seed's ``client.py`` runs as a user runs it;
our ``Client`` and a client generated from the .proto alone (no orchestrator code) check the replies.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _serving_helpers import Servers, children_of, example_copy, free_port, serve_two_versions, write_sub_model
from conftest import ROOT, project_env

pytestmark = [pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def versions_server(server):
    """The same folder served with both versions loaded, over gRPC and REST (bodies up to 1 MB): (grpc port, rest port)."""
    servers, folder, _ = server
    return serve_two_versions(servers, folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed")
    port = free_port()
    folder = example_copy(tmp, {5500: port}, versions=2)
    write_sub_model(folder / "add" / "2" / "tensor_add.onnx")
    servers = Servers(tmp / "logs")
    try:
        servers.start("master_with_worker", [sys.executable, "master_with_worker.py"], folder)
        yield servers, folder, port
    finally:
        servers.stop_all()


def client(port, method="add_common", **kwargs):
    from orchestrator.serving.client import Client

    return Client("localhost", port, "add", method, **kwargs)


def test_the_seeds_client_script_prints_the_seeds_results(server):
    _, folder, _ = server
    result = subprocess.run([sys.executable, "client.py"], cwd=folder, env=project_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    numbers = re.findall(r"array\(\[\[([^\]]*)\],\s*\[([^\]]*)\]\], dtype=float32\)", result.stdout)
    # The newest version (2: x - y) serves by default: the seed's pairs of equal inputs give zeros.
    assert [tuple(float(v) for v in " ".join(pair).replace(",", " ").split()) for pair in numbers] == [(0.0,) * 4] * 4
    assert result.stdout.count("{'y': array(") == 4 and "error" not in result.stdout


def test_results_equal_numpy_and_a_version_can_be_named(versions_server):
    port, _ = versions_server
    rng = np.random.default_rng(0)
    instances = [{"x1": rng.standard_normal((2, 2), dtype=np.float32), "x2": rng.standard_normal((2, 2), dtype=np.float32)}
                 for _ in range(5)]
    v1 = client(port, version_number=1).infer(instances)
    newest = client(port).infer(instances)
    for inst, one, two in zip(instances, v1, newest):
        np.testing.assert_array_equal(one["y"], inst["x1"] + inst["x2"])  # version 1: the seed's add
        np.testing.assert_array_equal(two["y"], inst["x1"] - inst["x2"])  # version 2, the newest
        assert one["y"].dtype == np.float32
    cast = client(port, "add_cast", version_number=1).infer([{"x1": np.ones((2, 2), np.int32), "x2": np.ones((2, 2), np.int32)}])
    np.testing.assert_array_equal(cast[0]["y"], np.full((2, 2), 2, np.float32))


def test_each_bad_instance_gets_its_own_error_and_the_others_their_results(versions_server):
    port, _ = versions_server
    good = {"x1": np.ones((2, 2), np.float32), "x2": np.ones((2, 2), np.float32)}
    result = client(port, version_number=1).infer([
        good,
        {"x1": np.ones((2, 2), np.float32)},                                       # x2 missing
        {"x1": np.ones((2, 2), np.float32), "x2": np.ones((2, 2), np.float32), "x3": np.ones(1)},
        {"x1": np.ones((2, 2), np.int32), "x2": np.ones((2, 2), np.int32)},        # add_common takes float32
        {"x1": np.ones((3, 2), np.float32), "x2": np.ones((3, 2), np.float32)},    # the model takes 2x2
        good,
    ])
    assert len(result) == 6
    np.testing.assert_array_equal(result[0]["y"], np.full((2, 2), 2, np.float32))
    np.testing.assert_array_equal(result[5]["y"], np.full((2, 2), 2, np.float32))
    assert "lacks ['x2']" in result[1]["error"]
    assert "unknown ['x3']" in result[2]["error"]
    assert "dtype int32, the model takes float32" in result[3]["error"]
    assert "shape [3, 2]; the model takes shape [2, 2]" in result[4]["error"]


@pytest.mark.parametrize("servable, method, version, expected", [
    ("nope", "add_common", 0, "servable 'nope' is not served here; servables served: add"),
    ("add", "add_nothing", 0, "servable 'add' version 2 has no method 'add_nothing'; its methods: add_common, add_cast"),
    ("add", "add_common", 7, "servable 'add' has no version 7 served; versions served: [1, 2]"),
])
def test_a_request_for_something_not_served_fails_whole_with_a_clear_error(versions_server, servable, method, version,
                                                                          expected):
    from orchestrator.serving.client import Client

    port, _ = versions_server
    result = Client("localhost", port, servable, method, version_number=version).infer(
        [{"x1": np.ones((2, 2), np.float32), "x2": np.ones((2, 2), np.float32)}])
    assert result == {"error": expected}


def test_the_newer_clients_address_form_async_calls_and_a_server_that_is_gone(versions_server):
    from orchestrator.serving.client import Client

    port, _ = versions_server
    ones = {"x1": np.ones((2, 2), np.float32), "x2": np.ones((2, 2), np.float32)}
    pending = Client(f"127.0.0.1:{port}", "add", "add_common", version_number=1).infer_async([ones, ones])
    assert [r["y"].tolist() for r in pending.result()] == [[[2.0, 2.0], [2.0, 2.0]]] * 2
    gone = Client("127.0.0.1", 1, "add", "add_common", timeout=5).infer(ones)
    # MindSpore Serving's text ("Grpc Error, " and grpc's status value), then the server called.
    assert set(gone) == {"error"} and gone["error"].startswith("Grpc Error, (14, 'unavailable'), "), gone
    assert gone["error"].endswith("(calling 127.0.0.1:1)"), gone


CLIENT_FROM_PROTO = textwrap.dedent("""
    # A client that knows only the .proto: stubs generated here with grpcio-tools, under MindSpore
    # Serving's own module path; no orchestrator code is imported.
    import shutil, sys
    from pathlib import Path
    import grpc, numpy as np
    from grpc_tools import protoc
    work = Path(sys.argv[1]); port = sys.argv[2]
    (work / "mindspore_serving" / "proto").mkdir(parents=True)
    shutil.copy(sys.argv[3], work / "mindspore_serving" / "proto" / "ms_service.proto")
    assert protoc.main(["protoc", f"-I{work}", f"--python_out={work}", f"--grpc_python_out={work}",
                        str(work / "mindspore_serving" / "proto" / "ms_service.proto")]) == 0
    sys.path.insert(0, str(work))
    assert "orchestrator" not in sys.modules
    from mindspore_serving.proto import ms_service_pb2 as pb, ms_service_pb2_grpc as pb_grpc
    stub = pb_grpc.MSServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = pb.PredictRequest()
    request.servable_spec.name = "add"; request.servable_spec.method_name = "add_cast"
    request.servable_spec.version_number = 1
    for value in (1, 5):
        instance = request.instances.add()
        for key in ("x1", "x2"):
            t = instance.items[key]; t.dtype = pb.MS_INT32; t.shape.dims.extend([2, 2])
            t.data = np.full((2, 2), value, np.int32).tobytes()
    reply = stub.Predict(request, timeout=30)
    assert not reply.error_msg, reply.error_msg
    assert reply.servable_spec.name == "add" and reply.servable_spec.version_number == 1
    for instance, value in zip(reply.instances, (1, 5)):
        y = instance.items["y"]
        assert y.dtype == pb.MS_FLOAT32 and list(y.shape.dims) == [2, 2]
        assert (np.frombuffer(y.data, np.float32) == 2 * value).all()
    request.servable_spec.version_number = 0
    request.instances[1].items["x1"].shape.dims[:] = [4]    # 4 int32 values, not 2x2
    reply = stub.Predict(request, timeout=30)
    assert [e.error_code for e in reply.error_msg] == [0, 3], reply.error_msg  # 3: a bad request (RequestError)
    assert b"shape [4]" in reply.error_msg[1].error_msg
    print("proto client ok")
""")


def test_a_client_generated_from_the_proto_alone_talks_to_the_server(versions_server, tmp_path):
    port, _ = versions_server
    script = tmp_path / "proto_client.py"
    script.write_text(CLIENT_FROM_PROTO)
    proto = ROOT / "orchestrator" / "serving" / "_proto" / "ms_service.proto"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "gen"), str(port), str(proto)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "proto client ok" in result.stdout


def test_sigterm_stops_the_server_cleanly_with_its_workers(server):
    servers, _, port = server
    pid = servers.pid("master_with_worker")
    assert client(port).infer({"x1": np.ones((2, 2), np.float32), "x2": np.ones((2, 2), np.float32)})[0]["y"].shape == (2, 2)
    exit_ = servers.signal("master_with_worker", signal.SIGTERM)
    assert exit_.exitcode == 0 and exit_.signal is None, servers.log("master_with_worker")
    assert "Serving stopped" in servers.log("master_with_worker")
    assert children_of(pid) == []
    assert "Traceback" not in servers.log("master_with_worker")

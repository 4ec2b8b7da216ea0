"""KServe v2 (Open Inference) on our servers, spoken by stock tritonclient (HTTP and gRPC) and by raw HTTP.

One lightweight server for the module, in a child process: the seed's ``add`` (versions 1 = x + y
and 2 = x - y, methods add_common and add_cast: models ``add.add_common`` / ``add.add_cast``), the
sample MLP (``mlp``: one method, with_batch_dim=True, request batching on), ``shout`` (BYTES in and
out) and ``slow`` (queue_size 1, a method that sleeps: a full queue on demand). References: numpy
for add, an ONNX Runtime session of the same file for the MLP (rtol 1e-5).
"""

from __future__ import annotations

import gzip
import json
import sys
import textwrap
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from _serving_helpers import Servers, example_copy, free_port, write_sub_model

pytestmark = [pytest.mark.multiprocess]

MLP_CONFIG = textwrap.dedent("""
    from orchestrator.serving import register

    register.declare_servable(servable_file="mlp.onnx", model_format="ONNX", with_batch_dim=True)

    @register.register_method(output_names=["y"])
    def predict(x):
        return register.call_servable(x)
""")
SHOUT_CONFIG = textwrap.dedent("""
    from orchestrator.serving import register

    register.declare_servable(servable_file="tensor_add.onnx", model_format="ONNX", with_batch_dim=False)

    @register.register_method(output_names=["text"])
    def shout(text):
        return register.call_postprocess(lambda t: t.upper(), text)
""")
SLOW_CONFIG = textwrap.dedent("""
    import time
    from orchestrator.serving import register

    register.declare_servable(servable_file="tensor_add.onnx", model_format="ONNX", with_batch_dim=False)

    @register.register_method(output_names=["y"])
    def slow(x1, x2):
        time.sleep(1.5)
        return register.call_servable(x1, x2)
""")
SERVER = textwrap.dedent("""
    import os, sys
    from orchestrator.serving import master, worker

    here = os.path.abspath(".")
    worker.start_servable_in_master(here, "add", version_number=1, workers_num=1)
    worker.start_servable_in_master(here, "add", version_number=2, workers_num=1)
    worker.start_servable_in_master(here, "mlp", workers_num=1, max_batch=8, batch_delay_ms=2)
    worker.start_servable_in_master(here, "shout", workers_num=1)
    worker.start_servable_in_master(here, "slow", workers_num=1, queue_size=1)
    master.start_grpc_server("127.0.0.1", int(sys.argv[1]))
    master.start_restful_server("127.0.0.1", int(sys.argv[2]), max_msg_mb_size=1)
""")
X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
ONES = np.ones((2, 2), np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from orchestrator import write_sample_model

    tmp = tmp_path_factory.mktemp("kserve")
    folder = example_copy(tmp, versions=2)
    write_sub_model(folder / "add" / "2" / "tensor_add.onnx")
    for name, config in (("mlp", MLP_CONFIG), ("shout", SHOUT_CONFIG), ("slow", SLOW_CONFIG)):
        (folder / name / "1").mkdir(parents=True)
        (folder / name / "servable_config.py").write_text(config)
    write_sample_model("mlp", folder / "mlp" / "1" / "mlp.onnx", width=16, hidden=32, layers=2)
    for name in ("shout", "slow"):
        (folder / name / "1" / "tensor_add.onnx").write_bytes((folder / "add" / "1" / "tensor_add.onnx").read_bytes())
    (folder / "serve_kserve.py").write_text(SERVER)
    servers = Servers(tmp / "logs")
    try:
        for attempt in range(3):
            grpc_port, http_port = free_port(), free_port()
            try:
                servers.start("kserve", [sys.executable, "serve_kserve.py", str(grpc_port), str(http_port)], folder,
                              ready="Serving RESTful server start success")
                break
            except AssertionError:
                # A free port can be taken by another program before the server binds it: new ports.
                if "cannot listen" not in servers.log("kserve") or attempt == 2:
                    raise
                servers.groups.pop("kserve").stop()
        yield {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}", "folder": folder}
    finally:
        servers.stop_all()


@pytest.fixture(scope="module")
def mlp_reference(server):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(server["folder"] / "mlp" / "1" / "mlp.onnx"))
    return lambda x: session.run(None, {"x": x})[0]


def http_client(server):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server["http"], network_timeout=30, connection_timeout=30)


def grpc_client(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server["grpc"])


def http_inputs(arrays: dict, binary: bool = True):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def grpc_inputs(arrays: dict):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


# -- inference with stock tritonclient ---------------------------------------------------------
def test_http_with_the_clients_defaults_binary_in_and_out(server):
    client = http_client(server)
    result = client.infer("add.add_common", http_inputs({"x1": X, "x2": ONES}), model_version="1")
    np.testing.assert_array_equal(result.as_numpy("y"), X + ONES)
    response = result.get_response()
    assert response["model_name"] == "add.add_common" and response["model_version"] == "1"
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 16  # it came back binary
    # No version: the newest (2 = x - y).
    result = client.infer("add.add_common", http_inputs({"x1": X, "x2": ONES}))
    np.testing.assert_array_equal(result.as_numpy("y"), X - ONES)
    assert result.get_response()["model_version"] == "2"


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_http_binary_and_json_each_way_on_the_batched_mlp(server, mlp_reference, binary_in, binary_out):
    import tritonclient.http as httpclient

    x = np.random.default_rng(1).standard_normal((3, 16), dtype=np.float32)
    result = http_client(server).infer("mlp", http_inputs({"x": x}, binary_in),
                                       outputs=[httpclient.InferRequestedOutput("y", binary_data=binary_out)],
                                       request_id="r-7")
    np.testing.assert_allclose(result.as_numpy("y"), mlp_reference(x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "r-7"
    assert ("data" in response["outputs"][0]) == (not binary_out)


def test_grpc_raw_contents_add_cast_and_the_batched_mlp(server, mlp_reference):
    client = grpc_client(server)
    ints = np.array([[1, 2], [3, 4]], np.int32)
    result = client.infer("add.add_cast", grpc_inputs({"x1": ints, "x2": ints}), model_version="1")
    np.testing.assert_array_equal(result.as_numpy("y"), (ints + ints).astype(np.float32))
    assert result.get_response().model_version == "1"
    x = np.random.default_rng(2).standard_normal((5, 16), dtype=np.float32)
    np.testing.assert_allclose(client.infer("mlp", grpc_inputs({"x": x})).as_numpy("y"), mlp_reference(x),
                               rtol=1e-5, atol=1e-6)


def test_concurrent_batch_1_requests_are_batched_and_answered_right(server, mlp_reference):
    rows = np.random.default_rng(3).standard_normal((16, 1, 16), dtype=np.float32)
    got = [None] * len(rows)

    def one(i):
        got[i] = grpc_client(server).infer("mlp", grpc_inputs({"x": rows[i]})).as_numpy("y")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(rows))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(got[i], mlp_reference(row), rtol=1e-5, atol=1e-6)


def test_bytes_in_and_out_both_protocols(server):
    text = np.array([b"hello"], dtype=object)
    assert http_client(server).infer("shout", http_inputs({"text": text})).as_numpy("text").tolist() == [b"HELLO"]
    assert http_client(server).infer("shout", http_inputs({"text": text}, binary=False)).as_numpy("text").tolist() == [
        b"HELLO"]
    assert grpc_client(server).infer("shout", grpc_inputs({"text": text})).as_numpy("text").tolist() == [b"HELLO"]


# -- metadata and readiness --------------------------------------------------------------------
def test_metadata_and_readiness(server):
    http, grpc_ = http_client(server), grpc_client(server)
    assert http.is_server_live() and http.is_server_ready() and grpc_.is_server_live() and grpc_.is_server_ready()
    assert http.get_server_metadata()["name"] == "orchestrator"
    assert "binary_tensor_data" in http.get_server_metadata()["extensions"]
    meta = http.get_model_metadata("add.add_common")
    assert meta == {"name": "add.add_common", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "x1", "datatype": "FP32", "shape": [2, 2]},
                               {"name": "x2", "datatype": "FP32", "shape": [2, 2]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2]}]}
    mlp = grpc_.get_model_metadata("mlp", as_json=True)
    assert mlp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "16"]}]  # int64 in JSON: strings
    assert http.get_model_metadata("mlp", model_version="1")["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 16]}]
    for name, version in (("add.add_cast", "1"), ("add.add_cast", ""), ("mlp", ""), ("mlp.predict", "1")):
        assert http.is_model_ready(name, version) and grpc_.is_model_ready(name, version)
    assert not http.is_model_ready("add")  # two methods: add.add_common and add.add_cast
    assert not http.is_model_ready("add.add_common", "3")


def test_model_config_and_repository_index_both_protocols(server):
    """Triton's model configuration and repository index, as tritonclient's get_model_config and
    get_model_repository_index read them; its statistics call gets a clear refusal on both."""
    import grpc
    from tritonclient.utils import InferenceServerException

    http, grpc_ = http_client(server), grpc_client(server)
    mlp = {"name": "mlp", "platform": "onnxruntime_onnx", "backend": "onnxruntime",
           "version_policy": {"specific": {"versions": [1]}}, "max_batch_size": 8,  # the servable's max_batch
           "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [16]}],  # without the batch dimension
           "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [16]}]}
    assert http.get_model_config("mlp") == mlp
    # Triton's own message (tritonclient's model_config.proto) reads our gRPC reply the same way.
    config = grpc_.get_model_config("mlp", as_json=True)["config"]
    assert config == mlp | {"version_policy": {"specific": {"versions": ["1"]}},  # int64 in JSON: strings
                            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["16"]}],
                            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": ["16"]}]}
    add = http.get_model_config("add.add_cast", "1")
    assert (add["max_batch_size"], add["version_policy"], add["input"][1]) == (
        0, {"specific": {"versions": [1, 2]}}, {"name": "x2", "data_type": "TYPE_FP32", "dims": [2, 2]})
    shout = grpc_.get_model_config("shout").config
    assert (shout.max_batch_size, shout.input[0].data_type, list(shout.input[0].dims)) == (0, 0, [-1])  # not known
    with pytest.raises(InferenceServerException, match="model 'nope' is not served here"):
        http.get_model_config("nope")
    with pytest.raises(InferenceServerException, match="has no version '3'") as info:
        grpc_.get_model_config("add.add_cast", "3")
    assert info.value.status() == str(grpc.StatusCode.NOT_FOUND)

    expected = [{"name": n, "version": v, "state": "READY"} for n, v in (
        ("add.add_cast", "1"), ("add.add_common", "1"), ("add.add_cast", "2"), ("add.add_common", "2"),
        ("mlp", "1"), ("shout", "1"), ("slow", "1"))]
    assert http.get_model_repository_index() == expected
    assert grpc_.get_model_repository_index(as_json=True)["models"] == expected
    assert [m["name"] for m in json.loads(request(server, "/v2/repository/index", {"ready": True})[2])] == [
        e["name"] for e in expected]

    with pytest.raises(InferenceServerException, match="the statistics extension is not supported") as info:
        grpc_.get_inference_statistics("mlp")
    assert info.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
    with pytest.raises(InferenceServerException, match="GET /metrics has its counters"):
        http.get_inference_statistics("mlp")


# -- raw requests: every error status -----------------------------------------------------------
def request(server, path: str, body=None, headers=None, method=None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(f"http://{server['http']}{path}", data=data, headers=headers or {},
                                 method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def infer_body(**inputs) -> dict:
    return {"inputs": [{"name": n, "datatype": "FP32", "shape": list(np.shape(v)), "data": np.ravel(v).tolist()}
                       for n, v in inputs.items()]}


def test_json_request_by_hand_and_binary_by_hand(server):
    status, _, body = request(server, "/v2/models/add.add_common/versions/1/infer", infer_body(x1=X, x2=ONES))
    assert status == 200 and json.loads(body)["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [2.0, 3.0, 4.0, 5.0]}]
    header = json.dumps({"inputs": [{"name": "x1", "datatype": "FP32", "shape": [2, 2],
                                     "parameters": {"binary_data_size": 16}},
                                    {"name": "x2", "datatype": "FP32", "shape": [2, 2], "data": [1, 1, 1, 1]}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = request(server, "/v2/models/add.add_common/versions/1/infer", header + X.tobytes(),
                                    {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    size = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:size])["outputs"][0]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(body[size:], np.float32).reshape(2, 2), X + ONES)
    # gzip-compressed request bodies are read too (tritonclient's request_compression_algorithm).
    status, _, body = request(server, "/v2/models/add.add_common/versions/1/infer",
                              gzip.compress(json.dumps(infer_body(x1=X, x2=ONES)).encode()), {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]


def test_live_ready_and_metadata_by_hand(server):
    assert request(server, "/v2/health/live")[0] == 200
    status, _, body = request(server, "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    assert json.loads(request(server, "/v2/models/mlp/ready")[2]) == {"name": "mlp", "ready": True}
    assert json.loads(request(server, "/v2")[2])["extensions"] == ["binary_tensor_data", "model_configuration"]


BAD = [
    ("/v2/models/add.add_common/infer", b"{not json", None, 400, "not valid JSON"),
    ("/v2/models/add.add_common/infer", {"inputs": []}, None, 400, "with at least one input"),
    ("/v2/models/add.add_common/infer", infer_body(x1=X), None, 400, "takes inputs ['x1', 'x2']; the request lacks ['x2']"),
    ("/v2/models/add.add_common/infer", infer_body(x1=X, x2=ONES, x3=X), None, 400, "has unknown ['x3']"),
    ("/v2/models/add.add_common/infer",
     {"inputs": [{"name": "x1", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}, None, 400,
     "shape [2, 2] has 4 elements; 'data' has 3"),
    ("/v2/models/add.add_common/infer",
     {"inputs": [{"name": "x1", "datatype": "COMPLEX", "shape": [1], "data": [1]}]}, None, 400, "unknown datatype 'COMPLEX'"),
    ("/v2/models/add.add_common/versions/1/infer",
     {"inputs": [{"name": n, "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]} for n in ("x1", "x2")]},
     None, 400, "the model's input 0 (x) got dtype int32, the model takes float32"),
    ("/v2/models/add.add_common/infer",
     {"inputs": [{"name": "x1", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}]},
     {"Inference-Header-Content-Length": "99999"}, 400, "is not a length within the body"),
    ("/v2/models/mlp/infer",
     {"inputs": [{"name": "x", "datatype": "FP32", "shape": [16], "data": [0.0] * 16}]}, None, 400,
     "row 0 of the batch: servable mlp version 1: the model's input 0 (x) got shape []; the model takes shape [16] per instance"),
    ("/v2/models/add.add_common/infer", infer_body(x1=X, x2=ONES) | {"outputs": [{"name": "z"}]}, None, 400,
     "has outputs ['y']; the request asks for ['z']"),
    ("/v2/models/nope/infer", infer_body(x1=X), None, 404, "model 'nope' is not served here; models: add.add_cast, "),
    ("/v2/models/add.add_common/versions/9/infer", infer_body(x1=X, x2=ONES), None, 404,
     "model 'add.add_common' has no version '9'; versions: 1, 2"),
    ("/v2/models/add.nope", None, None, 404, "model 'add.nope' is not served here"),
    ("/v2/models/add.add_common/versions/x/ready", None, None, 404, "has no version 'x'"),
    ("/v2/nothing", None, None, 404, "is not a KServe v2 endpoint"),
    # JSON values numpy would cast quietly (1.5 to 1, 2 to True, "3" to 3.0) are refused, like out-of-range ones.
    ("/v2/models/add.add_cast/infer", {"inputs": [{"name": "x1", "datatype": "INT32", "shape": [2, 2],
                                                   "data": [1, 2, 3.5, 4]}]}, None, 400,
     "input 'x1': INT32 data in JSON must be integers; element 2 is 3.5"),
    ("/v2/models/add.add_cast/infer", {"inputs": [{"name": "x1", "datatype": "BOOL", "shape": [2],
                                                   "data": [True, 2]}]}, None, 400,
     "input 'x1': BOOL data in JSON must be true or false; element 1 is 2"),
    ("/v2/models/add.add_cast/infer", {"inputs": [{"name": "x2", "datatype": "UINT8", "shape": [2, 1],
                                                   "data": [[7], [-1]]}]}, None, 400,
     "input 'x2': UINT8 data must be integers in [0, 255]; element 1 is -1"),
    ("/v2/models/add.add_common/infer", {"inputs": [{"name": "x1", "datatype": "FP32", "shape": [2],
                                                     "data": [1, "2"]}]}, None, 400,
     "input 'x1': FP32 data in JSON must be numbers; element 1 is \"2\""),
    ("/v2/models/stats", None, None, 501, "the statistics extension is not supported by this server; the HTTP "
                                          "server's GET /metrics has its counters"),
    ("/v2/models/mlp/config", b"{}", None, 405, "only GET is served"),
    ("/v2/repository/index", b"[1]", None, 400, 'must be a JSON object {"ready": true|false}'),
    # What the protocol types, typed: no guessing that "yes" is true or that a bad timeout means none.
    ("/v2/models/add.add_common/infer", infer_body(x1=X, x2=ONES) | {"parameters": {"binary_data_output": "yes"}},
     None, 400, "parameters: binary_data_output must be true or false, got 'yes'"),
    ("/v2/models/add.add_common/infer", infer_body(x1=X, x2=ONES) | {"parameters": {"timeout": "soon"}},
     None, 400, "parameters.timeout must be a whole number of microseconds, 1 to 10**13, got 'soon'"),
    ("/v2/models/add.add_common/infer", infer_body(x1=X, x2=ONES) | {"id": 123}, None, 400,
     "'id' must be a string (KServe v2), got 123"),
    ("/v2/models/add.add_common/infer", infer_body(x1=X, x2=ONES) | {"outputs": [{"name": "y"}, {"name": "y"}]},
     None, 400, "'outputs' names an output twice: ['y', 'y']"),
    ("/v2/models/add.add_common/infer",
     {"inputs": [{"name": "x1", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4],
                  "parameters": {"binary_data_size": 0}}]}, None, 400,
     "input 'x1' has both 'data' and parameters.binary_data_size; give one"),
    # A method's own exception: which method, which servable, and what it was given.
    ("/v2/models/add.add_cast/versions/1/infer",
     {"inputs": [{"name": "x1", "datatype": "BYTES", "shape": [1], "data": ["a"]},
                 {"name": "x2", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]}, None, 500,
     "method add_cast of servable add version 1 raised AttributeError: "),
    # Nested past the JSON decoder's recursion limit: a 400 like any other bad JSON, not a plain-text 500.
    ("/v2/models/add.add_common/infer", b'{"inputs": [{"name": "x1", "datatype": "FP32", "shape": [1], "data": '
                                        + b"[" * 100000 + b"]" * 100000 + b"}]}", None, 400,
     "the inference request is not valid JSON: maximum recursion depth exceeded"),
]


@pytest.mark.parametrize("path, body, headers, status, text", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_every_bad_request_gets_its_status_and_an_error_object(server, path, body, headers, status, text):
    got, _, reply = request(server, path, body, headers)
    assert got == status, reply
    reply = json.loads(reply)
    assert list(reply) == ["error"] and text in reply["error"], reply


def test_a_body_over_the_size_limit_is_413_before_it_is_read(server):
    import socket

    host, port = server["http"].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # Only the headers: the answer must come without the server reading (or waiting for) the 4 MB.
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (4 << 20))
        reply = b""
        while b"}" not in reply.partition(b"\r\n\r\n")[2] and (chunk := sock.recv(65536)):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload) == {"error": "the body has 4194304 bytes; the limit is 1048576"}


def test_method_not_allowed_and_a_full_queue_503(server):
    got, _, reply = request(server, "/v2/models/mlp/infer", method="GET")
    assert got == 405 and "only POST is served" in json.loads(reply)["error"]
    # Two requests at once to a servable with a queue of one whose method takes 1.5 s: one runs, the other
    # is refused at once (whichever came second).
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(
        request(server, "/v2/models/slow/infer", infer_body(x1=X, x2=ONES)))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(status for status, _, _ in replies) == [200, 503], replies
    refused = next(json.loads(body) for status, _, body in replies if status == 503)
    assert "its queue is full (1 instances waiting or running)" in refused["error"]


def test_grpc_errors_carry_their_codes(server):
    import grpc
    from tritonclient.utils import InferenceServerException

    client = grpc_client(server)
    with pytest.raises(InferenceServerException, match="model 'nope' is not served here") as info:
        client.infer("nope", grpc_inputs({"x1": X}))
    assert info.value.status() == str(grpc.StatusCode.NOT_FOUND)
    with pytest.raises(InferenceServerException, match=r"the request lacks \['x2'\]") as info:
        client.infer("add.add_common", grpc_inputs({"x1": X}))
    assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InferenceServerException, match="has no version '7'"):
        client.get_model_metadata("mlp", "7")


# -- metrics -----------------------------------------------------------------------------------
def metrics(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = request(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_requests_failures_batches_and_workers(server):
    before = metrics(server)
    key = ("orchestrator_serving_requests_total", (("model", "mlp"), ("version", "1")))
    failed = ("orchestrator_serving_request_failures_total",
              (("model", "add.add_common"), ("reason", "bad_request"), ("version", "1")))
    client = grpc_client(server)
    x = np.zeros((4, 16), np.float32)
    for _ in range(3):
        client.infer("mlp", grpc_inputs({"x": x}))
    with pytest.raises(Exception):
        client.infer("add.add_common", grpc_inputs({"x1": X.astype(np.int32), "x2": X.astype(np.int32)}), "1")
    after = metrics(server)
    assert after[key] - before.get(key, 0) == 3
    assert after[failed] - before.get(failed, 0) == 1
    batches = ("orchestrator_serving_batch_size_sum", (("servable", "mlp"), ("version", "1")))
    assert after[batches] - before.get(batches, 0) == 12  # 3 requests of 4 rows
    for name in ("queue_seconds_count", "compute_seconds_count"):
        assert after[(f"orchestrator_serving_{name}", (("servable", "mlp"), ("version", "1")))] >= 3
    for servable, version in (("add", "1"), ("add", "2"), ("mlp", "1")):
        assert after[("orchestrator_serving_workers_alive", (("servable", servable), ("version", version)))] == 1
    assert after[("orchestrator_serving_model_ready", (("model", "add.add_cast"), ("version", "2")))] == 1
    # Requests for a model or version not served count as unknown on every front, and make no label of their
    # own (a client could make them up without end).
    unknown = ("orchestrator_serving_unknown_model_requests_total", ())
    for path in ("/v2/models/nope/infer", "/v2/models/mlp/versions/77/infer"):
        assert request(server, path, infer_body(x=np.zeros((1, 16), np.float32)))[0] == 404
    with pytest.raises(Exception):
        client.infer("nope", grpc_inputs({"x": x}))
    from orchestrator.serving.client import Client  # MindSpore Serving's protocol, on the same gRPC port

    host, port = server["grpc"].split(":")
    assert "error" in Client(host, int(port), "mlp", "predict", version_number=77).infer({"x": x[0]})
    latest = metrics(server)
    assert latest[unknown] - after.get(unknown, 0) == 4
    assert not [k for k in latest if ("version", "77") in k[1]]


def test_tritonclient_grpc_and_our_server_modules_load_in_one_process():
    import tritonclient.grpc  # noqa: F401  (puts package "inference" into protobuf's default pool)
    from orchestrator.serving import _kserve_grpc  # noqa: F401  (ours are in a pool of their own)
    from orchestrator.serving._proto import grpc_predict_v2_pb2 as ours
    from tritonclient.grpc import service_pb2 as theirs

    request = ours.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 4])
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    assert theirs.ModelInferRequest.FromString(request.SerializeToString()).inputs[0].name == "x"


def test_grpc_typed_contents_in_from_tritons_own_messages(server):
    """Inputs as typed ``contents`` (not raw), sent with the messages tritonclient ships (Triton's .proto)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="add.add_cast", model_version="1", id="typed")
        for name, values in (("x1", [1, 2, 3, 4]), ("x2", [10, 20, 30, 40])):
            tensor = request.inputs.add(name=name, datatype="INT64", shape=[2, 2])
            tensor.contents.int64_contents.extend(values)
        reply = stub.ModelInfer(request, timeout=30)
        assert (reply.id, reply.model_version, reply.outputs[0].datatype, list(reply.outputs[0].shape)) == (
            "typed", "1", "FP32", [2, 2])
        np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), [11, 22, 33, 44])
        request.inputs[0].contents.int64_contents.pop()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shape [2, 2] has 4 elements; contents.int64_contents has 3" in info.value.details()

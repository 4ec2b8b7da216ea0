"""MindSpore Serving's RESTful API: requests as its documentation writes them, and every bad request.

One server for the module (the seed's ``add`` in versions 1 = x + y and 2 = x - y, two methods
added to its config for bytes in and out), in a child process; requests with the standard
library's HTTP client. After the bad requests the server still serves.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from _serving_helpers import Servers, example_copy, serve_two_versions, write_sub_model

pytestmark = [pytest.mark.multiprocess]

BYTES_METHODS = '''

@register.register_method(output_names=["y"])
def add_bytes(data, x2):
    """x1 arrives as raw float32 bytes (REST: {"b64": ...})."""
    x1 = register.call_preprocess(lambda raw: np.frombuffer(raw, np.float32).reshape(2, 2), data)
    return register.call_servable(x1, x2)


@register.register_method(output_names=["raw"])
def add_to_bytes(x1, x2):
    y = register.call_servable(x1, x2)
    return register.call_postprocess(lambda v: v.tobytes(), y)


@register.register_method(output_names=["joined", "y"])
def join_words(words, x1, x2):
    """A JSON list of str arrives as one string tensor: a list of str in Python."""
    y = register.call_servable(x1, x2)
    return register.call_postprocess(lambda w, v: ("+".join(w) if isinstance(w, list) else "one:" + w, v), words, y)


@register.register_method(output_names=["total", "first"])
def add_total(x1, x2):
    """Outputs of shape [] and [1]: what MindSpore Serving's two client versions return differently."""
    y = register.call_servable(x1, x2)
    return register.call_postprocess(lambda v: (np.float32(v.sum()), v.reshape(-1)[:1]), y)
'''


@pytest.fixture(scope="module")
def ports(tmp_path_factory):
    """(gRPC port, REST base URL) of the module's server."""
    tmp = tmp_path_factory.mktemp("rest")
    folder = example_copy(tmp, versions=2)
    write_sub_model(folder / "add" / "2" / "tensor_add.onnx")
    config = folder / "add" / "servable_config.py"
    config.write_text(config.read_text() + BYTES_METHODS)
    servers = Servers(tmp / "logs")
    try:
        grpc_port, port = serve_two_versions(servers, folder)
        yield grpc_port, f"http://127.0.0.1:{port}"
    finally:
        servers.stop_all()


@pytest.fixture(scope="module")
def rest(ports):
    return ports[1]


def post(base: str, path: str, body, *, method: str = "POST") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


X1 = [[1.0, 2.0], [3.0, 4.0]]
ONES = [[1.0, 1.0], [1.0, 1.0]]


def test_the_documented_request_gives_the_documented_reply(rest):
    status, reply = post(rest, "/model/add/version/1:add_common", {"instances": [{"x1": X1, "x2": ONES}]})
    assert (status, reply) == (200, {"instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]})


def test_the_newest_version_serves_unless_one_is_named_and_one_instance_may_be_an_object(rest):
    assert post(rest, "/model/add:add_common", {"instances": {"x1": X1, "x2": ONES}})[1] == {
        "instances": [{"y": [[0.0, 1.0], [2.0, 3.0]]}]}
    assert post(rest, "/model/add/version/2:add_common", {"instances": {"x1": X1, "x2": ONES}})[1] == {
        "instances": [{"y": [[0.0, 1.0], [2.0, 3.0]]}]}


def test_batched_instances_and_json_integers_as_int32(rest):
    instances = [{"x1": [[i, i], [i, i]], "x2": [[1, 2], [3, 4]]} for i in range(4)]
    status, reply = post(rest, "/model/add/version/1:add_cast", {"instances": instances})
    assert status == 200
    assert reply == {"instances": [{"y": [[i + 1.0, i + 2.0], [i + 3.0, i + 4.0]]} for i in range(4)]}


def test_typed_binary_objects_and_bytes_in_and_out(rest):
    x1 = np.array(X1, np.float32)
    typed = {"b64": b64(x1), "type": "fp32", "shape": [2, 2]}
    assert post(rest, "/model/add/version/1:add_common", {"instances": [{"x1": typed, "x2": ONES}]})[1] == {
        "instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]}
    int16 = {"b64": b64(np.array([[1, 2], [3, 4]], np.int16)), "type": "int16", "shape": [2, 2]}
    assert post(rest, "/model/add/version/1:add_cast", {"instances": [{"x1": int16, "x2": int16}]})[1] == {
        "instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
    assert post(rest, "/model/add/version/1:add_bytes", {"instances": [{"data": {"b64": b64(x1)}, "x2": ONES}]})[1] == {
        "instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]}
    reply = post(rest, "/model/add/version/1:add_to_bytes", {"instances": [{"x1": X1, "x2": ONES}]})[1]
    raw = base64.b64decode(reply["instances"][0]["raw"]["b64"])
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(2, 2), x1 + 1)


def test_a_bad_instance_fails_alone(rest):
    status, reply = post(rest, "/model/add/version/1:add_common",
                         {"instances": [{"x1": X1, "x2": ONES}, {"x1": X1}, {"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]},
                                        {"x1": [[1.0, 2.0, 3.0]], "x2": [[1.0, 2.0, 3.0]]}]})
    assert status == 200
    first, missing, dtype, shape = reply["instances"]
    assert first == {"y": [[2.0, 3.0], [4.0, 5.0]]}
    assert "lacks ['x2']" in missing["error_msg"]
    assert "dtype int32, the model takes float32" in dtype["error_msg"]
    assert "shape [1, 3]; the model takes shape [2, 2]" in shape["error_msg"]


BAD = [
    ("/model/add:add_common", b"{not json", 400, "the body is not valid JSON"),
    ("/model/add:add_common", [1, 2], 400, 'the body must be a JSON object {"instances": [...]}'),
    ("/model/add:add_common", {"inputs": []}, 400, "it has keys ['inputs']"),
    ("/model/add:add_common", {"instances": []}, 400, '"instances" must be a non-empty list'),
    ("/model/add:add_common", {"instances": [3]}, 400, "instance 0 must be a non-empty object"),
    ("/model/nope:add_common", {"instances": [{"x1": X1, "x2": ONES}]}, 404, "servable 'nope' is not served here"),
    ("/model/add:nope", {"instances": [{"x1": X1, "x2": ONES}]}, 404, "version 2 has no method 'nope'"),
    ("/model/add/version/9:add_common", {"instances": [{"x1": X1, "x2": ONES}]}, 404,
     "has no version 9 served; versions served: [1, 2]"),
    ("/model/add", {"instances": [{"x1": X1}]}, 404, "is not /model/NAME[/version/N]:METHOD"),
    ("/model/add/version/x:add_common", {"instances": [{"x1": X1}]}, 404, "is not /model/NAME[/version/N]:METHOD"),
    ("/model/add:add_common", {"instances": [{"x1": [[1.0], [1.0, 2.0]], "x2": ONES}]}, 400, "ragged"),
    ("/model/add:add_common", {"instances": [{"x1": {"b64": "%%%"}, "x2": ONES}]}, 400, "not valid base64"),
    ("/model/add:add_common", {"instances": [{"x1": {"b64": "AAAA", "kind": "fp32"}, "x2": ONES}]}, 400,
     "unknown keys ['kind']"),
    ("/model/add:add_common", {"instances": [{"x1": {"b64": "AAAA", "type": "fp32", "shape": [2, 2]}, "x2": ONES}]}, 400,
     "shape [2, 2] of fp32 needs 16 bytes; 'b64' decodes to 3"),
    ("/model/add:add_common", {"instances": [{"x1": {"b64": "AAAA", "type": "complex"}, "x2": ONES}]}, 400,
     "unknown 'type' 'complex'"),
    ("/model/add:add_common", {"instances": [{"x1": None, "x2": ONES}]}, 400, "a NoneType is not a value"),
    ("/model/add:add_common", {"instances": [{"x1": [[2**40]], "x2": ONES}]}, 400, "does not fit in int32"),
]


@pytest.mark.parametrize("path, body, status, text", BAD, ids=[b[3][:40] for b in BAD])
def test_a_bad_request_gets_a_clear_error(rest, path, body, status, text):
    got_status, reply = post(rest, path, body)
    assert got_status == status, reply
    assert set(reply) == {"error_msg"} and text in reply["error_msg"], reply


def test_a_body_over_the_size_limit_is_refused_before_it_is_read(rest):
    import socket

    host, port = rest.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        # Only the headers: the answer must come without the server reading (or waiting for) the 4 MB.
        sock.sendall(b"POST /model/add:add_common HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (4 << 20))
        reply = b""
        while b"}" not in reply.partition(b"\r\n\r\n")[2] and (chunk := sock.recv(65536)):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert "the limit is 1048576" in json.loads(payload)["error_msg"]


def test_only_post_is_served_and_the_server_keeps_serving_after_bad_requests(rest):
    status, reply = post(rest, "/model/add:add_common", None, method="GET")
    assert status == 405 and "only POST" in reply["error_msg"]
    status, reply = post(rest, "/model/add/version/1:add_common", {"instances": [{"x1": X1, "x2": ONES}]})
    assert status == 200 and reply == {"instances": [{"y": [[2.0, 3.0], [4.0, 5.0]]}]}


def test_the_grpc_client_takes_both_of_mindspore_servings_forms_and_returns_outputs_as_each_did(ports):
    from orchestrator.serving.client import Client

    grpc_port, rest = ports
    x = {"x1": np.array(X1, np.float32), "x2": np.array(ONES, np.float32)}
    # 1.2's form, positional or by keyword: shapes [] and [1] come back as numpy scalars, as its client gave them.
    for client in (Client("localhost", grpc_port, "add", "add_total", version_number=1),
                   Client("localhost", port=grpc_port, servable_name="add", method_name="add_total", version_number=1),
                   Client(ip="localhost", port=grpc_port, servable_name="add", method_name="add_total",
                          version_number=1, max_msg_mb_size=16)):
        [reply] = client.infer(x)
        assert isinstance(reply["total"], np.float32) and reply["total"] == 14.0
        assert isinstance(reply["first"], np.float32) and reply["first"] == 2.0
    # 1.3's form: arrays of the shapes sent, as its client reshapes them.
    for client in (Client(f"127.0.0.1:{grpc_port}", "add", "add_total", 1),
                   Client(address=f"127.0.0.1:{grpc_port}", servable_name="add", method_name="add_total",
                          version_number=1, ssl_config=None)):
        [reply] = client.infer(x)
        assert isinstance(reply["total"], np.ndarray) and reply["total"].shape == () and reply["total"] == 14.0
        assert isinstance(reply["first"], np.ndarray) and reply["first"].tolist() == [2.0]
    # REST gives both as JSON: the scalar a number, the [1] a list; in the method's output_names order, every
    # time (a protobuf map keeps none; "total" sorts after "first").
    for _ in range(6):
        reply = post(rest, "/model/add/version/1:add_total", {"instances": [{"x1": X1, "x2": ONES}] * 2})[1]
        assert reply == {"instances": [{"total": 14.0, "first": [2.0]}] * 2}
        assert [list(instance) for instance in reply["instances"]] == [["total", "first"]] * 2


@pytest.mark.parametrize("args, kwargs, error, text", [
    (("localhost", "5500", "add", "add_common"), {}, RuntimeError, "Parameter 'port' should be an int, but actually '5500'"),
    (("localhost:5500", "add"), {}, TypeError, "fit neither of MindSpore Serving's forms (missing a required argument: 'method_name')"),
    (("localhost", 5500, "add", "add_common"), {"ssl_config": None}, TypeError, "got an unexpected keyword argument 'ssl_config'"),
    (("localhost:5500", "add", "add_common"), {"max_msg_mb_size": 8}, TypeError, "unexpected keyword argument 'max_msg_mb_size'"),
    (("localhost:port", "add", "add_common"), {}, RuntimeError, "Parameter 'address' should be 'host:port', but actually 'localhost:port'"),
    (("localhost:5500", "add", "add_common"), {"ssl_config": object()}, RuntimeError, "servers speak plain gRPC (no TLS); pass ssl_config=None"),
    (("localhost", 70000, "add", "add_common"), {}, RuntimeError, "Parameter 'port' should be in range [0, 65535], but actually 70000"),
])
def test_client_arguments_that_fit_neither_form_name_what_is_wrong(args, kwargs, error, text):
    from orchestrator.serving.client import Client

    with pytest.raises(error) as info:
        Client(*args, **kwargs)
    assert text in str(info.value), str(info.value)


def test_a_json_list_of_strings_is_one_string_tensor(rest):
    both = {"x1": X1, "x2": ONES}
    assert post(rest, "/model/add/version/1:join_words", {"instances": [{"words": ["ab", "c", "déf"], **both},
                                                                        {"words": "solo", **both}]})[1] == {
        "instances": [{"joined": "ab+c+déf", "y": [[2.0, 3.0], [4.0, 5.0]]},
                      {"joined": "one:solo", "y": [[2.0, 3.0], [4.0, 5.0]]}]}
    status, reply = post(rest, "/model/add/version/1:join_words", {"instances": [{"words": [["a"], ["b"]], **both}]})
    assert status == 400 and "values must be numbers, booleans, a str, a flat list of str, or" in reply["error_msg"], reply


def test_json_nested_past_the_decoders_limit_is_a_400(rest):
    status, reply = post(rest, "/model/add:add_common", b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    assert status == 400 and "the body is not valid JSON: maximum recursion depth exceeded" in reply["error_msg"], reply

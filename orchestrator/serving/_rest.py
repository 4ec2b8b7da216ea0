"""MindSpore Serving's RESTful API, on Starlette (served by uvicorn in a thread).

    POST /model/NAME[/version/N]:METHOD
    {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]],                     JSON numbers: int -> int32, float -> float32
                    "image": {"b64": "iVBOR..."},                        bytes (type "bytes", the default)
                    "box": {"b64": "AQACAAIAAwADAAQA", "type": "int16", "shape": [3, 2]}}]}   a typed binary array

A single instance may be sent as an object instead of a list. The reply is
``{"instances": [{"y": [[...]]}, {"error_msg": "..."}]}`` (one object per
instance, failed ones carrying their error) or ``{"error_msg": "..."}`` when
the request fails as a whole. Outputs: arrays as nested lists, bytes as
``{"b64": ...}``. Every request becomes a ``PredictRequest`` and goes the
gRPC requests' way through the dispatcher.

Status codes: 200 for a reply (even one whose instances failed); 400 for a
body that cannot be read (bad JSON, wrong shape of the body); 404 for an
unknown URL, servable, version or method; 413 for a body over the size limit; 405 for a
method other than POST.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ._dispatch import NOT_SERVED
from ._errors import RequestError
from ._http_body import BodyTooLarge, read_body
from ._proto import ms_service_pb2 as pb
from ._tensors import TYPE_NAMES, from_tensor, to_tensor

_URL = re.compile(r"^(?P<name>[^/:]+)(?:/version/(?P<version>\d+))?:(?P<method>[^/:]+)$")
B64_KEYS = {"b64", "type", "shape"}


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(message: str, status: int) -> JSONResponse:
    # A refused body is not read: the connection cannot carry another request after it.
    headers = {"Connection": "close"} if status == 413 else None
    return JSONResponse({"error_msg": message}, status_code=status, headers=headers)


def parse_url(path: str) -> tuple[str, int, str]:
    match = _URL.match(path)
    if not match:
        raise _BadRequest(f"URL /model/{path} is not /model/NAME[/version/N]:METHOD", 404)
    return match["name"], int(match["version"] or 0), match["method"]


def _array_from_json(value, where: str) -> np.ndarray | list[str]:
    try:
        array = np.array(value)
    except ValueError:
        array = None
    if array is None or array.dtype == object:
        raise RequestError(f"{where}: the nested lists are ragged or mix types; give a rectangular array of numbers")
    if array.size == 0 and array.ndim >= 1:
        raise RequestError(f"{where}: an empty list carries no value")
    if array.dtype.kind == "b":
        return array.astype(np.bool_)
    if array.dtype.kind in "iu":
        if array.size and (array.min() < -2**31 or array.max() >= 2**31):
            raise RequestError(f"{where}: an integer does not fit in int32 (JSON integers are int32; send a typed "
                               f"binary object for int64)")
        return array.astype(np.int32)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind == "U" and array.ndim == 1:
        return [str(v) for v in value]  # a list of str: one string tensor of that length, as the gRPC client sends it
    raise RequestError(f"{where}: values must be numbers, booleans, a str, a flat list of str, or a {{'b64': ...}} object; "
                       f"got {value!r:.80}")


def _value_from_json(value, where: str):
    """An instance's value: a str, bytes, or a numpy array."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        extra = set(value) - B64_KEYS
        if "b64" not in value or extra:
            raise RequestError(f"{where}: an object value must be {{'b64': ..., 'type': ..., 'shape': [...]}}"
                               + (f"; unknown keys {sorted(extra)}" if extra else "; 'b64' is missing"))
        if not isinstance(value["b64"], str):
            raise RequestError(f"{where}: 'b64' must be a base64 string")
        try:
            raw = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: 'b64' is not valid base64") from None
        kind = value.get("type", "bytes")
        if kind in ("bytes", "str"):
            if "shape" in value and value["shape"] not in ([1], []):
                raise RequestError(f"{where}: a {kind} value has shape [1]; got shape {value['shape']}")
            return raw if kind == "bytes" else raw.decode("utf-8", "replace")
        dtype = TYPE_NAMES.get(kind) if isinstance(kind, str) else None
        if dtype is None:
            raise RequestError(f"{where}: unknown 'type' {kind!r}; expected bytes, str or one of {sorted(set(TYPE_NAMES))}")
        shape = value.get("shape", [1])
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise RequestError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
        need = math.prod(shape) * np.dtype(dtype).itemsize
        if len(raw) != need:
            raise RequestError(f"{where}: shape {shape} of {kind} needs {need} bytes; 'b64' decodes to {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if isinstance(value, (list, int, float, bool)):
        return _array_from_json(value, where)
    raise RequestError(f"{where}: a {type(value).__name__} is not a value; give numbers, a str or a {{'b64': ...}} object")


def request_from_json(body, name: str, version: int, method: str) -> pb.PredictRequest:
    """The ``PredictRequest`` of a REST body; _BadRequest when the body's layout is wrong."""
    if not isinstance(body, dict) or set(body) != {"instances"}:
        raise _BadRequest("the body must be a JSON object {\"instances\": [...]}"
                          + (f"; it has keys {sorted(body)}" if isinstance(body, dict) else ""))
    instances = body["instances"]
    if isinstance(instances, dict):
        instances = [instances]
    if not isinstance(instances, list) or not instances:
        raise _BadRequest("\"instances\" must be a non-empty list of objects {input name: value} (or one object)")
    request = pb.PredictRequest()
    request.servable_spec.name = name
    request.servable_spec.version_number = version
    request.servable_spec.method_name = method
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or not instance:
            raise _BadRequest(f"instance {i} must be a non-empty object {{input name: value}}, got {instance!r:.80}")
        item = request.instances.add()
        for key, value in instance.items():
            where = f"instance {i} input {key!r}"
            try:
                to_tensor(_value_from_json(value, where), item.items[key], name=where)
            except RequestError as exc:
                raise _BadRequest(str(exc)) from None
    return request


def _json_value(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.dtype == np.float16:
            value = value.astype(np.float32)
        return value.tolist()
    return value


def reply_to_json(reply: pb.PredictReply, order: tuple[str, ...] = ()) -> dict:
    """The REST body of ``reply``; each instance's outputs in ``order`` (the method's output_names: a protobuf
    map keeps no order), then any others."""
    errors = list(reply.error_msg)
    if len(errors) == 1 and len(reply.instances) <= 1:
        return {"error_msg": bytes(errors[0].error_msg).decode("utf-8", "replace")}
    rank = {name: i for i, name in enumerate(order)}
    out = []
    for i, instance in enumerate(reply.instances):
        if errors and errors[i].error_code != 0:
            out.append({"error_msg": bytes(errors[i].error_msg).decode("utf-8", "replace")})
        else:
            names = sorted(instance.items, key=lambda k: (rank.get(k, len(rank)), k))
            out.append({k: _json_value(from_tensor(instance.items[k], k)) for k in names})
    return {"instances": out}


def _output_names(dispatcher, reply: pb.PredictReply) -> tuple[str, ...]:
    """The output_names of the method and servable version that answered ``reply`` (its spec says which ran)."""
    spec = reply.servable_spec
    signature = (dispatcher.known().get(spec.name) or {}).get(spec.version_number)
    return signature.methods.get(spec.method_name, ((), ()))[1] if signature is not None else ()


def routes(dispatcher, max_body_bytes: int, timeout: float | None = None) -> list[Route]:
    async def predict(request: Request):
        try:
            name, version, method = parse_url(request.path_params["path"])
            try:
                raw = await read_body(request, max_body_bytes)
            except BodyTooLarge as exc:
                raise _BadRequest(str(exc), 413) from None
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
                raise _BadRequest(f"the body is not valid JSON: {exc}") from None
            pb_request = request_from_json(body, name, version, method)
        except _BadRequest as exc:
            return _error(str(exc), exc.status)
        except ClientDisconnect:
            return _error("the client went away", 400)
        reply = await run_in_threadpool(dispatcher.predict, pb_request, timeout)
        not_served = len(reply.error_msg) == 1 and reply.error_msg[0].error_code == NOT_SERVED
        return JSONResponse(reply_to_json(reply, _output_names(dispatcher, reply)), status_code=404 if not_served else 200)

    return [Route("/model/{path:path}", predict, methods=["POST"])]

"""KServe v2's HTTP/REST protocol over the dispatcher, with the binary tensor data extension: what tritonclient.http calls.

    GET  /v2/health/live                                      200 {"live": true}
    GET  /v2/health/ready                                     200 {"ready": true}; 503 while a servable has no worker
    GET  /v2                                                  server metadata
    GET  /v2/models/NAME[/versions/V]                         model metadata
    GET  /v2/models/NAME[/versions/V]/ready                   200; 503 while no worker serves it; 404 unknown
    POST /v2/models/NAME[/versions/V]/infer                   inference
    GET  /v2/models/NAME[/versions/V]/config                  Triton's model configuration extension
    POST /v2/repository/index                                 Triton's repository index ({"ready": true}: ready only)
    GET  /v2/models[/NAME[/versions/V]]/stats                 501: the statistics extension is not served

An inference body is JSON ``{"inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...],
"parameters": {...}}``, or, with the binary tensor data extension, that JSON (its length in the
``Inference-Header-Content-Length`` header) followed by the raw tensors of the inputs whose
``parameters`` give ``binary_data_size``, in the order of ``inputs``. An output goes back as raw
bytes after the JSON when its request asks ``{"parameters": {"binary_data": true}}`` (or, for
outputs the request does not list, when the request's ``parameters`` ask ``binary_data_output``:
tritonclient's default); otherwise as JSON ``data``. Raw tensors are row-major, little-endian;
BYTES elements each a 4-byte little-endian length and the bytes.

Errors: ``{"error": "..."}`` with 400 (a request that does not fit), 404 (unknown model, version or
URL), 413 (a body over the size limit), 501 (an extension not served), 503 (a full queue, no worker),
504 (timeout), 500.
"""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._errors import RequestError, ServingError
from ._http_body import BodyTooLarge, decompress, read_body
from ._kserve_grpc import SERVER_NAME, SERVER_VERSION
from ._kserve_models import (NO_STATISTICS, KServeModels, array_from_list, array_from_raw, datatype_of, list_from_array,
                             raw_from_array, status_of)

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


def error(message: str, status: int) -> JSONResponse:
    # A refused body is not read: the connection cannot carry another request after it.
    headers = {"Connection": "close"} if status == 413 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def parse_infer(body: bytes, header_length: str | None) -> tuple[dict, list, list | None, bool]:
    """(the JSON header, [(input name, array)], requested output names or None, {name: binary?} rule)."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(f"{HEADER_LENGTH} {header_length!r} is not a length within the body's {len(body)} bytes")
        body, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
    try:
        header = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise RequestError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise RequestError('the inference request must be a JSON object {"inputs": [{"name", "datatype", "shape", '
                           '"data"}, ...]} with at least one input')
    inputs, offset = [], 0
    for i, tensor in enumerate(header["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError(f"input {i} must be an object with a 'name', 'datatype' and 'shape'")
        where = f"input {tensor['name']!r}"
        for key in ("datatype", "shape"):
            if key not in tensor:
                raise RequestError(f"{where} has no {key!r}")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(f"{where}: 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise RequestError(f"{where}: binary_data_size must be an integer >= 0, got {size!r}")
            if "data" in tensor:
                raise RequestError(f"{where} has both 'data' and parameters.binary_data_size; give one")
            if offset + size > len(binary):
                raise RequestError(f"{where}: binary_data_size {size} runs past the {len(binary)} bytes of binary "
                                   f"data after the JSON ({HEADER_LENGTH} {header_length})")
            array = array_from_raw(binary[offset:offset + size], tensor["datatype"], tensor["shape"], where)
            offset += size
        else:
            if "data" not in tensor:
                raise RequestError(f"{where} has neither 'data' nor parameters.binary_data_size")
            array = array_from_list(tensor["data"], tensor["datatype"], tensor["shape"], where)
        inputs.append((tensor["name"], array))
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data after the JSON belong to no input "
                           f"(the inputs' binary_data_size add up to {offset})")
    outputs = header.get("outputs")
    if outputs is not None and (not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    names = [o["name"] for o in outputs or []]
    if len(set(names)) != len(names):
        raise RequestError(f"'outputs' names an output twice: {names}")
    if "id" in header and not isinstance(header["id"], str):
        raise RequestError(f"'id' must be a string (KServe v2), got {header['id']!r}")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be an object")
    default_binary = _flag(params, "binary_data_output", "parameters")
    rule = {o["name"]: _flag(o.get("parameters") or {}, "binary_data", f"output {o['name']!r}: parameters", default_binary)
            for o in outputs or []}
    return header, inputs, [o["name"] for o in outputs] if outputs else None, rule or default_binary


def _flag(params, key: str, where: str, default: bool = False) -> bool:
    """A true/false parameter: JSON true or false only ("yes" is a mistake, not true)."""
    if not isinstance(params, dict):
        raise RequestError(f"{where} must be an object")
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def request_timeout(header: dict):
    """Triton's ``parameters.timeout`` (microseconds) in seconds, or None; a bad value is refused, not ignored."""
    micros = (header.get("parameters") or {}).get("timeout")
    if micros is None:
        return None
    if isinstance(micros, bool) or not isinstance(micros, int) or not 0 < micros <= 10**13:
        raise RequestError(f"parameters.timeout must be a whole number of microseconds, 1 to 10**13, got {micros!r}")
    return micros / 1e6


def infer_response(model_name: str, version: int, request_id, outputs, binary_rule) -> Response:
    parts, body_outputs = [], []
    for name, array in outputs:
        entry = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        binary = binary_rule.get(name, False) if isinstance(binary_rule, dict) else binary_rule
        if binary:
            raw = raw_from_array(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = list_from_array(array)
        body_outputs.append(entry)
    header = {"model_name": model_name, "model_version": str(version), "outputs": body_outputs}
    if request_id:
        header["id"] = request_id
    text = json.dumps(header, separators=(",", ":")).encode()
    if not parts:
        return Response(text, media_type="application/json")
    return Response(b"".join([text, *parts]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})


def routes(dispatcher, max_body_bytes: int, timeout: float | None = None) -> list[Route]:
    models = KServeModels(dispatcher)

    def model_of(request: Request, inference: bool = False):
        return models.resolve(request.path_params["name"], request.path_params.get("version", ""), inference=inference)

    async def live(request: Request):
        return JSONResponse({"live": True})

    async def ready(request: Request):
        ok, why = models.server_ready()
        return JSONResponse({"ready": True}) if ok else JSONResponse({"ready": False, "error": why}, 503)

    async def server_metadata(request: Request):
        return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    async def model_ready(request: Request):
        try:
            model = model_of(request)
        except ServingError as exc:
            return error(str(exc), status_of(exc))
        if models.ready(model):
            return JSONResponse({"name": model.name, "ready": True})
        return JSONResponse({"name": model.name, "ready": False,
                             "error": f"model {model.name}: no worker serves it now"}, 503)

    async def model_metadata(request: Request):
        try:
            return JSONResponse(models.metadata(model_of(request)))
        except ServingError as exc:
            return error(str(exc), status_of(exc))

    async def model_config(request: Request):
        try:
            return JSONResponse(models.config(model_of(request)))
        except ServingError as exc:
            return error(str(exc), status_of(exc))

    async def repository_index(request: Request):
        try:
            body = await read_body(request, max_body_bytes)
        except BodyTooLarge as exc:
            return error(str(exc), 413)
        try:
            options = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            return error(f"the repository index request is not valid JSON: {exc}", 400)
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            return error('the repository index request must be a JSON object {"ready": true|false} (or empty)', 400)
        return JSONResponse(models.index(options.get("ready", False)))

    async def statistics(request: Request):
        return error(NO_STATISTICS, 501)

    async def infer(request: Request):
        try:
            model = model_of(request, inference=True)
            body = decompress(await read_body(request, max_body_bytes), request.headers.get("content-encoding"),
                               max_body_bytes)
            header, inputs, wanted, rule = parse_infer(body, request.headers.get(HEADER_LENGTH))
            limit, asked = timeout, request_timeout(header)
            if asked is not None:
                limit = asked if limit is None else min(limit, asked)
            version, outputs = await run_in_threadpool(models.infer, model, inputs, limit, wanted)
            return infer_response(model.name, version, header.get("id"), outputs, rule)
        except BodyTooLarge as exc:
            return error(str(exc), 413)
        except ClientDisconnect:
            return error("the client went away", 400)
        except ServingError as exc:
            return error(str(exc), status_of(exc))

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/stats", statistics, methods=["GET"]),  # before /v2/models/{name}: not a model "stats"
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/config", model_config, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/config", model_config, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/models/{name}/stats", statistics, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/stats", statistics, methods=["GET"]),
    ]

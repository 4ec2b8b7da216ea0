"""Servables as KServe v2 models: names, metadata, readiness, tensors, and one inference through the dispatcher.

Model names. A servable ``NAME`` with one method is the model ``NAME``; with several methods each
is the model ``NAME.METHOD`` (the seed's ``add``: ``add.add_common`` and ``add.add_cast``).
``NAME.METHOD`` also names the method of a one-method servable. The model's versions are the
servable's version numbers (``"1"``, ``"2"``); no version: the newest served.

Tensors. A model's inputs are the method's inputs (its parameters), its outputs the method's
``output_names``. With ``with_batch_dim=True`` dimension 0 of every input is the batch: a request
of shape ``[B, ...]`` is B instances (joined with other requests' by the batcher), and each output
is the instances' outputs stacked back into ``[B, ...]``. With ``with_batch_dim=False`` the request's
tensors are one instance, as they are. The metadata shows, for a method with as many inputs
(outputs) as the model, the model's dtype and shape at the same position (``-1`` for a free
dimension, and for the batch); a method that takes or returns other things shows datatype ``""``
(not known) and shape ``[-1]``. A method may accept more than the model (``add_cast`` casts any
numbers to float32).

Errors are typed, and the fronts turn the type into a status (``status_of``, ``grpc_code_of``):
unknown model or version 404 / NOT_FOUND, a request that does not fit 400 / INVALID_ARGUMENT, a
full queue or no worker (none left, or the one that had the request died and no other could take
it) 503 / UNAVAILABLE, a timeout 504 / DEADLINE_EXCEEDED, anything else 500
/ INTERNAL.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from ._dispatch import BAD_REQUEST, NOT_SERVED, TIMED_OUT, UNAVAILABLE
from ._errors import (NotServedError, RequestError, ServingError, ServingQueueFullError, ServingTimeoutError,
                      ServingUnavailableError, ServingWorkerLostError)
from ._proto import ms_service_pb2 as pb
from ._tensors import from_tensor, to_tensor

PLATFORM = "onnxruntime_onnx"  # Triton's platform name for an ONNX model on ONNX Runtime
DATATYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
BACKEND = "onnxruntime"
# Triton's statistics need per-model-version queue and compute times and counts of successes and failures
# that the dispatcher does not keep in that form; the metrics have what it keeps.
NO_STATISTICS = ("the statistics extension is not supported by this server; the HTTP server's GET /metrics has "
                 "its counters (requests, failures, request duration, queue and compute seconds, batch sizes) in "
                 "Prometheus text")
# Triton's model configuration names its datatypes otherwise (model_config.proto's DataType).
CONFIG_TYPES = {name: f"TYPE_{'STRING' if name == 'BYTES' else name}" for name in DATATYPES}


def datatype_of(dtype) -> str:
    """The KServe datatype of a numpy dtype ("" when it has none)."""
    if dtype is None:
        return ""
    dtype = np.dtype(dtype)
    if dtype.kind in "SUO":
        return "BYTES"
    return _NAMES.get(dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype, "")


def model_name(servable: str, method: str, methods) -> str:
    return servable if len(set(methods)) == 1 else f"{servable}.{method}"


# -- tensors ---------------------------------------------------------------------------------
def check_shape(shape, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"{where}: 'shape' must be a list of integers >= 0, got {shape!r:.80}")
    return tuple(shape)


def dtype_of(datatype, where: str) -> np.dtype:
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise RequestError(f"{where}: unknown datatype {datatype!r:.40}; expected one of {', '.join(DATATYPES)}")
    return dtype


def array_from_raw(raw, datatype: str, shape, where: str) -> np.ndarray:
    """A tensor from its raw bytes: elements row-major, little-endian; BYTES: each a 4-byte length, then the bytes."""
    dtype, shape = dtype_of(datatype, where), check_shape(shape, where)
    count = math.prod(shape)
    if datatype == "BYTES":
        view, values, offset = memoryview(raw), [], 0
        while offset < len(view):
            if offset + 4 > len(view):
                raise RequestError(f"{where}: BYTES data ends inside an element's 4-byte length")
            (size,) = struct.unpack_from("<I", view, offset)
            offset += 4
            if offset + size > len(view):
                raise RequestError(f"{where}: a BYTES element of {size} bytes runs past the end of the data")
            values.append(bytes(view[offset:offset + size]))
            offset += size
        if len(values) != count:
            raise RequestError(f"{where}: shape {list(shape)} has {count} elements; the BYTES data holds {len(values)}")
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    need = count * dtype.itemsize
    if len(raw) != need:
        raise RequestError(f"{where}: shape {list(shape)} of {datatype} needs {need} bytes; the data has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def raw_from_array(array: np.ndarray) -> bytes:
    if array.dtype == object:
        parts = []
        for value in array.reshape(-1):
            value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts.append(struct.pack("<I", len(value)))
            parts.append(value)
        return b"".join(parts)
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C").tobytes()


def array_from_list(data, datatype: str, shape, where: str) -> np.ndarray:
    """A tensor from JSON ``data``: its elements flat (or nested) in row-major order; BYTES as strings."""
    dtype, shape = dtype_of(datatype, where), check_shape(shape, where)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise RequestError(f"{where}: BYTES data in JSON must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = [v.encode("utf-8") for v in flat]
    else:
        flat = _flat(data)
        _check_json_types(flat, datatype, dtype, where)
        try:
            array = np.array(flat, dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise RequestError(f"{where}: 'data' is not a list of {datatype} values ({exc})") from None
    if array.size != math.prod(shape):
        raise RequestError(f"{where}: shape {list(shape)} has {math.prod(shape)} elements; 'data' has {array.size}")
    return array.reshape(shape)


def _flat(data: list) -> list:
    """The elements of JSON ``data``, nested lists opened in row-major order."""
    if not any(isinstance(v, list) for v in data):
        return data
    flat, stack = [], [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


# The JSON values each kind of datatype takes. numpy would cast the others quietly (1.5 to an INT32 1, 2 or
# "no" to a BOOL True, "1.5" to an FP32 1.5); like Triton, refuse them. bool is not an int here (JSON's
# true is no number), though Python makes it one.
_JSON_TYPES = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float)}
_JSON_WORDS = {"b": "true or false", "i": "integers", "u": "integers", "f": "numbers"}


def _check_json_types(flat: list, datatype: str, dtype: np.dtype, where: str) -> None:
    allowed = _JSON_TYPES[dtype.kind]
    if not all(type(v) in allowed for v in flat):  # noqa: E721 - exact types: bool must not pass as int
        index, value = next((i, v) for i, v in enumerate(flat) if type(v) not in allowed)  # noqa: E721
        raise RequestError(f"{where}: {datatype} data in JSON must be {_JSON_WORDS[dtype.kind]}; element {index} "
                           f"is {json.dumps(value)[:40]}")
    if dtype.kind in "iu" and flat:
        low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        if min(flat) < low or max(flat) > high:
            index, value = next((i, v) for i, v in enumerate(flat) if not low <= v <= high)
            raise RequestError(f"{where}: {datatype} data must be integers in [{low}, {high}]; element {index} is "
                               f"{value}")


def list_from_array(array: np.ndarray) -> list:
    """JSON ``data`` of a tensor: its elements flat, row-major; BYTES as strings."""
    flat = array.reshape(-1)
    if array.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


# -- models ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    name: str  # the KServe model name
    servable: str
    method: str
    version: int  # 0: the newest served (the request named none)
    signature: object  # the _dispatch.ServableSignature of the version that describes it


def _tensor_meta(names, tensors, batch: bool) -> list[dict]:
    if len(names) != len(tensors):
        return [{"name": n, "datatype": "", "shape": [-1]} for n in names]
    out = []
    for name, tensor in zip(names, tensors):
        shape = [d if d >= 0 else -1 for d in tensor.shape]
        if batch and shape:
            shape[0] = -1
        out.append({"name": name, "datatype": datatype_of(tensor.dtype), "shape": shape})
    return out


class KServeModels:
    """The KServe view of a dispatcher's servables (what both KServe fronts call)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def names(self) -> list[str]:
        names = []
        for servable, versions in sorted(self.dispatcher.known().items()):
            methods = {m for s in versions.values() for m in s.methods}
            names += [model_name(servable, m, methods) for m in sorted(methods)]
        return names

    def resolve(self, name: str, version: str = "", *, inference: bool = False) -> Model:
        """The model ``name`` [version]; NotServedError (404) for an unknown model or version (``inference``:
        counted in the metrics, as an unknown model's requests on the other fronts are)."""
        try:
            return self._resolve(name, version)
        except NotServedError:
            if inference and self.dispatcher.metrics is not None:
                self.dispatcher.metrics.unknown.inc()
            raise

    def _resolve(self, name: str, version: str) -> Model:
        known = self.dispatcher.known()

        def methods_of(servable):
            return {m for s in known.get(servable, {}).values() for m in s.methods}

        servable, method = None, None
        if name in known and len(methods_of(name)) == 1:
            servable, method = name, next(iter(methods_of(name)))
        elif "." in name:
            head, _, tail = name.rpartition(".")
            if tail in methods_of(head):
                servable, method = head, tail
        if servable is None:
            raise NotServedError(f"model {name!r} is not served here; models: {', '.join(self.names()) or 'none yet'}")
        versions = known[servable]
        with_method = sorted(v for v, s in versions.items() if method in s.methods)
        if version in ("", None):
            counts = self.dispatcher.backend_counts()
            live = [v for v in with_method if counts.get((servable, v))]
            return Model(name, servable, method, 0, versions[(live or with_method)[-1]])
        if not (isinstance(version, str) and version.isdigit() and int(version) in with_method):
            raise NotServedError(f"model {name!r} has no version {version!r}; versions: "
                                 f"{', '.join(map(str, with_method))}")
        return Model(name, servable, method, int(version), versions[int(version)])

    def ready(self, model: Model) -> bool:
        counts = self.dispatcher.backend_counts()
        if model.version:
            return counts.get((model.servable, model.version), 0) > 0
        return any(n for (s, v), n in counts.items() if s == model.servable)

    def server_ready(self) -> tuple[bool, str]:
        """(ready, why not): ready when something is served and every servable has a worker serving it."""
        counts = self.dispatcher.backend_counts()
        if not counts:
            return False, "no servable is served yet"
        down = sorted({s for (s, _), _n in counts.items()} - {s for (s, _), n in counts.items() if n})
        if down:
            return False, f"no worker serves {', '.join(down)} now"
        return True, ""

    def metadata(self, model: Model) -> dict:
        spec = model.signature
        inputs, outputs = spec.methods[model.method]
        versions = sorted(v for v, s in self.dispatcher.known()[model.servable].items() if model.method in s.methods)
        return {
            "name": model.name,
            "versions": [str(v) for v in versions],
            "platform": PLATFORM,
            "inputs": _tensor_meta(inputs, spec.model_inputs, spec.with_batch_dim),
            "outputs": _tensor_meta(outputs, spec.model_outputs, spec.with_batch_dim),
        }

    def config(self, model: Model) -> dict:
        """Triton's model configuration (its model_config.proto as JSON) of what is known about ``model``.

        ``max_batch_size``: the batcher's limit for a with_batch_dim servable (a request may still carry
        more rows: they run in several model runs), else 0; ``dims`` leave the batch dimension out when
        it is > 0, as Triton's do. The versions are every version served since the start.
        """
        spec = model.signature
        inputs, outputs = spec.methods[model.method]
        versions = sorted(v for v, s in self.dispatcher.known()[model.servable].items() if model.method in s.methods)
        batch = max(spec.max_batch, 1) if spec.with_batch_dim else 0

        def tensors(names, tensors):
            out = []
            for meta in _tensor_meta(names, tensors, spec.with_batch_dim):
                dims = meta["shape"][1:] if batch and len(names) == len(tensors) else meta["shape"]
                out.append({"name": meta["name"], "data_type": CONFIG_TYPES.get(meta["datatype"], "TYPE_INVALID"),
                            "dims": dims})
            return out

        return {"name": model.name, "platform": PLATFORM, "backend": BACKEND,
                "version_policy": {"specific": {"versions": versions}}, "max_batch_size": batch,
                "input": tensors(inputs, spec.model_inputs), "output": tensors(outputs, spec.model_outputs)}

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index: one entry per model version, READY or UNAVAILABLE (with the reason)."""
        counts = self.dispatcher.backend_counts()
        entries = []
        for servable, versions in sorted(self.dispatcher.known().items()):
            methods = {m for s in versions.values() for m in s.methods}
            for version, spec in sorted(versions.items()):
                ready = counts.get((servable, version), 0) > 0
                if ready_only and not ready:
                    continue
                for method in sorted(spec.methods):
                    entry = {"name": model_name(servable, method, methods), "version": str(version),
                             "state": "READY" if ready else "UNAVAILABLE"}
                    if not ready:
                        entry["reason"] = "no worker serves it now (its workers left or died)"
                    entries.append(entry)
        return entries

    # -- inference -----------------------------------------------------------------------------
    def infer(self, model: Model, inputs: list[tuple[str, np.ndarray]], timeout: float | None,
              wanted: list[str] | None = None) -> tuple[int, list[tuple[str, np.ndarray]]]:
        """(version that ran, [(output name, array)]) for the request's ``inputs``; raises the failure's type."""
        names, out_names = model.signature.methods[model.method]
        given = [n for n, _ in inputs]
        missing = [n for n in names if n not in given]
        extra = [n for n in given if n not in names]
        if missing or extra or len(set(given)) != len(given):
            raise RequestError(f"model {model.name} takes inputs {list(names)}; the request "
                               + "; ".join(p for p in (f"lacks {missing}" if missing else "",
                                                       f"has unknown {extra}" if extra else "",
                                                       "names an input twice" if len(set(given)) != len(given) else "")
                                           if p))
        if wanted is not None:
            unknown = [n for n in wanted if n not in out_names]
            if unknown:
                raise RequestError(f"model {model.name} has outputs {list(out_names)}; the request asks for {unknown}")
        request = pb.PredictRequest()
        request.servable_spec.name = model.servable
        request.servable_spec.version_number = model.version
        request.servable_spec.method_name = model.method
        batch = model.signature.with_batch_dim
        if batch:
            sizes = set()
            for name, array in inputs:
                if array.ndim == 0:
                    raise RequestError(f"input {name!r} has shape []; model {model.name} batches along dimension "
                                       f"0 (with_batch_dim=True): give shape [batch, ...]")
                sizes.add(array.shape[0])
            if len(sizes) != 1 or 0 in sizes:
                raise RequestError(f"inputs of model {model.name} must have the same batch size (dimension 0) > 0; "
                                   f"got {', '.join(f'{n}: {list(a.shape)}' for n, a in inputs)}")
            rows = sizes.pop()
            for i in range(rows):
                item = request.instances.add()
                for name, array in inputs:
                    to_tensor(_value(np.asarray(array[i])), item.items[name], name=f"input {name!r}")
        else:
            item = request.instances.add()
            for name, array in inputs:
                to_tensor(_value(array), item.items[name], name=f"input {name!r}")

        reply = self.dispatcher.predict(request, timeout)
        failures = [(i, e) for i, e in enumerate(reply.error_msg) if e.error_code]
        if failures:
            index, error = failures[0]
            text = bytes(error.error_msg).decode("utf-8", "replace")
            if len(reply.error_msg) > 1:
                text = f"row {index} of the batch: {text}"
            kind = {NOT_SERVED: NotServedError, BAD_REQUEST: RequestError, UNAVAILABLE: ServingUnavailableError,
                    TIMED_OUT: ServingTimeoutError}.get(error.error_code, ServingError)
            raise kind(text)
        per_instance = [{k: _array(from_tensor(t, f"output {k!r}")) for k, t in inst.items.items()}
                        for inst in reply.instances]
        outputs = []
        for name in (wanted if wanted else out_names):
            values = [inst[name] for inst in per_instance]
            if batch:
                if len({(v.shape, v.dtype) for v in values}) != 1:
                    raise ServingError(f"model {model.name}: output {name!r} differs in shape or dtype between the "
                                       f"rows of the batch; it cannot be stacked into one tensor")
                outputs.append((name, np.stack(values)))
            else:
                outputs.append((name, values[0]))
        return int(reply.servable_spec.version_number), outputs


def _value(array: np.ndarray):
    """What a method receives for a tensor: the array, or for BYTES its bytes (a list when there are several)."""
    if array.dtype != object:
        return array
    flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.reshape(-1)]
    return flat[0] if len(flat) == 1 else flat


def _array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes)):
        value = [value]
    if isinstance(value, list):
        array = np.empty(len(value), dtype=object)
        array[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in value]
        return array
    return np.asarray(value)


# -- statuses ----------------------------------------------------------------------------------
def status_of(exc: BaseException) -> int:
    """The HTTP status of a failure."""
    if isinstance(exc, NotServedError):
        return 404
    if isinstance(exc, RequestError):
        return 400
    if isinstance(exc, (ServingQueueFullError, ServingUnavailableError, ServingWorkerLostError)):
        return 503
    if isinstance(exc, ServingTimeoutError):
        return 504
    return 500


def grpc_code_of(exc: BaseException):
    import grpc

    return {404: grpc.StatusCode.NOT_FOUND, 400: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE,
            504: grpc.StatusCode.DEADLINE_EXCEEDED}.get(status_of(exc), grpc.StatusCode.INTERNAL)

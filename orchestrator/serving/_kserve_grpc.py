"""KServe v2's gRPC service (``inference.GRPCInferenceService``) over the dispatcher: what tritonclient.grpc calls.

Served beside MindSpore Serving's ``MSService`` on the same gRPC server (``master.start_grpc_server``).
Inputs come as ``raw_input_contents`` (tritonclient's way) or as typed ``contents``; outputs go back
as ``raw_output_contents``. Failures are gRPC status codes (``_kserve_models.grpc_code_of``) with
the error's text as details. Of Triton's extensions, ModelConfig and RepositoryIndex are served;
ModelStatistics answers UNIMPLEMENTED with the reason, and the RPCs not in our .proto (streaming,
shared memory, repository load/unload, trace, logging) get grpc's own UNIMPLEMENTED.
"""

from __future__ import annotations

import grpc
import numpy as np

from ._errors import RequestError, ServingError
from ._kserve_models import (NO_STATISTICS, KServeModels, array_from_raw, check_shape, datatype_of, dtype_of,
                             grpc_code_of, raw_from_array)
from ._proto import grpc_predict_v2_pb2 as pb
from ._proto import grpc_predict_v2_pb2_grpc as pb_grpc

# A call without a deadline reports ~2**63 ns remaining (tritonclient.grpc sets none unless asked):
# that is no deadline, not one to pass on (a cluster worker's call with it would expire at once).
NO_DEADLINE = 1e9
SERVER_NAME = "orchestrator"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orchestrator")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


SERVER_VERSION = _version()

# Which repeated field of InferTensorContents carries each datatype (FP16 only comes raw).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _timeout(request, context, default: float | None) -> float | None:
    timeout = default
    remaining = context.time_remaining()
    if remaining is not None and remaining < NO_DEADLINE and (timeout is None or remaining < timeout):
        timeout = remaining
    param = request.parameters.get("timeout")  # Triton's: microseconds
    if param is not None and param.WhichOneof("parameter_choice") in ("int64_param", "uint64_param"):
        micros = getattr(param, param.WhichOneof("parameter_choice"))
        if micros > 0 and (timeout is None or micros / 1e6 < timeout):
            timeout = micros / 1e6
    return timeout


def inputs_of(request: pb.ModelInferRequest) -> list[tuple[str, np.ndarray]]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"the request has {len(request.inputs)} inputs and {len(raw)} raw_input_contents; "
                           f"give one raw content per input, or none and each input's contents")
    arrays = []
    for i, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        if raw:
            arrays.append((tensor.name, array_from_raw(raw[i], tensor.datatype, list(tensor.shape), where)))
            continue
        dtype, shape = dtype_of(tensor.datatype, where), check_shape(list(tensor.shape), where)
        field = _CONTENTS.get(tensor.datatype)
        if field is None:
            raise RequestError(f"{where}: {tensor.datatype} comes only in raw_input_contents")
        values = list(getattr(tensor.contents, field))
        count = int(np.prod(shape, dtype=np.int64))
        if len(values) != count:
            raise RequestError(f"{where}: shape {list(shape)} has {count} elements; contents.{field} has {len(values)}")
        if tensor.datatype == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = values
        else:
            array = np.array(values, dtype=dtype)
        arrays.append((tensor.name, array.reshape(shape)))
    return arrays


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dispatcher, timeout: float | None = None):
        self.models = KServeModels(dispatcher)
        self._timeout = timeout

    def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.models.server_ready()[0])

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_configuration"])

    def _model(self, name, version, context, inference: bool = False):
        try:
            return self.models.resolve(name, version, inference=inference)
        except ServingError as exc:
            context.abort(grpc_code_of(exc), str(exc))

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=self.models.ready(self._model(request.name, request.version, context)))

    def ModelMetadata(self, request, context):  # noqa: N802
        meta = self.models.metadata(self._model(request.name, request.version, context))
        reply = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for field in ("inputs", "outputs"):
            for tensor in meta[field]:
                getattr(reply, field).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return reply

    def ModelConfig(self, request, context):  # noqa: N802
        config = self.models.config(self._model(request.name, request.version, context))
        reply = pb.ModelConfigResponse()
        out = reply.config
        out.name, out.platform, out.backend = config["name"], config["platform"], config["backend"]
        out.max_batch_size = config["max_batch_size"]
        out.version_policy.specific.versions.extend(config["version_policy"]["specific"]["versions"])
        for field, tensors in (("input", config["input"]), ("output", config["output"])):
            for tensor in tensors:
                getattr(out, field).add(name=tensor["name"], data_type=pb.DataType.Value(tensor["data_type"]),
                                        dims=tensor["dims"])
        return reply

    def RepositoryIndex(self, request, context):  # noqa: N802
        reply = pb.RepositoryIndexResponse()
        for entry in self.models.index(request.ready):
            reply.models.add(**entry)
        return reply

    def ModelStatistics(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_STATISTICS)

    def ModelInfer(self, request, context):  # noqa: N802
        model = self._model(request.model_name, request.model_version, context, inference=True)
        try:
            inputs = inputs_of(request)
            wanted = [o.name for o in request.outputs] or None
            version, outputs = self.models.infer(model, inputs, _timeout(request, context, self._timeout), wanted)
        except ServingError as exc:
            context.abort(grpc_code_of(exc), str(exc))
        reply = pb.ModelInferResponse(model_name=model.name, model_version=str(version), id=request.id)
        for name, array in outputs:
            reply.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=list(array.shape))
            reply.raw_output_contents.append(raw_from_array(array))
        return reply


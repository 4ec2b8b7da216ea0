"""Numpy arrays <-> MindSpore Serving's ``Tensor`` message (``ms_service.proto``), both directions.

A value of an instance is a numpy array (any shape, the dtypes of ``DataType``),
a Python scalar (sent as a shape-[1] array, as MindSpore Serving's client does),
``str`` (MS_STRING) or ``bytes`` (MS_BYTES). A received tensor of shape [] or
[1] comes back as a numpy scalar, strings and bytes as themselves (a list when
there are several): what MindSpore Serving's client returns.
"""

from __future__ import annotations

import math

import numpy as np

from ._errors import RequestError
from ._proto import ms_service_pb2 as pb

DTYPES = {
    pb.MS_BOOL: np.dtype(np.bool_),
    pb.MS_INT8: np.dtype(np.int8),
    pb.MS_UINT8: np.dtype(np.uint8),
    pb.MS_INT16: np.dtype(np.int16),
    pb.MS_UINT16: np.dtype(np.uint16),
    pb.MS_INT32: np.dtype(np.int32),
    pb.MS_UINT32: np.dtype(np.uint32),
    pb.MS_INT64: np.dtype(np.int64),
    pb.MS_UINT64: np.dtype(np.uint64),
    pb.MS_FLOAT16: np.dtype(np.float16),
    pb.MS_FLOAT32: np.dtype(np.float32),
    pb.MS_FLOAT64: np.dtype(np.float64),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
# The names REST's typed binaries use ({"type": "int16", ...}), MindSpore Serving's spelling.
TYPE_NAMES = {"bool": np.bool_, "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
              "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64,
              "fp16": np.float16, "float16": np.float16, "fp32": np.float32, "float32": np.float32,
              "fp64": np.float64, "float64": np.float64}


def to_tensor(value, tensor: pb.Tensor | None = None, name: str = "value") -> pb.Tensor:
    """Fill (or make) a ``Tensor`` message from an array, a scalar, ``str`` or ``bytes``."""
    tensor = pb.Tensor() if tensor is None else tensor
    if isinstance(value, (str, bytes)) or (isinstance(value, (list, tuple)) and value
                                           and all(isinstance(v, (str, bytes)) for v in value)):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        is_str = isinstance(values[0], str)
        tensor.dtype = pb.MS_STRING if is_str else pb.MS_BYTES
        tensor.shape.dims.extend([len(values)])
        tensor.bytes_val.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values)
        return tensor
    if isinstance(value, (bool, int, float, np.generic)) and not isinstance(value, np.ndarray):
        value = np.asarray([value])
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{name}: a {type(value).__name__} cannot be sent; give a numpy array, a number, str or bytes")
    code = CODES.get(value.dtype)
    if code is None:
        raise RequestError(f"{name}: dtype {value.dtype} cannot be sent; supported: "
                           f"{', '.join(str(d) for d in DTYPES.values())}, str, bytes")
    tensor.dtype = code
    tensor.shape.dims.extend(value.shape)
    tensor.data = np.asarray(value, order="C").tobytes()
    return tensor


def from_tensor(tensor: pb.Tensor, name: str = "value", *, scalars: bool = False):
    """The value a ``Tensor`` message carries; ``scalars``: shapes [] and [1] as a numpy scalar (the client's view)."""
    if tensor.WhichOneof("tensor_data") == "shm_data":
        raise RequestError(f"{name}: shared-memory tensors (shm_data) are not supported; send the data inline")
    dims = list(tensor.shape.dims)
    if tensor.dtype in (pb.MS_STRING, pb.MS_BYTES):
        values = [bytes(v).decode("utf-8", "replace") if tensor.dtype == pb.MS_STRING else bytes(v)
                  for v in tensor.bytes_val]
        return values[0] if len(values) == 1 else values
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise RequestError(f"{name}: unknown dtype code {tensor.dtype}; expected one of MS_BOOL .. MS_BYTES")
    if any(d < 0 for d in dims):
        raise RequestError(f"{name}: negative dimension in shape {dims}")
    expected = math.prod(dims) * dtype.itemsize
    if len(tensor.data) != expected:
        raise RequestError(f"{name}: shape {dims} of {dtype} needs {expected} bytes of data, the tensor has "
                           f"{len(tensor.data)}")
    # A writable copy: a method may change its inputs in place, as it may with MindSpore Serving's.
    array = np.frombuffer(bytearray(tensor.data), dtype=dtype).reshape(dims)
    if scalars and (not dims or dims == [1]):
        return array.reshape(1)[0]
    return array
